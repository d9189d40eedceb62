"""Static matplotlib figures: an image with its boxes, masks and labels; a grid; a loss curve.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so nothing depends on
a global "current figure" and figures can be created in tests, scripts and notebooks alike
(in a notebook, a returned ``Figure`` displays itself; in a script, call ``fig.savefig(path)``).
matplotlib is imported inside the functions: ``import instseg_edu`` never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor


def _palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours in ``[0, 1]``, ``float [n, 3]`` (tab10, then tab20)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N)[:3] for i in range(max(n, 1))])


def _numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return (
            x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
        )
    return np.asarray(x)


def _label_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    masks: Tensor | None = None,
    scores: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    ax=None,
    *,
    score_thr: float = 0.0,
    mask_alpha: float = 0.45,
    title: str | None = None,
    image_size: tuple[int, int] | None = None,
    gt_boxes: Tensor | None = None,
):
    """Draw boxes, translucent masks with their outlines, and ``label score`` tags on an image.

    Args:
        image: ``float [3, H, W]`` in ``[0, 1]`` (a ``Batch`` image; may include padding).
        boxes: ``float [K, 4]`` xyxy pixels of ``image``.
        labels: ``int [K]`` in ``0..C-1``; the colour is chosen per class.
        masks: optional ``bool [K, h, w]``; drawn over the top-left ``h × w`` of the image (masks
            at the true size and masks padded like the batch both line up).
        scores: optional ``[K]``; shown after the name, and detections below ``score_thr`` skipped.
        class_names: names indexed by label.
        ax: draw into this matplotlib ``Axes`` instead of a new figure.
        image_size: ``(h, w)`` to crop the image to (``Batch.image_sizes[i]``), hiding padding.
        gt_boxes: optional ``float [G, 4]`` xyxy ground-truth boxes, drawn first as dashed white
            outlines, so a missed object shows as a dashed box with no prediction on it.

    Returns:
        The ``matplotlib.figure.Figure`` drawn on.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    img = _numpy(image)
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(img.shape)}")
    if image_size is not None:
        img = img[:, : image_size[0], : image_size[1]]
    img = np.clip(img.transpose(1, 2, 0), 0, 1)  # [H, W, 3]
    h, w = img.shape[:2]
    boxes = _numpy(boxes).reshape(-1, 4)
    labels = _numpy(labels).reshape(-1).astype(int)
    scores_np = None if scores is None else _numpy(scores).reshape(-1)
    keep = np.ones(len(boxes), dtype=bool) if scores_np is None else scores_np >= score_thr
    num_classes = len(class_names) if class_names is not None else int(labels.max(initial=0)) + 1
    colors = _palette(num_classes)

    if ax is None:
        fig = Figure(figsize=(6, 6 * h / max(w, 1)), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    ax.imshow(img, extent=(0, w, h, 0))
    if gt_boxes is not None:
        for x1, y1, x2, y2 in _numpy(gt_boxes).reshape(-1, 4):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white",
                                   linestyle=(0, (3, 2)), linewidth=1.0))  # fmt: skip
    if masks is not None and len(masks):
        m = _numpy(masks).astype(bool)[:, :h, :w]  # [K, h', w']
        overlay = np.zeros((h, w, 4))  # RGBA
        # Later (lower-scored) masks first, so the best detection ends up on top.
        for k in np.flatnonzero(keep)[::-1]:
            region = np.zeros((h, w), dtype=bool)
            region[: m.shape[1], : m.shape[2]] = m[k]
            overlay[region, :3] = colors[labels[k] % len(colors)]
            overlay[region, 3] = mask_alpha
        ax.imshow(overlay, extent=(0, w, h, 0))
        # Each mask's outline in its class colour: where masks overlap, the fills blend.
        for k in np.flatnonzero(keep):
            if m[k].any():
                ys, xs = np.arange(m.shape[1]) + 0.5, np.arange(m.shape[2]) + 0.5  # pixel centres
                ax.contour(xs, ys, m[k].astype(float), levels=[0.5], linewidths=1.0,
                           colors=[colors[labels[k] % len(colors)]])  # fmt: skip
    for k in np.flatnonzero(keep):
        x1, y1, x2, y2 = boxes[k]
        color = colors[labels[k] % len(colors)]
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5)
        )
        text = _label_name(int(labels[k]), class_names)
        if scores_np is not None:
            text += f" {scores_np[k]:.2f}"
        ax.text(x1, y1, text, fontsize=7, color="white", va="bottom", ha="left",
                bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"})  # fmt: skip
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def gallery(
    images: Sequence[Tensor] | Tensor,
    detections: Sequence,
    class_names: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    score_thr: float = 0.3,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    titles: Sequence[str] | None = None,
    panel_size: float = 3.0,
    ground_truth: Sequence | None = None,
):
    """A grid of :func:`draw_detections` panels.

    Args:
        images: ``[B, 3, H, W]`` or a list of ``[3, H, W]``.
        detections: per image, anything with ``boxes``, ``labels`` and optionally ``masks`` and
            ``scores`` — :class:`~instseg_edu.structures.Detections` or a ground-truth
            :class:`~instseg_edu.structures.Target`.
        image_sizes: true sizes to crop padding away (``Batch.image_sizes``).
        ground_truth: per image, anything with ``boxes`` (a ``Target``): drawn as dashed white
            outlines under the detections.
        panel_size: inches per panel (a saved figure's pixels: ``panel_size`` x its dpi).
    """
    from matplotlib.figure import Figure

    n = len(detections)
    if len(images) != n:
        raise ValueError(f"{len(images)} images but {n} detections")
    if ground_truth is not None and len(ground_truth) != n:
        raise ValueError(f"{len(ground_truth)} ground truths but {n} detections")
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        det = detections[i]
        draw_detections(
            images[i], det.boxes, det.labels, getattr(det, "masks", None),
            getattr(det, "scores", None), class_names, ax=ax, score_thr=score_thr,
            title=None if titles is None else titles[i],
            image_size=None if image_sizes is None else image_sizes[i],
            gt_boxes=None if ground_truth is None else ground_truth[i].boxes,
        )  # fmt: skip
    return fig


def loss_curve_figure(history, *, smooth: int = 20):
    """Loss terms (log scale, with a moving average), learning rate, and evaluation AP if any.

    Args:
        history: a :class:`~instseg_edu.engine.train.History` or its ``to_dict()``.
        smooth: moving-average window in steps (raw values are drawn faintly behind).
    """
    from matplotlib.figure import Figure

    steps_list = history["steps"] if isinstance(history, dict) else history.steps
    evals = history["evals"] if isinstance(history, dict) else history.evals
    keys = sorted(
        {k for s in steps_list for k in s if k == "loss" or k.startswith("loss_")},
        key=lambda k: (k != "loss", k),
    )
    panels = 2 + bool(evals)
    fig = Figure(figsize=(10, 3 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    colors = _palette(len(keys))
    for color, key in zip(colors, keys):
        xs = np.array([s["step"] for s in steps_list if key in s])
        ys = np.array([s[key] for s in steps_list if key in s], dtype=float)
        if len(xs) == 0:
            continue
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        if len(ys) >= smooth > 1:
            kernel = np.ones(smooth) / smooth
            ax.plot(xs[smooth - 1 :], np.convolve(ys, kernel, mode="valid"), color=color,
                    label=key, linewidth=1.6)  # fmt: skip
        else:
            ax.plot(xs, ys, color=color, label=key, linewidth=1.6)
    if any(s.get("loss", 0) > 0 for s in steps_list):
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot([s["step"] for s in steps_list], [s.get("lr", np.nan) for s in steps_list], color="k")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[2]
        for iou_type in sorted({t for e in evals for t in e["metrics"]}):
            pts = [(e["step"], e["metrics"][iou_type].get("AP")) for e in evals
                   if isinstance(e["metrics"].get(iou_type), dict)]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{iou_type} AP")
        ax.set_ylabel("AP")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig
