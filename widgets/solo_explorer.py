"""SOLOGridExplorer: pick a level, sigma and scale ranges; see which grid cells SOLO trains and
what mask channel ``i · S + j`` of a cell learns.

Every assignment comes from :func:`instseg_edu.models.solo.solo_target_single`, the function
``SOLO.targets`` (and so the loss) calls for each image; the figure is
:func:`instseg_edu.viz.solo.solo_grid_figure`. Nothing is recomputed here.

    from instseg_edu.widgets.solo_explorer import SOLOGridExplorer
    SOLOGridExplorer(batch.images[0], batch.targets[0])               # SOLO R50 defaults
    SOLOGridExplorer(image, target, head=SOLO_R18_SMALL.bbox_head)    # another head config
"""

from __future__ import annotations

from dataclasses import replace

import ipywidgets as ipw
import plotly.graph_objects as go
from torch import Tensor

from instseg_edu.models.solo import SOLOHeadConfig, SOLOImageTargets, solo_target_single
from instseg_edu.structures import Target
from instseg_edu.viz.solo import positive_channels, solo_grid_figure, solo_grid_traces

__all__ = ["SOLOGridExplorer"]


class SOLOGridExplorer:
    """The grid targets of one image, live.

    Controls (public ``ipywidgets``; set ``.value`` from code to drive them): ``level``, ``sigma``
    (centre-region factor), ``scale_range`` (the current level's ``(lo, hi)``), ``channel`` (one
    positive mask channel of the level, shown on the right). ``figure`` is the
    ``go.FigureWidget``, ``assigned`` the current :class:`SOLOImageTargets`, ``head`` the
    :class:`SOLOHeadConfig` with the edited values, ``widget`` the layout to display.

    Args:
        image: ``float [3, Hp, Wp]`` in ``[0, 1]`` (a padded batch image).
        target: its ground truth, masks ``[G, Hp, Wp]``.
        head: the head config whose ``num_grids``, ``scale_ranges``, ``sigma`` and ``strides``
            start the controls (mask sizes follow SOLO: ``Hp / (stride / 2)``).
    """

    def __init__(self, image: Tensor, target: Target, head: SOLOHeadConfig | None = None):
        self.image = image.detach().float().cpu()
        self.target = target.to("cpu")
        self.head = head or SOLOHeadConfig()
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
        self.figure = go.FigureWidget(
            solo_grid_figure(self.image, self.target, self.assigned, *self._level_args())
        )
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
        t = self.target
        return solo_target_single(
            t.boxes,
            t.labels,
            t.masks,
            num_grids=self.head.num_grids,
            scale_ranges=self.head.scale_ranges,
            sigma=self.head.sigma,
        )

    def mask_size(self, level: int) -> tuple[int, int]:
        """The level's mask-branch size: the padded image over the mask stride ``stride / 2``."""
        hp, wp = self.target.masks.shape[-2:]
        out_stride = self.head.strides[level] // 2
        return (hp // out_stride, wp // out_stride)

    def _level_args(self):
        lvl = self.level.value
        return (lvl, self.head.num_grids[lvl], self.head.sigma, self.mask_size(lvl),
                self.channel.value)  # fmt: skip

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
