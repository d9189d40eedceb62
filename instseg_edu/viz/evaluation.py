"""Plotly figures of a model's mistakes: one image's outcomes, precision–recall, confusion.

Every number comes from :mod:`instseg_edu.engine.analysis` (COCOeval's own matches, sorted into
true positives, four kinds of false positive and missed objects); these functions only draw. Each
figure has a fixed list of traces (``*_TRACES``) and a ``*_traces`` function returning their data
as plain dicts, so :class:`instseg_edu.widgets.EvaluationExplorer` updates a ``FigureWidget`` in
place, and a ``*_figure`` function building the whole figure for a notebook.

Coordinates are the pixels of the original image file (where COCO's boxes live); a smaller image
(e.g. a dataset item resized by ``eval_transforms``) is stretched over them.

Taught in ``notebooks/01_data_and_coco.py``; the static (matplotlib) versions are in
:mod:`instseg_edu.viz.report`.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import Tensor

from instseg_edu.engine.analysis import (
    BACKGROUND,
    COUNT_NAMES,
    DETECTION_OUTCOMES,
    DROPPED,
    DUPLICATE,
    FOUND,
    GT_IGNORED,
    IGNORED,
    MISSED,
    POOR_LOCALISATION,
    TRUE_POSITIVE,
    WRONG_CLASS,
    CocoMatches,
    ErrorAnalysis,
    PrecisionRecall,
)
from instseg_edu.viz.anchors import boxes_to_path, image_to_data_uri

__all__ = [
    "CONFUSION_NOTE",
    "CONFUSION_TRACES",
    "IMAGE_TRACES",
    "OUTCOME_COLORS",
    "confusion_caption",
    "confusion_figure",
    "confusion_title",
    "confusion_traces",
    "detection_label",
    "detection_text",
    "explorer_figure",
    "explorer_titles",
    "explorer_trace_names",
    "explorer_traces",
    "image_canvas",
    "image_source",
    "outcome_figure",
    "outcome_title",
    "outcome_traces",
    "paint_masks",
    "pr_figure",
    "pr_legend_width",
    "pr_traces",
    "summary_html",
]

#: Colour of each detection outcome, and of found / missed / ignored ground truth.
OUTCOME_COLORS: dict[str, str] = {
    "true positive": "#1a9850",
    "wrong class": "#ff7f00",
    "duplicate": "#e7298a",
    "poor localisation": "#ffd92f",
    "background": "#e41a1c",
    "ignored": "#9e9e9e",
    "dropped": "#9e9e9e",
    "found": "#ffffff",
    "missed": "#00bcd4",
}

# The image figure's traces, in order; the explorer updates them in place by index.
IMAGE_TRACES = (
    "image",
    "ground truth: found",
    "ground truth: missed",
    "ground truth: ignored",
    "true positive",
    "wrong class",
    "duplicate",
    "poor localisation",
    "background",
    "ignored detection",
    "its ground truth",
    "selected detection",
    "detections",
)
_DETECTION_TRACE = {o: IMAGE_TRACES.index(DETECTION_OUTCOMES[o]) for o in range(BACKGROUND + 1)}

CONFUSION_TRACES = ("confusion",)

#: How to read a row of the confusion matrix (:attr:`ErrorAnalysis.confusion`), said wherever one
#: is drawn: COCO evaluates each class on its own, so an object found only by a detection of
#: another class is in its row twice, under that class and under "missed".
CONFUSION_NOTE = (
    "A row holds its class's objects, found (diagonal) or missed (last column), plus the "
    "wrong-class detections on them: COCO matches each class separately, so an object under a "
    "wrong-class detection is also counted as missed, and a row can add up to more than its "
    "objects."
)


_GT_OUTCOME_NAMES = {FOUND: "found", MISSED: "missed", GT_IGNORED: "ignored"}


def image_source(images) -> Callable[[int], Tensor | None]:
    """Turn what a caller has into ``image_id -> float [3, h, w] in [0, 1]`` (or ``None``).

    Args:
        images: ``None`` (no pixels: a grey canvas is drawn), a dataset with ``image_ids`` whose
            items are ``(image, target)`` (e.g. :class:`~instseg_edu.data.coco.CocoDataset`; give it
            ``eval_transforms`` or none, not random augmentation), a mapping ``image_id -> image``
            (an id it lacks gets the grey canvas), or a callable ``image_id -> image``. An image
            may be smaller than the file (a resized dataset item); it is stretched over the file's
            pixel grid.
    """
    if images is None:
        return lambda image_id: None
    if hasattr(images, "image_ids") and hasattr(images, "__getitem__"):
        index = {int(i): n for n, i in enumerate(images.image_ids)}
        return lambda image_id: images[index[int(image_id)]][0]
    if isinstance(images, Mapping):
        return lambda image_id: images.get(image_id)  # an image not given: a grey canvas
    if callable(images):
        return images
    raise TypeError(f"images must be None, a dataset, a mapping or a callable, not {type(images)}")


def _color_rgb(color: str) -> np.ndarray:
    return np.array([int(color[k : k + 2], 16) for k in (1, 3, 5)], dtype=np.float32) / 255


def image_canvas(matches: CocoMatches, i: int, image: Tensor | None, with_masks: bool) -> Tensor:
    """``float [3, h, w]``: the image, grey without one; at the file's size when masks are
    painted on it (masks are RLEs at that size)."""
    height, width = (int(v) for v in matches.image_sizes[i])
    if image is None:
        size = (height, width) if with_masks else (8, 8)
        return torch.full((3, *size), 0.35)
    image = image.detach().float().cpu()[:3]
    if with_masks and tuple(image.shape[-2:]) != (height, width):
        image = F.interpolate(image[None], size=(height, width), mode="bilinear")[0]
    return image


def paint_masks(canvas: Tensor, rles: list, colors: list[str], alpha: float = 0.45) -> Tensor:
    """Blend RLE masks into ``canvas float [3, H, W]``: each pixel takes the colour of the last
    mask covering it (later masks on top), at opacity ``alpha``."""
    from pycocotools import mask as mask_utils

    if not rles:
        return canvas
    masks = torch.from_numpy(mask_utils.decode(list(rles)).astype(bool))  # [H, W, N]
    n = masks.shape[-1]
    # Index of the last mask covering each pixel: argmax finds the first True of the flipped stack.
    top = n - 1 - masks.flip(-1).to(torch.uint8).argmax(dim=-1)  # [H, W]
    covered = masks.any(dim=-1)  # [H, W]
    palette = torch.from_numpy(np.stack([_color_rgb(c) for c in colors]))  # [N, 3]
    paint = palette[top].permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    return torch.where(covered, (1 - alpha) * canvas + alpha * paint, canvas)


def _visible(matches: CocoMatches, errors: ErrorAnalysis, i: int, label: int | None):
    """Rows of image ``i``'s detections and ground truth to draw (one class, or all)."""
    d = np.arange(matches.dt_start[i], matches.dt_start[i + 1])
    g = np.arange(matches.gt_start[i], matches.gt_start[i + 1])
    if label is not None:
        d = d[matches.dt_label[d] == label]
        referenced = errors.dt_gt[d][errors.dt_outcome[d] != DROPPED]
        g = g[(matches.gt_label[g] == label) | np.isin(g, referenced)]
    return d, g


