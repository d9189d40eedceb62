"""Shared pieces of the side-by-side benchmarks: data, the torchvision peers, timing.

Both sides of every comparison see the same batches from the same loader; only the model (and
how a batch is handed to it) differs. torchvision's detection models take a list of un-padded
images and a list of target dicts, resize internally (here pinned to the benchmark's image size so
that neither side sees larger images) and use label 0 for background in Mask R-CNN.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.shapes import make_shapes_splits
from instseg_edu.data.transforms import eval_transforms, train_transforms
from instseg_edu.engine.train import cpu_has_native_bf16, make_loader
from instseg_edu.structures import Batch, Detections


def shapes_data(root: str | Path, image_size: int, num_train: int, num_val: int, seed: int = 0):
    """Build (once) and open the shapes train/val splits at ``image_size``."""
    paths = make_shapes_splits(root, num_train, num_val, image_size=image_size, seed=seed)
    train_json, val_json = paths["train"], paths["val"]
    train = CocoDataset(train_json, train_json.parent / "train", train_transforms(image_size))
    val = CocoDataset(val_json, val_json.parent / "val", eval_transforms(image_size))
    return train, val


def loaders(train, val, batch_size: int, workers: int, seed: int = 0, persistent: bool = False):
    """Train and val loaders; ``persistent`` keeps the workers between epochs."""
    kw = dict(workers=workers, seed=seed, persistent_workers=persistent and workers > 0)
    train_loader = make_loader(train, batch_size, shuffle=True, **kw)
    val_loader = make_loader(val, batch_size, shuffle=False, **kw)
    return train_loader, val_loader


# ----------------------------------------------------------------------------- torchvision peers
def build_torchvision(family: str, num_classes: int, image_size: int, **kwargs) -> torch.nn.Module:
    """torchvision's R50-FPN model of ``family``, random init, resizing pinned to ``image_size``;
    ``kwargs`` go to the model (e.g. ``score_thresh``)."""
    from torchvision.models import detection

    common = dict(weights=None, weights_backbone=None, min_size=image_size, max_size=image_size)
    common.update(kwargs)
    if family == "retinanet":
        # Sigmoid classification: labels index the class axis directly, no background column.
        return detection.retinanet_resnet50_fpn(num_classes=num_classes, **common)
    if family == "mask_rcnn":
        return detection.maskrcnn_resnet50_fpn(num_classes=num_classes + 1, **common)
    raise ValueError(f"unknown family {family!r}")


def torchvision_inputs(batch: Batch, family: str):
    """Un-padded images and target dicts in torchvision's format (labels shifted for R-CNN)."""
    images, targets = [], []
    shift = 1 if family == "mask_rcnn" else 0
    for image, (h, w), t in zip(batch.images, batch.image_sizes, batch.targets):
        images.append(image[:, :h, :w])
        target = {"boxes": t.boxes, "labels": t.labels + shift}
        if family == "mask_rcnn":
            target["masks"] = t.masks[:, :h, :w].to(torch.uint8)
        targets.append(target)
    return images, targets


def torchvision_detections(outputs: list[dict], family: str) -> list[Detections]:
    shift = 1 if family == "mask_rcnn" else 0
    detections = []
    for out in outputs:
        masks = out.get("masks")
        if masks is not None:
            masks = masks[:, 0] >= 0.5  # [K, 1, h, w] probabilities -> [K, h, w] bool
        detections.append(
            Detections(out["boxes"].float(), out["scores"].float(), out["labels"] - shift, masks)
        )
    return detections


def loss_total(losses: dict, ours: bool = True) -> torch.Tensor:
    """Ours: the ``loss_*`` terms (other keys are statistics); torchvision: every value."""
    return sum(v for k, v in losses.items() if not ours or k.startswith("loss_"))


# ------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds between ``start()`` and ``elapsed()`` with the device synchronised."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = 0.0

    def start(self) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        sync(self.device)
        return time.perf_counter() - self.t0


def autocast(device: torch.device, precision: str):
    """bf16 autocast when ``precision`` is ``"bf16"``, on CUDA or on a CPU with bf16
    instructions (elsewhere bf16 would be emulated, slower than fp32: fp32 there)."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    enabled = precision == "bf16" and native
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
