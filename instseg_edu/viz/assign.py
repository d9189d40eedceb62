"""Plotly figures of a MaxIoU assignment: anchors by reason, max-IoU histogram, positives per GT.

The assignment itself always comes from :func:`instseg_edu.ops.assign.max_iou_assign` (what the
RetinaNet loss trains on) and its counts from :func:`instseg_edu.ops.assign.assignment_summary`;
these functions only draw them. Boxes are drawn as one ``NaN``-separated path per reason (see
:mod:`instseg_edu.viz.anchors`), so a figure has a fixed set of traces an explorer updates in place.

Taught in ``notebooks/03_assignment_and_box_coding.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from torch import Tensor

from instseg_edu.ops.assign import (
    IGNORED,
    LOW_QUALITY_POSITIVE,
    NEGATIVE,
    POSITIVE,
    REASON_NAMES,
    Assignment,
    AssignmentSummary,
)
from instseg_edu.viz.anchors import boxes_to_path, gt_boxes_trace, image_layout, image_trace

__all__ = [
    "REASON_COLORS",
    "REASONS",
    "assignment_figure",
    "iou_histogram",
    "reason_paths",
    "subsample_negatives",
    "threshold_lines",
    "unmatched_warning_html",
]

REASONS: tuple[int, ...] = (NEGATIVE, IGNORED, POSITIVE, LOW_QUALITY_POSITIVE)
"""Drawing order of the reason traces."""

REASON_COLORS: dict[int, str] = {
    NEGATIVE: "#9e9e9e",
    IGNORED: "#ffb000",
    POSITIVE: "#d7191c",
    LOW_QUALITY_POSITIVE: "#7b3294",
}

THRESHOLD_COLORS = {"pos_iou_thr": "#d7191c", "neg_iou_thr": "#2c7bb6", "min_pos_iou": "#7b3294"}


def subsample_negatives(reason: Tensor, max_negatives: int) -> Tensor:
    """``bool [N]`` which boxes to draw: all non-negatives, and every k-th negative (≤ max)."""
    keep = reason != NEGATIVE
    neg = torch.nonzero(reason == NEGATIVE).flatten()  # [Nneg]
    if neg.numel() > 0 and max_negatives > 0:
        step = max(1, -(-neg.numel() // max_negatives))  # ceil division
        keep[neg[::step]] = True
    return keep


def reason_paths(anchors: Tensor, reason: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ``(x, y)`` box path per reason, in the order of :data:`REASONS`."""
    return [boxes_to_path(anchors[reason == r]) for r in REASONS]