def detection_label(matches: CocoMatches, errors: ErrorAnalysis, d: int) -> str:
    """One line naming detection row ``d``: class, score, outcome (for a dropdown)."""
    name = matches.class_names[matches.dt_label[d]]
    outcome = DETECTION_OUTCOMES[errors.dt_outcome[d]]
    return f"{name} {matches.dt_score[d]:.2f} · {outcome}"


def detection_text(matches: CocoMatches, errors: ErrorAnalysis, d: int) -> str:
    """Why detection row ``d`` has its outcome: the ground truth behind it and the IoU (HTML)."""
    names = matches.class_names
    outcome = int(errors.dt_outcome[d])
    g, iou, thr = int(errors.dt_gt[d]), float(errors.dt_iou[d]), errors.iou_thr
    head = (
        f"<b>detection {matches.dt_id[d]}</b> ({names[matches.dt_label[d]]}, score "
        f"{matches.dt_score[d]:.3f}): <b>{DETECTION_OUTCOMES[outcome]}</b>"
    )

    def gt(row: int) -> str:
        crowd = ", a crowd region" if matches.gt_crowd[row] else ""
        return f"ground truth {matches.gt_id[row]} ({names[matches.gt_label[row]]}{crowd})"

    if outcome == TRUE_POSITIVE:
        why = f"matched {gt(g)} at IoU {iou:.2f} ≥ {thr:.2f}"
    elif outcome == WRONG_CLASS:
        why = f"IoU {iou:.2f} ≥ {thr:.2f} with {gt(g)}, an object of another class"
    elif outcome == DUPLICATE:
        s = int(errors.dt_suppressor[d])
        why = (
            f"IoU {iou:.2f} ≥ {thr:.2f} with {gt(g)}, already matched by detection "
            f"{matches.dt_id[s]} (score {matches.dt_score[s]:.3f})"
        )
    elif outcome == POOR_LOCALISATION:
        why = f"best IoU with its class is {iou:.2f} < {thr:.2f}, with {gt(g)}"
    elif outcome == BACKGROUND:
        why = f"best IoU {iou:.2f}, with {gt(g)}" if g >= 0 else "it overlaps no ground truth"
    elif outcome == IGNORED:
        t, a = matches.iou_index(thr), matches.area_index(errors.area)
        m = int(matches.dt_match[t, a, d])
        if m >= 0:  # matched an ignored ground truth: a crowd region, or outside the area range
            outside = "" if matches.gt_crowd[m] else f", outside area '{errors.area}'"
            why = f"COCO ignores it: it matched {gt(m)}{outside}"
        else:
            why = f"COCO ignores it: unmatched, and its area is outside '{errors.area}'"
    elif matches.dt_score[d] < errors.score_thr:
        why = f"score below the threshold {errors.score_thr:.2f}"
    else:
        why = f"rank {matches.dt_rank[d] + 1} in its class, past max_dets={errors.max_dets}"
    return f"{head} — {html.escape(why)}"


