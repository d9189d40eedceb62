"""The evaluation analysis as static files: precision–recall curves, confusion matrix, error counts,
a gallery of the worst images and a Markdown summary (``instseg-edu evaluate --report DIR``).

The same numbers as :class:`instseg_edu.widgets.EvaluationExplorer`, for people who work outside
Jupyter: everything comes from :mod:`instseg_edu.engine.analysis` (COCOeval's own matches). Figures
are ``matplotlib.figure.Figure`` objects built without pyplot (matplotlib is imported inside the
functions), so they work in scripts, tests and notebooks alike.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from instseg_edu.engine.analysis import (
    COUNT_NAMES,
    DETECTION_OUTCOMES,
    DROPPED,
    FALSE_POSITIVE_KINDS,
    FOUND,
    GT_IGNORED,
    IGNORED,
    LOCALISATION_MIN_IOU,
    MISSED,
    CocoMatches,
    ErrorAnalysis,
    PrecisionRecall,
    error_analysis,
    per_class_ap,
    precision_recall,
    rank_images,
)
from instseg_edu.engine.evaluate import format_ap_table
from instseg_edu.viz.evaluation import (
    CONFUSION_NOTE,
    OUTCOME_COLORS,
    image_canvas,
    image_source,
    outcome_title,
    paint_masks,
)

__all__ = [
    "compare_outcomes_plot",
    "confusion_plot",
    "error_counts_plot",
    "error_gallery",
    "pr_curves_plot",
    "report_markdown",
    "write_report",
]


def _class_colors(n: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return np.array([cmap(k % cmap.N)[:3] for k in range(max(n, 1))])


def pr_curves_plot(pr: PrecisionRecall, errors: ErrorAnalysis | None = None, class_names=None):
    """Per class: COCO's interpolated precision (solid, its mean height is the AP), the raw curve
    (dotted) and, with ``errors``, a diamond at the score threshold's (recall, precision)."""
    from matplotlib.figure import Figure

    num_c = len(pr.ap)
    names = class_names or [str(k) for k in range(num_c)]
    colors = _class_colors(num_c)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    point = errors.precision_recall_point() if errors is not None else None
    for k in range(num_c):
        if pr.ap[k] <= -1:
            continue
        ax.step(pr.rec_thrs, pr.precision[k], where="post", color=colors[k], linewidth=1.8,
                label=f"{names[k]}: AP {pr.ap[k]:.3f}")  # fmt: skip
        recall, precision, _ = pr.curves[k]
        ax.plot(recall, precision, ":", color=colors[k], linewidth=1)
        if point is not None and np.isfinite(point[0][k]) and np.isfinite(point[1][k]):
            ax.plot(point[0][k], point[1][k], "D", color=colors[k], markeredgecolor="black",
                    markersize=8)  # fmt: skip
    title = f"precision–recall at IoU {pr.iou_thr:.2f} (area {pr.area}, max_dets {pr.max_dets})"
    if errors is not None:
        title += f"\n◆ = score ≥ {errors.score_thr:.2f}"
    ax.set(xlim=(0, 1.01), ylim=(0, 1.03), xlabel="recall", ylabel="precision", title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: a curve can pass anywhere inside
        fig.legend(fontsize=8, loc="outside right upper")
    return fig


def confusion_plot(errors: ErrorAnalysis, class_names: Sequence[str]):
    """:attr:`ErrorAnalysis.confusion` as a table of coloured cells with their counts."""
    from matplotlib.figure import Figure

    z = errors.confusion
    n = len(class_names) + 1
    fig = Figure(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(z, cmap="Blues", vmin=0, vmax=max(int(z.max()), 1))
    for (r, c), v in np.ndenumerate(z):
        ax.text(c, r, str(v), ha="center", va="center", fontsize=8,
                color="white" if v > 0.6 * z.max() else "black")  # fmt: skip
    ax.set_xticks(range(n), [*class_names, "missed"], rotation=30, ha="right")
    ax.set_yticks(range(n), [*class_names, "background"])
    ax.set(xlabel="predicted", ylabel="ground truth",
           title=f"IoU {errors.iou_thr:.2f}, score ≥ {errors.score_thr:.2f}")  # fmt: skip
    # Under the figure, so no one adds a row and wonders why it exceeds the objects of the class.
    fig.supxlabel(textwrap.fill(CONFUSION_NOTE, int(fig.get_figwidth() * 72 / 4)), fontsize=7)
    return fig


def error_counts_plot(errors: ErrorAnalysis, class_names: Sequence[str]):
    """Per class, stacked bars: true positives, the four false-positive kinds, missed objects."""
    from matplotlib.figure import Figure

    per_class = errors.counts.sum(axis=0)  # [C, 6]
    fig = Figure(figsize=(8, 1.2 + 0.35 * len(class_names)), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(class_names))
    for j, name in enumerate(COUNT_NAMES):
        color = OUTCOME_COLORS[name]
        ax.barh(class_names, per_class[:, j], left=left, color=color, label=name,
                edgecolor="black", linewidth=0.3)  # fmt: skip
        left += per_class[:, j]
    ax.invert_yaxis()
    ax.set(xlabel="count", title=f"outcomes at IoU {errors.iou_thr:.2f}, "
           f"score ≥ {errors.score_thr:.2f}")  # fmt: skip
    fig.legend(fontsize=7, loc="outside right upper")
    return fig


def compare_outcomes_plot(errors_by_name: dict[str, ErrorAnalysis], label: int | None = None):
    """One stacked bar per model (or setting): true positives, the four false-positive kinds and
    missed objects, side by side — where each one fails, on the same images.

    Args:
        errors_by_name: ``{name: ErrorAnalysis}``, e.g. one per model family, each from
            :func:`~instseg_edu.engine.analysis.error_analysis` at the same setting.
        label: count one class only (``None``: all).
    """
    from matplotlib.figure import Figure

    names = list(errors_by_name)
    totals = np.array([list(e.totals(label).values()) for e in errors_by_name.values()])  # [N, 6]
    fig = Figure(figsize=(8, 1.2 + 0.45 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(names))
    containers = []
    for j, kind in enumerate(COUNT_NAMES):
        bars = ax.barh(names, totals[:, j], left=left, color=OUTCOME_COLORS[kind], label=kind,
                       edgecolor="black", linewidth=0.3)  # fmt: skip
        containers.append((bars, totals[:, j]))
        left += totals[:, j]
    ax.invert_yaxis()
    settings = {(e.iou_thr, e.score_thr) for e in errors_by_name.values()}
    title = "outcomes"
    if len(settings) == 1:
        iou_thr, score_thr = settings.pop()
        title += f" at IoU {iou_thr:.2f}, score ≥ {score_thr:.2f}"
    ax.set(xlabel="count", title=title)
    fig.legend(fontsize=7, loc="outside right upper")
    _label_bars_that_fit(fig, ax, containers, fontsize=7)
    return fig


def _label_bars_that_fit(fig, ax, containers, fontsize: float, pad_px: float = 3.0) -> None:
    """Write each bar's count in its middle, only where the count fits inside the bar.

    In a stacked row a count wider than its bar spills onto its neighbour's: narrow bars of 24 and
    43 beside each other would read "2443". The figure is laid out first, so bars and text have
    their final sizes in pixels; a count that does not fit is left out (the axis still shows it).
    """
    labels = []
    for bars, values in containers:
        texts = ax.bar_label(bars, [str(v) if v else "" for v in values], label_type="center",
                             fontsize=fontsize)  # fmt: skip
        labels += zip(bars, texts)
    fig.draw_without_rendering()  # runs the constrained layout: final axes size
    for bar, text in labels:
        if text.get_text() and text.get_window_extent().width + 2 * pad_px > (
            bar.get_window_extent().width
        ):
            text.set_text("")


def _draw_image(ax, matches: CocoMatches, errors: ErrorAnalysis, i: int, image) -> None:
    from matplotlib.patches import Rectangle

    height, width = (int(v) for v in matches.image_sizes[i])
    segm = matches.iou_type == "segm"
    canvas = image_canvas(matches, i, image, with_masks=segm)
    d = np.arange(matches.dt_start[i], matches.dt_start[i + 1])
    g = np.arange(matches.gt_start[i], matches.gt_start[i + 1])
    drawn = d[(errors.dt_outcome[d] != DROPPED) & (errors.dt_outcome[d] != IGNORED)]
    if segm:
        missed = g[errors.gt_outcome[g] == MISSED]
        canvas = paint_masks(
            canvas,
            [matches.gt_segm[r] for r in missed] + [matches.dt_segm[r] for r in drawn[::-1]],
            [OUTCOME_COLORS["missed"]] * len(missed)
            + [OUTCOME_COLORS[DETECTION_OUTCOMES[errors.dt_outcome[r]]] for r in drawn[::-1]],
        )
    ax.imshow(canvas.permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, width, height, 0))
    styles = {FOUND: ("found", "-"), MISSED: ("missed", "--"), GT_IGNORED: ("ignored", ":")}
    for r in g:
        name, style = styles[int(errors.gt_outcome[r])]
        x1, y1, x2, y2 = matches.gt_box[r]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linestyle=style,
                               edgecolor=OUTCOME_COLORS[name], linewidth=1.5))  # fmt: skip
    for r in drawn:
        x1, y1, x2, y2 = matches.dt_box[r]
        color = OUTCOME_COLORS[DETECTION_OUTCOMES[errors.dt_outcome[r]]]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                               linewidth=1.5))  # fmt: skip
        ax.text(x1, y1, f"{matches.class_names[matches.dt_label[r]]} {matches.dt_score[r]:.2f}",
                fontsize=6, color="black", va="bottom",
                bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"})  # fmt: skip
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()


def error_gallery(
    matches: CocoMatches,
    errors: ErrorAnalysis,
    images=None,
    *,
    num_images: int = 8,
    ncols: int = 4,
    label: int | None = None,
    panel_size: float = 3.2,
):
    """The ``num_images`` images with the most errors (:func:`rank_images`), each with its true
    positives and false positives in their outcome's colour, missed objects cyan dashed, found
    ones white, ignored ones (crowd regions, other sizes) grey dotted; the legend names them.
    ``images`` as :func:`instseg_edu.viz.evaluation.image_source` takes them."""
    from matplotlib import patheffects
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    source = image_source(images)
    order = rank_images(errors, label)[:num_images]
    n = max(len(order), 1)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(order) :]:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, order):
        _draw_image(ax, matches, errors, int(i), source(int(matches.image_ids[i])))
        ax.set_title(outcome_title(matches, errors, int(i), label), fontsize=8)
    # Detections by outcome, then ground truth drawn as in the panels: found (white, outlined
    # here so that it shows on the white page), missed, ignored.
    handles = [Line2D([], [], color=OUTCOME_COLORS[name], linewidth=2, label=name)
               for name in COUNT_NAMES[:5]]  # fmt: skip
    outline = [patheffects.withStroke(linewidth=3.5, foreground="#444444")]
    for name, style in (("found", "-"), ("missed", "--"), ("ignored", ":")):
        handles.append(Line2D([], [], color=OUTCOME_COLORS[name], linewidth=2, linestyle=style,
                              label=f"{name} (ground truth)",
                              path_effects=outline if name == "found" else None))  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=7)
    fig.suptitle(f"{matches.iou_type}: images with the most errors (IoU {errors.iou_thr:.2f}, "
                 f"score ≥ {errors.score_thr:.2f})", fontsize=10)  # fmt: skip
    return fig


