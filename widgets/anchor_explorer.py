"""AnchorExplorer: change the anchor generator's config and see the anchors it tiles.

Every number on screen comes from :class:`instseg_edu.ops.anchors.AnchorGenerator` — the
generator the RetinaNet head uses — built from the controls' current values:

- ``octave_base_scale``, ``scales_per_octave``, ``ratios``, ``strides`` and ``center_offset`` are
  the generator's own arguments (MMDetection key names);
- ``view`` = ``"location"`` draws the ``A`` anchors of the cell under ``(x, y)`` on the chosen
  level(s); ``"level"`` draws a level's anchors on every k-th cell (sparse, so the tiling shows);
- each anchor is coloured by its best IoU with the ground truth; the bar chart counts
  ``H * W * A`` anchors per level.

Taught in ``notebooks/02_anchors.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import ipywidgets as W
import plotly.graph_objects as go
import torch
from instseg_edu.widgets.controls import example_image, slider
from torch import Tensor

from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.viz.anchors import (
    anchor_figure,
    best_iou,
    iou_binned_paths,
    location_anchor_indices,
    sparse_level_indices,
)

__all__ = ["AnchorExplorer", "STRIDE_PRESETS", "RATIO_CHOICES", "one_thread"]

STRIDE_PRESETS: dict[str, tuple[int, ...]] = {
    "P3–P7 (8 … 128), RetinaNet": (8, 16, 32, 64, 128),
    "P2–P6 (4 … 64), Mask R-CNN RPN": (4, 8, 16, 32, 64),
    "P3–P5 (8, 16, 32)": (8, 16, 32),
}
RATIO_CHOICES: tuple[str, ...] = ("0.25", "0.333", "0.5", "1.0", "2.0", "3.0", "4.0")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run an explorer update on one intra-op thread, then restore the previous setting.

    An update works on ~50k boxes: splitting such small ops across threads costs more than it
    saves, and on a busy machine (a training run, other kernels) thread contention turns a 30 ms
    update into a second. Widget callbacks run one at a time on the kernel's main thread, so the
    switch never overlaps other work of the same kernel.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class AnchorExplorer:
    """Anchors of an :class:`AnchorGenerator` over an image with ground truth.

    Args:
        image: ``float [3, H, W]`` in ``[0, 1]``; default: shapes image ``sample_index``.
        gt_boxes: ``float [G, 4]`` xyxy pixels (required with ``image``).
        gt_labels: ``int64 [G]`` (optional, for hover text).
        class_names: names for ``gt_labels``.
        image_size: side of the default shapes image.
        strides, ratios, octave_base_scale, scales_per_octave, center_offset: the initial
            generator config (RetinaNet's by default).
        max_cells: at most this many cells per level are drawn in ``"level"`` view.

    Attributes (controls): ``octave_base_scale``, ``scales_per_octave``, ``ratios``, ``strides``,
    ``center_offset``, ``view``, ``level``, ``x``, ``y`` — ipywidgets whose ``.value`` you may set.
    ``figure`` is the plotly ``FigureWidget``; ``widget`` the container to display.
    After each update: ``generator``, ``anchors`` (per level), ``anchor_iou`` (per level),
    ``shown`` (per-level indices drawn) and ``last_update_s``.
    """

    def __init__(
        self,
        image: Tensor | None = None,
        gt_boxes: Tensor | None = None,
        gt_labels: Tensor | None = None,
        class_names: Sequence[str] | None = None,
        *,
        image_size: int = 512,
        sample_index: int = 3,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        center_offset: float = 0.0,
        max_cells: int = 100,
    ) -> None:
        image, self.gt_boxes, self.gt_labels, self.class_names = example_image(
            image, gt_boxes, gt_labels, class_names, sample_index, image_size
        )
        self.image = image
        self.max_cells = max_cells
        h, w = image.shape[-2:]
        self.image_hw = (int(h), int(w))

        style = {"description_width": "130px"}
        layout = W.Layout(width="330px")
        sized = dict(label_width="130px", width="330px")
        self.octave_base_scale = slider(
            "octave_base_scale", octave_base_scale, 1.0, 10.0, 0.5, **sized
        )
        self.scales_per_octave = slider("scales_per_octave", scales_per_octave, 1, 6, **sized)
        self.center_offset = slider("center_offset", center_offset, 0.0, 1.0, 0.05, **sized)
        ratio_options = list(RATIO_CHOICES)
        initial = [_ratio_key(r, ratio_options) for r in ratios]
        self.ratios = W.SelectMultiple(
            options=ratio_options,
            value=tuple(initial),
            rows=len(ratio_options),
            description="ratios (h/w)",
            style=style,
            layout=W.Layout(width="230px"),
        )
        presets = dict(STRIDE_PRESETS)
        if tuple(strides) not in presets.values():
            presets[", ".join(str(s) for s in strides)] = tuple(strides)
        self.strides = W.Dropdown(
            options=list(presets.items()),
            value=tuple(strides),
            description="strides",
            style=style,
            layout=layout,
        )
        self.view = W.ToggleButtons(
            options=["location", "level"],
            value="location",
            description="view",
            style=style,
        )
        self.level = W.Dropdown(
            options=self._level_options(tuple(strides)),
            value=-1,
            description="level",
            style=style,
            layout=layout,
        )
        self.x = W.IntSlider(
            value=w // 2, min=0, max=w - 1, description="x (pixels)", style=style, layout=layout
        )
        self.y = W.IntSlider(
            value=h // 2, min=0, max=h - 1, description="y (pixels)", style=style, layout=layout
        )
        self.message = W.HTML()
        self._rebuilding_levels = False

        self.figure = go.FigureWidget()
        self._build_figure()
        controls = [
            self.octave_base_scale,
            self.scales_per_octave,
            self.ratios,
            self.strides,
            self.center_offset,
            self.view,
            self.level,
            self.x,
            self.y,
        ]
        for control in controls:
            control.observe(self._on_change, names="value")
        left = W.VBox(
            [
                self.octave_base_scale,
                self.scales_per_octave,
                self.center_offset,
                self.strides,
                self.level,
            ]
        )
        right = W.VBox([self.view, self.x, self.y])
        self.widget = W.VBox([W.HBox([left, self.ratios, right]), self.message, self.figure])
        self.widget.add_class("instseg-anchor-explorer")

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _level_options(strides: tuple[int, ...]) -> list[tuple[str, int]]:
        return [("all levels", -1)] + [(f"stride {s}", i) for i, s in enumerate(strides)]

    def make_generator(self) -> AnchorGenerator:
        """The generator for the controls' current values (raises ``ValueError`` if invalid)."""
        return AnchorGenerator(
            strides=self.strides.value,
            ratios=[float(r) for r in self.ratios.value],
            octave_base_scale=float(self.octave_base_scale.value),
            scales_per_octave=int(self.scales_per_octave.value),
            center_offset=float(self.center_offset.value),
        )

    def featmap_sizes(self, strides: Sequence[float]) -> list[tuple[int, int]]:
        """Feature-map size per level for this image: ``ceil(H / s) x ceil(W / s)``."""
        h, w = self.image_hw
        return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]

    def _compute(self) -> tuple[Tensor, Tensor]:
        """Build the anchors and pick the ones to draw; returns ``(boxes [n, 4], iou [n])``."""
        gen = self.make_generator()
        sizes = self.featmap_sizes(gen.strides)
        self.generator = gen
        self.anchors = gen.grid_anchors(sizes, "cpu")  # list of [H*W*A, 4]
        if self.view.value == "location":
            shown = location_anchor_indices(
                sizes, gen.strides, gen.num_base_anchors, self.x.value, self.y.value
            )
        else:
            shown = [
                sparse_level_indices(s, a, self.max_cells)
                for s, a in zip(sizes, gen.num_base_anchors)
            ]
        level = self.level.value
        if level >= 0:
            shown = [idx if i == level else idx[:0] for i, idx in enumerate(shown)]
        self.shown = shown
        boxes = torch.cat([a[idx] for a, idx in zip(self.anchors, shown)])  # [n, 4]
        # IoU of only the drawn anchors: the same box_iou the assigner uses, on a few boxes.
        iou = best_iou(boxes, self.gt_boxes)  # [n]
        self.shown_iou = iou
        return boxes, iou

    def _build_figure(self) -> None:
        boxes, iou = self._compute()
        gen = self.generator
        fig = anchor_figure(
            self.image,
            self.gt_boxes,
            boxes,
            iou,
            [len(a) for a in self.anchors],
            gen.strides,
            gt_labels=self.gt_labels,
            class_names=self.class_names,
            title=self._title(),
        )
        self.figure.add_traces(fig.data)
        self.figure.layout = fig.layout
        self.last_update_s = 0.0

    def _title(self) -> str:
        gen = self.generator
        a = gen.num_base_anchors[0]
        total = sum(len(x) for x in self.anchors)
        scales = ", ".join(f"{s:.2f}" for s in gen.scales)
        return f"A = {a} anchors per cell (scales {scales}); {total:,} anchors in all"

    def update(self) -> None:
        """Recompute from the controls and replace the figure's anchor traces in place."""
        start = time.perf_counter()
        try:
            with one_thread():
                boxes, iou = self._compute()
                paths = iou_binned_paths(boxes, iou)
        except ValueError as err:  # e.g. no ratio selected: say why, keep the last figure
            self.message.value = f"<b style='color:#b00'>{err}</b>"
            return
        self.message.value = ""
        counts = [len(a) for a in self.anchors]
        names = [f"stride {int(s)}" for s in self.generator.strides]
        with self.figure.batch_update():
            for trace, (x, y) in zip(self.figure.data[1 : 1 + len(paths)], paths):
                trace.x, trace.y = x, y
            bars = self.figure.data[-1]
            bars.x, bars.y, bars.text = names, counts, [f"{c:,}" for c in counts]
            self.figure.layout.title.text = self._title()
        self.last_update_s = time.perf_counter() - start

    def _on_change(self, change) -> None:
        if self._rebuilding_levels:
            return
        if change["owner"] is self.strides:
            # New levels: keep "all", or the same index when it still exists (one update only).
            old = self.level.value
            self._rebuilding_levels = True
            try:
                self.level.options = self._level_options(self.strides.value)
                self.level.value = old if old < len(self.strides.value) else -1
            finally:
                self._rebuilding_levels = False
        self.update()

    # Display: the explorer shows as its container.
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _ratio_key(r: float, options: list[str]) -> str:
    for o in options:
        if abs(float(o) - float(r)) < 1e-3:
            return o
    options.append(f"{float(r):g}")
    return options[-1]