def iou_histogram(max_iou: Tensor, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Counts of each box's best IoU in ``bins`` equal bins over ``[0, 1]``.

    Returns:
        ``(centers float64 [bins], counts int64 [bins])``; IoU 1 lands in the last bin.
    """
    idx = (max_iou.detach().cpu().double() * bins).floor().clamp(0, bins - 1).long()  # [N]
    counts = torch.bincount(idx, minlength=bins)[:bins]
    centers = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    return centers.numpy(), counts.numpy()


def threshold_lines(
    pos_iou_thr: float, neg_iou_thr, min_pos_iou: float, y_max: float
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Vertical lines at the thresholds, as ``(name, x, y)`` data (not layout shapes, so a change
    of threshold is a change of the figure's data). A ``(lo, hi)`` ``neg_iou_thr`` draws both."""
    top = max(float(y_max), 1.0) * 2
    negs = list(neg_iou_thr) if isinstance(neg_iou_thr, (tuple, list)) else [neg_iou_thr]
    out = []
    for name, values in (
        ("pos_iou_thr", [pos_iou_thr]),
        ("neg_iou_thr", negs),
        ("min_pos_iou", [min_pos_iou]),
    ):
        xs, ys = [], []
        for v in values:
            xs += [float(v), float(v), np.nan]
            ys += [0.8, top, np.nan]
        out.append((name, np.array(xs), np.array(ys)))
    return out


def unmatched_warning_html(
    summary: AssignmentSummary,
    gt_labels: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    gt_boxes: Tensor | None = None,
) -> str:
    """A short HTML note: boxes per reason, and a warning naming ground truth with no positive."""
    counts = summary.counts.tolist()
    parts = [
        f"<span style='color:{REASON_COLORS[r]}'>■</span> {REASON_NAMES[r]}: {counts[r]:,}"
        for r in REASONS
    ]
    html = "&nbsp;&nbsp;".join(parts)
    unmatched = summary.unmatched_gt.tolist()
    if unmatched:
        names = []
        for k in unmatched:
            name = f"gt {k}"
            if gt_labels is not None:
                label = int(gt_labels[k])
                name += f" ({class_names[label] if class_names else label}"
                if gt_boxes is not None:
                    x1, y1, x2, y2 = gt_boxes[k].tolist()
                    name += f", {x2 - x1:.0f}×{y2 - y1:.0f} px"
                name += ")"
            names.append(name)
        html += (
            "<br><b style='color:#b00'>⚠ no positive anchor for: " + ", ".join(names) + "</b>"
            " — these objects are never trained as foreground."
        )
    return html


def assignment_figure(
    image: Tensor,
    gt_boxes: Tensor,
    anchors: Tensor,
    assignment: Assignment,
    summary: AssignmentSummary,
    *,
    pos_iou_thr: float,
    neg_iou_thr,
    min_pos_iou: float,
    draw: Tensor | None = None,
    gt_labels: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    bins: int = 50,
    title: str = "",
    height: int = 600,
) -> go.Figure:
    """Anchors by reason over the image (left), max-IoU histogram with thresholds (top right),
    positives per ground truth (bottom right).

    Trace order (fixed): ``0`` image, ``1..4`` one path per reason (:data:`REASONS`), ``5`` ground
    truth (on top), ``6`` histogram, ``7..9`` threshold lines (pos, neg, min_pos), ``10`` positives
    per ground truth.

    Args:
        anchors: ``float [N, 4]`` every anchor the assignment was computed on.
        assignment: :func:`max_iou_assign` of those anchors (fields ``[N]``).
        summary: :func:`assignment_summary` of it.
        draw: ``bool [N]`` which anchors to draw (default: :func:`subsample_negatives`).
    """
    h, w = image.shape[-2:]
    if draw is None:
        draw = subsample_negatives(assignment.reason, 1500)
    fig = go.Figure()
    fig.add_trace(image_trace(image, hoverinfo="skip"))
    for r, (x, y) in zip(REASONS, reason_paths(anchors[draw], assignment.reason[draw])):
        fig.add_trace(
            go.Scattergl(
                x=x,
                y=y,
                mode="lines",
                name=REASON_NAMES[r],
                hoverinfo="skip",
                line={"color": REASON_COLORS[r], "width": 2 if r >= POSITIVE else 1},
                visible="legendonly" if r == NEGATIVE else True,
            )
        )
    fig.add_trace(gt_boxes_trace(gt_boxes, gt_labels, class_names))
    centers, counts = iou_histogram(assignment.max_iou, bins)
    fig.add_trace(
        go.Bar(
            x=centers,
            y=counts,
            width=1.0 / bins,
            marker_color="#4c78a8",
            name="best IoU per anchor",
            showlegend=False,
            xaxis="x2",
            yaxis="y2",
        )
    )
    for name, x, y in threshold_lines(pos_iou_thr, neg_iou_thr, min_pos_iou, counts.max()):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines",
                name=name,
                xaxis="x2",
                yaxis="y2",
                line={"color": THRESHOLD_COLORS[name], "dash": "dash", "width": 2},
            )
        )
    pos = summary.pos_per_gt.tolist()
    fig.add_trace(
        go.Bar(
            x=[f"gt {k}" for k in range(len(pos))],
            y=pos,
            marker_color="#d7191c",
            name="positives per gt",
            showlegend=False,
            xaxis="x3",
            yaxis="y3",
            text=[str(p) for p in pos],
            textposition="auto",
        )
    )
    fig.update_layout(
        **image_layout(title, height, w, h, [0, 0.58]),
        xaxis2={"domain": [0.72, 1.0], "anchor": "y2", "range": [0, 1], "title": "best IoU"},
        yaxis2={"domain": [0.6, 1.0], "anchor": "x2", "type": "log", "title": "anchors"},
        xaxis3={"domain": [0.72, 1.0], "anchor": "y3"},
        yaxis3={"domain": [0.0, 0.4], "anchor": "x3", "title": "positives"},
        legend={"orientation": "h", "x": 0.0, "y": -0.02, "yanchor": "top"},
        plot_bgcolor="white",
        bargap=0,
    )
    return fig
