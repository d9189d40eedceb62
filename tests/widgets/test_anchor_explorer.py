"""AnchorExplorer, headless: set a control, check what is sent to the browser and that it is exactly
what AnchorGenerator gives when called directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from instseg_edu.widgets.anchor_explorer import AnchorExplorer  # noqa: E402
from widget_messages import sent_messages, sent_traces  # noqa: E402

from instseg_edu.ops.anchors import AnchorGenerator  # noqa: E402
from instseg_edu.ops.boxes import box_iou  # noqa: E402
from instseg_edu.viz.anchors import boxes_to_path, iou_binned_paths  # noqa: E402

STRIDES = (8, 16, 32, 64, 128)


def _explorer():
    image = torch.zeros(3, 128, 128)
    gt = torch.tensor([[40.0, 40.0, 90.0, 80.0], [10.0, 100.0, 22.0, 112.0]])
    return AnchorExplorer(image, gt, torch.tensor([0, 1]), ("a", "b"))


def assert_path_equal(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=float), expected, rtol=0, atol=1e-4)


def test_octave_base_scale_reaches_browser_and_equals_generator():
    ex = _explorer()
    before = [np.asarray(t.x, dtype=float).copy() for t in ex.figure.data[1:6]]
    msgs = sent_messages(ex.figure)
    ex.octave_base_scale.value = 6.0

    # Direct call of the library: the explorer draws the anchors of the cell under (64, 64).
    gen = AnchorGenerator(STRIDES, (0.5, 1.0, 2.0), octave_base_scale=6.0, scales_per_octave=3)
    sizes = [(math.ceil(128 / s), math.ceil(128 / s)) for s in STRIDES]
    anchors = gen.grid_anchors(sizes)
    picked = []
    for (h, w), s, a, lvl in zip(sizes, STRIDES, gen.num_base_anchors, anchors):
        i, j = min(64 // s, h - 1), min(64 // s, w - 1)
        picked.append(lvl[(i * w + j) * a : (i * w + j + 1) * a])
    boxes = torch.cat(picked)  # [45, 4]
    iou = box_iou(boxes, ex.gt_boxes).amax(dim=1)
    expected = iou_binned_paths(boxes, iou)

    after = [np.asarray(t.x, dtype=float) for t in ex.figure.data[1:6]]
    assert any(
        b.shape != a.shape or not np.allclose(b, a, equal_nan=True) for b, a in zip(before, after)
    )
    for trace, (x, y) in zip(ex.figure.data[1:6], expected):
        assert_path_equal(trace.x, x)
        assert_path_equal(trace.y, y)
    # ... and that is what went to the browser.
    sent = sent_traces(msgs)
    assert sent, "no update message was sent"
    for k, props in sent.items():
        assert_path_equal(props["x"], expected[k - 1][0])
    # Golden: stride 8, cell (8, 8), ratio 0.5, scale 6: w = 8·√2·6, h = 8/√2·6, centre (64, 64).
    hw, hh = 8 * math.sqrt(2) * 6 / 2, 8 / math.sqrt(2) * 6 / 2
    torch.testing.assert_close(
        ex.anchors[0][(8 * 16 + 8) * 9], torch.tensor([64 - hw, 64 - hh, 64 + hw, 64 + hh])
    )
    # every drawn box appears once: 5 levels x 9 anchors, 5 corner points each
    assert (
        sum(np.isfinite(np.asarray(t.x, dtype=float)).sum() for t in ex.figure.data[1:6]) == 45 * 5
    )


def test_scales_per_octave_changes_counts_per_level():
    ex = _explorer()
    msgs = sent_messages(ex.figure)
    ex.scales_per_octave.value = 2
    # 3 ratios x 2 scales = 6 anchors per cell on 16², 8², 4², 2², 1² cells.
    assert list(ex.figure.data[-1].y) == [1536, 384, 96, 24, 6]
    assert sent_traces(msgs)[len(ex.figure.data) - 1]["y"] == [1536, 384, 96, 24, 6]
    gen = AnchorGenerator(STRIDES, (0.5, 1.0, 2.0), octave_base_scale=4.0, scales_per_octave=2)
    assert [len(a) for a in ex.anchors] == [
        len(a) for a in gen.grid_anchors([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])
    ]


def test_level_view_draws_one_level_sparsely():
    ex = _explorer()
    ex.view.value = "level"
    ex.level.value = 0
    assert all(len(idx) == 0 for idx in ex.shown[1:])
    # 16x16 cells, at most 100 drawn: every 2nd cell in both directions -> 8x8 cells x 9 anchors
    assert len(ex.shown[0]) == 64 * 9
    x, _ = boxes_to_path(ex.anchors[0][ex.shown[0]])
    drawn = sum(np.isfinite(np.asarray(t.x, dtype=float)).sum() for t in ex.figure.data[1:6])
    assert drawn == np.isfinite(x).sum() == 64 * 9 * 5


def test_center_offset_moves_anchors_by_half_a_stride():
    ex = _explorer()
    first = ex.anchors[0][0].clone()
    ex.center_offset.value = 0.5
    torch.testing.assert_close(ex.anchors[0][0], first + 4.0)


def test_invalid_config_explains_and_keeps_figure():
    ex = _explorer()
    before = [np.asarray(t.x, dtype=float).copy() for t in ex.figure.data[1:6]]
    msgs = sent_messages(ex.figure)
    ex.ratios.value = ()
    assert "ratios" in ex.message.value
    assert msgs == []
    for b, t in zip(before, ex.figure.data[1:6]):
        np.testing.assert_array_equal(b, np.asarray(t.x, dtype=float))
    ex.ratios.value = ("1.0",)
    assert ex.message.value == ""
    assert ex.generator.num_base_anchors == [3] * 5


def test_strides_preset_rebuilds_levels():
    ex = _explorer()
    ex.level.value = 4
    ex.strides.value = (8, 16, 32)
    assert ex.level.value == -1  # level 4 no longer exists
    assert list(ex.figure.data[-1].x) == ["stride 8", "stride 16", "stride 32"]
    assert len(ex.anchors) == 3


def test_displays_as_its_container():
    ex = _explorer()
    bundle = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "instseg-anchor-explorer" in ex.widget._dom_classes


def test_ground_truth_is_drawn_on_top_of_the_anchors():
    ex = _explorer()
    gt = ex.figure.data[6]
    assert gt.name == "ground truth" and gt.type == "scattergl"
    x, y = boxes_to_path(ex.gt_boxes)
    assert_path_equal(gt.x, x)
    assert_path_equal(gt.y, y)
    assert list(gt.text[:6]) == ["gt 0: a"] * 6