def outcome_traces(
    matches: CocoMatches,
    errors: ErrorAnalysis,
    i: int,
    image: Tensor | None = None,
    *,
    label: int | None = None,
    selected: int = -1,
) -> list[dict]:
    """The data of every trace of :func:`outcome_figure`, in :data:`IMAGE_TRACES` order.

    Args:
        matches, errors: from :func:`~instseg_edu.engine.analysis.match_coco` and
            :func:`~instseg_edu.engine.analysis.error_analysis`.
        i: image index (into ``matches.image_ids``).
        image: its pixels ``float [3, h, w]`` (``None``: grey).
        label: draw only this class's detections and ground truth (plus the ground truth they
            point at); ``None``: every class.
        selected: detection row to highlight with the ground truth behind its outcome (``-1``:
            none).
    """
    d, g = _visible(matches, errors, i, label)
    outcome = errors.dt_outcome[d]
    shown = d[outcome != DROPPED]
    height, width = (int(v) for v in matches.image_sizes[i])
    segm = matches.iou_type == "segm"
    canvas = image_canvas(matches, i, image, with_masks=segm)
    if segm:
        painted = [r for r in shown[::-1] if errors.dt_outcome[r] != IGNORED]  # best on top
        missed = g[errors.gt_outcome[g] == MISSED]
        canvas = paint_masks(
            canvas,
            [matches.gt_segm[r] for r in missed] + [matches.dt_segm[r] for r in painted],
            [OUTCOME_COLORS["missed"]] * len(missed)
            + [OUTCOME_COLORS[DETECTION_OUTCOMES[errors.dt_outcome[r]]] for r in painted],
        )
    dy, dx = height / canvas.shape[-2], width / canvas.shape[-1]
    data: list[dict] = [dict(source=image_to_data_uri(canvas), x0=dx / 2, y0=dy / 2, dx=dx, dy=dy)]

    def path(rows, boxes) -> dict:
        x, y = boxes_to_path(torch.from_numpy(boxes[rows]))
        return dict(x=x, y=y)

    for code in (FOUND, MISSED, GT_IGNORED):
        data.append(path(g[errors.gt_outcome[g] == code], matches.gt_box))
    for code in (TRUE_POSITIVE, WRONG_CLASS, DUPLICATE, POOR_LOCALISATION, BACKGROUND, IGNORED):
        data.append(path(d[outcome == code], matches.dt_box))
    if selected >= 0 and matches.dt_image[selected] == i:
        behind = errors.dt_gt[selected]
        data.append(path(np.array([behind] if behind >= 0 else [], dtype=np.int64), matches.gt_box))
        sel = path(np.array([selected]), matches.dt_box)
        sel["line"] = dict(
            color=OUTCOME_COLORS[DETECTION_OUTCOMES[errors.dt_outcome[selected]]], width=5
        )
        data.append(sel)
    else:
        data += [path(np.zeros(0, dtype=np.int64), matches.gt_box) for _ in range(2)]
    # One hover marker per drawn detection, at its top-left corner; customdata is its row.
    corner = matches.dt_box[shown, :2]  # [n, 2]
    colors = [OUTCOME_COLORS[DETECTION_OUTCOMES[o]] for o in errors.dt_outcome[shown]]
    hover = [detection_text(matches, errors, r) for r in shown]
    data.append(
        dict(
            x=corner[:, 0],
            y=corner[:, 1],
            customdata=shown,
            hovertext=hover,
            marker=dict(color=colors, size=9, symbol="square", line=dict(color="black", width=1)),
        )
    )
    return data


