"""AssignerExplorer: move the MaxIoU thresholds and see which anchors become positive.

The explorer is built from a model — a RetinaNet or a YOLACT — and shows exactly what its loss
trains on: the assignment on screen is ``model.targets(outputs, batch).assignment`` for the image
in a batch of one (padded as ``collate`` pads it), with the model's own anchors, valid flags and
assigner config. The controls start at that config's ``pos_iou_thr``, ``neg_iou_thr``,
``min_pos_iou``, ``match_low_quality`` and ``gt_max_assign_all``; moving one calls the model's
``targets`` again with the config changed in that field only (an invalid combination is refused by
the config itself, and the message is shown). The counts come from
:func:`instseg_edu.ops.assign.assignment_summary`. The ``level`` filter only changes what is drawn:
the low-quality rescue (step 4) competes across all levels, as in training.

Taught in ``notebooks/03_assignment_and_box_coding.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import ipywidgets as W
import plotly.graph_objects as go
import torch
from instseg_edu.widgets.anchor_explorer import one_thread
from instseg_edu.widgets.controls import example_image, slider
from instseg_edu.widgets.variants import with_config
from torch import Tensor, nn

from instseg_edu.data.transforms import collate
from instseg_edu.ops.assign import Assignment, assignment_summary
from instseg_edu.structures import Target
from instseg_edu.viz.assign import (
    assignment_figure,
    iou_histogram,
    reason_paths,
    subsample_negatives,
    threshold_lines,
    unmatched_warning_html,
)

__all__ = ["AssignerExplorer", "targets_with_assigner"]


def targets_with_assigner(model: nn.Module, outputs, batch, **assigner_fields):
    """``model.targets(outputs, batch)`` with the model's ``train_cfg.assigner`` changed in the
    given fields (e.g. ``pos_iou_thr=0.7``); the model itself is left unchanged.

    The targets are computed by :func:`~instseg_edu.widgets.variants.with_config`: the same
    weights, anchors and code, a config that differs only there. Raises the config's
    ``ValueError`` for an invalid combination.
    """
    train_cfg = model.cfg.train_cfg
    assigner = replace(train_cfg.assigner, **assigner_fields)
    cfg = replace(model.cfg, train_cfg=replace(train_cfg, assigner=assigner))
    return with_config(model, cfg).targets(outputs, batch)


class AssignerExplorer:
    """MaxIoU assignment of a model's anchors to an image's ground truth, as its loss sees it.

    Args:
        model: a RetinaNet or YOLACT (anything with ``cfg.train_cfg.assigner``, ``targets``,
            ``anchors``, ``level_sizes`` and ``anchor_generator``); its head runs once on the
            image to get the feature-map sizes.
        image: ``float [3, H, W]`` in ``[0, 1]``; default: shapes image ``sample_index``.
        gt_boxes: ``float [G, 4]`` xyxy pixels (required with ``image``).
        gt_labels: ``int64 [G]``; class_names: their names (for hover text and warnings).
        max_negatives: at most this many negative anchors are drawn (they are hidden until
            clicked in the legend).

    Attributes (controls): ``pos_iou_thr``, ``neg_iou_thr``, ``min_pos_iou``,
    ``match_low_quality``, ``gt_max_assign_all``, ``level``. ``figure`` is the ``FigureWidget``,
    ``warning`` an HTML line (counts and unmatched ground truth), ``widget`` the container.
    ``batch`` and ``outputs`` are what ``model.targets`` is called with. After each update:
    ``targets`` (the model's), ``assignment`` (its image 0, fields ``[N]``), ``summary``,
    ``drawn`` (``bool [N]``), ``last_update_s``.
    """

    def __init__(
        self,
        model: nn.Module,
        image: Tensor | None = None,
        gt_boxes: Tensor | None = None,
        gt_labels: Tensor | None = None,
        class_names: Sequence[str] | None = None,
        *,
        image_size: int = 512,
        sample_index: int = 3,
        max_negatives: int = 1500,
    ) -> None:
        image, self.gt_boxes, gt_labels, self.class_names = example_image(
            image, gt_boxes, gt_labels, class_names, sample_index, image_size
        )
        self.model = model
        self.image = image
        g = self.gt_boxes.shape[0]
        self.gt_labels = gt_labels if gt_labels is not None else torch.zeros(g, dtype=torch.long)
        self.max_negatives = max_negatives
        h, w = image.shape[-2:]
        target = Target(self.gt_boxes, self.gt_labels, torch.zeros(g, h, w, dtype=torch.bool))
        self.batch = collate([(image, target)])
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.outputs = model(self.batch.images.to(device))
        model.train(was_training)
        self.batch = self.batch.to(device)
        sizes = self.outputs.featmap_sizes
        self.anchors = model.anchors(sizes, device).cpu()  # [N, 4], levels concatenated
        self.level_sizes = list(model.level_sizes(sizes))
        self.anchor_level = torch.cat(
            [torch.full((n,), i) for i, n in enumerate(self.level_sizes)]
        )  # [N]
        assigner = model.cfg.train_cfg.assigner
        neg = assigner.neg_iou_thr
        self._neg_low = neg[0] if isinstance(neg, tuple) else None  # a (lo, hi) pair: slide hi

        style = {"description_width": "110px"}
        layout = W.Layout(width="320px")  # of the level dropdown, as of the sliders
        self.pos_iou_thr = slider("pos_iou_thr", assigner.pos_iou_thr, 0.0, 1.0, 0.01)
        neg_hi = neg[1] if isinstance(neg, tuple) else neg
        self.neg_iou_thr = slider("neg_iou_thr", neg_hi, 0.0, 1.0, 0.01)
        self.min_pos_iou = slider("min_pos_iou", assigner.min_pos_iou, 0.0, 1.0, 0.01)
        self.match_low_quality = W.Checkbox(
            value=assigner.match_low_quality, description="match_low_quality"
        )
        self.gt_max_assign_all = W.Checkbox(
            value=assigner.gt_max_assign_all, description="gt_max_assign_all"
        )
        self.level = W.Dropdown(
            options=[("all levels", -1)]
            + [(f"stride {int(s)}", i) for i, s in enumerate(model.anchor_generator.strides)],
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
            pos_iou_thr=self.pos_iou_thr.value,
            neg_iou_thr=self.neg_iou_thr.value,
            min_pos_iou=self.min_pos_iou.value,
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
        """The assigner config fields the controls set (passed to :func:`targets_with_assigner`)."""
        neg = float(self.neg_iou_thr.value)
        return {
            "pos_iou_thr": float(self.pos_iou_thr.value),
            "neg_iou_thr": neg if self._neg_low is None else (min(self._neg_low, neg), neg),
            "min_pos_iou": float(self.min_pos_iou.value),
            "match_low_quality": bool(self.match_low_quality.value),
            "gt_max_assign_all": bool(self.gt_max_assign_all.value),
        }

    def _compute(self) -> None:
        self.targets = targets_with_assigner(
            self.model, self.outputs, self.batch, **self.assign_kwargs()
        )
        self.assignment = Assignment(*(f[0].cpu() for f in self.targets.assignment))  # image 0
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
        lines = threshold_lines(
            self.pos_iou_thr.value, self.neg_iou_thr.value, self.min_pos_iou.value, counts.max()
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
