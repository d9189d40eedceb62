"""Figures of a training run: loss terms, learning rate, throughput, positives per image,
prediction thumbnails, and the object crops the backbone is pretrained on.

Plain functions of the :class:`instseg_edu.engine.train.History` rows (one dict per step with
``step``, ``lr``, ``img_s``, ``loss``, every ``loss_*`` term and statistics such as ``num_pos``),
shared by :class:`instseg_edu.widgets.TrainingDashboard`, the notebooks and the CLI.

Taught in ``notebooks/04_retinanet.py``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = [
    "PANELS",
    "crops_figure",
    "detection_thumbnail",
    "ema",
    "history_columns",
    "panel_of",
    "training_figure",
]

PANELS: tuple[str, ...] = ("losses", "learning rate", "images / s", "positives per image")
"""Subplots of :func:`training_figure`, row-major in a 2×2 grid."""

_PANEL_AXES = {0: ("x", "y"), 1: ("x2", "y2"), 2: ("x3", "y3"), 3: ("x4", "y4")}


def panel_of(key: str) -> int | None:
    """Which panel draws a history key (``None``: not drawn)."""
    if key == "loss" or key.startswith("loss_"):
        return 0
    return {"lr": 1, "img_s": 2, "num_pos": 3}.get(key)


def history_columns(rows: Sequence[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for every drawn key present in ``rows`` (History.steps)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if panel_of(key) is None or value is None:
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(int(row["step"]))
            values.append(float(value))
    return out


def ema(values: Sequence[float], smoothing: float) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing slider).

    ``s_t = smoothing * s_{t-1} + (1 - smoothing) * v_t``, divided by ``1 - smoothing**t`` so the
    curve starts at the first value; ``smoothing=0`` returns the values unchanged.
    """
    v = np.asarray(values, dtype=np.float64)
    if smoothing <= 0 or v.size == 0:
        return v
    out = np.empty_like(v)
    acc = 0.0
    for t, x in enumerate(v, start=1):
        acc = smoothing * acc + (1 - smoothing) * x
        out[t - 1] = acc / (1 - smoothing**t)
    return out


def training_figure(height: int = 520, log_loss: bool = True) -> go.Figure:
    """An empty 2×2 dashboard (losses, lr, img/s, positives per image); traces are added per key."""
    fig = go.Figure()
    domains = {
        0: ([0, 0.47], [0.56, 1]),
        1: ([0.55, 1], [0.56, 1]),
        2: ([0, 0.47], [0, 0.42]),
        3: ([0.55, 1], [0, 0.42]),
    }
    layout = {}
    for i, title in enumerate(PANELS):
        xa, ya = _PANEL_AXES[i]
        xd, yd = domains[i]
        sx = "" if i == 0 else str(i + 1)
        layout[f"xaxis{sx}"] = {"domain": xd, "anchor": ya, "title": "step" if i >= 2 else None}
        layout[f"yaxis{sx}"] = {"domain": yd, "anchor": xa, "title": title}
    layout["yaxis"]["type"] = "log" if log_loss else "linear"
    fig.update_layout(
        height=height,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        legend={"x": 0.0, "y": 1.08, "orientation": "h"},
        **layout,
    )
    return fig


def series_trace(key: str, steps: Sequence[int], values) -> go.Scattergl:
    """One line of the dashboard, on the panel of ``key``."""
    xa, ya = _PANEL_AXES[panel_of(key)]
    return go.Scattergl(
        x=np.asarray(steps),
        y=np.asarray(values, dtype=np.float64),
        mode="lines",
        name=key,
        xaxis=xa,
        yaxis=ya,
        showlegend=panel_of(key) == 0,
    )


_PALETTE = ("#e41a1c", "#377eb8", "#ff7f00", "#984ea3", "#a65628", "#f781bf", "#999999")