def _cell(v: float) -> str:
    return "n/a" if v is None or v < 0 else f"{v:.3f}"


def _analyse(matches_by_type, iou_thr, area, max_dets, score_thr):
    """Per IoU type: errors, the PR at ``iou_thr``, per-class AP, AP50 and AP75."""
    out = {}
    for t, m in matches_by_type.items():
        out[t] = {
            "errors": error_analysis(m, iou_thr, area, max_dets, score_thr),
            "pr": precision_recall(m, iou_thr, area, max_dets),
            "AP": per_class_ap(m, area, max_dets),
            "AP50": precision_recall(m, 0.5, area, max_dets).ap,
            "AP75": precision_recall(m, 0.75, area, max_dets).ap,
        }
    return out


def report_markdown(
    matches_by_type: dict[str, CocoMatches],
    *,
    iou_thr: float = 0.5,
    area: str = "all",
    max_dets: int = 100,
    score_thr: float = 0.3,
    title: str = "Evaluation report",
    figures: dict[str, dict[str, str]] | None = None,
    num_images: int = 8,
) -> str:
    """The Markdown summary: COCO's 12 numbers per IoU type, per-class AP (AP, AP50, AP75), the
    outcome counts per class at the chosen setting, the worst images, and links to ``figures``
    (``{iou_type: {caption: file name}}``)."""
    analysis = _analyse(matches_by_type, iou_thr, area, max_dets, score_thr)
    first = next(iter(matches_by_type.values()))
    names = first.class_names
    lines = [
        f"# {title}",
        "",
        f"{first.num_images} images, {first.num_classes} classes. Matching is pycocotools' "
        "COCOeval; the errors below are read from its matches at IoU "
        f"{iou_thr:.2f}, area {area}, max_dets {max_dets}, for detections scoring ≥ "
        f"{score_thr:.2f}.",
        "",
        "## COCO metrics",
        "",
        format_ap_table({t: m.stats for t, m in matches_by_type.items()}),
        "",
        "## Per-class AP",
        "",
    ]
    header = ["class", "ground truth"] + [
        f"{t} {k}" for t in matches_by_type for k in ("AP", "AP50", "AP75")
    ]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    num_gt = next(iter(analysis.values()))["pr"].num_gt
    for k, name in enumerate(names):
        cells = [name, str(int(num_gt[k]))] + [
            _cell(analysis[t][key][k]) for t in matches_by_type for key in ("AP", "AP50", "AP75")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Errors at IoU {iou_thr:.2f}, score ≥ {score_thr:.2f}",
        "",
        "A kept detection is a true positive or a false positive of one kind (checked in this "
        "order): **wrong class** (IoU ≥ the threshold with an object of another class), "
        "**duplicate** (IoU ≥ the threshold with an object of its class already matched by a "
        "higher score), **poor localisation** (best IoU with its class between "
        f"{LOCALISATION_MIN_IOU} and the threshold), **background** (the rest). False positives "
        "count under their predicted class, missed objects under their true class.",
        "",
        f"**Confusion matrix** (rows: ground-truth class, then background; columns: predicted "
        f"class, then missed). {CONFUSION_NOTE}",
    ]
    for t, m in matches_by_type.items():
        errors = analysis[t]["errors"]
        lines += ["", f"### {t}", "", "| class | " + " | ".join(COUNT_NAMES) + " |",
                  "|---|" + "---:|" * len(COUNT_NAMES)]  # fmt: skip
        for k, name in enumerate(names):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in errors.totals(k).values())
                         + " |")  # fmt: skip
        lines.append("| **all** | " + " | ".join(f"**{v}**" for v in errors.totals().values())
                     + " |")  # fmt: skip
        for caption, file in (figures or {}).get(t, {}).items():
            lines += ["", f"![{t} {caption}]({file})"]
        lines += ["", f"Images with the most errors ({t}):", "",
                  "| rank | image id | file | true positive | false positive | missed |",
                  "|---:|---:|---|---:|---:|---:|"]  # fmt: skip
        for rank, i in enumerate(rank_images(errors)[:num_images], start=1):
            c = errors.counts[i].sum(axis=0)
            fps = int(c[list(FALSE_POSITIVE_KINDS)].sum())
            lines.append(f"| {rank} | {m.image_ids[i]} | {m.file_names[i]} | {c[0]} | {fps} | "
                         f"{c[-1]} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(
    out_dir,
    matches_by_type: dict[str, CocoMatches],
    images=None,
    *,
    iou_thr: float = 0.5,
    area: str = "all",
    max_dets: int = 100,
    score_thr: float = 0.3,
    num_images: int = 8,
    title: str = "Evaluation report",
    dpi: int = 100,
) -> list[str]:
    """Write the analysis of each IoU type to ``out_dir``.

    Files: ``summary.md`` (:func:`report_markdown`), ``analysis.json`` (the same numbers, full
    precision: ``metrics`` = COCO's 12 per IoU type, ``per_class`` AP/AP50/AP75, ``errors`` counts
    per class and in all, ``worst_images`` ids) and per IoU type ``<type>_pr_curves.png``,
    ``<type>_confusion.png``, ``<type>_outcomes.png``, ``<type>_gallery.png``.

    Args:
        out_dir: folder (created when missing).
        matches_by_type: ``{iou_type: CocoMatches}`` (e.g. from
            :func:`~instseg_edu.engine.analysis.match_model`).
        images: pixels for the gallery, as :func:`instseg_edu.viz.evaluation.image_source` takes
            them (``None``: grey canvases).
        iou_thr, area, max_dets, score_thr: the setting of the error analysis.
        num_images: images in the gallery and the worst-images table.

    Returns:
        The names of the files written.
    """
    if not matches_by_type:
        raise ValueError("matches_by_type is empty: nothing to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analysis = _analyse(matches_by_type, iou_thr, area, max_dets, score_thr)
    written: list[str] = []
    figures: dict[str, dict[str, str]] = {}
    for t, m in matches_by_type.items():
        a = analysis[t]
        names = list(m.class_names)
        made = {
            "precision–recall": (f"{t}_pr_curves.png", pr_curves_plot(a["pr"], a["errors"], names)),
            "confusion": (f"{t}_confusion.png", confusion_plot(a["errors"], names)),
            "outcomes per class": (f"{t}_outcomes.png", error_counts_plot(a["errors"], names)),
            "error gallery": (
                f"{t}_gallery.png",
                error_gallery(m, a["errors"], images, num_images=num_images),
            ),
        }
        figures[t] = {}
        for caption, (file, fig) in made.items():
            fig.savefig(out / file, dpi=dpi)
            figures[t][caption] = file
            written.append(file)
    text = report_markdown(
        matches_by_type, iou_thr=iou_thr, area=area, max_dets=max_dets, score_thr=score_thr,
        title=title, figures=figures, num_images=num_images,
    )  # fmt: skip
    (out / "summary.md").write_text(text)
    data = {
        "settings": dict(iou_thr=iou_thr, area=area, max_dets=max_dets, score_thr=score_thr),
        "metrics": {t: m.stats for t, m in matches_by_type.items()},
        "per_class": {
            t: {
                name: {key: float(analysis[t][key][k]) for key in ("AP", "AP50", "AP75")}
                for k, name in enumerate(m.class_names)
            }
            for t, m in matches_by_type.items()
        },
        "errors": {
            t: {
                "all": analysis[t]["errors"].totals(),
                **{name: analysis[t]["errors"].totals(k) for k, name in enumerate(m.class_names)},
            }
            for t, m in matches_by_type.items()
        },
        "worst_images": {
            t: [int(m.image_ids[i]) for i in rank_images(analysis[t]["errors"])[:num_images]]
            for t, m in matches_by_type.items()
        },
    }
    (out / "analysis.json").write_text(json.dumps(data, indent=1))
    return ["summary.md", "analysis.json", *written]
