"""AssignerExplorer: move the MaxIoU thresholds and see which anchors become positive.

The assignment on screen is :func:`instseg_edu.ops.assign.max_iou_assign` over every anchor of every
level (concatenated, as the RetinaNet loss does), with the controls' ``pos_iou_thr``,
``neg_iou_thr``, ``min_pos_iou``, ``match_low_quality`` and ``gt_max_assign_all``; the counts come
from :func:`instseg_edu.ops.assign.assignment_summary`. The ``level`` filter only changes what is
drawn: the low-quality rescue (step 4) competes across all levels, as in training.

Taught in ``notebooks/03_assignment_and_box_coding.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import ipywidgets as W
import plotly.graph_objects as go
import torch
from instseg_edu.widgets.anchor_explorer import one_thread
from torch import Tensor

from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.ops.assign import assignment_summary, max_iou_assign
from instseg_edu.viz.anchors import shapes_sample
from instseg_edu.viz.assign import (
    assignment_figure,
    iou_histogram,
    reason_paths,
    subsample_negatives,
    threshold_lines,
    unmatched_warning_html,
)

__all__ = ["AssignerExplorer"]


class AssignerExplorer:
    """MaxIoU assignment of a generator's anchors to an image's ground truth.

    Args:
        image: ``float [3, H, W]`` in ``[0, 1]``; default: shapes image ``sample_index``.
        gt_boxes: ``float [G, 4]`` xyxy pixels (required with ``image``).
        gt_labels: ``int64 [G]``; class_names: their names (for hover text and warnings).
        generator: the :class:`AnchorGenerator` (default: RetinaNet's, strides 8–128, 9 anchors).
        pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality, gt_max_assign_all: initial
            assigner config (RetinaNet's by default).
        max_negatives: at most this many negative anchors are drawn (they are hidden until
            clicked in the legend).

    Attributes (controls): ``pos_iou_thr``, ``neg_iou_thr``, ``min_pos_iou``,
    ``match_low_quality``, ``gt_max_assign_all``, ``level``. ``figure`` is the ``FigureWidget``,
    ``warning`` an HTML line (counts and unmatched ground truth), ``widget`` the container.
    After each update: ``assignment``, ``summary``, ``drawn`` (``bool [N]``), ``last_update_s``.
    """

    def __init__(
        self,
        image: Tensor | None = None,
        gt_boxes: Tensor | None = None,
        gt_labels: Tensor | None = None,
        class_names: Sequence[str] | None = None,
        *,
        generator: AnchorGenerator | None = None,
        image_size: int = 512,
        sample_index: int = 3,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.4,
        min_pos_iou: float = 0.0,
        match_low_quality: bool = True,
        gt_max_assign_all: bool = True,
        max_negatives: int = 1500,
    ) -> None:
        if image is None:
            from instseg_edu.data.shapes import CLASSES

            image, gt_boxes, gt_labels = shapes_sample(sample_index, image_size)
            class_names = CLASSES if class_names is None else class_names
        if gt_boxes is None:
            raise ValueError("gt_boxes is required when an image is given")
        self.image = image
        self.gt_boxes = gt_boxes.float().reshape(-1, 4)
        g = self.gt_boxes.shape[0]
        self.gt_labels = gt_labels if gt_labels is not None else torch.zeros(g, dtype=torch.long)
        self.class_names = class_names
        self.max_negatives = max_negatives
        self.generator = generator or AnchorGenerator(
            strides=(8, 16, 32, 64, 128),
            ratios=(0.5, 1.0, 2.0),
            octave_base_scale=4,
            scales_per_octave=3,
        )
        h, w = image.shape[-2:]
        sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in self.generator.strides]
        per_level = self.generator.grid_anchors(sizes, "cpu")  # list of [H*W*A, 4]
        self.level_sizes = [len(a) for a in per_level]
        self.anchors = torch.cat(per_level)  # [N, 4], levels concatenated as in the loss
        self.anchor_level = torch.cat(
            [torch.full((n,), i) for i, n in enumerate(self.level_sizes)]
        )  # [N]

        style = {"description_width": "110px"}
        layout = W.Layout(width="320px")
        self.pos_iou_thr = W.FloatSlider(
            value=pos_iou_thr,
            min=0.0,
            max=1.0,
            step=0.01,
            description="pos_iou_thr",
            style=style,
            layout=layout,
        )
        self.neg_iou_thr = W.FloatSlider(
            value=neg_iou_thr,
            min=0.0,
            max=1.0,
            step=0.01,
            description="neg_iou_thr",
            style=style,
            layout=layout,
        )
        self.min_pos_iou = W.FloatSlider(
            value=min_pos_iou,
            min=0.0,
            max=1.0,
            step=0.01,
            description="min_pos_iou",
            style=style,
            layout=layout,
        )
        self.match_low_quality = W.Checkbox(
            value=match_low_quality, description="match_low_quality"
        )
        self.gt_max_assign_all = W.Checkbox(
            value=gt_max_assign_all, description="gt_max_assign_all"
        )
        self.level = W.Dropdown(
            options=[("all levels", -1)]
            + [(f"stride {int(s)}", i) for i, s in enumerate(self.generator.strides)],
            value=-1,
            description="level",
            style=style,
            layout=layout,
        )
        self.warning = W.HTML()

        self.figure = go.FigureWidget()
        self._compute()
        fig = assignment_figure(
            self.image,
            self.gt_boxes,
            self.anchors,
            self.assignment,
            self.summary,
            pos_iou_thr=pos_iou_thr,
            neg_iou_thr=neg_iou_thr,
            min_pos_iou=min_pos_iou,
            draw=self.drawn,
            gt_labels=self.gt_labels,
            class_names=self.class_names,
        )
        self.figure.add_traces(fig.data)
        self.figure.layout = fig.layout
        self.warning.value = self._warning_html()
        self.last_update_s = 0.0

        controls = [
            self.pos_iou_thr,
            self.neg_iou_thr,
            self.min_pos_iou,
            self.match_low_quality,
            self.gt_max_assign_all,
            self.level,
        ]
        for control in controls:
            control.observe(self._on_change, names="value")
        self.widget = W.VBox(
            [
                W.HBox(
                    [
                        W.VBox([self.pos_iou_thr, self.neg_iou_thr, self.min_pos_iou]),
                        W.VBox([self.match_low_quality, self.gt_max_assign_all, self.level]),
                    ]
                ),
                self.warning,
                self.figure,
            ]
        )
        self.widget.add_class("instseg-assigner-explorer")

    # ----------------------------------------------------------------------------------------------
    def assign_kwargs(self) -> dict:
        """The keyword arguments passed to :func:`max_iou_assign` for the current controls."""
        return {
            "pos_iou_thr": float(self.pos_iou_thr.value),
            "neg_iou_thr": float(self.neg_iou_thr.value),
            "min_pos_iou": float(self.min_pos_iou.value),
            "match_low_quality": bool(self.match_low_quality.value),
            "gt_max_assign_all": bool(self.gt_max_assign_all.value),
        }

    def _compute(self) -> None:
        self.assignment = max_iou_assign(
            self.anchors, self.gt_boxes, self.gt_labels, **self.assign_kwargs()
        )
        self.summary = assignment_summary(
            self.assignment, self.gt_boxes.shape[0], level_sizes=self.level_sizes
        )
        drawn = subsample_negatives(self.assignment.reason, self.max_negatives)  # [N]
        if self.level.value >= 0:
            drawn &= self.anchor_level == self.level.value
        self.drawn = drawn

    def _warning_html(self) -> str:
        return unmatched_warning_html(self.summary, self.gt_labels, self.class_names, self.gt_boxes)

    def update(self) -> None:
        """Re-run the assignment for the controls' values; replace the figure's data in place."""
        start = time.perf_counter()
        try:
            with one_thread():
                self._compute()
                paths = reason_paths(self.anchors[self.drawn], self.assignment.reason[self.drawn])
                _, counts = iou_histogram(self.assignment.max_iou)
        except ValueError as err:  # e.g. neg_iou_thr > pos_iou_thr: say why, keep the figure
            self.warning.value = f"<b style='color:#b00'>{err}</b>"
            return
        kw = self.assign_kwargs()
        lines = threshold_lines(
            kw["pos_iou_thr"], kw["neg_iou_thr"], kw["min_pos_iou"], counts.max()
        )
        pos = self.summary.pos_per_gt.tolist()
        data = self.figure.data
        with self.figure.batch_update():
            for trace, (x, y) in zip(data[1:5], paths):
                trace.x, trace.y = x, y
            data[6].y = counts
            for trace, (_, x, y) in zip(data[7:10], lines):
                trace.x, trace.y = x, y
            data[10].y, data[10].text = pos, [str(p) for p in pos]
        self.warning.value = self._warning_html()
        self.last_update_s = time.perf_counter() - start

    def _on_change(self, change) -> None:
        self.update()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
