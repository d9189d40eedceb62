"""AssignerExplorer, headless: it shows the model's own targets; set a control, check what is sent
to the browser and that it is exactly what the model's ``targets`` gives with that config."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from instseg_edu.widgets.assigner_explorer import AssignerExplorer  # noqa: E402
from widget_messages import sent_messages, sent_traces  # noqa: E402

from instseg_edu.models.retinanet import RETINANET_R18_SMALL, build_retinanet  # noqa: E402
from instseg_edu.models.yolact import YOLACT_R18_SMALL, build_yolact  # noqa: E402
from instseg_edu.ops.assign import (  # noqa: E402
    LOW_QUALITY_POSITIVE,
    POSITIVE,
    assignment_summary,
)
from instseg_edu.structures import Batch, Target  # noqa: E402
from instseg_edu.viz.anchors import boxes_to_path  # noqa: E402
from instseg_edu.viz.assign import iou_histogram, reason_paths  # noqa: E402

# gt 0 is large (IoU >= 0.5 with some anchor); gt 1 is a 10x4 sliver no anchor fits.
GT = torch.tensor([[32.0, 32.0, 96.0, 96.0], [10.0, 10.0, 20.0, 14.0]])
LABELS = torch.tensor([0, 1])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_retinanet(RETINANET_R18_SMALL.with_num_classes(2))


def _explorer(model, image=None):
    image = torch.zeros(3, 128, 128) if image is None else image
    return AssignerExplorer(model, image, GT, LABELS, ("big", "tiny"))


def _own_targets(model, image, **assigner):
    """What the model's loss trains on, from a model built with the changed config."""
    train_cfg = model.cfg.train_cfg
    assigner = replace(train_cfg.assigner, **assigner)
    cfg = replace(model.cfg, train_cfg=replace(train_cfg, assigner=assigner))
    own = type(model)(cfg)
    own.load_state_dict(model.state_dict())
    h, w = image.shape[-2:]
    pad = (-h % 32, -w % 32)
    images = torch.nn.functional.pad(image, (0, pad[1], 0, pad[0]))[None]
    target = Target(GT, LABELS, torch.zeros(2, h + pad[0], w + pad[1], dtype=torch.bool))
    batch = Batch(images, [(h, w)], [target])
    own.eval()
    with torch.no_grad():
        return own.targets(own(images), batch), own


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=float), expected, atol=1e-4)


def test_the_assignment_shown_is_the_models_own_targets(model):
    image = torch.rand(3, 100, 120)  # padded to 128 x 128: padding anchors are ignored
    ex = _explorer(model, image)
    expected, _ = _own_targets(model, image)
    for got, want in zip(ex.assignment, expected.assignment):
        assert torch.equal(got, want[0])
    assert torch.equal(ex.targets.labels, expected.labels)
    a = model.cfg.train_cfg.assigner  # the controls start at the model's config
    assert (ex.pos_iou_thr.value, ex.neg_iou_thr.value, ex.min_pos_iou.value) == (
        a.pos_iou_thr,
        a.neg_iou_thr,
        a.min_pos_iou,
    )
    assert model.cfg.train_cfg.assigner == a and model.training  # the model is left as it was


def test_pos_iou_thr_reaches_browser_and_equals_the_models_targets(model):
    ex = _explorer(model)
    before = np.asarray(ex.figure.data[7].x, dtype=float).copy()
    msgs = sent_messages(ex.figure)
    ex.pos_iou_thr.value = 0.7

    targets, own = _own_targets(model, torch.zeros(3, 128, 128), pos_iou_thr=0.7)
    a = type(ex.assignment)(*(f[0] for f in targets.assignment))
    s = assignment_summary(a, 2)
    assert torch.equal(ex.assignment.gt_inds, a.gt_inds)
    assert torch.equal(ex.assignment.reason, a.reason)
    # reason paths: every non-negative anchor is drawn
    keep = ex.drawn
    assert bool(keep[a.reason != 0].all())
    anchors = own.anchors(own(torch.zeros(1, 3, 128, 128)).featmap_sizes, "cpu")
    for trace, (x, y) in zip(ex.figure.data[1:5], reason_paths(anchors[keep], a.reason[keep])):
        _close(trace.x, x)
        _close(trace.y, y)
    _, counts = iou_histogram(a.max_iou)
    assert list(ex.figure.data[6].y) == counts.tolist()
    assert list(ex.figure.data[10].y) == s.pos_per_gt.tolist()
    # the pos_iou_thr line moved from 0.5 to 0.7, in the data sent to the browser
    assert before[0] == 0.5
    sent = sent_traces(msgs)
    assert np.asarray(sent[7]["x"], dtype=float)[0] == pytest.approx(0.7)
    assert np.asarray(ex.figure.data[7].x, dtype=float)[0] == pytest.approx(0.7)


