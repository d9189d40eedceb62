"""PrototypeExplorer: pick a YOLACT detection, edit its mask coefficients, watch its mask change.

A YOLACT mask is ``crop(sigmoid(Prototypes · c), box)`` (Bolya et al. 2019, Sec. 3.3). The explorer
lists detections, shows the chosen one's ``P`` coefficients as bars and as sliders, and redraws the
assembled mask whenever a slider moves. Built from a model, the detections are those its
``predict`` returns — Fast NMS's survivors, with their boxes and coefficients, from
:meth:`~instseg_edu.models.yolact.YOLACT.kept_detections` — and the mask comes from
:func:`instseg_edu.models.yolact.assemble_masks` (through :mod:`instseg_edu.viz.yolact`), the
function ``predict`` uses.

    from instseg_edu.widgets.yolact_explorer import PrototypeExplorer
    PrototypeExplorer.from_model(model, batch.images)   # a YOLACT and a batch
    PrototypeExplorer(prototypes, coeffs, boxes)        # raw tensors
"""

from __future__ import annotations

import ipywidgets as ipw
import plotly.graph_objects as go
import torch
from torch import Tensor

from instseg_edu.viz.yolact import assemble_one, assembly_figure, assembly_traces

__all__ = ["PrototypeExplorer"]


class PrototypeExplorer:
    """Coefficients → mask, live.

    Controls (public ``ipywidgets``; set ``.value`` from code to drive them): ``detection``
    (which candidate), ``coeff_sliders`` (one ``FloatSlider`` per prototype, ``[-1, 1]``),
    ``crop`` (crop to the box or not), ``reset`` (back to the network's coefficients).
    ``figure`` is the ``go.FigureWidget``, ``widget`` the layout to display.

    Args:
        prototypes: ``float [P, Hm, Wm]`` one image's prototypes.
        coeffs: ``float [K, P]`` the candidates' coefficients.
        boxes: ``float [K, 4]`` their boxes (xyxy input pixels), or ``None`` (no crop).
        stride: input pixels per prototype pixel.
        labels: ``K`` strings naming the candidates in the dropdown.
    """

    def __init__(
        self,
        prototypes: Tensor,
        coeffs: Tensor,
        boxes: Tensor | None = None,
        stride: int = 4,
        labels: list[str] | None = None,
    ):
        self.prototypes = prototypes.detach().float().cpu()
        self.candidates = coeffs.detach().float().cpu()  # [K, P]
        self.boxes = None if boxes is None else boxes.detach().float().cpu()
        self.stride = stride
        k, p = self.candidates.shape
        if self.prototypes.shape[0] != p:
            raise ValueError(
                f"coeffs have P={p} columns but prototypes has {self.prototypes.shape[0]}"
            )
        names = labels or [f"candidate {i}" for i in range(k)]
        self.detection = ipw.Dropdown(options=[(n, i) for i, n in enumerate(names)], value=0,
                                      description="detection")  # fmt: skip
        self.coeff_sliders = [
            ipw.FloatSlider(value=float(self.candidates[0, j]), min=-1.0, max=1.0, step=0.01,
                            description=f"c{j}", continuous_update=True,
                            layout=ipw.Layout(width="260px"))
            for j in range(p)
        ]  # fmt: skip
        self.crop = ipw.Checkbox(value=self.boxes is not None, description="crop to the box",
                                 disabled=self.boxes is None)  # fmt: skip
        self.reset = ipw.Button(description="reset coefficients")
        self._quiet = False  # True while sliders are set programmatically

        self.figure = go.FigureWidget(assembly_figure(self.assembly()))
        self.detection.observe(self._on_detection, names="value")
        self.crop.observe(lambda _: self.update(), names="value")
        for s in self.coeff_sliders:
            s.observe(self._on_slider, names="value")
        self.reset.on_click(lambda _: self._load(self.detection.value))
        columns = [ipw.VBox(self.coeff_sliders[i : i + 8]) for i in range(0, p, 8)]
        self.widget = ipw.VBox(
            [ipw.HBox([self.detection, self.crop, self.reset]), ipw.HBox(columns), self.figure]
        )
        self.widget.add_class("instseg-prototype-explorer")

    @classmethod
    def from_model(
        cls,
        model,
        images: Tensor,
        image_index: int = 0,
        num_candidates: int = 10,
        image_sizes: list[tuple[int, int]] | None = None,
    ):
        """The best ``num_candidates`` detections of one image, exactly as ``model.predict``
        (a ``YOLACT``) makes them: :meth:`~instseg_edu.models.yolact.YOLACT.kept_detections`
        gives their boxes, scores, labels and coefficients.

        Args:
            images: ``float [B, 3, Hp, Wp]``; image_sizes: their true ``(h, w)`` (default: the
                padded size for every image).

        Raises:
            ValueError: the image has no detection (nothing scores above ``test_cfg.score_thr``).
        """
        sizes = image_sizes or [tuple(images.shape[-2:])] * len(images)
        with torch.no_grad():
            out = model(images)
            kept, coeffs = model.kept_detections(out, sizes)[image_index]
        if len(coeffs) == 0:
            raise ValueError(
                f"image {image_index} has no detection above score_thr="
                f"{model.cfg.test_cfg.score_thr}: nothing to explore"
            )
        k = min(num_candidates, len(coeffs))  # kept detections are sorted by score
        names = [f"detection {i}: class {int(c)}, {float(s):.2f}"
                 for i, (c, s) in enumerate(zip(kept.labels[:k], kept.scores[:k]))]  # fmt: skip
        return cls(out.prototypes[image_index], coeffs[:k], kept.boxes[:k],
                   stride=model.proto_stride, labels=names)  # fmt: skip

    # -- state -------------------------------------------------------------------------------

    @property
    def coeffs(self) -> Tensor:
        """The coefficients currently on the sliders, ``float [P]``."""
        return torch.tensor([s.value for s in self.coeff_sliders], dtype=torch.float32)

    @property
    def box(self) -> Tensor | None:
        """The chosen candidate's box if cropping is on."""
        if self.boxes is None or not self.crop.value:
            return None
        return self.boxes[self.detection.value]

    def assembly(self):
        """The current :class:`~instseg_edu.viz.yolact.MaskAssembly` (library computation)."""
        return assemble_one(self.prototypes, self.coeffs, self.box, self.stride)

    # -- updates -----------------------------------------------------------------------------

    def _load(self, index: int) -> None:
        self._quiet = True
        try:
            for s, v in zip(self.coeff_sliders, self.candidates[index].tolist()):
                s.value = v
        finally:
            self._quiet = False
        self.update()

    def _on_detection(self, change) -> None:
        self._load(change["new"])

    def _on_slider(self, _change) -> None:
        if not self._quiet:
            self.update()

    def update(self) -> None:
        """Reassemble the mask from the sliders and push it to the figure."""
        data = assembly_traces(self.assembly())
        with self.figure.batch_update():
            for trace, d in zip(self.figure.data, data):
                trace.update(d)

    # -- display -----------------------------------------------------------------------------

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
