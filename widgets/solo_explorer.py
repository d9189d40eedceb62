"""SOLOGridExplorer: pick a level, sigma and scale ranges; see which grid cells SOLO trains and
what mask channel ``i · S + j`` of a cell learns.

The explorer is built from a SOLO model and shows what its loss trains on: every assignment is
``model.targets(outputs, batch)`` for the image (a batch of one), with the model's head config —
the controls change its ``sigma`` and ``scale_ranges`` only — and the mask target on the right is
that call's ``ins_masks`` row of the selected channel, at the model's own mask size. The figure
is :func:`instseg_edu.viz.solo.solo_grid_figure`. Nothing is recomputed here.

    from instseg_edu.widgets.solo_explorer import SOLOGridExplorer
    SOLOGridExplorer(model, batch.images[0], batch.targets[0])
"""

from __future__ import annotations

from dataclasses import replace

import ipywidgets as ipw
import plotly.graph_objects as go
import torch
from instseg_edu.widgets.variants import with_config
from torch import Tensor

from instseg_edu.models.solo import SOLO, SOLOImageTargets, SOLOTargets
from instseg_edu.structures import Batch, Target
from instseg_edu.viz.solo import positive_channels, solo_grid_figure, solo_grid_traces

__all__ = ["SOLOGridExplorer"]


class SOLOGridExplorer:
    """The grid targets of one image, live, as a SOLO model builds them.

    Controls (public ``ipywidgets``; set ``.value`` from code to drive them): ``level``, ``sigma``
    (centre-region factor), ``scale_range`` (the current level's ``(lo, hi)``), ``channel`` (one
    positive mask channel of the level, shown on the right). ``figure`` is the
    ``go.FigureWidget``, ``targets`` the model's current :class:`SOLOTargets` (a batch of one),
    ``assigned`` its :class:`SOLOImageTargets`, ``head`` the model's head config with the edited
    values, ``widget`` the layout to display.

    Args:
        model: the SOLO whose ``targets`` and head config are shown; its forward runs once on the
            image (for the mask sizes).
        image: ``float [3, Hp, Wp]`` in ``[0, 1]`` (a padded batch image, sides multiples of 32).
        target: its ground truth, masks ``[G, Hp, Wp]``.
    """

    def __init__(self, model: SOLO, image: Tensor, target: Target):
        self.model = model
        self.image = image.detach().float().cpu()
        self.target = target.to("cpu")
        device = next(model.parameters()).device
        size = (int(image.shape[-2]), int(image.shape[-1]))
        self.batch = Batch(self.image[None], [size], [self.target]).to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.outputs = model(self.batch.images)
        model.train(was_training)
        self.head = model.cfg.bbox_head
        levels = len(self.head.num_grids)
        self.level = ipw.IntSlider(value=0, min=0, max=levels - 1, description="level")
        self.sigma = ipw.FloatSlider(value=self.head.sigma, min=0.05, max=1.0, step=0.05,
                                     description="sigma")  # fmt: skip
        lo, hi = self.head.scale_ranges[0]
        self.scale_range = ipw.FloatRangeSlider(
            value=(lo, hi), min=0.0, max=2048.0, step=1.0, description="scales",
            readout_format=".0f",  # "1 – 96": the default ".2f" does not fit the readout
        )  # fmt: skip
        self.channel = ipw.Dropdown(options=[], description="channel")
        self.summary = ipw.HTML()
        self._quiet = False  # True while controls are set programmatically

        self.assigned = self._assign()
        self._refresh_channels()
        data = solo_grid_traces(self.target, self.assigned, *self._level_args())
        self.figure = go.FigureWidget(solo_grid_figure(self.image, data))
        self._write_summary()
        self.level.observe(self._on_level, names="value")
        for control in (self.sigma, self.scale_range):
            control.observe(self._on_assignment, names="value")
        self.channel.observe(lambda _: self._quiet or self.update(), names="value")
        self.widget = ipw.VBox(
            [
                ipw.HBox(
                    [ipw.VBox([self.level, self.sigma]), ipw.VBox([self.scale_range, self.channel])]
                ),
                self.summary,
                self.figure,
            ]  # fmt: skip
        )
        self.widget.add_class("instseg-solo-explorer")

    # -- state -------------------------------------------------------------------------------

    def _assign(self) -> SOLOImageTargets:
        """The model's ``targets`` with the edited head config; image 0's assignment."""
        model = with_config(self.model, replace(self.model.cfg, bbox_head=self.head))
        self.targets: SOLOTargets = model.targets(self.outputs, self.batch)
        return SOLOImageTargets(*(_cpu(f) for f in self.targets.per_image[0]))

    def mask_size(self, level: int) -> tuple[int, int]:
        """The level's mask size: that of the model's ``mask_logits`` (and of its mask targets)."""
        return tuple(self.outputs.mask_logits[level].shape[-2:])

    def mask_target(self, level: int, channel: int | None) -> Tensor:
        """``float [h, w]``: what mask channel ``channel`` of ``level`` is trained towards — its
        row of the model's ``ins_masks`` — or zeros when it has no mask target (no object, or a
        box-only object)."""
        if channel is not None:
            row = (self.targets.pos_inds[level] == channel).nonzero()  # batch of one: row = channel
            if len(row):
                return self.targets.ins_masks[level][int(row[0, 0])].cpu()
        return torch.zeros(self.mask_size(level))

    def _level_args(self):
        lvl, channel = self.level.value, self.channel.value
        return (lvl, self.head.num_grids[lvl], self.head.sigma, self.mask_target(lvl, channel),
                channel)  # fmt: skip

    def _refresh_channels(self) -> None:
        s = self.head.num_grids[self.level.value]
        options = [(f"({k // s}, {k % s}) -> {k}", k)
                   for k in positive_channels(self.assigned, self.level.value)]  # fmt: skip
        self._quiet = True
        try:
            self.channel.options = options
            self.channel.value = options[0][1] if options else None
        finally:
            self._quiet = False

    def _write_summary(self) -> None:
        lvl = self.level.value
        n = len(positive_channels(self.assigned, lvl))
        objects = int(self.assigned.levels[:, lvl].sum())
        self.summary.value = (
            f"level {lvl}: S = {self.head.num_grids[lvl]}, {objects} object(s), "
            f"{n} positive cell(s) / mask channel(s)"
        )

    # -- updates -----------------------------------------------------------------------------

    def _on_level(self, change) -> None:
        self._quiet = True
        try:
            self.scale_range.value = tuple(self.head.scale_ranges[change["new"]])
        finally:
            self._quiet = False
        self._refresh_channels()
        self.update()

    def _on_assignment(self, _change) -> None:
        if self._quiet:
            return
        ranges = list(self.head.scale_ranges)
        ranges[self.level.value] = tuple(self.scale_range.value)
        self.head = replace(self.head, sigma=self.sigma.value, scale_ranges=tuple(ranges))
        self.assigned = self._assign()
        self._refresh_channels()
        self.update()

    def update(self) -> None:
        """Push the current assignment of the current level to the figure."""
        data = solo_grid_traces(self.target, self.assigned, *self._level_args())
        with self.figure.batch_update():
            for trace, d in zip(self.figure.data[1:], data):
                trace.update(d)
        self._write_summary()

    # -- display -----------------------------------------------------------------------------

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _cpu(x):
    return [t.cpu() for t in x] if isinstance(x, list) else x.cpu()
