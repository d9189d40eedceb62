"""Plotly figures of anchors: an image, its ground truth and anchors coloured by their best IoU.

Everything here is a plain function of tensors, shared by the notebooks and by
:class:`instseg_edu.widgets.AnchorExplorer`; the anchors themselves always come from
:class:`instseg_edu.ops.anchors.AnchorGenerator` (the generator the RetinaNet head uses).

Drawing tens of thousands of rectangles as separate shapes is slow in the browser, so boxes are
drawn as **one path per colour**: the corners of every box in a single ``Scattergl`` line
trace, with a ``NaN`` between boxes to lift the pen. A figure therefore has a fixed number of
traces, and an explorer update only replaces their ``x``/``y`` arrays.

Pixel convention: a box ``(x1, y1, x2, y2)`` is in continuous pixel coordinates (pixel ``(0, 0)``
covers ``[0, 1] x [0, 1]``), so the image is placed with its first pixel centred at ``(0.5, 0.5)``.

Taught in ``notebooks/02_anchors.py``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from torch import Tensor

from instseg_edu.ops.boxes import box_iou

__all__ = [
    "IOU_BIN_COLORS",
    "IOU_BIN_EDGES",
    "anchor_counts_trace",
    "anchor_figure",
    "best_iou",
    "boxes_to_path",
    "gt_boxes_trace",
    "image_layout",
    "image_trace",
    "image_to_data_uri",
    "iou_binned_paths",
    "location_anchor_indices",
    "shapes_sample",
    "sparse_level_indices",
]

IOU_BIN_EDGES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.5, 0.7, 1.0)
"""Anchors are coloured by which of these IoU bins their best IoU falls in (last bin closed)."""

IOU_BIN_COLORS: tuple[str, ...] = ("#bdbdbd", "#6baed6", "#fdae6b", "#e6550d", "#a50f15")

GT_COLOR = "#00d26a"


def shapes_sample(
    index: int = 0, image_size: int = 512, seed: int = 0, split: str = "train"
) -> tuple[Tensor, Tensor, Tensor]:
    """One image of the procedural shapes dataset, drawn in memory (nothing is written).

    Returns:
        ``(image float32 [3, H, W] in [0, 1], boxes float32 [G, 4] xyxy, labels int64 [G])``;
        boxes are the tight boxes of the visible masks, as in the dataset's COCO JSON.
    """
    from instseg_edu.data.shapes import CLASSES, render_image

    scene, shapes = render_image(seed, split, index, image_size)
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255  # [H, W, 3] -> [3, H, W]
    boxes = []
    for mask in scene.masks:  # [H, W] bool
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # pixel edges, like COCO
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)  # [G, 4]
    labels = torch.tensor([CLASSES.index(shapes[k].kind) for k in scene.kept], dtype=torch.long)
    return image, boxes_t, labels


def image_to_data_uri(image: Tensor) -> str:
    """``float [3, H, W]`` in ``[0, 1]`` (or ``uint8``) -> a PNG ``data:`` URI (small to send)."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = image.permute(1, 2, 0).cpu().numpy()  # [3, H, W] -> [H, W, 3]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_trace(image: Tensor, **kwargs) -> go.Image:
    """The image as a plotly ``Image`` trace, pixel ``(0, 0)`` covering ``[0, 1]²``."""
    return go.Image(source=image_to_data_uri(image), x0=0.5, y0=0.5, dx=1, dy=1, **kwargs)


def image_layout(title: str, height: int, width_px: int, height_px: int, domain) -> dict:
    """``fig.update_layout`` arguments of a figure whose first axes show an image
    (:func:`image_trace`) of ``width_px x height_px`` pixels: y down, square pixels, no grid, the
    x axis spanning ``domain`` (a fraction of the figure's width)."""
    return {
        "title": title,
        "height": height,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
        "xaxis": {"domain": domain, "range": [0, width_px], "showgrid": False, "zeroline": False},
        "yaxis": {"range": [height_px, 0], "scaleanchor": "x", "showgrid": False,
                  "zeroline": False},
    }  # fmt: skip


