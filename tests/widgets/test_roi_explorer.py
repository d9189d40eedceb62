"""RoIExplorer, headless: set a control, check what its FigureWidget sends to the browser."""

import statistics
import time

import numpy as np
import pytest
import torch
import torchvision.ops as tvo

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from instseg_edu.widgets.roi_explorer import RoIExplorer  # noqa: E402

from instseg_edu.ops.roi import (  # noqa: E402
    roi_align_reference,
    roi_align_sampling_points,
    roi_pool_reference,
    roipool_misalignment,
)
from instseg_edu.viz.roi import TRACE_NAMES, synthetic_feature_map  # noqa: E402


class Sent:
    """Records the Plotly.update messages a FigureWidget sends to its frontend."""

    def __init__(self, figure):
        self.messages = []
        figure.observe(self._record, names=["_py2js_update"])

    def _record(self, change):
        if change["new"] is not None:
            self.messages.append(change["new"])

    def value(self, trace_name, prop):
        """The last value sent for ``prop`` of the named trace."""
        index = TRACE_NAMES.index(trace_name)
        for message in reversed(self.messages):
            if index in message["style_traces"] and prop in message["style_data"]:
                value = message["style_data"][prop][message["style_traces"].index(index)]
                if not type(value).__name__ == "Undefined":
                    return np.array(value)  # a copy: the message's arrays are read-only
        raise AssertionError(f"nothing sent for {trace_name}.{prop}")


def rois_of(explorer):
    return torch.tensor([[0.0, *explorer.roi]])


def test_moving_the_roi_sends_the_library_outputs():
    explorer = RoIExplorer(roi=(90.0, 70.0, 330.0, 262.0), output_size=7, sampling_ratio=2)
    sent = Sent(explorer.figure)
    before = explorer.figure.data[TRACE_NAMES.index("RoIPool output")].z.copy()

    explorer.x1.value = 130.0
    assert sent.messages, "changing x1 sent nothing to the browser"
    features = synthetic_feature_map(16)  # the default map at spatial_scale 1/16
    rois = rois_of(explorer)
    pool = torch.as_tensor(sent.value("RoIPool output", "z"))
    align = torch.as_tensor(sent.value("RoIAlign output", "z"))
    assert not torch.equal(pool, torch.as_tensor(before))
    torch.testing.assert_close(pool, roi_pool_reference(features, rois, 7, 1 / 16)[0, 0])
    torch.testing.assert_close(pool, tvo.roi_pool(features, rois, 7, 1 / 16)[0, 0])
    torch.testing.assert_close(
        align, roi_align_reference(features, rois, 7, 1 / 16, 2, False)[0, 0]
    )
    torch.testing.assert_close(align, tvo.roi_align(features, rois, 7, 1 / 16, 2, False)[0, 0])
    torch.testing.assert_close(torch.as_tensor(sent.value("RoIAlign − RoIPool", "z")), align - pool)
    # The white RoI outline starts at the new x1.
    assert sent.value("RoI", "x")[0] == 130.0


def test_aligned_and_sampling_controls_move_the_sample_points():
    explorer = RoIExplorer(sampling_ratio=2, aligned=False)
    sent = Sent(explorer.figure)
    explorer.aligned.value = True
    explorer.sampling_ratio.value = 0  # adaptive
    samples = roi_align_sampling_points(
        rois_of(explorer), 7, 1 / 16, 0, True, featmap_size=(32, 32)
    )
    points = samples.points[0][samples.inside[0]]  # [n, 2]
    x = torch.as_tensor(sent.value("RoIAlign: samples", "x"), dtype=points.dtype)
    y = torch.as_tensor(sent.value("RoIAlign: samples", "y"), dtype=points.dtype)
    assert len(x) == int(samples.inside.sum()) == 49 * 3 * 2  # ceil(240/16/7) × ceil(192/16/7)
    torch.testing.assert_close(torch.stack([x, y], dim=1), points)
    features = synthetic_feature_map(16)
    torch.testing.assert_close(
        torch.as_tensor(sent.value("RoIAlign output", "z")),
        tvo.roi_align(features, rois_of(explorer), 7, 1 / 16, 0, True)[0, 0],
    )


def test_spatial_scale_repools_the_synthetic_map_and_label_reports_misalignment():
    explorer = RoIExplorer()
    sent = Sent(explorer.figure)
    explorer.spatial_scale.value = 1 / 32
    assert explorer.features.shape == (1, 1, 16, 16)
    assert torch.as_tensor(sent.value("feature map", "z")).shape == (16, 16)
    mis = roipool_misalignment(rois_of(explorer), 7, 1 / 32)
    x1, y1, x2, y2 = mis.boundary_px[0].tolist()
    assert f"x2 {x2:+.1f}" in explorer.misalignment.value
    assert f"{mis.bin_edge_px[0, 0].item():.1f} px (x)" in explorer.misalignment.value


def test_user_tensor_and_channel():
    torch.manual_seed(0)
    features = torch.randn(3, 20, 24)
    explorer = RoIExplorer(features=features, roi=(8.0, 8.0, 120.0, 90.0), spatial_scale=1 / 8)
    sent = Sent(explorer.figure)
    explorer.channel.value = 2
    rois = rois_of(explorer)
    torch.testing.assert_close(
        torch.as_tensor(sent.value("RoIPool output", "z")),
        tvo.roi_pool(features[None], rois, 7, 1 / 8)[0, 2],
    )
    explorer.output_size.value = 3
    torch.testing.assert_close(
        torch.as_tensor(sent.value("RoIAlign output", "z")),
        tvo.roi_align(features[None], rois, 3, 1 / 8, 2, False)[0, 2],
    )


def test_update_is_interactive():
    explorer = RoIExplorer()
    times = []
    for i in range(6):
        start = time.perf_counter()
        explorer.x2.value = 300.0 + 5 * i
        times.append(time.perf_counter() - start)
    # The target is < 100 ms; the bound leaves room for a loaded CI machine.
    assert statistics.median(times) < 0.3
    assert "application/vnd.jupyter.widget-view+json" in explorer._repr_mimebundle_()
