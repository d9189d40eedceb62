"""Small builders the explorers share: a labelled slider and the image an explorer starts on.

Only widget plumbing lives here — every number an explorer shows still comes from the library.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as W
from torch import Tensor

from instseg_edu.viz.anchors import shapes_sample

__all__ = ["example_image", "slider"]


def slider(
    description: str,
    value: float,
    lo: float,
    hi: float,
    step: float | None = None,
    *,
    label_width: str | None = "110px",
    width: str | None = "320px",
    **options,
) -> W.FloatSlider | W.IntSlider:
    """A slider from ``lo`` to ``hi`` labelled ``description``: an ``IntSlider`` when ``step`` is
    ``None`` (whole numbers), else a ``FloatSlider`` of that step. ``label_width`` and ``width``
    size the label and the whole control (``None``: ipywidgets' default); ``options`` go to the
    slider (e.g. ``readout_format=".2f"``)."""
    if label_width is not None:
        options["style"] = {"description_width": label_width}
    if width is not None:
        options["layout"] = W.Layout(width=width)
    if step is None:
        return W.IntSlider(value=value, min=lo, max=hi, description=description, **options)
    return W.FloatSlider(value=value, min=lo, max=hi, step=step, description=description, **options)


def example_image(
    image: Tensor | None,
    gt_boxes: Tensor | None,
    gt_labels: Tensor | None,
    class_names: Sequence[str] | None,
    sample_index: int,
    image_size: int,
) -> tuple[Tensor, Tensor, Tensor | None, Sequence[str] | None]:
    """The image an explorer draws: the one given with its boxes, or shapes image
    ``sample_index`` (:func:`~instseg_edu.viz.anchors.shapes_sample`) with the shapes' class names.

    Returns:
        ``(image float [3, H, W], gt_boxes float [G, 4] xyxy, gt_labels, class_names)``.

    Raises:
        ValueError: an image is given without its ``gt_boxes``.
    """
    if image is None:
        from instseg_edu.data.shapes import CLASSES

        image, gt_boxes, gt_labels = shapes_sample(sample_index, image_size)
        class_names = CLASSES if class_names is None else class_names
    if gt_boxes is None:
        raise ValueError("gt_boxes is required when an image is given")
    return image, gt_boxes.float().reshape(-1, 4), gt_labels, class_names