def boxes_to_path(boxes: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Corners of every box as one polyline, ``NaN`` between boxes.

    Args:
        boxes: ``float [N, 4]`` xyxy.

    Returns:
        ``(x, y)``, each ``float64 [N * 6]``: per box ``x1, x2, x2, x1, x1, NaN`` (and the matching
        ``y``), i.e. a closed rectangle and a pen lift. No boxes give a single ``NaN`` point: an
        empty WebGL trace keeps plotly.js from drawing the WebGL traces after it.
    """
    b = boxes.detach().to("cpu", torch.float64).reshape(-1, 4)  # [N, 4]
    if b.shape[0] == 0:
        return np.array([np.nan]), np.array([np.nan])
    x1, y1, x2, y2 = b.unbind(dim=1)  # [N] each
    nan = torch.full_like(x1, float("nan"))
    x = torch.stack([x1, x2, x2, x1, x1, nan], dim=1).reshape(-1)  # [N, 6] -> [N*6]
    y = torch.stack([y1, y1, y2, y2, y1, nan], dim=1).reshape(-1)  # [N, 6] -> [N*6]
    return x.numpy(), y.numpy()


def best_iou(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """``float [N]``: each anchor's highest IoU with any ground truth (0 without ground truth)."""
    if gt_boxes.numel() == 0:
        return torch.zeros(anchors.shape[0], dtype=anchors.dtype, device=anchors.device)
    return box_iou(anchors, gt_boxes).amax(dim=1)  # [N, G] -> [N]


def iou_bin_index(iou: Tensor, edges: Sequence[float] = IOU_BIN_EDGES) -> Tensor:
    """``int64 [N]``: bin ``k`` holds ``edges[k] <= iou < edges[k+1]`` (the last bin is closed)."""
    inner = torch.tensor(edges[1:-1], dtype=iou.dtype, device=iou.device)
    return torch.bucketize(iou, inner, right=True)


def iou_binned_paths(
    anchors: Tensor, iou: Tensor, edges: Sequence[float] = IOU_BIN_EDGES
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ``(x, y)`` path (see :func:`boxes_to_path`) per IoU bin, low to high."""
    bins = iou_bin_index(iou, edges)  # [N]
    return [boxes_to_path(anchors[bins == k]) for k in range(len(edges) - 1)]


def iou_bin_names(edges: Sequence[float] = IOU_BIN_EDGES) -> list[str]:
    return [f"IoU {lo:.1f}–{hi:.1f}" for lo, hi in zip(edges[:-1], edges[1:])]


def gt_boxes_trace(
    gt_boxes: Tensor, labels: Tensor | None = None, class_names: Sequence[str] | None = None
) -> go.Scatter:
    """Ground-truth boxes as one thick green path, hover text naming each box's index and class."""
    x, y = boxes_to_path(gt_boxes)
    names = []
    for k in range(gt_boxes.shape[0]):
        name = f"gt {k}"
        if labels is not None:
            label = int(labels[k])
            name += f": {class_names[label] if class_names else label}"
        names.extend([name] * 6)
    if gt_boxes.shape[0] == 0:
        names = [""]  # matches the single NaN point of an empty path
    # WebGL like the anchor paths: drawn after them, it stays on top of them.
    return go.Scattergl(
        x=x,
        y=y,
        mode="lines",
        line={"color": GT_COLOR, "width": 3},
        name="ground truth",
        text=names,
        hoverinfo="text",
    )


def location_anchor_indices(
    featmap_sizes: Sequence[tuple[int, int]],
    strides: Sequence[float],
    num_base_anchors: Sequence[int],
    x: float,
    y: float,
) -> list[Tensor]:
    """Indices (into each level's ``grid_anchors``) of the anchors of the cell under ``(x, y)``.

    The cell of pixel ``(x, y)`` on a level of stride ``s`` is ``(i, j) = (y // s, x // s)``
    (clamped to the map), and its ``A`` anchors are rows ``(i * W + j) * A + a``: the row, column,
    anchor order of the generator.

    Returns:
        One ``int64 [A]`` tensor per level.
    """
    out = []
    for (h, w), s, a in zip(featmap_sizes, strides, num_base_anchors):
        i = min(max(int(y // s), 0), h - 1)
        j = min(max(int(x // s), 0), w - 1)
        out.append((i * w + j) * a + torch.arange(a))  # [A]
    return out


def sparse_level_indices(featmap_size: tuple[int, int], num_base_anchors: int, max_cells: int):
    """Indices of the anchors of every ``k``-th cell in both directions (at most ``max_cells``).

    Drawing all 36 864 anchors of a 64×64 stride-8 map hides everything; every k-th cell shows the
    tiling. Returns ``int64 [n * A]`` in generator order.
    """
    h, w = featmap_size
    k = 1
    while ((h + k - 1) // k) * ((w + k - 1) // k) > max_cells:
        k += 1
    rows = torch.arange(0, h, k)
    cols = torch.arange(0, w, k)
    cells = (rows[:, None] * w + cols[None, :]).reshape(-1)  # [n] cell index i * W + j
    a = num_base_anchors
    return (cells[:, None] * a + torch.arange(a)[None, :]).reshape(-1)  # [n, A] -> [n*A]


def anchor_counts_trace(counts: Sequence[int], strides: Sequence[float]) -> go.Bar:
    """Anchors per level (``H * W * A``) as bars."""
    names = [f"stride {int(s)}" for s in strides]
    return go.Bar(
        x=names,
        y=list(counts),
        text=[f"{c:,}" for c in counts],
        textposition="auto",
        marker_color="#4c78a8",
        name="anchors per level",
        showlegend=False,
        xaxis="x2",
        yaxis="y2",
    )


def anchor_figure(
    image: Tensor,
    gt_boxes: Tensor,
    anchors: Tensor,
    anchor_iou: Tensor,
    counts: Sequence[int],
    strides: Sequence[float],
    *,
    gt_labels: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
    height: int = 560,
) -> go.Figure:
    """Image + ground truth + anchors coloured by best IoU (left), anchors per level (right).

    Trace order (fixed, so an explorer can update in place): ``0`` image, ``1 .. B`` one path per
    IoU bin (:data:`IOU_BIN_EDGES`), ``B+1`` ground truth (on top), ``B+2`` anchors per level.

    Args:
        image: ``float [3, H, W]`` in ``[0, 1]``.
        gt_boxes: ``float [G, 4]`` xyxy.
        anchors: ``float [N, 4]`` the anchors to draw.
        anchor_iou: ``float [N]`` their best IoU (see :func:`best_iou`).
        counts: anchors per level in the whole pyramid.
        strides: stride per level.
    """
    h, w = image.shape[-2:]
    fig = go.Figure()
    fig.add_trace(image_trace(image, hoverinfo="skip"))
    for (x, y), name, color in zip(
        iou_binned_paths(anchors, anchor_iou), iou_bin_names(), IOU_BIN_COLORS
    ):
        fig.add_trace(
            go.Scattergl(
                x=x,
                y=y,
                mode="lines",
                line={"color": color, "width": 1},
                name=name,
                hoverinfo="skip",
            )
        )
    fig.add_trace(gt_boxes_trace(gt_boxes, gt_labels, class_names))
    fig.add_trace(anchor_counts_trace(counts, strides))
    fig.update_layout(
        **image_layout(title, height, w, h, [0, 0.68]),
        xaxis2={"domain": [0.76, 1.0], "anchor": "y2"},
        yaxis2={"domain": [0.55, 1.0], "anchor": "x2", "type": "log", "title": "anchors"},
        legend={"x": 0.76, "y": 0.45, "xanchor": "left", "yanchor": "top"},
        plot_bgcolor="white",
    )
    return fig