def test_a_yolact_model_brings_its_own_assigner():
    torch.manual_seed(0)
    yolact = build_yolact(YOLACT_R18_SMALL.with_num_classes(2))
    ex = _explorer(yolact)
    assert ex.gt_max_assign_all.value is False  # YOLACT's config: one best anchor per object
    expected, _ = _own_targets(yolact, torch.zeros(3, 128, 128))
    assert torch.equal(ex.assignment.gt_inds, expected.assignment.gt_inds[0])
    assert sum(ex.level_sizes) == 3 * (256 + 64 + 16 + 4 + 1)  # 3 anchors per cell


def test_low_quality_rescue_and_unmatched_warning(model):
    ex = _explorer(model)
    # The sliver's best anchor has IoU < 0.4, so only step 4 makes it positive.
    tiny = ex.assignment.gt_inds == 2
    assert tiny.any()
    assert bool((ex.assignment.reason[tiny] == LOW_QUALITY_POSITIVE).all())
    assert "no positive anchor" not in ex.warning.value
    msgs = sent_messages(ex.figure)
    ex.match_low_quality.value = False
    assert not (ex.assignment.gt_inds == 2).any()
    assert ex.summary.pos_per_gt[1] == 0
    assert "no positive anchor for: gt 1 (tiny, 10×4 px)" in ex.warning.value
    assert list(ex.figure.data[10].y) == ex.summary.pos_per_gt.tolist()
    assert sent_traces(msgs)[10]["y"][1] == 0
    # the 64x64 box is matched by threshold: 16·4·1 = 64 px square anchors of stride 16 fit it
    assert int((ex.assignment.reason == POSITIVE).sum()) == int(ex.summary.pos_per_gt[0])


def test_min_pos_iou_blocks_the_rescue(model):
    ex = _explorer(model)
    a = ex.assignment
    best_tiny = float(a.max_iou[a.gt_inds == 2].max())
    assert 0 < best_tiny < 0.4
    ex.min_pos_iou.value = round(best_tiny + 0.01, 2)
    assert ex.summary.pos_per_gt[1] == 0
    ex.min_pos_iou.value = round(best_tiny - 0.01, 2)
    assert ex.summary.pos_per_gt[1] >= 1


def test_level_filter_only_changes_what_is_drawn(model):
    ex = _explorer(model)
    gt_inds = ex.assignment.gt_inds.clone()
    ex.level.value = 1
    torch.testing.assert_close(ex.assignment.gt_inds, gt_inds)
    assert bool((ex.anchor_level[ex.drawn] == 1).all())


def test_invalid_thresholds_explain_and_keep_figure(model):
    ex = _explorer(model)
    msgs = sent_messages(ex.figure)
    ex.neg_iou_thr.value = 0.8
    assert "neg_iou_thr" in ex.warning.value and "pos_iou_thr" in ex.warning.value
    assert msgs == []


def test_counts_per_reason_match_summary(model):
    ex = _explorer(model)
    s = assignment_summary(ex.assignment, 2, level_sizes=ex.level_sizes)
    assert ex.summary.counts.tolist() == s.counts.tolist()
    assert int(s.counts.sum()) == 9 * (256 + 64 + 16 + 4 + 1)
    assert "instseg-assigner-explorer" in ex.widget._dom_classes


def test_ground_truth_is_drawn_on_top_of_the_anchors(model):
    ex = _explorer(model)
    gt = ex.figure.data[5]
    assert gt.name == "ground truth" and gt.type == "scattergl"
    x, _ = boxes_to_path(GT)
    np.testing.assert_allclose(np.asarray(gt.x, dtype=float), x)