def detection_thumbnail(
    image: Tensor,
    boxes: Tensor | None = None,
    scores: Tensor | None = None,
    labels: Tensor | None = None,
    gt_boxes: Tensor | None = None,
    *,
    size: int = 160,
    score_thr: float = 0.3,
    class_names: Sequence[str] | None = None,
) -> bytes:
    """A small PNG of an image with ground truth (green) and predictions above ``score_thr``.

    Args:
        image: ``float [3, H, W]`` in ``[0, 1]`` (any device).
        boxes, scores, labels: a :class:`~instseg_edu.structures.Detections`' fields
            (``[K, 4]`` xyxy input pixels, ``[K]``, ``[K]``), or ``None``.
        gt_boxes: ``float [G, 4]`` xyxy, or ``None``.
        size: the longer side of the thumbnail, pixels.

    Returns:
        PNG bytes.
    """
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    small = torch.nn.functional.interpolate(
        image[None].float(), size=(th, tw), mode="bilinear", align_corners=False, antialias=True
    )[0]  # [3, th, tw]
    array = (small.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array)
    draw = ImageDraw.Draw(pil)
    if gt_boxes is not None:
        for box in (gt_boxes.detach().float().cpu() * scale).tolist():
            draw.rectangle(box, outline=(0, 210, 106), width=1)
    if boxes is not None and scores is not None:
        keep = scores.detach().float().cpu() > score_thr
        b = boxes.detach().float().cpu()[keep] * scale
        s = scores.detach().float().cpu()[keep]
        lab = labels.detach().cpu()[keep] if labels is not None else torch.zeros(len(s), dtype=int)
        for box, score, label in zip(b.tolist(), s.tolist(), lab.tolist()):
            color = _PALETTE[label % len(_PALETTE)]
            draw.rectangle(box, outline=color, width=2)
            name = class_names[label] if class_names else str(label)
            draw.text((box[0] + 2, box[1] + 1), f"{name} {score:.2f}", fill=color)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def crops_figure(
    crops: Tensor, labels: Tensor, class_names: Sequence[str], columns: int = 8, scale: int = 3
) -> go.Figure:
    """A grid of object crops, each with its class name under it.

    Args:
        crops: ``float [N, 3, S, S]`` in ``[0, 1]`` or ``uint8`` in ``[0, 255]``, e.g. the first
            ``N`` of :class:`~instseg_edu.engine.pretrain.ObjectCrops`' ``crops``.
        labels: ``int64 [N]`` their classes (indices into ``class_names``).
        class_names: one name per class.
        columns: crops per row.
        scale: screen pixels per crop pixel.

    Raises:
        ValueError: ``crops`` is not ``[N, 3, S, S]`` with ``N >= 1`` and as many ``labels``.
    """
    if crops.ndim != 4 or crops.shape[1] != 3 or len(crops) == 0 or len(labels) != len(crops):
        raise ValueError(f"crops must be [N>=1, 3, S, S] with N labels, got "
                         f"{tuple(crops.shape)} and {len(labels)} labels")  # fmt: skip
    if crops.dtype == torch.uint8:
        crops = crops.float() / 255
    n, size = len(crops), crops.shape[-1]
    rows = -(-n // columns)
    gap, text = 4, max(10, size // 2)  # between crops; below each, room for its name
    cell_w, cell_h = size + gap, size + text
    canvas = torch.ones(3, rows * cell_h + gap, columns * cell_w + gap)  # white
    names = []  # (x, y, text) under each crop
    for i in range(n):  # a figure of a few crops, not a hot path
        top, left = gap + (i // columns) * cell_h, gap + (i % columns) * cell_w
        canvas[:, top : top + size, left : left + size] = crops[i].float().clamp(0, 1)
        names.append((left + size / 2, top + size + 1, class_names[int(labels[i])]))
    pixels = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    fig = go.Figure(go.Image(z=pixels, hoverinfo="skip"))
    for x, y, name in names:
        fig.add_annotation(x=x, y=y, text=name, showarrow=False, yanchor="top",
                           font={"size": 11})  # fmt: skip
    height, width = pixels.shape[0] * scale, pixels.shape[1] * scale
    fig.update_layout(width=width, height=height + 20, margin={"l": 0, "r": 0, "t": 20, "b": 0})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig
