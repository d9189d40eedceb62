"""Plotly figures for RoIPool versus RoIAlign (used by ``RoIExplorer`` and notebook 05).

Everything drawn is computed by ``instseg_edu.ops.roi``: the quantized cells RoIPool max-pools
(``roi_pool_cells``), RoIAlign's real-valued bins and bilinear sample points
(``roi_align_sampling_points``), both outputs (``roi_pool_reference``, ``roi_align_reference``) and
RoIPool's misalignment in image pixels (``roipool_misalignment``).

Drawing convention: feature cell ``(i, j)`` covers image pixels ``[j / s, (j + 1) / s) ×
[i / s, (i + 1) / s)`` for ``spatial_scale = s``; its value is drawn at the cell's centre.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from instseg_edu.ops.roi import (
    RoIAlignSamples,
    RoIPoolCells,
    RoIPoolMisalignment,
    roi_align_reference,
    roi_align_sampling_points,
    roi_pool_cells,
    roi_pool_reference,
    roipool_misalignment,
)

__all__ = [
    "RoIComparison",
    "TRACE_NAMES",
    "compare_roi_ops",
    "misalignment_text",
    "roi_comparison_figure",
    "roi_comparison_traces",
    "synthetic_feature_map",
    "synthetic_image",
]

# The figure's traces, in order; the explorer updates them in place by index.
TRACE_NAMES = (
    "feature map",
    "RoI",
    "RoIPool: rounded RoI",
    "RoIPool: bin cells",
    "RoIAlign: bins",
    "RoIAlign: samples",
    "RoIAlign: samples off the map (read 0)",
    "RoIPool output",
    "RoIAlign output",
    "RoIAlign − RoIPool",
)


class RoIComparison(NamedTuple):
    """Both ops on one RoI and the geometry they used (all from ``instseg_edu.ops.roi``)."""

    feature: Tensor  # [H, W] the displayed channel
    roi: Tensor  # [5] (batch_index, x1, y1, x2, y2) in image pixels
    spatial_scale: float
    cells: RoIPoolCells  # K = 1
    samples: RoIAlignSamples  # K = 1
    pool: Tensor  # [PH, PW] roi_pool_reference on the displayed channel
    align: Tensor  # [PH, PW] roi_align_reference on the displayed channel
    misalignment: RoIPoolMisalignment  # K = 1


@functools.lru_cache(maxsize=4)
def synthetic_image(size: int = 512) -> Tensor:
    """A ``[size, size]`` float image in [0, 1]: a disc, a bar and a soft blob on a gentle ramp.

    Sharp edges make RoIPool's shifted cells visible; the ramp keeps every bin different.
    """
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    u, v = xx / size, yy / size  # [size, size] in (0, 1)
    disc = ((u - 0.35) ** 2 + (v - 0.4) ** 2 < 0.2**2).float()
    bar = ((u > 0.62) & (u < 0.7) & (v > 0.15) & (v < 0.85)).float()
    blob = torch.exp(-((u - 0.78) ** 2 + (v - 0.78) ** 2) / 0.01)
    return (0.15 * (u + v) + 0.8 * torch.maximum(disc, bar) + 0.5 * blob).clamp(0, 1)


def synthetic_feature_map(stride: int, size: int = 512) -> Tensor:
    """``synthetic_image(size)`` average-pooled by ``stride``: a ``[1, 1, size/stride, ...]`` map.

    A stand-in for an FPN level whose cell ``(i, j)`` summarises image pixels
    ``[j·stride, (j+1)·stride) × [i·stride, (i+1)·stride)``.
    """
    image = synthetic_image(size)[None, None]  # [1, 1, size, size] (cached: do not modify)
    return F.avg_pool2d(image, stride)  # [1, 1, size/stride, size/stride]


def compare_roi_ops(
    features: Tensor,
    roi,
    output_size: int | tuple[int, int] = 7,
    spatial_scale: float = 1 / 16,
    sampling_ratio: int = 2,
    aligned: bool = True,
    channel: int = 0,
) -> RoIComparison:
    """Run RoIPool and RoIAlign on one RoI with the library functions.

    Args:
        features: ``[B, C, H, W]``, ``[C, H, W]`` or ``[H, W]`` float feature map.
        roi: ``(x1, y1, x2, y2)`` or ``(batch_index, x1, y1, x2, y2)`` in image pixels.
        channel: which channel to pool and show.
    """
    while features.dim() < 4:
        features = features[None]  # -> [B, C, H, W]
    features = features.float()
    roi = torch.as_tensor(roi, dtype=torch.float32).flatten()
    if roi.numel() == 4:
        roi = torch.cat([roi.new_zeros(1), roi])  # [5]
    batch_index = int(roi[0])
    rois = roi[None]  # [1, 5]
    fmap = features[batch_index : batch_index + 1, channel : channel + 1]  # [1, 1, H, W]
    height, width = fmap.shape[-2:]
    local_rois = rois.clone()
    local_rois[:, 0] = 0  # fmap holds only the chosen image
    return RoIComparison(
        feature=fmap[0, 0],
        roi=roi,
        spatial_scale=spatial_scale,
        cells=roi_pool_cells(rois, output_size, spatial_scale, featmap_size=(height, width)),
        samples=roi_align_sampling_points(
            rois, output_size, spatial_scale, sampling_ratio, aligned, featmap_size=(height, width)
        ),
        pool=roi_pool_reference(fmap, local_rois, output_size, spatial_scale)[0, 0],
        align=roi_align_reference(
            fmap, local_rois, output_size, spatial_scale, sampling_ratio, aligned
        )[0, 0],
        misalignment=roipool_misalignment(rois, output_size, spatial_scale),
    )


def _rectangles(boxes: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``[N, 4]`` xyxy boxes -> one polyline (x, y arrays) with NaN gaps between the boxes."""
    x1, y1, x2, y2 = boxes.reshape(-1, 4).double().unbind(1)  # each [N]
    gap = torch.full_like(x1, float("nan"))
    xs = torch.stack([x1, x2, x2, x1, x1, gap], dim=1)  # [N, 6] corners, closed, then a gap
    ys = torch.stack([y1, y1, y2, y2, y1, gap], dim=1)  # [N, 6]
    return xs.flatten().numpy(), ys.flatten().numpy()  # [6N]