def outcome_title(
    matches: CocoMatches, errors: ErrorAnalysis, i: int, label: int | None = None
) -> str:
    """``"image 17: 3 TP, 2 FP, 1 missed"`` for image index ``i`` (one class, or all)."""
    c = errors.counts[i] if label is None else errors.counts[i, label : label + 1]
    counts = dict(zip(COUNT_NAMES, c.sum(axis=0).tolist()))
    fps = sum(counts[n] for n in COUNT_NAMES[1:5])
    return (
        f"image {matches.image_ids[i]}: {counts['true positive']} TP, {fps} FP, "
        f"{counts['missed']} missed"
    )


def _outcome_objects(data: list[dict]) -> list:
    """Styled plotly traces for :data:`IMAGE_TRACES` from :func:`outcome_traces`' data."""
    data = [dict(d) for d in data]
    line = dict(mode="lines", hoverinfo="skip")
    traces = [go.Image(hoverinfo="skip", **data[0])]
    gt_styles = [("found", "solid", 1.5), ("missed", "dash", 2.5), ("ignored", "dot", 1.5)]
    for (name, dash, width), d in zip(gt_styles, data[1:4]):
        traces.append(
            go.Scatter(line=dict(color=OUTCOME_COLORS[name], dash=dash, width=width), **line, **d)
        )
    for name, d in zip(IMAGE_TRACES[4:10], data[4:10]):
        color = OUTCOME_COLORS[name.replace(" detection", "")]
        dash = "dot" if name == "ignored detection" else "solid"
        traces.append(go.Scatter(line=dict(color=color, width=2, dash=dash), **line, **d))
    traces.append(go.Scatter(line=dict(color="white", width=4, dash="dash"), **line, **data[10]))
    selected_line = data[11].pop("line", dict(color="white", width=5))
    traces.append(go.Scatter(line=selected_line, **line, **data[11]))
    traces.append(go.Scatter(mode="markers", hoverinfo="text", **data[12]))
    for trace, name in zip(traces, IMAGE_TRACES):
        trace.name = name
        if name != "image":  # an Image trace has no legend entry
            trace.showlegend = name not in ("its ground truth", "selected detection", "detections")
    return traces


def _image_axes(fig, height: int, width: int, row=None, col=None) -> None:
    fig.update_xaxes(range=[0, width], showgrid=False, zeroline=False, constrain="domain",
                     row=row, col=col)  # fmt: skip
    fig.update_yaxes(range=[height, 0], showgrid=False, zeroline=False, constrain="domain",
                     scaleanchor="x", row=row, col=col)  # fmt: skip


def outcome_figure(
    matches: CocoMatches,
    errors: ErrorAnalysis,
    i: int,
    image: Tensor | None = None,
    *,
    label: int | None = None,
    selected: int = -1,
    height: int = 480,
) -> go.Figure:
    """One image with its true positives, false positives by kind and missed objects.

    Ground truth is drawn white (found), cyan dashed (missed) or grey dotted (ignored); detections
    in their outcome's colour (:data:`OUTCOME_COLORS`). For ``segm`` the masks of kept detections
    and missed objects are painted on the image. Hover a detection's corner marker for why it has
    its outcome. Arguments as :func:`outcome_traces`.
    """
    fig = go.Figure(
        _outcome_objects(outcome_traces(matches, errors, i, image, label=label, selected=selected))
    )
    _image_axes(fig, *(int(v) for v in matches.image_sizes[i]))
    fig.update_layout(
        title=dict(text=outcome_title(matches, errors, i, label), font=dict(size=14)),
        height=height,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", y=-0.02, yanchor="top", font=dict(size=10)),
        plot_bgcolor="#303030",
        uirevision="image",
    )
    return fig


