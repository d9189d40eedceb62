"""A dataset decoded once and kept in memory, for training on a CPU.

Reading an item of :class:`~instseg_edu.data.coco.CocoDataset` decodes a PNG, decodes every mask
(polygons or RLE, through pycocotools) and resizes both. On a GPU, DataLoader worker processes do
that in the background; on a laptop's two cores the workers take their time from the training
step itself. A small training set (a thousand 128 px images) fits in memory, so
:class:`InMemoryDataset` reads each item once, up front, and afterwards only applies the random
augmentation of every epoch (flip, colour jitter), in the main process (``workers=0``).

What is stored is lossless: images as ``uint8`` when every value is a multiple of 1/255 (an 8-bit
image at its own size), else ``float32``; masks packed to one bit per pixel.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from instseg_edu.structures import Target


class InMemoryDataset(Dataset):
    """Every item of ``dataset``, read once; ``transforms`` applied each time an item is taken.

    Args:
        dataset: any dataset of ``(image float32 [3, H, W] in [0, 1], Target)`` items, usually a
            :class:`~instseg_edu.data.coco.CocoDataset` built with the deterministic part of the
            pipeline (``eval_transforms(size)``: the resize).
        transforms: ``(image, target) -> (image, target)`` applied on every access, e.g.
            :func:`~instseg_edu.data.transforms.train_transforms` (random flip and jitter).
            ``None``: the stored items as they are.

    Attributes the wrapped dataset has (``coco``, ``classes``, ``label_to_cat_id``,
    ``categories``, ``image_ids``, ``check_trainable``, ...) are read through from it, so this
    wrapper goes wherever the dataset went (training loop, evaluation, the command line).

    Memory: a 128 px RGB image takes 48 KiB, each of its masks 2 KiB; 1000 shapes images about
    70 MiB.
    """

    def __init__(self, dataset, transforms=None):
        self.dataset = dataset
        self.transforms = transforms
        start = time.perf_counter()
        self._images: list[Tensor] = []
        self._targets: list[Target] = []
        self._mask_widths: list[int] = []
        for index in range(len(dataset)):
            image, target = dataset[index]
            self._images.append(_compact_image(image))
            width = int(target.masks.shape[-1])
            packed = np.packbits(target.masks.numpy(), axis=-1)  # [G, H, ceil(W / 8)] uint8
            self._targets.append(replace(target, masks=torch.from_numpy(packed)))
            self._mask_widths.append(width)
        self.load_seconds = time.perf_counter() - start

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image = self._images[index]
        image = image.float() / 255 if image.dtype == torch.uint8 else image.clone()
        target = self._targets[index]
        masks = np.unpackbits(target.masks.numpy(), axis=-1, count=self._mask_widths[index])
        target = replace(target, masks=torch.from_numpy(masks.astype(bool)))  # [G, H, W]
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __getattr__(self, name: str):
        # Only called for names this object lacks. Private names and ``dataset`` itself are never
        # forwarded (unpickling in a DataLoader worker looks them up before they exist).
        if name.startswith("_") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"InMemoryDataset({self.dataset!r}, {len(self)} items)"


def _compact_image(image: Tensor) -> Tensor:
    """``uint8`` when that is exact (every value ``k / 255``), else the image unchanged."""
    quantized = (image * 255).round()
    if torch.equal(quantized / 255, image):
        return quantized.to(torch.uint8)
    return image
