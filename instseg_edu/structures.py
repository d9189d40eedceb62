"""The few containers every part of instseg_edu passes around.

Conventions (see DESIGN.md):

- Boxes are ``xyxy`` in absolute pixels, float32.
- Labels are foreground classes ``0..C-1``; background is implicit.
- An image is ``float32 [3, H, W]`` with values in ``[0, 1]``; models normalise internally.
- A :class:`Batch` pads its images to a multiple of 32 at the bottom and right and remembers each
  image's true ``(h, w)``; the masks of its targets are padded the same way, so that a batch's
  masks can be stacked and sampled without per-image bookkeeping.
- An object may be **box-only** (its annotation has no segmentation): ``Target.has_mask`` is False
  for it and its mask row is all zeros. Box models train on it like any other object; mask models
  train its box and class terms and leave it out of their mask terms.

Sizes have two names, everywhere: an image's **true size** ``(h, w)`` — ``image_size`` /
``image_sizes`` — and the **padded input size** ``(Hp, Wp)`` of the batch it sits in —
``input_size`` (the shape of ``Batch.images``).

**Target encodings**, the same in every family's ``*Targets``: ``gt_index`` is 0-based (a row of
the image's, or the batch's, ground truth) with :data:`NO_GT` for none; a class label is
``0..C-1`` for a positive entry and :data:`BACKGROUND` for every other one — a weight (``0`` for an
ignored anchor) says whether it is trained as background. The softmax heads (YOLACT, the R-CNN box
head) move ``BACKGROUND`` to their background column ``C`` inside the loss
(:func:`softmax_labels`). Why an anchor is negative or ignored is the assigner's ``reason``, with
the codes ``NEGATIVE``, ``IGNORED``, ``POSITIVE`` of :mod:`instseg_edu.ops.assign`.

Shape legend, one meaning per letter in every module (each module's docstring lists those it uses):

- ``B`` images; ``G`` ground-truth objects; ``I`` ignore regions; ``C`` classes; ``L`` FPN levels;
- ``A`` anchors per feature-map cell; ``N`` anchors (or SOLO grid cells) of all levels;
- ``R`` proposals / RoIs (Mask R-CNN); ``P`` prototypes (YOLACT); ``S`` a SOLO grid size;
- ``M`` positives that train a mask (RoIs, anchors or grid cells); ``K`` candidates or detections;
- ``T`` the side of a Mask R-CNN mask-head output (28), ``O`` that of a RoIAlign output (7, 14);
- ``H, W`` a feature map's height and width; ``h, w`` an image's true size; ``Hp, Wp`` the padded
  input size; ``Hm, Wm`` YOLACT's prototype size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = [
    "BACKGROUND",
    "NO_GT",
    "Batch",
    "Detections",
    "PaddedTargets",
    "Target",
    "image_sizes_tensor",
    "pad_targets",
    "softmax_labels",
]

#: ``gt_index`` of an entry (anchor, proposal, grid cell, mask channel) that no object owns.
NO_GT = -1
#: Class label of an entry that is not positive (a negative or ignored anchor, a negative RoI, an
#: empty SOLO cell): its one-hot row is all zeros; a softmax head moves it to its background
#: column ``C`` (:func:`softmax_labels`).
BACKGROUND = -1


def softmax_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Class labels for a softmax over ``C + 1`` columns: ``BACKGROUND`` becomes column ``C``.

    Example with ``C = 3``: ``[2, -1, 0] → [2, 3, 0]``.
    """
    return torch.where(labels == BACKGROUND, num_classes, labels)