def roi_comparison_traces(cmp: RoIComparison) -> list[dict]:
    """The data of every trace of ``roi_comparison_figure``, in ``TRACE_NAMES`` order.

    Plain dicts (lists and nested lists) so a FigureWidget can be updated with them in place.
    """
    step = 1.0 / cmp.spatial_scale  # image pixels per cell
    x1, y1, x2, y2 = cmp.roi[1:].tolist()
    roi_x, roi_y = _rectangles(torch.tensor([x1, y1, x2, y2]))
    rounded_x, rounded_y = _rectangles(cmp.cells.roi_image[0])
    nonempty = cmp.cells.bins_image[0][~cmp.cells.empty[0]]  # [bins, 4]
    cells_x, cells_y = _rectangles(nonempty)
    bins_x, bins_y = _rectangles(cmp.samples.bins_image[0])
    points = cmp.samples.points[0]  # [PH, PW, G, 2]
    inside = points[cmp.samples.inside[0]]  # [n, 2]
    outside = points[cmp.samples.real[0] & ~cmp.samples.inside[0]]  # [m, 2]
    diff = cmp.align - cmp.pool  # [PH, PW]
    low, high = float(cmp.feature.min()), float(cmp.feature.max())
    # numpy arrays travel to the browser as typed arrays: much faster than nested lists
    return [
        dict(
            z=cmp.feature.numpy(),
            x0=0.5 * step,
            dx=step,
            y0=0.5 * step,
            dy=step,
            zmin=low,
            zmax=high,
        ),
        dict(x=roi_x, y=roi_y),
        dict(x=rounded_x, y=rounded_y),
        dict(x=cells_x, y=cells_y),
        dict(x=bins_x, y=bins_y),
        dict(x=inside[:, 0].numpy(), y=inside[:, 1].numpy()),
        dict(x=outside[:, 0].numpy(), y=outside[:, 1].numpy()),
        # one colour scale for the map and both outputs, so equal values look equal
        dict(z=cmp.pool.numpy(), zmin=low, zmax=high),
        dict(z=cmp.align.numpy(), zmin=low, zmax=high),
        dict(z=diff.numpy(), zmin=-float(diff.abs().max()), zmax=float(diff.abs().max())),
    ]


