"""How many looks at an object does it take to learn the seven shapes from scratch? A yardstick
for the CPU recipe's classifier.

From scratch, Mask R-CNN's box head tells the shapes apart only after about 400 steps (the CPU
recipe's history in ``benchmarks/RESULTS.md``). This script asks how much of that is the task
itself: it cuts every ground-truth object of at least ``--min-size`` px out of the recipe's
128 px shapes images (a square around the object's box, 20 % larger, resampled to
``--crop`` x ``--crop`` pixels by RoIAlign), and trains a small CNN (three stride-2 stages of two
3x3 convs with BatchNorm, then two fc layers) to name the shape, with the recipe's optimiser
(AdamW, lr 2e-3 unless ``--lr``, weight decay 0.05) and random flips, ``--batch`` crops a step
(256 unless given). Every ``--eval-every`` steps it prints the accuracy on the crops of the
validation split and how many crops the training has seen so far.
Comparing that count with the objects a detector's training step sees (about 6.5 per image) says
how many steps the detector needs at the same learning per look.

    python benchmarks/shape_classifier.py --crop 32 --steps 600 --json runs/shape_classifier.jsonl
    python benchmarks/shape_classifier.py --crop 32 --batch 64 --steps 800 --eval-every 100
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from instseg_edu.data.shapes import SHAPES_PER_IMAGE
from instseg_edu.recipes import recipe


def object_crops(dataset, crop: int, min_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every object of ``dataset`` whose box's longer side is ``>= min_size`` px, cut out as a
    square 1.2 times that side around the box's centre and resampled by RoIAlign.

    Returns:
        ``(crops float32 [N, 3, crop, crop], labels int64 [N])``.
    """
    crops, labels = [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        boxes = target.boxes.float()  # [G, 4] xyxy
        side = (boxes[:, 2:] - boxes[:, :2]).amax(1)  # [G]
        keep = side >= min_size
        centre = (boxes[keep, :2] + boxes[keep, 2:]) / 2  # [K, 2]
        half = 0.6 * side[keep, None]  # [K, 1]
        squares = torch.cat([torch.zeros(len(centre), 1), centre - half, centre + half], 1)
        crops.append(roi_align(image[None], squares, crop, 1.0, 2, aligned=True))
        labels.append(target.labels[keep])
    return torch.cat(crops), torch.cat(labels)


def small_cnn(num_classes: int) -> nn.Sequential:
    """Three stride-2 stages of two 3x3 conv + BatchNorm + ReLU (32, 64, 128 channels), then a
    256-wide fc and the class scores."""

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        ]  # fmt: skip

    return nn.Sequential(*stage(3, 32), *stage(32, 64), *stage(64, 128), nn.Flatten(),
                         nn.LazyLinear(256), nn.ReLU(), nn.Linear(256, num_classes))  # fmt: skip


def run(data: str, crop: int, steps: int, batch: int, min_size: float, eval_every: int,
        seed: int = 0, lr: float = 2e-3, **sizes) -> dict:  # fmt: skip
    """Train the crop classifier; returns the JSON record with its accuracy curve.
    ``sizes`` (``num_train``, ``num_val``, ``image_size``) shrink the data for a smoke run."""
    # The standard training split (3-10 shapes per image), whatever the recipe trains on now.
    r = recipe("mask_rcnn", "cpu").override(train_shapes_per_image=SHAPES_PER_IMAGE, **sizes)
    train_set, val_set = r.shapes_datasets(data)
    # The stored items, without the training augmentation (flips are added below).
    train_x, train_y = object_crops(getattr(train_set, "dataset", train_set), crop, min_size)
    val_x, val_y = object_crops(val_set, crop, min_size)
    torch.manual_seed(seed)
    net = small_cnn(len(train_set.classes))
    net(train_x[:2])  # materialise the lazy fc
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    curve = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(len(train_x), (batch,))
        x = train_x[index]
        flip = torch.rand(batch) < 0.5
        x[flip] = x[flip].flip(3)
        loss = F.cross_entropy(net(x), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            net.eval()
            with torch.no_grad():
                acc = (net(val_x).argmax(1) == val_y).float().mean().item()
            net.train()
            curve.append({"step": step, "crops_seen": step * batch, "val_acc": round(acc, 3),
                          "loss": round(loss.item(), 3),
                          "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
            print(json.dumps(curve[-1]), flush=True)
    return {
        "crop": crop, "min_size": min_size, "batch": batch, "lr": lr, "train_crops": len(train_x),
        "val_crops": len(val_x), "threads": torch.get_num_threads(), "curve": curve,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes/128px-1000-200", help="shapes root")
    parser.add_argument("--crop", type=int, default=32, help="crop side, pixels")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW's learning rate")
    parser.add_argument("--min-size", type=float, default=16.0, help="smallest box side, px")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--num-train", type=int, default=None, help="(smoke runs) fewer images")
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--json", default=None, help="append the run's JSON record here")
    args = parser.parse_args(argv)
    sizes = {key: getattr(args, key) for key in ("num_train", "num_val")}
    sizes = {key: value for key, value in sizes.items() if value is not None}
    record = run(args.data, args.crop, args.steps, args.batch, args.min_size, args.eval_every,
                 lr=args.lr, **sizes)  # fmt: skip
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
