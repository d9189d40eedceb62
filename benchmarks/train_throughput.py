"""Training and inference speed: ours against torchvision's model, side by side in one run.

For each family (RetinaNet, Mask R-CNN), both models are R50-FPN with random init, see the same
512² shapes batches (batch 8, cycled from memory so the data loader is not measured) on the same
device, and run in each precision listed in ``--precisions``; the best of each side is compared.
Printed per side: train img/s, inference img/s (batch 8, masks included for Mask R-CNN), batch-1
latency and peak memory, then the ratios ours / torchvision.

    python benchmarks/train_throughput.py --device cuda                # the real measurement
    python benchmarks/train_throughput.py --device cpu --smoke        # a seconds-long check

``torch.backends.cudnn.benchmark`` stays off: with a number of RoIs that changes every step it
re-tunes convolutions over and over and makes torchvision's Mask R-CNN about ten times slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import (
    Timer,
    autocast,
    build_torchvision,
    loss_total,
    shapes_data,
    torchvision_inputs,
)

from instseg_edu.data.transforms import collate


def build_ours(family: str, num_classes: int, smoke: bool):
    if family == "retinanet":
        from instseg_edu.models.retinanet import (
            RETINANET_R18_SMALL,
            RETINANET_R50_FPN_SCRATCH,
            build_retinanet,
        )

        # Random init on both sides: nothing frozen, BatchNorm statistics updated, as torchvision
        # does without weights.
        cfg = RETINANET_R18_SMALL if smoke else RETINANET_R50_FPN_SCRATCH
        return build_retinanet(cfg.with_num_classes(num_classes))
    from instseg_edu.models.mask_rcnn import MASK_RCNN_R18_SMALL, MASK_RCNN_R50_FPN, build_mask_rcnn

    cfg = MASK_RCNN_R18_SMALL if smoke else MASK_RCNN_R50_FPN
    return build_mask_rcnn(cfg.with_num_classes(num_classes))


class Side:
    """How one model is stepped: ours takes a Batch, torchvision takes lists."""

    def __init__(self, name, model, family, device, channels_last):
        self.name, self.model, self.family, self.device = name, model.to(device), family, device
        self.channels_last = channels_last and device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def train_step(self, batch, precision):
        self.model.train()
        with autocast(self.device, precision):
            if self.name == "ours":
                images = batch.images
                if self.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                losses = self.model.loss(self.model(images), batch)
            else:
                images, targets = torchvision_inputs(batch, self.family)
                losses = self.model(images, targets)
            total = loss_total(losses, ours=self.name == "ours")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer(self, batch, precision):
        self.model.eval()
        with autocast(self.device, precision):
            if self.name == "ours":
                return self.model.predict(self.model(batch.images), batch.image_sizes)
            images, _ = torchvision_inputs(batch, self.family)
            return self.model(images)


def measure(side: Side, batches, batch1, precision, warmup, steps, device):
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        side.train_step(batches[i % len(batches)], precision)
    timer.start()
    for i in range(steps):
        side.train_step(batches[i % len(batches)], precision)
    train_s = timer.elapsed()
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )

    for i in range(warmup):
        side.infer(batches[i % len(batches)], precision)
    timer.start()
    for i in range(steps):
        side.infer(batches[i % len(batches)], precision)
    infer_s = timer.elapsed()

    latencies = []
    for i in range(warmup + steps):
        timer.start()
        side.infer(batch1, precision)
        if i >= warmup:
            latencies.append(timer.elapsed() * 1000)
    n_images = steps * len(batches[0])
    return {
        "precision": precision,
        "train_img_s": n_images / train_s,
        "infer_img_s": n_images / infer_s,
        "latency_ms": statistics.median(latencies),
        "peak_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["retinanet", "mask_rcnn"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--data", default="data/shapes512")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, small models, CPU-fast")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.image_size, args.batch_size, args.warmup, args.steps = 128, 2, 1, 2
        args.precisions = ["fp32"]
        args.data = args.data + "_smoke"
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)

    train, _ = shapes_data(args.data, args.image_size, num_train=4 * args.batch_size, num_val=8)
    num_classes = len(train.classes)
    batches = [
        collate([train[i * args.batch_size + j] for j in range(args.batch_size)]).to(device)
        for i in range(4)
    ]
    batch1 = collate([train[0]]).to(device)

    results = {}
    if args.smoke:
        print("smoke run: ours uses the small CPU preset, so the ratios below mean nothing")
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, batch {args.batch_size}, "
        f"{args.image_size}²"
    )
    for family in args.families:
        sides = {
            "ours": Side("ours", build_ours(family, num_classes, args.smoke), family, device, True),
            "torchvision": Side(
                "torchvision",
                build_torchvision(family, num_classes, args.image_size),
                family,
                device,
                False,
            ),
        }
        best = {}
        for name, side in sides.items():
            runs = [
                measure(side, batches, batch1, p, args.warmup, args.steps, device)
                for p in args.precisions
            ]
            for r in runs:
                print(
                    f"{family:9s} {name:11s} {r['precision']:4s} train {r['train_img_s']:7.1f} "
                    f"img/s  infer {r['infer_img_s']:7.1f} img/s  batch-1 "
                    f"{r['latency_ms']:6.1f} ms  peak "
                    + (f"{r['peak_gib']:5.2f} GiB" if device.type == "cuda" else "(CUDA only)")
                )
            best[name] = max(runs, key=lambda r: r["train_img_s"])
            best[name]["best_infer"] = max(runs, key=lambda r: r["infer_img_s"])["infer_img_s"]
        ours, peer = best["ours"], best["torchvision"]
        ratios = {
            "train": ours["train_img_s"] / peer["train_img_s"],
            "infer": ours["best_infer"] / peer["best_infer"],
            "latency": peer["latency_ms"] / ours["latency_ms"],
        }
        print(
            f"{family:9s} ratio ours/torchvision: train {ratios['train']:.2f}x  "
            f"infer {ratios['infer']:.2f}x  batch-1 speed-up {ratios['latency']:.2f}x"
        )
        results[family] = {"ours": ours, "torchvision": peer, "ratios": ratios}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
