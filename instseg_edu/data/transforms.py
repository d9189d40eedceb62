"""Transforms that move boxes and masks together with the image, and batching.

A geometric augmentation has to change an image's annotations in exactly the same way: flip the
image and every box must flip (``x1' = W - x2``), resize it and boxes scale while masks are
resampled. torchvision's transforms v2 do this when each part is wrapped in a ``tv_tensors``
type — ``Image``, ``BoundingBoxes`` (here always ``XYXY``) and ``Mask`` — and every v2 transform
dispatches on that type. :class:`ObjectTransform` wraps an ``(image, Target)`` pair that way, runs
a list of steps (any v2 transform, or :class:`ResizeKeepAspect`), unwraps, and drops objects that
no longer exist: a box under 1 px wide or high, or a mask left without pixels (a thin object can
vanish when an image shrinks). A box-only object (``Target.has_mask`` False) has no mask to lose
and is kept while its box is.

Two details matter for alignment. Masks are resized with ``NEAREST_EXACT``, which samples each
output pixel at its centre (``x_in = (x_out + 0.5) / scale``), so a resized mask's tight box stays
within one pixel of the resized box. Images are resized bilinearly with antialiasing, which keeps
``[0, 1]`` values in range.

Normalisation is not a dataset transform here: datasets and batches carry ``[0, 1]`` images that
figures can show directly, and models call :func:`normalize` (ImageNet mean and std, the
statistics their pretrained backbones expect) as their first step.

:func:`collate` pads a list of items into a :class:`~instseg_edu.structures.Batch`: images and
target masks are padded with zeros at the bottom and right to a common size that is a multiple of
32 (so that every FPN stride up to 32 divides it), and each image's true ``(h, w)`` is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from instseg_edu.ops.masks import masks_to_boxes
from instseg_edu.structures import Batch, Target

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Parts = dict  # {"boxes": BoundingBoxes, "masks": Mask, "ignore_boxes": BoundingBoxes}
Step = Callable[[tv_tensors.Image, Parts], tuple[tv_tensors.Image, Parts]]


def normalize(images: Tensor) -> Tensor:
    """ImageNet normalisation ``(x - mean) / std`` per channel.

    Args:
        images: ``float [3, H, W]`` or ``[B, 3, H, W]`` with values in ``[0, 1]``.

    Returns:
        a new tensor of the same shape, dtype and device.
    """
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"images must be [3, H, W] or [B, 3, H, W], got {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` after scaling so that the longest side becomes ``size``.

    Example: ``resized_size(480, 640, 512) == (384, 512)``.
    """
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class ResizeKeepAspect:
    """Scale an image and its annotations so that the longest side is ``size`` pixels.

    A step for :class:`ObjectTransform`: called with tv_tensors, it resizes the image bilinearly
    (antialiased), the boxes by the same factors and the masks with ``NEAREST_EXACT``.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"size={size} must be >= 1")
        self.size = int(size)

    def __call__(self, image: tv_tensors.Image, parts: Parts) -> tuple[tv_tensors.Image, Parts]:
        new_hw = list(resized_size(image.shape[-2], image.shape[-1], self.size))
        if new_hw == list(image.shape[-2:]):
            # Already at size: every resize below would be the identity. torchvision returns
            # the image as is, but the masks' interpolate would still cost ~4 ms per mask at 256².
            return image, parts
        image = F.resize(image, new_hw, interpolation=InterpolationMode.BILINEAR, antialias=True)
        resized = {}
        for key, value in parts.items():
            if isinstance(value, tv_tensors.Mask):
                resized[key] = _resize_masks(value, new_hw)
            else:  # boxes are scaled by (new_w / w, new_h / h)
                resized[key] = F.resize(value, new_hw)
        return image, resized

    def __repr__(self) -> str:
        return f"ResizeKeepAspect(size={self.size})"


class RandomResizeCrop:
    """Scale jitter: resize by a random ratio of ``size``, then crop to at most ``size`` square.

    A step for :class:`ObjectTransform` (MMDetection's ``RandomResize(scale, ratio_range)``
    followed by ``RandomCrop(crop_size)``; torchvision's ``ScaleJitter``, the "large scale jitter"
    of Ghiasi et al., *Simple Copy-Paste*, 2021, Sec. 3). The longest side becomes
    ``round(size * r)`` with ``r`` uniform in ``ratio_range``; where a side then exceeds ``size``,
    a random ``size`` window of it is kept (boxes shifted and clipped, masks cut), so a step costs
    at most what an image of ``size`` does. Objects come out larger or smaller than drawn: the
    model sees every object at several scales.
    """

    def __init__(self, size: int, ratio_range: tuple[float, float]):
        self.size = int(size)
        self.ratio_range = check_ratio_range(ratio_range)

    def __call__(self, image: tv_tensors.Image, parts: Parts) -> tuple[tv_tensors.Image, Parts]:
        low, high = self.ratio_range
        ratio = low + (high - low) * float(torch.rand(()))
        image, parts = ResizeKeepAspect(max(1, round(self.size * ratio)))(image, parts)
        height, width = image.shape[-2:]
        crop_h, crop_w = min(height, self.size), min(width, self.size)
        if (crop_h, crop_w) == (height, width):
            return image, parts
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        image = F.crop(image, top, left, crop_h, crop_w)
        parts = {key: F.crop(value, top, left, crop_h, crop_w) for key, value in parts.items()}
        return image, {**parts, "boxes": _visible_boxes(parts["boxes"], parts["masks"])}

    def __repr__(self) -> str:
        return f"RandomResizeCrop(size={self.size}, ratio_range={self.ratio_range})"


def check_ratio_range(value, name: str = "ratio_range") -> tuple[float, float]:
    """``value`` as ``(low, high)`` floats (a checkpoint's list too), ``0 < low <= high``.

    Raises:
        ValueError: anything else, naming ``name``.
    """
    if len(value) != 2 or not 0 < float(value[0]) <= float(value[1]):
        raise ValueError(f"{name}={value!r} must be (low, high) with 0 < low <= high")
    return float(value[0]), float(value[1])


def _visible_boxes(
    boxes: tv_tensors.BoundingBoxes, masks: tv_tensors.Mask
) -> tv_tensors.BoundingBoxes:
    """Boxes of the objects with a mask recomputed as their mask's tight box (``x2 = last + 1``).

    After a crop, clipping a box keeps the box of the whole object's extent inside the window,
    which can be much larger than the part left visible (MMDetection's ``RandomCrop`` with
    ``recompute_bbox=True`` does the same). Objects without mask pixels keep their clipped box.
    """
    mask = masks.as_subclass(Tensor).bool()  # [G, h, w]
    tight = masks_to_boxes(mask).to(boxes.dtype)  # [G, 4]
    has_pixels = mask.flatten(1).any(dim=1)  # [G]
    new = torch.where(has_pixels[:, None], tight, boxes.as_subclass(Tensor))
    return tv_tensors.wrap(new, like=boxes)


def _resize_masks(masks: tv_tensors.Mask, size: list[int]) -> tv_tensors.Mask:
    """``[G, H, W]`` masks to ``[G, h, w]``, sampling each output pixel at its centre.

    Done with ``interpolate(mode="nearest-exact")`` directly rather than through ``F.resize``,
    because torchvision before 0.2x ignored the interpolation mode for masks (plain ``nearest``,
    which samples at the pixel's corner and shifts masks by up to a pixel).
    """
    if masks.shape[0] == 0:
        return tv_tensors.Mask(masks.new_zeros(0, *size))
    out = torch.nn.functional.interpolate(
        masks.as_subclass(Tensor)[None].float(), size=size, mode="nearest-exact"
    )  # [1, G, h, w]
    return tv_tensors.Mask(out[0].to(masks.dtype))


class ObjectTransform:
    """Apply steps to an ``(image, Target)`` pair, keeping boxes and masks aligned.

    Args:
        steps: callables ``(Image, parts) -> (Image, parts)``, applied in order; any torchvision
            v2 transform qualifies (``v2.RandomHorizontalFlip(0.5)``, ``v2.ColorJitter(...)``,
            ``v2.RandomIoUCrop()``, ...), as does :class:`ResizeKeepAspect`.

    Called as ``image, target = transform(image, target)`` with ``image`` ``float32 [3, H, W]`` in
    ``[0, 1]`` and a :class:`~instseg_edu.structures.Target` whose ``masks`` are ``[G, H, W]``.
    Returns a plain tensor image and a new ``Target`` (boxes, masks and ignore boxes moved,
    degenerate objects dropped; ``image_id`` and ``orig_size`` unchanged).
    """

    def __init__(self, steps: Sequence[Step]):
        self.steps = list(steps)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        if tuple(target.masks.shape[-2:]) != (height, width):
            raise ValueError(
                f"target.masks is {tuple(target.masks.shape)} but the image is {height}x{width}; "
                "masks must be [G, H, W] at the image's size"
            )
        tv_image = tv_tensors.Image(image)
        parts = {
            "boxes": tv_tensors.BoundingBoxes(
                target.boxes, format="XYXY", canvas_size=(height, width)
            ),
            # uint8 rather than bool: older torchvision cannot interpolate bool tensors.
            "masks": tv_tensors.Mask(target.masks.to(torch.uint8)),
            "ignore_boxes": tv_tensors.BoundingBoxes(
                target.ignore_boxes, format="XYXY", canvas_size=(height, width)
            ),
        }
        for step in self.steps:
            tv_image, parts = step(tv_image, parts)
        return _unwrap(tv_image, parts, target)

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(s) for s in self.steps)
        return f"ObjectTransform([\n    {inner}\n])"


def _unwrap(image: tv_tensors.Image, parts: Parts, target: Target) -> tuple[Tensor, Target]:
    """tv_tensors back to plain tensors; drop objects that became degenerate."""
    height, width = image.shape[-2:]

    def clip(boxes: Tensor) -> Tensor:  # [N, 4] xyxy, plain tensor
        boxes = boxes.as_subclass(Tensor).clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return boxes

    def big_enough(boxes: Tensor) -> Tensor:  # [N] bool
        return ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)

    boxes = clip(parts["boxes"])
    masks = parts["masks"].as_subclass(Tensor).bool()  # [G, H, W]
    # A box-only object (no mask to begin with) lives as long as its box does.
    has_mask = target.has_mask.to(masks.device)  # [G]
    keep = big_enough(boxes) & (masks.flatten(1).any(dim=1) | ~has_mask)  # [G]
    ignore = clip(parts["ignore_boxes"])
    new_target = replace(
        target,
        boxes=boxes[keep],
        labels=target.labels[keep],
        masks=masks[keep],
        ignore_boxes=ignore[big_enough(ignore)],
        has_mask=has_mask[keep],
    )
    return image.as_subclass(Tensor), new_target


def train_transforms(
    size: int,
    flip_prob: float = 0.5,
    jitter: bool = True,
    ratio_range: tuple[float, float] | None = None,
) -> Callable[[Tensor, Target], tuple[Tensor, Target]]:
    """Training augmentation: resize (longest side ``size``), random horizontal flip, colour jitter.

    The jitter (brightness, contrast, saturation +-20 %) touches only the image. No hue shift:
    MMDetection's Mask R-CNN and RetinaNet configs use no colour jitter at all, the shapes are
    painted in random colours anyway, and converting to HSV and back was half of the augmentation's
    time (1.5 of 3.0 ms per 128 px image with 15 masks, in the training step's own process when
    the data is in memory).

    ``ratio_range=(low, high)`` adds scale jitter after the resize (:class:`RandomResizeCrop`:
    about 1.5 ms more per 128 px image); ``None``, the default, none.
    """
    steps: list[Step] = [ResizeKeepAspect(size)]
    if ratio_range is not None:
        steps.append(RandomResizeCrop(size, ratio_range))
    if flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
    if jitter:
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    return ObjectTransform(steps)


def eval_transforms(size: int) -> Callable[[Tensor, Target], tuple[Tensor, Target]]:
    """Evaluation: only resize so that the longest side is ``size`` (deterministic)."""
    return ObjectTransform([ResizeKeepAspect(size)])


def collate(items: Sequence[tuple[Tensor, Target]], size_divisor: int = 32) -> Batch:
    """Pad ``(image, target)`` items into one :class:`~instseg_edu.structures.Batch`.

    Args:
        items: ``(image float32 [3, h, w], Target with masks [G, h, w])`` pairs of any sizes.
        size_divisor: the padded height and width are multiples of it.

    Returns:
        ``Batch`` with ``images [B, 3, Hp, Wp]`` (zeros bottom/right), ``image_sizes`` the true
        ``(h, w)`` of each image, and targets whose masks are padded to ``[G, Hp, Wp]``.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    images = [image for image, _ in items]
    targets = [target for _, target in items]
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    for i, (image, target) in enumerate(items):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"item {i}: image must be [3, H, W], got {tuple(image.shape)}")
        if tuple(target.masks.shape[-2:]) != sizes[i]:
            raise ValueError(
                f"item {i}: masks are {tuple(target.masks.shape)} but the image is "
                f"{sizes[i][0]}x{sizes[i][1]}"
            )
    pad_h = math.ceil(max(h for h, _ in sizes) / size_divisor) * size_divisor
    pad_w = math.ceil(max(w for _, w in sizes) / size_divisor) * size_divisor
    batch = images[0].new_zeros(len(images), 3, pad_h, pad_w)  # [B, 3, Hp, Wp]
    padded_targets = []
    for i, ((h, w), image, target) in enumerate(zip(sizes, images, targets)):
        batch[i, :, :h, :w] = image
        masks = target.masks.new_zeros(target.masks.shape[0], pad_h, pad_w)  # [G, Hp, Wp]
        masks[:, :h, :w] = target.masks
        padded_targets.append(replace(target, masks=masks))
    return Batch(images=batch, image_sizes=sizes, targets=padded_targets)
