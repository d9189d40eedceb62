"""What torchvision's compiled RoI kernels buy over the readable references.

512 RoIs on a 256×64×64 map (one FPN level of a 1024×1024 image at stride 16), RoIs 2 to 32 cells
wide as FPN level assignment produces; RoIAlign 7×7 with sampling_ratio 2 (and adaptive), RoIPool
7×7. Prints milliseconds per call and the reference / torchvision ratio; checks both agree first.

    python benchmarks/roi.py                 # CPU
    python benchmarks/roi.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision.ops as tvo

from instseg_edu.ops.roi import roi_align_reference, roi_pool_reference


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


if __name__ == "__main__":
    main()
