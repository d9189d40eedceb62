"""What torchvision's compiled RoI kernels buy over the readable references.

512 RoIs on a 256×64×64 map (one FPN level of a 1024×1024 image at stride 16), RoIs 2 to 32 cells
wide as FPN level assignment produces; RoIAlign 7×7 with sampling_ratio 2 (and adaptive), RoIPool
7×7. Prints milliseconds per call and the reference / torchvision ratio; checks both agree first.

Then the matrix-product RoIAlign (``roi_align_matmul``, what the Mask R-CNN heads train with on
the CPU with small maps) against torchvision's kernel, forward and forward + backward, on the CPU
tier's box-head workload: 8 images, 64 channels, 32×32 (P2 of a 128 px image), 256 RoIs, 7×7,
``sampling_ratio=2`` (``--train-*`` options).

    python benchmarks/roi.py                 # CPU
    python benchmarks/roi.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision.ops as tvo

from instseg_edu.ops.roi import roi_align_matmul, roi_align_reference, roi_pool_reference


def make_inputs(num_rois: int, channels: int, size: int, stride: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(1, channels, size, size, generator=g)
    image = size * stride
    wh = (2 + 30 * torch.rand(num_rois, 2, generator=g)) * stride  # 2..32 cells
    xy = torch.rand(num_rois, 2, generator=g) * (image - wh)
    rois = torch.cat([torch.zeros(num_rois, 1), xy, xy + wh], dim=1)  # [K, 5]
    return features.to(device), rois.to(device)


def timeit(fn, device, repeats: int) -> float:
    """Median milliseconds per call, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=8)
    parser.add_argument("--train-rois", type=int, default=256)
    parser.add_argument("--train-channels", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=32)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    scale = 1.0 / args.stride
    features, rois = make_inputs(args.rois, args.channels, args.size, args.stride, device)

    cases = {
        "RoIAlign 7x7, sampling_ratio=2": (
            lambda: roi_align_reference(features, rois, 7, scale, 2, True),
            lambda: tvo.roi_align(features, rois, 7, scale, 2, True),
        ),
        "RoIAlign 7x7, adaptive": (
            lambda: roi_align_reference(features, rois, 7, scale, 0, True),
            lambda: tvo.roi_align(features, rois, 7, scale, 0, True),
        ),
        "RoIPool 7x7": (
            lambda: roi_pool_reference(features, rois, 7, scale),
            lambda: tvo.roi_pool(features, rois, 7, scale),
        ),
    }
    print(
        f"{args.rois} RoIs on a {args.channels}x{args.size}x{args.size} map, {device} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    print(f"{'op':34} {'reference ms':>12} {'torchvision ms':>15} {'ratio':>7}")
    for name, (reference, compiled) in cases.items():
        torch.testing.assert_close(reference(), compiled(), atol=1e-4, rtol=0)
        ref_ms = timeit(reference, device, args.repeats)
        tv_ms = timeit(compiled, device, args.repeats)
        print(f"{name:34} {ref_ms:12.1f} {tv_ms:15.2f} {ref_ms / tv_ms:7.1f}x")
    compare_matmul(args, device)


def compare_matmul(args, device) -> None:
    """Forward and forward + backward: ``roi_align_matmul`` against torchvision's kernel."""
    g = torch.Generator().manual_seed(1)
    n, size, stride = args.train_images, args.train_size, 4
    features = torch.randn(n, args.train_channels, size, size, generator=g).to(device)
    image = size * stride
    wh = 4 + 0.3 * image * torch.rand(args.train_rois, 2, generator=g)  # 4 px .. 30% of image
    xy = torch.rand(args.train_rois, 2, generator=g) * (image - wh)
    index = torch.randint(0, n, (args.train_rois, 1), generator=g).float()
    rois = torch.cat([index, xy, xy + wh], dim=1).to(device)
    grad = torch.randn(args.train_rois, args.train_channels, 7, 7, generator=g).to(device)
    leaf = features.clone().requires_grad_(True)

    def forward(op):
        return lambda: op(features, rois, 7, 1.0 / stride, 2, True)

    def train_step(op):
        def run():
            leaf.grad = None
            op(leaf, rois, 7, 1.0 / stride, 2, True).backward(grad)

        return run

    torch.testing.assert_close(
        forward(roi_align_matmul)(), forward(tvo.roi_align)(), atol=1e-4, rtol=0
    )
    print(
        f"\nRoIAlign 7x7 as two matrix products: {args.train_rois} RoIs on {n} maps of "
        f"{args.train_channels}x{size}x{size}, sampling_ratio=2"
    )
    print(f"{'pass':34} {'matmul ms':>12} {'torchvision ms':>15} {'speed-up':>8}")
    for name, make in (("forward", forward), ("forward + backward", train_step)):
        ours = timeit(make(roi_align_matmul), device, args.repeats)
        theirs = timeit(make(tvo.roi_align), device, args.repeats)
        print(f"{name:34} {ours:12.1f} {theirs:15.2f} {theirs / ours:7.2f}x")


if __name__ == "__main__":
    main()