@dataclass
class Target:
    """Ground truth of one image.

    Attributes:
        boxes: ``float32 [G, 4]`` xyxy pixels in the (possibly resized) image.
        labels: ``int64 [G]`` in ``0..C-1``.
        masks: ``bool [G, H, W]`` instance masks (``[G, Hp, Wp]`` inside a :class:`Batch`).
        image_id: the COCO image id, used to match predictions to ground truth in evaluation.
        ignore_boxes: ``float32 [I, 4]`` regions whose anchors are neither positive nor negative
            (COCO ``iscrowd`` objects).
        orig_size: ``(h, w)`` of the image file before any resize; predictions are scaled back to
            it for COCO evaluation.
        has_mask: ``bool [G]``, False for a box-only object (no segmentation in its annotation;
            its row of ``masks`` is all zeros). ``None`` (the default) means every object has a
            mask and is replaced by ``ones(G)``.

    Raises:
        ValueError: ``has_mask`` does not have one entry per object.
    """

    boxes: Tensor
    labels: Tensor
    masks: Tensor
    image_id: int = 0
    ignore_boxes: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    orig_size: tuple[int, int] | None = None
    has_mask: Tensor | None = None

    def __post_init__(self) -> None:
        g = int(self.boxes.shape[0])
        if self.has_mask is None:
            self.has_mask = torch.ones(g, dtype=torch.bool, device=self.boxes.device)
        elif tuple(self.has_mask.shape) != (g,):
            raise ValueError(
                f"Target.has_mask is {tuple(self.has_mask.shape)} but there are {g} boxes; "
                "it needs one entry per object (filter it together with boxes and masks)"
            )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Target:
        return replace(
            self,
            boxes=self.boxes.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            masks=self.masks.to(device, non_blocking=non_blocking),
            ignore_boxes=self.ignore_boxes.to(device, non_blocking=non_blocking),
            has_mask=self.has_mask.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class Detections:
    """What a model's ``predict`` returns for one image.

    Attributes:
        boxes: ``float32 [K, 4]`` xyxy pixels in the network input's coordinates.
        scores: ``float32 [K]`` in ``[0, 1]``, sorted in descending order.
        labels: ``int64 [K]`` in ``0..C-1``.
        masks: ``bool [K, H, W]`` at the image's true (un-padded) size, or ``None`` for box-only
            models.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor | None = None

    def to(self, device: torch.device | str) -> Detections:
        return Detections(
            self.boxes.to(device),
            self.scores.to(device),
            self.labels.to(device),
            None if self.masks is None else self.masks.to(device),
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def empty(device: torch.device | str = "cpu", mask_size: tuple[int, int] | None = None):
        masks = None
        if mask_size is not None:
            masks = torch.zeros(0, *mask_size, dtype=torch.bool, device=device)
        return Detections(
            torch.zeros(0, 4, device=device),
            torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
            masks,
        )


@dataclass
class Batch:
    """A padded batch, as built by :func:`instseg_edu.data.transforms.collate`.

    Attributes:
        images: ``float32 [B, 3, Hp, Wp]``, values in ``[0, 1]``, zero padding bottom/right,
            ``Hp`` and ``Wp`` multiples of 32.
        image_sizes: each image's true ``(h, w)`` inside the padding.
        targets: one :class:`Target` per image, masks padded to ``[G, Hp, Wp]``.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[Target]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            list(self.image_sizes),
            [t.to(device, non_blocking=non_blocking) for t in self.targets],
        )

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)`` so host-to-GPU copies can overlap compute."""
        return Batch(
            self.images.pin_memory(),
            self.image_sizes,
            [
                replace(
                    t,
                    boxes=t.boxes.pin_memory(),
                    labels=t.labels.pin_memory(),
                    masks=t.masks.pin_memory(),
                    ignore_boxes=t.ignore_boxes.pin_memory(),
                    has_mask=t.has_mask.pin_memory(),
                )
                for t in self.targets
            ],
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def padded_targets(self) -> PaddedTargets:
        """Ground truth of the whole batch padded to the largest ``G``, for batched assignment."""
        return pad_targets(self.targets, self.images.device)


class PaddedTargets:
    """Ground truth of a batch stacked to ``Gmax`` objects per image.

    Attributes:
        boxes: ``float32 [B, Gmax, 4]`` (padding rows are zeros).
        labels: ``int64 [B, Gmax]`` (padding is ``-1``).
        valid: ``bool [B, Gmax]``, True for real objects.
        ignore_boxes: ``float32 [B, Imax, 4]``; ``ignore_valid``: ``bool [B, Imax]``.
        has_mask: ``bool [B, Gmax]``, True for real objects with a mask (False for box-only
            objects and padding).
    """

    def __init__(self, boxes, labels, valid, ignore_boxes, ignore_valid, has_mask=None):
        self.boxes, self.labels, self.valid = boxes, labels, valid
        self.ignore_boxes, self.ignore_valid = ignore_boxes, ignore_valid
        self.has_mask = valid.clone() if has_mask is None else has_mask


def pad_targets(targets: list[Target], device: torch.device | str | None = None) -> PaddedTargets:
    """Stack per-image ground truth into padded tensors (one host-side pass, one copy each)."""
    device = device if device is not None else (targets[0].boxes.device if targets else "cpu")
    b = len(targets)
    g_max = max([len(t) for t in targets], default=0)
    i_max = max([int(t.ignore_boxes.shape[0]) for t in targets], default=0)
    boxes = torch.zeros(b, g_max, 4, device=device)
    labels = torch.full((b, g_max), -1, dtype=torch.long, device=device)
    valid = torch.zeros(b, g_max, dtype=torch.bool, device=device)
    has_mask = torch.zeros(b, g_max, dtype=torch.bool, device=device)
    ignore = torch.zeros(b, i_max, 4, device=device)
    ignore_valid = torch.zeros(b, i_max, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        g, n_ign = len(t), int(t.ignore_boxes.shape[0])
        boxes[i, :g] = t.boxes.to(device)
        labels[i, :g] = t.labels.to(device)
        valid[i, :g] = True
        has_mask[i, :g] = t.has_mask.to(device)
        ignore[i, :n_ign] = t.ignore_boxes.to(device)
        ignore_valid[i, :n_ign] = True
    return PaddedTargets(boxes, labels, valid, ignore, ignore_valid, has_mask)


def image_sizes_tensor(
    image_sizes: list[tuple[int, int]], device: torch.device | str, dtype=torch.float32
) -> torch.Tensor:
    """Each image's true ``(h, w)`` as a ``[B, 2]`` tensor on ``device``.

    ``torch.tensor(image_sizes, device="cuda")`` would block: the host waits for the GPU's queue
    before copying. A non-blocking copy of the small host tensor does not.
    """
    sizes = torch.tensor(image_sizes, dtype=dtype).reshape(-1, 2)  # [B, 2] on the host
    return sizes.to(device, non_blocking=True)
