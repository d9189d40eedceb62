"""Plotly figure of SOLO's grid targets: the S × S grid of one level over an image, each object's
centre of mass and centre region, the positive cells, and the mask target of one cell's channel.

Every number comes from the model: the assignment of one image
(:class:`~instseg_edu.ops.grid_assign.SOLOImageTargets`, from ``SOLO.targets``), the centre
regions of :func:`~instseg_edu.ops.grid_assign.center_region` and the mask target of the selected
channel; this module only draws. Shared by ``notebooks/07_solo.py`` and
:class:`instseg_edu.widgets.solo_explorer.SOLOGridExplorer`.

Coordinates: SOLO places the grid over the padded image in pixel-index coordinates (the centre of
mass of pixels ``0..n-1`` is measured in indices), so centres and regions are drawn exactly where
the assignment sees them.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from instseg_edu.ops.grid_assign import SOLOImageTargets, center_region
from instseg_edu.structures import Target
from instseg_edu.viz.anchors import boxes_to_path, image_trace

__all__ = [
    "TRACE_NAMES",
    "cells_to_boxes",
    "grid_path",
    "positive_channels",
    "solo_grid_figure",
    "solo_grid_traces",
]

#: The figure's traces, in order; ``solo_grid_traces`` returns the data of all but the image.
TRACE_NAMES = (
    "image",
    "grid",
    "centre regions",
    "centres",
    "positive cells",
    "selected cell",
    "mask target",
)


def grid_path(num_grid: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``S + 1`` horizontal and vertical grid lines as one polyline (``NaN`` pen lifts)."""
    xs, ys = [], []
    for k in range(num_grid + 1):
        y, x = k * height / num_grid, k * width / num_grid
        xs += [0.0, width, np.nan, x, x, np.nan]
        ys += [y, y, np.nan, 0.0, height, np.nan]
    return np.array(xs), np.array(ys)


def cells_to_boxes(cells: Tensor, num_grid: int, height: int, width: int) -> Tensor:
    """Grid cells ``int [K, 2]`` ``(i, j)`` → their rectangles ``float [K, 4]`` xyxy in pixels."""
    i, j = cells[:, 0].double(), cells[:, 1].double()
    ch, cw = height / num_grid, width / num_grid
    return torch.stack([j * cw, i * ch, (j + 1) * cw, (i + 1) * ch], dim=1)  # [K, 4]


def positive_channels(assigned: SOLOImageTargets, level: int) -> list[int]:
    """Mask channels ``k = i · S + j`` trained on ``level`` (ascending)."""
    return (assigned.gt_index[level] >= 0).nonzero().flatten().tolist()


def solo_grid_traces(
    target: Target,
    assigned: SOLOImageTargets,
    level: int,
    num_grid: int,
    sigma: float,
    mask_target: Tensor,
    channel: int | None = None,
) -> list[dict]:
    """Data of every trace but the image, in :data:`TRACE_NAMES` order.

    Args:
        target: the image's ground truth, masks ``bool [G, Hp, Wp]`` over the padded image.
        assigned: the image's :class:`~instseg_edu.ops.grid_assign.SOLOImageTargets` (e.g.
            ``model.targets(outputs, batch).per_image[0]``).
        level: which level to draw; ``num_grid`` its ``S``, ``sigma`` the centre-region factor used.
        mask_target: ``float [h, w]``, the mask target of ``channel`` at the level's mask size
            (as in ``SOLOTargets.ins_masks``); zeros when it has none.
        channel: the mask channel to highlight (a positive one), or ``None``.
    """
    hp, wp = target.masks.shape[-2:]
    gx, gy = grid_path(num_grid, hp, wp)
    hit = assigned.levels[:, level]  # [G]
    centers = assigned.centers[hit]  # [G', 2] (y, x)
    rx, ry = boxes_to_path(center_region(centers, target.boxes[hit], sigma))  # [G', 4] xyxy
    owners = assigned.gt_index[level]  # [S²], NO_GT where no object
    positive = (owners >= 0).nonzero().flatten()  # [K]
    cells = torch.stack([positive // num_grid, positive % num_grid], dim=1)  # [K, 2] (i, j)
    px, py = boxes_to_path(cells_to_boxes(cells, num_grid, hp, wp))

    if channel is None:
        sx, sy = np.array([np.nan]), np.array([np.nan])
    else:
        cell = torch.tensor([[channel // num_grid, channel % num_grid]])
        sx, sy = boxes_to_path(cells_to_boxes(cell, num_grid, hp, wp))
    z = mask_target.detach().float().cpu().numpy()
    return [
        {"x": gx, "y": gy},
        {"x": rx, "y": ry},
        {"x": centers[:, 1].numpy(), "y": centers[:, 0].numpy()},
        {"x": px, "y": py},
        {"x": sx, "y": sy},
        {"z": z},
    ]


def solo_grid_figure(image: Tensor, data: list[dict], height: int = 440) -> go.Figure:
    """Left: the image, grid, centres, centre regions (dashed), positive cells (filled) and the
    selected cell (yellow). Right: the selected channel's mask target.

    Args:
        image: ``float [3, Hp, Wp]`` in ``[0, 1]``, the padded image the grid lies over.
        data: the traces' data, :func:`solo_grid_traces` of the image's assignment.
        height: the figure's height in pixels.
    """
    fig = make_subplots(1, 2, column_widths=[0.6, 0.4], subplot_titles=("grid", "mask target"))
    fig.add_trace(image_trace(image.cpu(), name="image", hoverinfo="skip"), 1, 1)
    styles = [
        go.Scatter(mode="lines", line={"color": "white", "width": 0.6}, hoverinfo="skip"),
        go.Scatter(mode="lines", line={"color": "orange", "dash": "dash"}),
        go.Scatter(mode="markers", marker={"color": "orange", "size": 7}),
        go.Scatter(
            mode="lines", fill="toself", line={"color": "deepskyblue", "width": 1}, opacity=0.5
        ),  # fmt: skip
        go.Scatter(mode="lines", line={"color": "yellow", "width": 3}),
    ]
    for name, style, d in zip(TRACE_NAMES[1:6], styles, data[:5]):
        style.update(name=name, **d)
        fig.add_trace(style, 1, 1)
    fig.add_trace(
        go.Heatmap(name="mask target", colorscale="gray", showscale=False, **data[5]), 1, 2
    )
    # Square pixels; the plot area shrinks to the image instead of padding the axis range.
    fig.update_xaxes(constrain="domain")
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain", row=1, col=1)
    fig.update_yaxes(autorange="reversed", scaleanchor="x2", constrain="domain", row=1, col=2)
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig
