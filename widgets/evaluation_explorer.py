"""EvaluationExplorer: page through a model's mistakes, sorted the way COCO counted them.

COCOeval runs once (:func:`instseg_edu.engine.analysis.match_coco`); the explorer reads its matches
and, for the chosen IoU threshold, area range, ``max_dets``, class and score threshold, shows

- an image with its true positives, false positives by kind (wrong class, duplicate, poor
  localisation, background) and missed objects; pick a detection (dropdown, or click its corner
  marker) to see the ground truth behind its outcome and the IoU;
- per-class precision–recall curves at that IoU, with each class's point at the score threshold;
- the confusion matrix with a background row and a missed column;
- the images ranked by their errors (FP + missed), to page through (``image`` 0 = the worst).

Every count comes from :func:`~instseg_edu.engine.analysis.error_analysis` and
:func:`~instseg_edu.engine.analysis.precision_recall`, so they add up to COCO's numbers.

    from instseg_edu.widgets import EvaluationExplorer
    EvaluationExplorer.from_model(model, val_set)            # a trained model and a CocoDataset
    # a saved one: model, meta = instseg_edu.engine.checkpoint.load_model("runs/demo/last.pt")
    EvaluationExplorer.from_results(coco_gt, results, images=val_set)   # COCO result dicts
    EvaluationExplorer({"bbox": m_box, "segm": m_mask})      # CocoMatches you already have
"""

from __future__ import annotations

from collections import OrderedDict

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go
from instseg_edu.widgets.controls import slider

from instseg_edu.engine.analysis import (
    AREA_NAMES,
    DROPPED,
    CocoMatches,
    error_analysis,
    match_coco,
    match_model,
    precision_recall,
    rank_images,
)
from instseg_edu.viz.evaluation import (
    IMAGE_TRACES,
    detection_label,
    detection_text,
    explorer_figure,
    explorer_titles,
    explorer_traces,
    image_source,
    summary_html,
)

#: ipywidgets' own label and control widths for this explorer's sliders.
_DEFAULT_SIZE = dict(label_width=None, width=None)

__all__ = ["EvaluationExplorer"]

_IMAGE_CACHE = 16  # decoded images kept in memory


def _same(a, b) -> bool:
    """Whether two trace property values are equal (arrays with NaN gaps, lists, dicts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (np.ndarray, list, tuple)) and isinstance(b, (np.ndarray, list, tuple)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    return type(a) is type(b) and a == b


class EvaluationExplorer:
    """Where a detector goes wrong, image by image, with COCO's own matching.

    Controls (public ``ipywidgets``; set ``.value`` from code to drive them): ``results`` (which
    of several :class:`~instseg_edu.engine.analysis.CocoMatches`: boxes or masks, or one model or
    another; hidden when there is one), ``iou_thr`` (0.50–0.95, COCO's thresholds; a value in
    between snaps to the nearest), ``area``, ``max_dets``, ``label`` (``-1``: every class),
    ``score_thr``, ``image`` (position in the ranking, 0 = most errors; ``previous`` / ``next``
    buttons), ``detection`` (a detection row of the current image, ``-1``: none). A change of
    ``results``, ``iou_thr``, ``area``, ``max_dets`` or ``label`` goes to the first image of the
    new ranking; a change of ``score_thr`` stays on the image shown. ``figure`` is one
    ``go.FigureWidget`` with three panels (the image, precision–recall, confusion; traces in
    :func:`~instseg_edu.viz.evaluation.explorer_trace_names` order); ``info`` (the selected
    detection) and ``summary`` (the counts) are HTML; ``widget`` is the layout to display. The
    current analysis is in ``errors``, ``pr`` and ``ranking``.

    Args:
        matches: a :class:`~instseg_edu.engine.analysis.CocoMatches`, or ``{name: matches}`` for
            the same images and classes: ``{"bbox": ..., "segm": ...}`` as
            :func:`~instseg_edu.engine.analysis.match_model` returns, or several models on one
            validation set, e.g. ``{"RetinaNet boxes": ..., "SOLO masks": ...}``.
        images: the pixels to draw on, as :func:`instseg_edu.viz.evaluation.image_source` takes
            them (a dataset, a mapping or callable ``image_id -> [3, h, w]``, or ``None``).
        iou_thr, area, max_dets, score_thr: the starting setting.
    """

    def __init__(
        self,
        matches: CocoMatches | dict[str, CocoMatches],
        images=None,
        *,
        iou_thr: float = 0.5,
        area: str = "all",
        max_dets: int = 100,
        score_thr: float = 0.3,
    ):
        by_name = dict(matches) if isinstance(matches, dict) else {matches.iou_type: matches}
        if not by_name:
            raise ValueError("matches is empty: give at least one CocoMatches")
        first = next(iter(by_name.values()))
        for t, m in by_name.items():
            if not np.array_equal(m.image_ids, first.image_ids) or m.class_names != (
                first.class_names
            ):
                raise ValueError(f"matches[{t!r}] covers other images or classes than the first")
        self.matches_by_name = by_name
        self._pixels = image_source(images)
        self._cache: OrderedDict[int, object] = OrderedDict()
        self._quiet = False  # True while controls are set programmatically

        self.results = ipw.Dropdown(options=list(by_name), description="results")
        self.results.layout.display = None if len(by_name) > 1 else "none"
        thrs, start = first.iou_thrs, first.iou_thrs[first.iou_index(iou_thr)]
        self.iou_thr = slider("IoU", start, float(thrs[0]), float(thrs[-1]), 0.05,
                              readout_format=".2f", **_DEFAULT_SIZE)  # fmt: skip
        self.area = ipw.Dropdown(options=list(AREA_NAMES), value=area, description="area")
        self.max_dets = ipw.Dropdown(
            options=list(first.max_dets), value=max_dets, description="max dets"
        )
        self.label = ipw.Dropdown(
            options=[("all classes", -1)] + [(n, k) for k, n in enumerate(first.class_names)],
            value=-1,
            description="class",
        )
        self.score_thr = slider("score", score_thr, 0.0, 1.0, 0.05, readout_format=".2f",
                                **_DEFAULT_SIZE)  # fmt: skip
        self.image = slider("image", 0, 0, max(first.num_images - 1, 0), **_DEFAULT_SIZE)
        self.image.tooltip = "position in the ranking: 0 has the most errors (FP + missed)"
        self.previous = ipw.Button(description="◀", layout=ipw.Layout(width="36px"))
        self.next = ipw.Button(description="▶", layout=ipw.Layout(width="36px"))
        self.caption = ipw.HTML()
        self.detection = ipw.Dropdown(
            options=[("none", -1)], value=-1, description="detection", layout={"width": "420px"}
        )
        self.info = ipw.HTML()
        self.summary = ipw.HTML()

        self._analyse()
        self.ranking = rank_images(self.errors, self._label())
        self._image_index = int(self.ranking[0]) if len(self.ranking) else 0
        self._refresh_detections()
        self.figure = go.FigureWidget(
            explorer_figure(self.matches, self.errors, self.pr, self._image_index,
                            self._image_pixels(self._image_index), label=self._label())
        )  # fmt: skip
        self.figure.data[IMAGE_TRACES.index("detections")].on_click(self._on_click)
        self._drawn = explorer_traces(
            self.matches,
            self.errors,
            self.pr,
            self._image_index,
            self._image_pixels(self._image_index),
            label=self._label(),
        )
        self._write_text()

        for control in (self.results, self.area, self.max_dets):
            control.observe(self._on_setting, names="value")
        self.iou_thr.observe(self._on_iou, names="value")
        self.score_thr.observe(self._on_score, names="value")
        self.label.observe(self._on_label, names="value")
        self.image.observe(self._on_image, names="value")
        self.detection.observe(self._on_detection, names="value")
        self.previous.on_click(lambda _: self._step(-1))
        self.next.on_click(lambda _: self._step(1))

        self.controls = [
            self.results,
            self.iou_thr,
            self.area,
            self.max_dets,
            self.label,
            self.score_thr,
            self.image,
            self.detection,
        ]
        self.widget = ipw.VBox(
            [
                ipw.HBox([self.results, self.iou_thr, self.area, self.max_dets]),
                ipw.HBox([self.label, self.score_thr]),
                ipw.HBox([self.previous, self.image, self.next, self.caption]),
                self.detection,
                self.info,
                self.figure,
                self.summary,
            ]
        )
        self.widget.add_class("instseg-evaluation-explorer")  # a handle for browser tests and CSS

    # -- construction from other inputs --------------------------------------------------------

    @classmethod
    def from_results(
        cls, coco_gt, results, images=None, *, iou_types=None, image_ids=None, **kwargs
    ) -> EvaluationExplorer:
        """Match COCO result dicts against ground truth (``bbox``, plus ``segm`` when the results
        carry masks) and explore them. ``coco_gt`` is a ``COCO``, a dict or a JSON path."""
        results = list(results)
        if iou_types is None:
            has_masks = any("segmentation" in r for r in results)
            iou_types = ("bbox", "segm") if has_masks else ("bbox",)
        matches = {t: match_coco(coco_gt, results, t, image_ids=image_ids) for t in iou_types}
        return cls(matches, images, **kwargs)

    @classmethod
    def from_model(
        cls,
        model,
        dataset,
        *,
        batch_size: int = 4,
        device=None,
        iou_types=None,
        max_batches: int | None = None,
        **kwargs,
    ) -> EvaluationExplorer:
        """Run a trained model over a :class:`~instseg_edu.data.coco.CocoDataset` (with
        ``eval_transforms``) and explore its detections on the dataset's images. A model saved by
        ``instseg-edu train`` / ``demo`` or a notebook comes back with
        :func:`~instseg_edu.engine.checkpoint.load_model`."""
        from instseg_edu.engine.train import make_loader

        loader = make_loader(dataset, batch_size, shuffle=False)
        matches = match_model(
            model, loader, dataset.coco, dataset.label_to_cat_id, device,
            iou_types=iou_types, max_batches=max_batches,
        )  # fmt: skip
        return cls(matches, images=dataset, **kwargs)

    # -- state -----------------------------------------------------------------------------------

    @property
    def matches(self) -> CocoMatches:
        """The :class:`~instseg_edu.engine.analysis.CocoMatches` shown (``results`` picks it)."""
        return self.matches_by_name[self.results.value]

    @property
    def image_id(self) -> int:
        """COCO id of the image shown."""
        return int(self.matches.image_ids[self._image_index])

    def _label(self) -> int | None:
        return None if self.label.value < 0 else int(self.label.value)

    def _analyse(self) -> None:
        m = self.matches
        iou = float(m.iou_thrs[m.iou_index(self.iou_thr.value)])  # COCO's own float
        self.errors = error_analysis(m, iou, self.area.value, self.max_dets.value,
                                     self.score_thr.value)  # fmt: skip
        self.pr = precision_recall(m, iou, self.area.value, self.max_dets.value)

    def _image_pixels(self, i: int):
        image_id = int(self.matches.image_ids[i])
        if image_id not in self._cache:
            self._cache[image_id] = self._pixels(image_id)
            if len(self._cache) > _IMAGE_CACHE:
                self._cache.popitem(last=False)
        return self._cache[image_id]

    def _rerank(self, *, keep_image: bool) -> None:
        """Rank the images for the current analysis and class.

        ``keep_image``: stay on the image shown, at its new rank (the score slider: watch its
        detections come and go). Otherwise go to rank 1, the image with the most errors under the
        new filter: after picking a class, the image at the old rank 29 may not even hold it.
        """
        self.ranking = rank_images(self.errors, self._label())
        if keep_image:
            position = int(np.flatnonzero(self.ranking == self._image_index)[0])
        else:
            position, self._image_index = 0, int(self.ranking[0])
        self._set_quietly(self.image, position)

    def _set_quietly(self, control, value) -> None:
        self._quiet = True
        try:
            control.value = value
        finally:
            self._quiet = False

    def _refresh_detections(self, keep: bool = True) -> None:
        """Options of the detection dropdown: the image's drawn detections, best score first.

        ``keep``: the selected detection stays selected while it is still drawn. Pass ``False``
        when the rows name other detections (another ``results``: row 62 of model B's matches is
        not model A's detection 62).
        """
        m, e, i = self.matches, self.errors, self._image_index
        rows = np.arange(m.dt_start[i], m.dt_start[i + 1])
        rows = rows[e.dt_outcome[rows] != DROPPED]
        if self._label() is not None:
            rows = rows[m.dt_label[rows] == self._label()]
        rows = rows[np.argsort(-m.dt_score[rows], kind="stable")]
        options = [("none", -1)] + [(detection_label(m, e, int(r)), int(r)) for r in rows]
        selected = self.detection.value
        if not keep or selected not in {v for _, v in options}:
            selected = -1
        self._quiet = True
        try:
            self.detection.options = options
            self.detection.value = selected
        finally:
            self._quiet = False

    # -- updates ---------------------------------------------------------------------------------

    def _on_iou(self, change) -> None:
        """The slider moves in COCO's steps of 0.05; a value set from code between two of them
        (``ex.iou_thr.value = 0.62``) is snapped to the nearest (0.60), which calls this again."""
        if self._quiet:
            return
        thrs = self.matches.iou_thrs
        nearest = round(float(thrs[np.abs(thrs - change["new"]).argmin()]), 2)
        if abs(nearest - change["new"]) > 1e-6:
            self.iou_thr.value = nearest
            return
        self._on_setting(change)

    def _on_setting(self, change) -> None:
        if self._quiet:
            return
        self._analyse()
        self._rerank(keep_image=False)
        self._refresh_detections(keep=change["owner"] is not self.results)
        self._redraw()

    def _on_score(self, change) -> None:
        if self._quiet:
            return
        m = self.matches
        self.errors = error_analysis(
            m, self.errors.iou_thr, self.area.value, self.max_dets.value, self.score_thr.value
        )
        self._rerank(keep_image=True)
        self._refresh_detections()
        self._redraw()

    def _on_label(self, change) -> None:
        if self._quiet:
            return
        self._rerank(keep_image=False)
        self._refresh_detections()
        self._redraw()

    def _on_image(self, change) -> None:
        if self._quiet:
            return
        self._image_index = int(self.ranking[change["new"]])
        self._refresh_detections()
        self._redraw()

    def _on_detection(self, change) -> None:
        if self._quiet:
            return
        self._redraw()

    def _on_click(self, trace, points, state) -> None:
        if points.point_inds:
            row = int(trace.customdata[points.point_inds[0]])
            if row in {v for _, v in self.detection.options}:
                self.detection.value = row

    def _step(self, delta: int) -> None:
        self.image.value = int(np.clip(self.image.value + delta, self.image.min, self.image.max))

    def _redraw(self) -> None:
        """Push the current analysis to the figure (in place) and the text."""
        m, e, i, label = self.matches, self.errors, self._image_index, self._label()
        data = explorer_traces(
            m, e, self.pr, i, self._image_pixels(i), label=label, selected=self.detection.value
        )
        h, w = (int(v) for v in m.image_sizes[i])
        with self.figure.batch_update():
            # Only what changed: plotly validates every property it is given, which costs more
            # than the analysis, and the browser redraws less.
            for j, (trace, values) in enumerate(zip(self.figure.data, data)):
                changed = {k: v for k, v in values.items() if not _same(v, self._drawn[j].get(k))}
                if changed:
                    trace.update(changed)
                    self._drawn[j].update(changed)
            for annotation, title in zip(self.figure.layout.annotations,
                                         explorer_titles(m, e, i, label)):  # fmt: skip
                annotation.text = title
            self.figure.layout.xaxis.range = [0, w]
            self.figure.layout.yaxis.range = [h, 0]
        self._write_text()

    def _write_text(self) -> None:
        m, e = self.matches, self.errors
        name = m.file_names[self._image_index]
        self.caption.value = (
            f"rank {self.image.value + 1} of {m.num_images} by errors · image {self.image_id}"
            + (f" ({name})" if name else "")
        )
        d = self.detection.value
        self.info.value = (
            detection_text(m, e, d)
            if d >= 0
            else "Pick a detection (or click its corner marker) to see why it counts as it does."
        )
        self.summary.value = summary_html(m, e, self.pr, self._label(), per_class=False)

    # -- display ---------------------------------------------------------------------------------

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
