"""RoIExplorer: move an RoI over a feature map and watch RoIPool and RoIAlign disagree.

The left panel draws the feature map in image pixels, the RoI (white), the cells RoIPool snaps it
to (orange: dashed outline of the rounded RoI, thin lines for each bin's cells) and RoIAlign's
real-valued bins and bilinear sample points (blue; red crosses read 0 because they fall off the
map). The other panels show both 7×7 (or ``output_size``) outputs and their difference; the label
gives RoIPool's misalignment in image pixels. Every number comes from ``instseg_edu.ops.roi``
through ``instseg_edu.viz.roi``; nothing is recomputed here.

    from instseg_edu.widgets.roi_explorer import RoIExplorer
    RoIExplorer()                      # synthetic image pooled at the chosen stride
    RoIExplorer(features=fpn_level, spatial_scale=1 / 8)   # a real [C, H, W] map
"""

from __future__ import annotations

import ipywidgets as ipw
import plotly.graph_objects as go
from torch import Tensor

from instseg_edu.viz.roi import (
    compare_roi_ops,
    misalignment_text,
    roi_comparison_figure,
    roi_comparison_traces,
    synthetic_feature_map,
)

__all__ = ["RoIExplorer"]

SCALES = [("1/4", 1 / 4), ("1/8", 1 / 8), ("1/16", 1 / 16), ("1/32", 1 / 32), ("1", 1.0)]


class RoIExplorer:
    """An RoI on a feature map, pooled by RoIPool and RoIAlign side by side.

    Controls (public ``ipywidgets``, set ``.value`` to drive them from code): ``x1, y1, x2, y2``
    (RoI corners in image pixels), ``output_size``, ``sampling_ratio`` (0 = adaptive),
    ``spatial_scale``, ``aligned``, ``channel``. ``figure`` is the ``go.FigureWidget``,
    ``misalignment`` the label, ``widget`` the layout to display.

    Args:
        features: ``[C, H, W]`` (or ``[H, W]``, ``[1, C, H, W]``) map. ``None`` uses a synthetic
            ``image_size``² image average-pooled by ``1 / spatial_scale``, re-pooled whenever
            ``spatial_scale`` changes (so the map is always that image's level at that stride).
        roi: initial ``(x1, y1, x2, y2)`` in image pixels.
    """

    def __init__(
        self,
        features: Tensor | None = None,
        roi: tuple[float, float, float, float] = (90.0, 70.0, 330.0, 262.0),
        output_size: int = 7,
        sampling_ratio: int = 2,
        spatial_scale: float = 1 / 16,
        aligned: bool = False,
        image_size: int = 512,
    ):
        self._user_features = None
        if features is not None:
            while features.dim() < 4:
                features = features[None]  # -> [1, C, H, W]
            self._user_features = features[:1].detach().float().cpu()
        self.image_size = image_size

        options = list(SCALES)
        if all(abs(v - spatial_scale) > 1e-12 for _, v in options):
            options.append((f"{spatial_scale:g}", spatial_scale))
        self.spatial_scale = ipw.Dropdown(options=options, value=spatial_scale, description="scale")
        extent = self._extent(spatial_scale)
        slider = dict(min=-0.25 * extent, max=1.25 * extent, step=1.0, continuous_update=True)
        self.x1 = ipw.FloatSlider(value=roi[0], description="x1", **slider)
        self.y1 = ipw.FloatSlider(value=roi[1], description="y1", **slider)
        self.x2 = ipw.FloatSlider(value=roi[2], description="x2", **slider)
        self.y2 = ipw.FloatSlider(value=roi[3], description="y2", **slider)
        self.output_size = ipw.IntSlider(value=output_size, min=1, max=14, description="output")
        self.sampling_ratio = ipw.IntSlider(
            value=max(sampling_ratio, 0), min=0, max=6, description="sampling"
        )
        self.sampling_ratio.tooltip = "samples per bin along each axis; 0 = adaptive"
        self.aligned = ipw.Checkbox(value=aligned, description="aligned (half-pixel shift)")
        channels = 1 if self._user_features is None else self._user_features.shape[1]
        self.channel = ipw.IntSlider(value=0, min=0, max=channels - 1, description="channel")
        self.channel.layout.display = "none" if channels == 1 else None
        self.misalignment = ipw.HTML()

        self._features = self._feature_map(spatial_scale)
        cmp = self._compare()
        self.figure = go.FigureWidget(roi_comparison_figure(cmp))
        self.misalignment.value = misalignment_text(cmp)

        self.controls = [
            self.x1,
            self.y1,
            self.x2,
            self.y2,
            self.output_size,
            self.sampling_ratio,
            self.spatial_scale,
            self.aligned,
            self.channel,
        ]
        for control in self.controls:
            control.observe(self._on_change, names="value")
        self.widget = ipw.VBox(
            [
                ipw.HBox([ipw.VBox(self.controls[:4]), ipw.VBox(self.controls[4:])]),
                self.misalignment,
                self.figure,
            ]
        )
        self.widget.add_class("instseg-roi-explorer")  # a handle for browser tests and CSS

    # -- state -------------------------------------------------------------------------------

    def _extent(self, scale: float) -> float:
        """The image size (pixels) the map covers at this scale."""
        if self._user_features is None:
            return float(self.image_size)
        return max(self._user_features.shape[-2:]) / scale

    def _feature_map(self, scale: float) -> Tensor:
        if self._user_features is not None:
            return self._user_features
        return synthetic_feature_map(round(1 / scale), self.image_size)  # [1, 1, h, w]

    @property
    def roi(self) -> tuple[float, float, float, float]:
        """The RoI ``(x1, y1, x2, y2)`` in image pixels."""
        return (self.x1.value, self.y1.value, self.x2.value, self.y2.value)

    @property
    def features(self) -> Tensor:
        """The ``[1, C, H, W]`` map currently pooled."""
        return self._features

    def _compare(self):
        return compare_roi_ops(
            self._features,
            self.roi,
            output_size=self.output_size.value,
            spatial_scale=self.spatial_scale.value,
            sampling_ratio=self.sampling_ratio.value,
            aligned=self.aligned.value,
            channel=self.channel.value,
        )

    # -- updates -----------------------------------------------------------------------------

    def _on_change(self, change) -> None:
        if change["owner"] is self.spatial_scale:
            self._features = self._feature_map(change["new"])
            if self._user_features is not None:
                extent = self._extent(change["new"])
                low, high = -0.25 * extent, 1.25 * extent
                for s in (self.x1, self.y1, self.x2, self.y2):
                    s.max = max(s.max, high)  # widen first so min never exceeds max
                    s.min, s.max = low, high
        self.update()

    def update(self) -> None:
        """Recompute both ops for the current controls and push the new data to the figure."""
        cmp = self._compare()
        with self.figure.batch_update():
            for trace, data in zip(self.figure.data, roi_comparison_traces(cmp)):
                trace.update(data)
        self.misalignment.value = misalignment_text(cmp)

    # -- display -----------------------------------------------------------------------------

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
