"""How fast the shapes dataset is generated.

Draws ``--num-images`` images (PNG + COCO JSON) into a temporary folder and prints images per
second and the projected time for 1000 images. The target (issue 2) is 1000 images of 512² in
under 30 s on 2 cores. It also prints the CPU seconds spent (this process and its workers), which
stay meaningful when other jobs share the cores: CPU time / cores is the wall time on idle cores.

    python benchmarks/shapes.py --num-images 200 --image-size 512 --workers 2
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

from instseg_edu.data.shapes import make_shapes_dataset, render_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 2))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # drawing alone (no PNG, no RLE), one process
    n_draw = min(args.num_images, 50)
    start = time.perf_counter()
    for i in range(n_draw):
        render_image(args.seed, "bench", i, args.image_size)
    draw_s = (time.perf_counter() - start) / n_draw

    with tempfile.TemporaryDirectory() as root:
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        ann_file = make_shapes_dataset(
            root, args.num_images, args.image_size, args.seed, "bench", workers=args.workers
        )
        total = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_start
        size_mb = sum(f.stat().st_size for f in (ann_file.parent / "bench").iterdir()) / 1e6

    rate = args.num_images / total
    print(
        f"draw only: {1000 * draw_s:.1f} ms/image (1 process)\n"
        f"full dataset: {args.num_images} images of {args.image_size}² with {args.workers} "
        f"worker(s) in {total:.2f} s = {rate:.1f} images/s; "
        f"{size_mb / args.num_images * 1000:.0f} kB/image on disk\n"
        f"CPU time: {1000 * cpu / args.num_images:.1f} ms/image, i.e. "
        f"{cpu / args.num_images * 1000 / args.workers:.1f} s per 1000 images on "
        f"{args.workers} idle core(s)\n"
        f"projected for 1000 images: {1000 / rate:.1f} s (target < 30 s on 2 cores)"
    )


def _cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