def _class_colors(n: int) -> list[str]:
    import plotly.colors

    palette = plotly.colors.qualitative.D3 + plotly.colors.qualitative.Dark24
    return [palette[k % len(palette)] for k in range(n)]


def pr_traces(
    pr: PrecisionRecall,
    errors: ErrorAnalysis,
    class_names: Sequence[str],
    label: int | None = None,
) -> list[dict]:
    """Data of :func:`pr_figure`'s traces: per class, COCO's interpolated curve and the raw curve;
    then one marker per class at the score threshold's (recall, precision). ``label`` fades the
    other classes."""
    recall, precision = errors.precision_recall_point()
    data = []
    for k, name in enumerate(class_names):
        opacity = 1.0 if label is None or label == k else 0.12
        ap = pr.ap[k]
        legend = f"{name}: AP {ap:.3f}" if ap > -1 else f"{name}: no ground truth"
        if pr.ap[k] > -1:
            interp = dict(x=pr.rec_thrs, y=pr.precision[k])
        else:
            interp = dict(x=np.array([np.nan]), y=np.array([np.nan]))
        data.append(dict(name=legend, opacity=opacity, **interp))
        raw_recall, raw_precision, _ = pr.curves[k]
        raw = dict(x=np.concatenate([[0.0], raw_recall]), y=np.concatenate([[1.0], raw_precision]))
        data.append(dict(opacity=0.5 * opacity, **raw))
    keep = np.isfinite(recall) & np.isfinite(precision)
    ks = np.flatnonzero(keep)
    data.append(
        dict(
            x=recall[keep],
            y=precision[keep],
            customdata=ks,
            hovertext=[
                f"{class_names[k]} at score ≥ {errors.score_thr:.2f}: recall {recall[k]:.2f}, "
                f"precision {precision[k]:.2f}"
                for k in ks
            ],
            marker=dict(
                color=[_class_colors(len(class_names))[k] for k in ks],
                size=[14 if label is None or label == k else 7 for k in ks],
                symbol="diamond",
                line=dict(color="black", width=1),
            ),
        )
    )
    return data


def _pr_objects(data: list[dict], class_names: Sequence[str]) -> list:
    """Styled plotly traces from :func:`pr_traces`' data: per class the interpolated and the raw
    curve, then the score-threshold markers."""
    colors = _class_colors(len(class_names))
    traces = []
    for k, name in enumerate(class_names):
        traces.append(go.Scatter(mode="lines", line=dict(color=colors[k], width=2, shape="hv"),
                                 **data[2 * k]))  # fmt: skip
        traces.append(go.Scatter(mode="lines", line=dict(color=colors[k], width=1, dash="dot"),
                                 name=f"{name} (raw)", showlegend=False, hoverinfo="skip",
                                 **data[2 * k + 1]))  # fmt: skip
    traces.append(go.Scatter(mode="markers", name="score threshold", hoverinfo="text", **data[-1]))
    return traces


def pr_figure(
    pr: PrecisionRecall,
    errors: ErrorAnalysis,
    class_names: Sequence[str],
    label: int | None = None,
    height: int = 320,
) -> go.Figure:
    """Per-class precision–recall at ``pr.iou_thr``: COCO's interpolated curve (whose mean height
    is the AP), the raw curve beneath it, and a diamond where the score threshold puts the class.
    """
    fig = go.Figure(_pr_objects(pr_traces(pr, errors, class_names, label), class_names))
    fig.update_xaxes(title="recall", range=[0, 1.02])
    fig.update_yaxes(title="precision", range=[0, 1.05])
    fig.update_layout(
        title=dict(text=f"precision–recall at IoU {pr.iou_thr:.2f}", font=dict(size=13)),
        height=height,
        margin=dict(l=50, r=pr_legend_width(class_names), t=35, b=40),
        legend=_pr_legend(),
        uirevision="pr",
    )
    return fig


def _pr_legend() -> dict:
    """The precision–recall legend at the figure's right edge, in the margin
    :func:`pr_legend_width` keeps free: a curve can pass anywhere in the axes, so a legend inside
    them would cover one."""
    return dict(xref="container", x=1.0, xanchor="right", yref="paper", y=1.0, yanchor="top",
                font=dict(size=10))  # fmt: skip


