"""How fast MaxIoU assignment is: one batched call versus a per-image loop versus torchvision.

A RetinaNet batch: ``--batch`` images of ``--image-size``² (default 8 × 512²), anchors of strides
8..128 with 9 per cell (49 104 per image), ``--num-gt`` random ground-truth boxes per image. Three
ways to assign the same data with RetinaNet's thresholds (pos 0.5, neg 0.4, low-quality matches):

- ``batched``: :func:`instseg_edu.ops.assign.max_iou_assign_batched`, one call for the batch;
- ``loop``: :func:`instseg_edu.ops.assign.max_iou_assign` once per image;
- ``torchvision``: ``torchvision.ops.box_iou`` + ``torchvision.models.detection._utils.Matcher``
  once per image (what torchvision's RetinaNet does).

Prints the median milliseconds of each and the speed-ups, checks that ``batched`` equals ``loop``,
and on CUDA checks that the batched path makes no host synchronisation
(``torch.cuda.set_sync_debug_mode("error")``).

    python benchmarks/assign.py --device cpu
    python benchmarks/assign.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torchvision.models.detection._utils import Matcher

from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.ops.assign import max_iou_assign, max_iou_assign_batched

THRESHOLDS = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0)


def make_data(batch: int, image_size: int, num_gt: int, device: torch.device, seed: int = 0):
    gen = AnchorGenerator(
        strides=(8, 16, 32, 64, 128),
        ratios=(0.5, 1.0, 2.0),
        octave_base_scale=4,
        scales_per_octave=3,
    )
    sizes = [(-(-image_size // s), -(-image_size // s)) for s in (8, 16, 32, 64, 128)]
    anchors = torch.cat(gen.grid_anchors(sizes, device))  # [N, 4]
    g = torch.Generator().manual_seed(seed)
    wh = torch.exp(torch.empty(batch, num_gt, 2).uniform_(2.5, 6.0, generator=g))  # 12..400 px
    wh = wh.clamp(max=image_size - 1)
    xy = torch.rand(batch, num_gt, 2, generator=g) * (image_size - wh)
    gt_boxes = torch.cat([xy, xy + wh], dim=-1).to(device)  # [B, G, 4]
    gt_labels = torch.randint(0, 80, (batch, num_gt), generator=g).to(device)
    gt_valid = torch.ones(batch, num_gt, dtype=torch.bool, device=device)
    return anchors, gt_boxes, gt_labels, gt_valid


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--num-gt", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    anchors, gt_boxes, gt_labels, gt_valid = make_data(
        args.batch, args.image_size, args.num_gt, device
    )
    b, n = args.batch, anchors.shape[0]

    def batched():
        return max_iou_assign_batched(anchors, gt_boxes, gt_labels, gt_valid, **THRESHOLDS)

    def loop():
        return [max_iou_assign(anchors, gt_boxes[i], gt_labels[i], **THRESHOLDS) for i in range(b)]

    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)

    def tv():
        return [matcher(torchvision.ops.box_iou(gt_boxes[i], anchors)) for i in range(b)]

    # correctness first: the batched call equals the loop
    out, ref = batched(), loop()
    for i in range(b):
        assert torch.equal(out.gt_inds[i], ref[i].gt_inds), f"image {i}: gt_inds differ"
        assert torch.equal(out.reason[i], ref[i].reason), f"image {i}: reason differs"
    # how often torchvision's Matcher puts an anchor in the same category (pos / neg / ignored)
    tv_matches = torch.stack(tv())  # [B, N]: idx >= 0, -1 below low, -2 between
    ours = torch.where(out.gt_inds > 0, 1, torch.where(out.gt_inds == 0, 0, -1))
    theirs = torch.where(tv_matches >= 0, 1, torch.where(tv_matches == -1, 0, -1))
    agree = (ours == theirs).float().mean().item()

    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
        try:
            batched()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print("batched path: no host synchronisation (checked with set_sync_debug_mode('error'))")

    t_batched = time_ms(batched, device, args.repeats, args.warmup)
    t_loop = time_ms(loop, device, args.repeats, args.warmup)
    t_tv = time_ms(tv, device, args.repeats, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={name} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"B={b} anchors/image={n} gt/image={args.num_gt}"
    )
    print(f"{'method':<34}{'median ms':>12}{'vs batched':>12}")
    for label, t in [
        ("batched (max_iou_assign_batched)", t_batched),
        ("per-image loop (max_iou_assign)", t_loop),
        ("torchvision box_iou + Matcher", t_tv),
    ]:
        print(f"{label:<34}{t:>12.2f}{t / t_batched:>11.2f}x")
    print(
        f"batched == loop: yes; same pos/neg/ignored category as torchvision Matcher: {agree:.4%}"
    )


if __name__ == "__main__":
    main()
