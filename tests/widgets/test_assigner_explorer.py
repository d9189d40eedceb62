"""AssignerExplorer, headless: set a control, check what is sent to the browser and that it is
exactly what max_iou_assign / assignment_summary give when called directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from instseg_edu.widgets.assigner_explorer import AssignerExplorer  # noqa: E402
from widget_messages import sent_messages, sent_traces  # noqa: E402

from instseg_edu.ops.anchors import AnchorGenerator  # noqa: E402
from instseg_edu.ops.assign import (  # noqa: E402
    LOW_QUALITY_POSITIVE,
    POSITIVE,
    assignment_summary,
    max_iou_assign,
)
from instseg_edu.viz.anchors import boxes_to_path  # noqa: E402
from instseg_edu.viz.assign import iou_histogram, reason_paths  # noqa: E402

STRIDES = (8, 16, 32, 64, 128)
# gt 0 is large (IoU >= 0.5 with some anchor); gt 1 is a 10x4 sliver no anchor fits.
GT = torch.tensor([[32.0, 32.0, 96.0, 96.0], [10.0, 10.0, 20.0, 14.0]])


def _explorer(**kw):
    return AssignerExplorer(
        torch.zeros(3, 128, 128), GT, torch.tensor([0, 1]), ("big", "tiny"), **kw
    )


def _direct_anchors():
    gen = AnchorGenerator(STRIDES, (0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
    return torch.cat(gen.grid_anchors([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]))


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=float), expected, atol=1e-4)


def test_pos_iou_thr_reaches_browser_and_equals_max_iou_assign():
    ex = _explorer()
    before = np.asarray(ex.figure.data[7].x, dtype=float).copy()
    msgs = sent_messages(ex.figure)
    ex.pos_iou_thr.value = 0.7

    anchors = _direct_anchors()
    a = max_iou_assign(
        anchors,
        GT,
        torch.tensor([0, 1]),
        pos_iou_thr=0.7,
        neg_iou_thr=0.4,
        min_pos_iou=0.0,
        match_low_quality=True,
        gt_max_assign_all=True,
    )
    s = assignment_summary(a, 2)
    torch.testing.assert_close(ex.assignment.gt_inds, a.gt_inds)
    torch.testing.assert_close(ex.assignment.reason, a.reason)
    # reason paths: every non-negative anchor is drawn
    keep = ex.drawn
    assert bool(keep[a.reason != 0].all())
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


def test_low_quality_rescue_and_unmatched_warning():
    ex = _explorer()
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


def test_min_pos_iou_blocks_the_rescue():
    ex = _explorer()
    a = max_iou_assign(
        _direct_anchors(),
        GT,
        torch.tensor([0, 1]),
        pos_iou_thr=0.5,
        neg_iou_thr=0.4,
        min_pos_iou=0.0,
    )
    best_tiny = float(a.max_iou[a.gt_inds == 2].max())
    assert 0 < best_tiny < 0.4
    ex.min_pos_iou.value = round(best_tiny + 0.01, 2)
    assert ex.summary.pos_per_gt[1] == 0
    ex.min_pos_iou.value = round(best_tiny - 0.01, 2)
    assert ex.summary.pos_per_gt[1] >= 1


def test_level_filter_only_changes_what_is_drawn():
    ex = _explorer()
    gt_inds = ex.assignment.gt_inds.clone()
    ex.level.value = 1
    torch.testing.assert_close(ex.assignment.gt_inds, gt_inds)
    assert bool((ex.anchor_level[ex.drawn] == 1).all())


def test_invalid_thresholds_explain_and_keep_figure():
    ex = _explorer()
    msgs = sent_messages(ex.figure)
    ex.neg_iou_thr.value = 0.8
    assert "neg_iou_thr" in ex.warning.value and "pos_iou_thr" in ex.warning.value
    assert msgs == []


def test_counts_per_reason_match_summary():
    ex = _explorer()
    s = assignment_summary(ex.assignment, 2, level_sizes=ex.level_sizes)
    assert ex.summary.counts.tolist() == s.counts.tolist()
    assert int(s.counts.sum()) == 9 * (256 + 64 + 16 + 4 + 1)
    assert "instseg-assigner-explorer" in ex.widget._dom_classes


def test_ground_truth_is_drawn_on_top_of_the_anchors():
    ex = _explorer()
    gt = ex.figure.data[5]
    assert gt.name == "ground truth" and gt.type == "scattergl"
    x, _ = boxes_to_path(GT)
    np.testing.assert_allclose(np.asarray(gt.x, dtype=float), x)