def pr_legend_width(class_names: Sequence[str]) -> int:
    """Pixels the precision–recall legend needs (its right margin): the longest entry, e.g.
    ``"rectangle: AP 0.123"``, at about 6 px a character in its 10 px font, plus the line
    sample and padding (45 px)."""
    entries = ["score threshold", *(f"{name}: AP 0.000" for name in class_names)]
    return 6 * max(len(e) for e in entries) + 45


def confusion_traces(errors: ErrorAnalysis, class_names: Sequence[str]) -> list[dict]:
    """Data of :func:`confusion_figure`'s heatmap."""
    z = errors.confusion
    return [
        dict(
            z=z,
            x=[*class_names, "missed"],
            y=[*class_names, "background"],
            text=z.astype(str),
            zmax=max(int(z.max()), 1),
        )
    ]


def _confusion_objects(data: list[dict]) -> list:
    return [
        go.Heatmap(
            name="confusion",
            colorscale="Blues",
            zmin=0,
            texttemplate="%{text}",
            hovertemplate="truth %{y}, predicted %{x}: %{z}<extra></extra>",
            showscale=False,
            **data[0],
        )
    ]


def confusion_title(errors: ErrorAnalysis) -> str:
    return f"confusion at IoU {errors.iou_thr:.2f}, score ≥ {errors.score_thr:.2f}"


def confusion_figure(
    errors: ErrorAnalysis, class_names: Sequence[str], height: int = 320
) -> go.Figure:
    """The confusion matrix with background (:attr:`ErrorAnalysis.confusion`): rows ground-truth
    class then background, columns predicted class then missed; :data:`CONFUSION_NOTE` under the
    title says why a row can add up to more than its objects."""
    fig = go.Figure(_confusion_objects(confusion_traces(errors, class_names)))
    fig.update_xaxes(title="predicted", side="bottom", tickangle=-30)
    fig.update_yaxes(title="ground truth", autorange="reversed")
    fig.update_layout(
        # The note under the title (the title's automargin makes room for its lines).
        title=dict(text=confusion_title(errors), font=dict(size=13), automargin=True,
                   subtitle=dict(text=confusion_caption(), font=dict(size=10))),
        height=height,
        margin=dict(l=80, r=10, t=35, b=60),
        uirevision="confusion",
    )  # fmt: skip
    return fig


def confusion_caption(width: int = 80) -> str:
    """:data:`CONFUSION_NOTE` as plotly text, with a line break every ``width`` characters."""
    return "<br>".join(textwrap.wrap(CONFUSION_NOTE, width))


def explorer_trace_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """The traces of :func:`explorer_figure`, in order: :data:`IMAGE_TRACES`, per class
    ``"<name>: curve"`` and ``"<name>: raw"``, ``"score threshold"``, ``"confusion"``."""
    per_class = [f"{n}: {part}" for n in class_names for part in ("curve", "raw")]
    return (*IMAGE_TRACES, *per_class, "score threshold", "confusion")


def explorer_traces(
    matches: CocoMatches,
    errors: ErrorAnalysis,
    pr: PrecisionRecall,
    i: int,
    image: Tensor | None = None,
    *,
    label: int | None = None,
    selected: int = -1,
) -> list[dict]:
    """The data of every trace of :func:`explorer_figure` (:func:`explorer_trace_names` order)."""
    return [
        *outcome_traces(matches, errors, i, image, label=label, selected=selected),
        *pr_traces(pr, errors, matches.class_names, label),
        *confusion_traces(errors, matches.class_names),
    ]


def explorer_titles(
    matches: CocoMatches, errors: ErrorAnalysis, i: int, label: int | None = None
) -> tuple[str, str, str]:
    """The three panel titles of :func:`explorer_figure`."""
    return (
        outcome_title(matches, errors, i, label),
        f"precision–recall at IoU {errors.iou_thr:.2f}",
        confusion_title(errors),
    )


