"""A tiny model and dataset that follow the instseg_edu model protocol, so the training loop can be
tested without any real detector: the model regresses the one box drawn in each image."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from instseg_edu.structures import Detections, Target

SIZE = 32


class ToyOutputs(NamedTuple):
    boxes: Tensor  # [B, 4] xyxy as fractions of the padded image size


class ToyBoxModel(nn.Module):
    """conv → pool → linear → one box per image; ``loss_box`` (L1) and ``loss_aux`` terms."""

    def __init__(self, nan_at_call: int | None = None, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(64, 4))
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, images: Tensor) -> ToyOutputs:
        return ToyOutputs(self.head(self.features(images)))  # [B, 4]

    def targets(self, outputs: ToyOutputs, batch) -> tuple[Tensor, Tensor]:
        hp, wp = batch.images.shape[-2:]
        scale = torch.tensor([wp, hp, wp, hp], dtype=torch.float32, device=batch.images.device)
        boxes = torch.stack([
            t.boxes[0] if len(t) else torch.zeros(4, device=scale.device) for t in batch.targets
        ]) / scale  # [B, 4]  # fmt: skip
        valid = torch.tensor([len(t) > 0 for t in batch.targets], device=scale.device)  # [B]
        return boxes, valid

    def loss(self, outputs: ToyOutputs, batch) -> dict[str, Tensor]:
        self.calls += 1
        boxes, valid = self.targets(outputs, batch)
        pred = outputs.boxes.float()
        l1 = (pred - boxes).abs().sum(dim=1)  # [B]
        loss_box = (l1 * valid).sum() / valid.sum().clamp(min=1)
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            loss_box = loss_box * float("nan")
        return {
            "loss_box": loss_box,
            "loss_aux": 0.01 * pred.pow(2).mean(),
            "num_pos": valid.sum().float(),
        }

    def predict(self, outputs: ToyOutputs, image_sizes) -> list[Detections]:
        dets = []
        for box, (h, w) in zip(outputs.boxes.float(), image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=box.device)
            one = torch.ones(1, device=box.device)
            dets.append(Detections((box * scale)[None], one, one.long() * 0))
        return dets


class ToyDataset(torch.utils.data.Dataset):
    """Images with one bright rectangle on a dark background; a random horizontal flip drawn from
    the global torch RNG (as a main-process augmentation would), so resume must restore it."""

    def __init__(self, n: int = 10, size: int = SIZE, flip: bool = True):
        self.n, self.size, self.flip = n, size, flip

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        s = self.size
        x1, y1 = torch.randint(0, s // 2, (2,), generator=g).tolist()
        w, h = torch.randint(4, s // 2, (2,), generator=g).tolist()
        image = torch.full((3, s, s), 0.1)
        image[:, y1 : y1 + h, x1 : x1 + w] = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5
        mask = torch.zeros(1, s, s, dtype=torch.bool)
        mask[0, y1 : y1 + h, x1 : x1 + w] = True
        box = torch.tensor([[x1, y1, x1 + w, y1 + h]], dtype=torch.float32)
        if self.flip and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
            box = torch.stack([s - box[:, 2], box[:, 1], s - box[:, 0], box[:, 3]], dim=1)
        target = Target(box, torch.zeros(1, dtype=torch.long), mask, image_id=i + 1,
                        orig_size=(s, s))  # fmt: skip
        return image, target
