"""SOLOGridExplorer, headless: move a control, check that the FigureWidget sends exactly what
``solo_target_single`` (the function the loss's targets come from) assigns."""

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from instseg_edu.widgets.solo_explorer import SOLOGridExplorer  # noqa: E402

from instseg_edu.models.solo import (  # noqa: E402
    SOLO_R18_SMALL,
    resize_masks,
    solo_target_single,
)
from instseg_edu.structures import Target  # noqa: E402
from instseg_edu.viz.anchors import boxes_to_path  # noqa: E402
from instseg_edu.viz.solo import TRACE_NAMES, cells_to_boxes  # noqa: E402

HEAD = SOLO_R18_SMALL.bbox_head  # grids (12, 10, 8, 6, 4)
CELLS, SELECTED, MASK = (
    TRACE_NAMES.index(n) for n in ("positive cells", "selected cell", "mask target")
)


class Sent:
    """Records the Plotly.update messages a FigureWidget sends to its frontend."""

    def __init__(self, figure):
        self.messages = []
        figure.observe(self._record, names=["_py2js_update"])

    def _record(self, change):
        if change["new"] is not None:
            self.messages.append(change["new"])

    def value(self, index, prop):
        for message in reversed(self.messages):
            if index in message["style_traces"] and prop in message["style_data"]:
                value = message["style_data"][prop][message["style_traces"].index(index)]
                if type(value).__name__ != "Undefined":
                    return np.array(value, dtype=float)
        raise AssertionError(f"nothing sent for trace {index}.{prop}")


def _square_target() -> tuple[torch.Tensor, Target]:
    """128² image, an 80×80 square at rows/columns 24..103 (levels 0 and 1)."""
    masks = torch.zeros(1, 128, 128, dtype=torch.bool)
    masks[0, 24:104, 24:104] = True
    target = Target(torch.tensor([[24.0, 24, 104, 104]]), torch.tensor([1]), masks)
    return torch.rand(3, 128, 128), target


def _expected_cells_path(sigma, level, scale_ranges=HEAD.scale_ranges):
    _, t = _square_target()
    out = solo_target_single(t.boxes, t.labels, t.masks, num_grids=HEAD.num_grids,
                             scale_ranges=scale_ranges, sigma=sigma)  # fmt: skip
    s = HEAD.num_grids[level]
    k = (out.gt_inds[level] >= 0).nonzero().flatten()
    cells = torch.stack([k // s, k % s], dim=1)
    return boxes_to_path(cells_to_boxes(cells, s, 128, 128))[0], k.tolist()


def test_sigma_slider_sends_the_library_assignment():
    explorer = SOLOGridExplorer(*_square_target(), head=HEAD)
    sent = Sent(explorer.figure)
    before = np.array(explorer.figure.data[CELLS].x, dtype=float)
    x_02, k_02 = _expected_cells_path(0.2, 0)
    np.testing.assert_array_equal(before, x_02)
    assert k_02 == [65, 66, 77, 78]  # the golden case of tests/models/test_solo.py

    explorer.sigma.value = 1.0  # region = the whole box, clamped to the centre cell ± 1: 9 cells
    x_10, k_10 = _expected_cells_path(1.0, 0)
    assert len(k_10) == 9
    np.testing.assert_array_equal(sent.value(CELLS, "x"), x_10)
    assert [v for _, v in explorer.channel.options] == k_10


def test_level_scale_range_and_channel_controls():
    explorer = SOLOGridExplorer(*_square_target(), head=HEAD)
    sent = Sent(explorer.figure)
    explorer.level.value = 1
    assert explorer.scale_range.value == HEAD.scale_ranges[1]
    x_l1, k_l1 = _expected_cells_path(0.2, 1)
    assert k_l1 == [44, 45, 54, 55]
    np.testing.assert_array_equal(sent.value(CELLS, "x"), x_l1)

    # Picking channel 55 = cell (5, 5) of S = 10 moves the yellow cell there; its mask target is
    # the object's mask at the level's mask size (32×32; the same mask as channel 44's, so the
    # heatmap itself need not be re-sent).
    explorer.channel.value = 55
    cell = cells_to_boxes(torch.tensor([[5, 5]]), 10, 128, 128)
    np.testing.assert_array_equal(sent.value(SELECTED, "x"), boxes_to_path(cell)[0])
    expected = resize_masks(explorer.target.masks, (32, 32))[0].numpy()
    np.testing.assert_array_equal(np.array(explorer.figure.data[MASK].z, dtype=float), expected)

    # Narrow level 1's scale range below the square's scale (80): no positive cell is left.
    explorer.scale_range.value = (100.0, 192.0)
    ranges = list(HEAD.scale_ranges)
    ranges[1] = (100.0, 192.0)
    x_none, k_none = _expected_cells_path(0.2, 1, tuple(ranges))
    assert k_none == [] and explorer.channel.options == ()
    np.testing.assert_array_equal(sent.value(CELLS, "x"), x_none)
    assert explorer.head == replace(HEAD, scale_ranges=tuple(ranges))
    assert "0 positive" in explorer.summary.value
