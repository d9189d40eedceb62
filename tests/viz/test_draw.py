import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from instseg_edu.structures import Detections, Target  # noqa: E402
from instseg_edu.viz.draw import draw_detections, gallery, loss_curve_figure  # noqa: E402


def _rgba(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())


def test_draw_detections_is_a_figure_with_masks_boxes_and_labels():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    image = torch.zeros(3, 64, 96)  # a black image: any colour comes from the drawing
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 10:30, 10:40] = True
    fig = draw_detections(
        image, torch.tensor([[10.0, 10, 40, 30], [50, 20, 90, 60]]), torch.tensor([0, 2]),
        masks=masks, scores=torch.tensor([0.9, 0.2]), class_names=["circle", "square", "star"],
        score_thr=0.5,
    )  # fmt: skip
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert sum(isinstance(p, Rectangle) for p in ax.patches) == 1  # 0.2 < score_thr is skipped
    assert [t.get_text() for t in ax.texts] == ["circle 0.90"]
    assert len(ax.images) == 2  # the image and the mask overlay
    FigureCanvasAgg(fig)
    pixels = _rgba(fig)
    assert pixels[..., :3].max() > 0  # something was drawn on the black image


def test_ground_truth_is_dashed_and_every_mask_has_its_outline():
    from matplotlib.patches import Rectangle

    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, 5:15, 5:20] = True
    masks[1, 20:35, 22:38] = True
    fig = draw_detections(
        torch.zeros(3, 40, 40), torch.tensor([[5.0, 5, 20, 15], [22, 20, 38, 35]]),
        torch.tensor([0, 1]), masks=masks, scores=torch.tensor([0.9, 0.8]),
        gt_boxes=torch.tensor([[5.0, 5, 20, 15], [30, 0, 40, 4], [0, 30, 6, 40]]),
    )  # fmt: skip
    ax = fig.axes[0]
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    dashed = [p for p in rects if p.get_linestyle() != "solid"]
    assert len(rects) == 5 and len(dashed) == 3  # 3 ground truths first, then 2 detections
    assert [tuple(p.get_xy()) for p in dashed] == [(5.0, 5.0), (30.0, 0.0), (0.0, 30.0)]
    outlines = [c for c in ax.collections if hasattr(c, "levels")]  # one ContourSet per mask
    assert len(outlines) == 2 and all(list(c.levels) == [0.5] for c in outlines)


def test_draw_into_existing_axes_and_crop_padding():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    no_labels = torch.zeros(0, dtype=torch.long)
    out = draw_detections(torch.rand(3, 64, 64), torch.zeros(0, 4), no_labels, ax=ax,
                          image_size=(40, 50))  # fmt: skip
    assert out is fig
    assert ax.images[0].get_array().shape[:2] == (40, 50)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        draw_detections(torch.rand(64, 64), torch.zeros(0, 4), torch.zeros(0))


def test_gallery_accepts_detections_and_targets():
    images = torch.rand(3, 3, 32, 32)
    det = Detections(torch.tensor([[1.0, 1, 20, 20]]), torch.tensor([0.8]), torch.tensor([1]))
    tgt = Target(torch.tensor([[2.0, 2, 10, 12]]), torch.tensor([0]),
                 torch.ones(1, 32, 32, dtype=torch.bool))  # fmt: skip
    fig = gallery(images, [det, tgt, Detections.empty()], class_names=["a", "b"], ncols=2,
                  titles=["p", "gt", "none"])  # fmt: skip
    assert len(fig.axes) == 4  # 2x2 grid, the last one blank
    assert [ax.get_title() for ax in fig.axes[:3]] == ["p", "gt", "none"]
    with pytest.raises(ValueError, match="images"):
        gallery(images[:1], [det, tgt])
    fig = gallery(images[:2], [det, det], ground_truth=[tgt, tgt])
    assert sum(p.get_linestyle() != "solid" for p in fig.axes[0].patches) == 1  # tgt's one box
    with pytest.raises(ValueError, match="ground truths"):
        gallery(images[:2], [det, det], ground_truth=[tgt])


def test_loss_curve_figure_from_history_dict():
    steps = [{"step": i, "lr": 0.01, "loss": 2.0 / i, "loss_cls": 1.0 / i, "loss_bbox": 1.0 / i}
             for i in range(1, 41)]  # fmt: skip
    evals = [{"step": 20, "epoch": 0, "metrics": {"bbox": {"AP": 0.1}}},
             {"step": 40, "epoch": 1, "metrics": {"bbox": {"AP": 0.3}}}]  # fmt: skip
    fig = loss_curve_figure({"steps": steps, "evals": evals}, smooth=5)
    assert len(fig.axes) == 3
    labels = [
        line.get_label() for line in fig.axes[0].lines if not line.get_label().startswith("_")
    ]
    assert labels == ["loss", "loss_bbox", "loss_cls"]
    ap_line = fig.axes[2].lines[0]
    assert list(ap_line.get_ydata()) == [0.1, 0.3]
    assert len(loss_curve_figure({"steps": steps, "evals": []}).axes) == 2


def test_core_import_does_not_load_matplotlib():
    import subprocess

    code = "import instseg_edu, instseg_edu.engine.train, instseg_edu.engine.evaluate, sys; " \
           "import instseg_edu.engine.analysis, instseg_edu.viz; " \
           "print([m for m in ('matplotlib', 'plotly', 'ipywidgets') " \
           "       if m in sys.modules])"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