def misalignment_text(cmp: RoIComparison) -> str:
    """One-paragraph HTML summary of RoIPool's misalignment for this RoI, in image pixels."""
    m = cmp.misalignment
    bx1, by1, bx2, by2 = m.boundary_px[0].tolist()
    ex, ey = m.bin_edge_px[0].tolist()
    lx, ly = m.lost_px[0].tolist()
    gw, gh = cmp.samples.grid[0].tolist()
    return (
        f"<b>RoIPool</b> reads cells whose outer edges are off by "
        f"x1 {bx1:+.1f}, y1 {by1:+.1f}, x2 {bx2:+.1f}, y2 {by2:+.1f} px; "
        f"its bin edges are off by up to {ex:.1f} px (x) and {ey:.1f} px (y). "
        f"Textbook floor model: {lx:.1f} × {ly:.1f} px of the RoI not pooled. "
        f"<b>RoIAlign</b>: 0 px, {gw}×{gh} samples per bin. "
        f"Mean |RoIAlign − RoIPool| = {float((cmp.align - cmp.pool).abs().mean()):.3f}."
    )


def roi_comparison_figure(cmp: RoIComparison, height: int = 460):
    """A plotly ``go.Figure``: the map with both ops' geometry, then the two outputs and their
    difference (``RoIAlign − RoIPool``)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=4,
        column_widths=[0.46, 0.18, 0.18, 0.18],
        subplot_titles=("feature map, RoI and bins", "RoIPool", "RoIAlign", "RoIAlign − RoIPool"),
        horizontal_spacing=0.05,
    )
    data = roi_comparison_traces(cmp)
    line = dict(mode="lines", hoverinfo="skip")
    traces = [
        go.Heatmap(colorscale="Viridis", showscale=False, **data[0]),
        go.Scatter(line=dict(color="white", width=3), **line, **data[1]),
        go.Scatter(line=dict(color="orange", width=2, dash="dash"), **line, **data[2]),
        go.Scatter(line=dict(color="orange", width=1), opacity=0.8, **line, **data[3]),
        go.Scatter(line=dict(color="deepskyblue", width=1), **line, **data[4]),
        go.Scatter(mode="markers", marker=dict(color="deepskyblue", size=4), **data[5]),
        go.Scatter(mode="markers", marker=dict(color="red", size=5, symbol="x"), **data[6]),
        go.Heatmap(colorscale="Viridis", showscale=False, **data[7]),
        go.Heatmap(colorscale="Viridis", showscale=False, **data[8]),
        go.Heatmap(colorscale="RdBu", showscale=True, **data[9]),
    ]
    columns = [1] * 7 + [2, 3, 4]
    for trace, name, col in zip(traces, TRACE_NAMES, columns):
        trace.name = name
        fig.add_trace(trace, row=1, col=col)
    for col in range(1, 5):
        anchor = "x" if col == 1 else f"x{col}"
        # square cells; "domain" shrinks the panel instead of padding the axis range
        fig.update_yaxes(
            autorange="reversed", scaleanchor=anchor, constrain="domain", row=1, col=col
        )
        fig.update_xaxes(constrain="domain", row=1, col=col)
    fig.update_layout(
        height=height,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", y=-0.08, bgcolor="lightgray"),
        uirevision="roi",
    )
    return fig
