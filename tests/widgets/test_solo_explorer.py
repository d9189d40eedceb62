"""SOLOGridExplorer, headless: move a control, check that the FigureWidget sends exactly what the
model's own ``targets`` (the call its loss makes) assigns, and its mask targets."""

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from instseg_edu.widgets.solo_explorer import SOLOGridExplorer  # noqa: E402

from instseg_edu.models.solo import SOLO_R18_SMALL, build_solo, center_region  # noqa: E402
from instseg_edu.structures import Batch, Target  # noqa: E402
from instseg_edu.viz.anchors import boxes_to_path  # noqa: E402
from instseg_edu.viz.solo import TRACE_NAMES, cells_to_boxes  # noqa: E402

CFG = SOLO_R18_SMALL.with_num_classes(2)
HEAD = CFG.bbox_head  # grids (12, 10, 8, 6, 4)
REGIONS, CELLS, SELECTED, MASK = (
    TRACE_NAMES.index(n)
    for n in ("centre regions", "positive cells", "selected cell", "mask target")
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_solo(CFG)


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


def _own_targets(model, sigma=HEAD.sigma, scale_ranges=HEAD.scale_ranges):
    """The targets of a SOLO built with this head config, sharing the model's weights."""
    own = build_solo(replace(CFG, bbox_head=replace(HEAD, sigma=sigma, scale_ranges=scale_ranges)))
    own.load_state_dict(model.state_dict())
    image, t = _square_target()
    batch = Batch(image[None], [(128, 128)], [t])
    with torch.no_grad():
        return own.targets(own(batch.images), batch)


def _expected_cells_path(model, sigma, level, scale_ranges=HEAD.scale_ranges):
    out = _own_targets(model, sigma, scale_ranges).per_image[0]
    s = HEAD.num_grids[level]
    k = (out.gt_inds[level] >= 0).nonzero().flatten()
    cells = torch.stack([k // s, k % s], dim=1)
    return boxes_to_path(cells_to_boxes(cells, s, 128, 128))[0], k.tolist()


def test_sigma_slider_sends_the_models_assignment(model):
    explorer = SOLOGridExplorer(model, *_square_target())
    sent = Sent(explorer.figure)
    before = np.array(explorer.figure.data[CELLS].x, dtype=float)
    x_02, k_02 = _expected_cells_path(model, 0.2, 0)
    np.testing.assert_array_equal(before, x_02)
    assert k_02 == [65, 66, 77, 78]  # the golden case of tests/models/test_solo.py

    explorer.sigma.value = 1.0  # region = the whole box, clamped to the centre cell ± 1: 9 cells
    x_10, k_10 = _expected_cells_path(model, 1.0, 0)
    assert len(k_10) == 9
    np.testing.assert_array_equal(sent.value(CELLS, "x"), x_10)
    assert [v for _, v in explorer.channel.options] == k_10
    # the dashed centre region is the model's center_region: the whole 80 px box
    a = explorer.assigned
    region = center_region(a.centers, explorer.target.boxes, 1.0)
    np.testing.assert_array_equal(sent.value(REGIONS, "x"), boxes_to_path(region)[0])
    assert region[0, 2] - region[0, 0] == 80


def test_level_scale_range_and_channel_controls(model):
    explorer = SOLOGridExplorer(model, *_square_target())
    sent = Sent(explorer.figure)
    explorer.level.value = 1
    assert explorer.scale_range.value == HEAD.scale_ranges[1]
    x_l1, k_l1 = _expected_cells_path(model, 0.2, 1)
    assert k_l1 == [44, 45, 54, 55]
    np.testing.assert_array_equal(sent.value(CELLS, "x"), x_l1)

    # Picking channel 55 = cell (5, 5) of S = 10 moves the yellow cell there; its mask target is
    # the model's: row 3 of ins_masks (channels 44, 45, 54, 55), at the size of the model's level-1
    # mask logits (32×32; the same mask as channel 44's, so the heatmap need not be re-sent).
    explorer.channel.value = 55
    cell = cells_to_boxes(torch.tensor([[5, 5]]), 10, 128, 128)
    np.testing.assert_array_equal(sent.value(SELECTED, "x"), boxes_to_path(cell)[0])
    own = _own_targets(model)
    assert own.pos_inds[1].tolist() == [44, 45, 54, 55]
    expected = own.ins_masks[1][3].numpy()
    assert (
        expected.shape == explorer.mask_size(1) == tuple(explorer.outputs.mask_logits[1].shape[-2:])
    )
    np.testing.assert_array_equal(np.array(explorer.figure.data[MASK].z, dtype=float), expected)

    # Narrow level 1's scale range below the square's scale (80): no positive cell is left.
    explorer.scale_range.value = (100.0, 192.0)
    ranges = list(HEAD.scale_ranges)
    ranges[1] = (100.0, 192.0)
    x_none, k_none = _expected_cells_path(model, 0.2, 1, tuple(ranges))
    assert k_none == [] and explorer.channel.options == ()
    np.testing.assert_array_equal(sent.value(CELLS, "x"), x_none)
    assert explorer.head == replace(HEAD, scale_ranges=tuple(ranges))
    assert "0 positive" in explorer.summary.value
