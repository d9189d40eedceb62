"""PrototypeExplorer: pick a YOLACT detection, edit its mask coefficients, watch its mask change.

A YOLACT mask is ``crop(sigmoid(Prototypes · c), box)`` (Bolya et al. 2019, Sec. 3.3). The explorer
lists candidate detections (anchors with the best foreground scores), shows the chosen one's ``P``
coefficients as bars and as sliders, and redraws the assembled mask whenever a slider moves. The
mask comes from :func:`instseg_edu.models.yolact.assemble_masks` (through
:mod:`instseg_edu.viz.yolact`), the function ``predict`` uses.

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
    def from_model(cls, model, images: Tensor, image_index: int = 0, num_candidates: int = 10):
        """Candidates = the ``num_candidates`` anchors of one image with the best foreground
        score; their boxes are the decoded predictions (``model`` is a ``YOLACT``)."""
        with torch.no_grad():
            out = model(images)
        scores = out.cls_logits[image_index].float().softmax(-1)[:, :-1]  # [N, C]
        best, label = scores.max(dim=1)  # [N] each
        top = best.topk(min(num_candidates, best.numel())).indices  # [K]
        anchors = model.anchors(out.featmap_sizes, images.device)[top]  # [K, 4]
        boxes = model.bbox_coder.decode(anchors, out.bbox_deltas[image_index, top].float())
        names = [f"anchor {int(a)}: class {int(label[a])}, {float(best[a]):.2f}" for a in top]
        return cls(out.prototypes[image_index], out.coeffs[image_index, top], boxes,
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