def explorer_figure(
    matches: CocoMatches,
    errors: ErrorAnalysis,
    pr: PrecisionRecall,
    i: int,
    image: Tensor | None = None,
    *,
    label: int | None = None,
    selected: int = -1,
    height: int = 640,
) -> go.Figure:
    """The three panels of :class:`instseg_edu.widgets.EvaluationExplorer` in one figure: the
    image (:func:`outcome_figure`) on the left, precision–recall (:func:`pr_figure`) and the
    confusion matrix (:func:`confusion_figure`) on the right. One figure, so a notebook loads
    plotly's JavaScript once."""
    from plotly.subplots import make_subplots

    names = matches.class_names
    fig = make_subplots(
        rows=2, cols=2, specs=[[{"rowspan": 2}, {}], [None, {}]], column_widths=[0.56, 0.44],
        horizontal_spacing=0.07, vertical_spacing=0.2,
        subplot_titles=explorer_titles(matches, errors, i, label),
    )  # fmt: skip
    data = explorer_traces(matches, errors, pr, i, image, label=label, selected=selected)
    num_image, num_pr = len(IMAGE_TRACES), 2 * len(names) + 1
    for trace in _outcome_objects(data[:num_image]):
        fig.add_trace(trace, row=1, col=1)
    for trace in _pr_objects(data[num_image : num_image + num_pr], names):
        trace.legend = "legend2"
        fig.add_trace(trace, row=1, col=2)
    fig.add_trace(_confusion_objects(data[-1:])[0], row=2, col=2)
    _image_axes(fig, *(int(v) for v in matches.image_sizes[i]), row=1, col=1)
    fig.update_xaxes(title=dict(text="recall", standoff=2), range=[0, 1.02], row=1, col=2)
    fig.update_yaxes(title=dict(text="precision", standoff=2), range=[0, 1.05], row=1, col=2)
    fig.update_xaxes(tickangle=-30, tickfont=dict(size=10), row=2, col=2)
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=10), row=2, col=2)
    for annotation in fig.layout.annotations:
        annotation.font.size = 13
    fig.update_layout(
        height=height,
        margin=dict(l=10, r=pr_legend_width(names), t=30, b=70),
        # Below the confusion matrix's tick labels, which share the bottom edge with the image.
        legend=dict(orientation="h", x=0, y=-0.12, yanchor="top", font=dict(size=10)),
        legend2=_pr_legend(),
        uirevision="explorer",
    )
    return fig


def summary_html(
    matches: CocoMatches,
    errors: ErrorAnalysis,
    pr: PrecisionRecall,
    label: int | None = None,
    *,
    per_class: bool = True,
) -> str:
    """A small HTML table of AP at this IoU, true positives, each false-positive kind and missed
    objects at this score threshold: for ``label`` only, or every class (``per_class``) and all
    together; above it COCO's AP, AP50 and AP75 of the whole set, below it how to read a row of
    the confusion matrix (:data:`CONFUSION_NOTE`)."""
    names = matches.class_names
    rows = [label] if label is not None else (range(len(names)) if per_class else [])
    head = "".join(
        f"<th style='padding:0 6px;color:{OUTCOME_COLORS.get(n, '#000')}'>{n}</th>"
        if n not in ("true positive", "missed")
        else f"<th style='padding:0 6px'>{n}</th>"
        for n in COUNT_NAMES
    )
    body = []
    for k in rows:
        ap = f"{pr.ap[k]:.3f}" if pr.ap[k] > -1 else "n/a"
        cells = "".join(
            f"<td style='text-align:right'>{v}</td>" for v in errors.counts[:, k].sum(0)
        )
        body.append(f"<tr><td>{html.escape(names[k])}</td><td>{ap}</td>{cells}</tr>")
    if label is None:
        total = "".join(
            f"<td style='text-align:right'><b>{v}</b></td>" for v in errors.totals().values()
        )
        body.append(f"<tr><td><b>all</b></td><td><b>{pr.mean_ap:.3f}</b></td>{total}</tr>")
    stats = matches.stats
    return (
        f"<div style='font-size:12px'>{matches.iou_type}: COCO AP {stats['AP']:.3f}, AP50 "
        f"{stats['AP50']:.3f}, AP75 {stats['AP75']:.3f} · this view: IoU {errors.iou_thr:.2f}, "
        f"area {errors.area}, max_dets {errors.max_dets}, score ≥ {errors.score_thr:.2f}"
        f"<table><tr><th>class</th><th>AP@{errors.iou_thr:.2f}</th>{head}</tr>"
        + "".join(body)
        + f"</table><p style='margin:4px 0'><b>Confusion matrix:</b> {html.escape(CONFUSION_NOTE)}"
        "</p></div>"
    )
