"""PrototypeExplorer, headless: move a coefficient slider or pick another detection, check that the
FigureWidget sends the mask the library assembles."""

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from instseg_edu.widgets.yolact_explorer import PrototypeExplorer  # noqa: E402

from instseg_edu.models.yolact import (  # noqa: E402
    YOLACT_R18_SMALL,
    YOLACTProtonetConfig,
    assemble_masks,
    build_yolact,
)
from instseg_edu.viz.yolact import TRACE_NAMES  # noqa: E402

MASK, BARS, BOX = (TRACE_NAMES.index(n) for n in ("assembled mask", "coefficients", "box"))


class Sent:
    """Records the Plotly.update messages a FigureWidget sends to its frontend."""

    def __init__(self, figure):
        self.messages = []
        figure.observe(self._record, names=["_py2js_update"])

    def _record(self, change):
        if change["new"] is not None:
            self.messages.append(change["new"])

    def value(self, index, prop):
        for message in reversed(self.messages):
            if index in message["style_traces"] and prop in message["style_data"]:
                value = message["style_data"][prop][message["style_traces"].index(index)]
                if type(value).__name__ != "Undefined":
                    return np.array(value)
        raise AssertionError(f"nothing sent for trace {index}.{prop}")


def _raw_explorer():
    torch.manual_seed(0)
    protos = torch.rand(4, 6, 8)  # [P, Hm, Wm]
    coeffs = torch.rand(3, 4) * 2 - 1  # [K, P]
    boxes = torch.tensor([[4.0, 4.0, 20.0, 16.0], [0.0, 0.0, 32.0, 24.0], [8.0, 8.0, 12.0, 12.0]])
    return PrototypeExplorer(protos, coeffs, boxes, stride=4), protos, coeffs, boxes


def test_moving_a_slider_sends_the_library_mask():
    explorer, protos, coeffs, boxes = _raw_explorer()
    sent = Sent(explorer.figure)
    before = np.array(explorer.figure.data[MASK].z)
    explorer.coeff_sliders[2].value = 0.9
    assert sent.messages, "moving c2 sent nothing to the browser"
    edited = coeffs[0].clone()
    edited[2] = 0.9
    expected = assemble_masks(protos, edited[None], boxes[:1] / 4)[0]
    z = sent.value(MASK, "z")
    np.testing.assert_allclose(z, expected.numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(z, before)
    np.testing.assert_allclose(sent.value(BARS, "y"), edited.numpy(), rtol=1e-6)
    # outside the box (4, 4, 20, 16) / 4 = prototype rows 1..3, columns 1..4: zero
    assert (z[0] == 0).all() and (z[:, 5:] == 0).all() and (z[1:4, 1:5] > 0).all()


def test_picking_a_detection_loads_its_coefficients_and_box():
    explorer, protos, coeffs, boxes = _raw_explorer()
    sent = Sent(explorer.figure)
    explorer.detection.value = 2
    np.testing.assert_allclose(explorer.coeffs.numpy(), coeffs[2].numpy(), rtol=1e-6)
    expected = assemble_masks(protos, coeffs[2:3], boxes[2:3] / 4)[0]
    np.testing.assert_allclose(sent.value(MASK, "z"), expected.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sent.value(BOX, "x"), [8.0, 12.0, 12.0, 8.0, 8.0])
    n = len(sent.messages)
    explorer.crop.value = False  # the uncropped mask: sigmoid everywhere
    assert len(sent.messages) > n
    np.testing.assert_allclose(
        sent.value(MASK, "z"), assemble_masks(protos, coeffs[2:3])[0].numpy(), rtol=1e-6
    )
    explorer.coeff_sliders[0].value = -1.0
    explorer.reset.click()  # back to the network's coefficients
    np.testing.assert_allclose(explorer.coeffs.numpy(), coeffs[2].numpy(), rtol=1e-6)


def test_from_model_lists_the_detections_predict_returns():
    cfg = replace(
        YOLACT_R18_SMALL,
        neck=replace(YOLACT_R18_SMALL.neck, out_channels=16),
        bbox_head=replace(YOLACT_R18_SMALL.bbox_head, in_channels=16, feat_channels=16,
                          num_protos=4, num_classes=2),
        mask_head=YOLACTProtonetConfig(in_channels=16, proto_channels=(16, None, 4),
                                       proto_kernel_sizes=(3, -2, 1), num_protos=4),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_yolact(cfg).eval()
    images = torch.rand(2, 3, 64, 64)
    sizes = [(64, 64), (50, 40)]
    explorer = PrototypeExplorer.from_model(model, images, 1, num_candidates=5, image_sizes=sizes)
    with torch.no_grad():
        out = model(images)
        (_, dets) = model.predict(out, sizes)
    assert len(explorer.detection.options) == 5 and len(explorer.coeff_sliders) == 4
    torch.testing.assert_close(explorer.prototypes, out.prototypes[1])
    # the candidates are predict's five best detections of image 1: the same boxes, and their
    # coefficients assemble predict's masks
    assert torch.equal(explorer.boxes, dets.boxes[:5])
    assert explorer.detection.options[0][0] == (
        f"detection 0: class {int(dets.labels[0])}, {float(dets.scores[0]):.2f}"
    )
    probs = assemble_masks(
        out.prototypes[1], explorer.candidates, explorer.boxes / 4
    )  # [5, 16, 16]
    up = torch.nn.functional.interpolate(probs[None], size=(64, 64), mode="bilinear")[0]
    assert torch.equal(up[:, :50, :40] > model.cfg.test_cfg.mask_thr, dets.masks[:5])
    z = np.array(explorer.figure.data[MASK].z)
    assert z.shape == (16, 16)
    nothing = replace(cfg, test_cfg=replace(cfg.test_cfg, score_thr=0.99))
    with pytest.raises(ValueError, match="no detection"):
        PrototypeExplorer.from_model(build_yolact(nothing).eval(), images)
