"""A procedural shapes dataset for instance segmentation, written in COCO format.

Real detection data is big and slow to download; a teaching library wants something that appears
in seconds, is exactly reproducible, and still exercises every part of a detector. Each image here
is a textured background (a colour gradient, stripes, smooth noise or a checkerboard) with a
handful of flat-coloured shapes painted on top, one after another, like a painter working from
the back of the scene to the front:

- seven classes (:data:`CLASSES`), told apart by shape alone — colours are random, so a model
  cannot cheat by colour;
- sizes drawn log-uniformly from 8 px to 0.9 of the image side, so that every FPN level (strides 8
  to 128) and every SOLO scale range sees objects; a 512² image gets some objects under 16 px and
  some over 256 px;
- occlusion done right: a shape painted later takes over the pixels it covers, so the mask of an
  earlier shape is only what stays *visible*. An object with fewer than
  :data:`MIN_VISIBLE_PIXELS` visible pixels left is dropped, and every box is the tight box of
  the visible mask (not of the whole shape).

The images go to ``root/<split>/000000.png, ...`` and the annotations to ``root/<split>.json``
(COCO instances, masks as compressed RLE from pycocotools), so the dataset goes through
:class:`instseg_edu.data.coco.CocoDataset` exactly like anyone's own data.

Everything is deterministic: image ``i`` of split ``s`` is drawn from a random generator seeded
with ``(seed, crc32(s), i)``, so parallel workers produce the same bytes as a single process, and
the same seed always gives the same PNG and JSON files.

Shapes are rasterised with numpy on coordinate grids, only inside each shape's bounding square:
pixel ``(row, col)`` is inside a shape when its centre ``(col + 0.5, row + 0.5)`` is.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CLASSES: tuple[str, ...] = (
    "circle",
    "rectangle",
    "triangle",
    "ellipse",
    "star",
    "ring",
    "cross",
)
"""Class names; label ``k`` is ``CLASSES[k]`` and its COCO category id is ``k + 1``."""

MIN_VISIBLE_PIXELS = 10
"""Objects with fewer visible pixels than this (after occlusion and clipping) are dropped."""

MIN_SIZE = 8.0
"""Smallest shape diameter in pixels."""

MAX_SIZE_FRACTION = 0.9
"""Largest shape diameter as a fraction of the image side."""

SHAPES_PER_IMAGE = (3, 10)
"""How many shapes are painted on an image: drawn uniformly from this inclusive range (fewer
objects stay where later shapes hide earlier ones)."""

GENERATOR_VERSION = 1
"""Bumped whenever the drawing code changes, so stale datasets on disk are regenerated."""

_PNG_COMPRESS_LEVEL = 1  # fast and fixed: the same pixels always give the same bytes


class Shape(NamedTuple):
    """One shape to paint.

    ``size`` is the diameter of the shape's circumscribed circle, so every shape fits in the square
    ``[cx - size/2, cx + size/2] x [cy - size/2, cy + size/2]``. ``aspect`` is the one free form
    parameter of each kind:

    ========== ===========================================================
    circle     unused
    rectangle  short side / long side
    triangle   0 gives a right isosceles triangle, 1 an equilateral one
    ellipse    minor axis / major axis
    star       inner radius / outer radius (five points)
    ring       inner radius / outer radius
    cross      arm half-width / outer radius
    ========== ===========================================================

    ``shade`` tilts the colour linearly along the shape's long axis (0 is flat).
    """

    kind: str
    cx: float
    cy: float
    size: float
    angle: float = 0.0
    aspect: float = 1.0
    color: tuple[float, float, float] = (255.0, 255.0, 255.0)
    shade: float = 0.0


class Scene(NamedTuple):
    """What :func:`paint` returns.

    Attributes:
        image: ``uint8 [H, W, 3]``.
        masks: ``bool [K, H, W]`` visible masks of the kept shapes, in painting order.
        kept: ``int64 [K]`` index into the painted list of each kept shape.
    """

    image: np.ndarray
    masks: np.ndarray
    kept: np.ndarray


def shape_mask(shape: Shape, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which points lie inside ``shape``.

    Args:
        shape: the shape.
        xs, ys: point coordinates in pixels, broadcastable against each other (e.g. ``[1, w]`` and
            ``[h, 1]`` pixel centres).

    Returns:
        ``bool`` array of the broadcast shape.
    """
    if shape.kind not in CLASSES:
        raise ValueError(f"shape.kind={shape.kind!r} must be one of {CLASSES}")
    r = shape.size / 2
    cos, sin = math.cos(shape.angle), math.sin(shape.angle)
    dx, dy = xs - shape.cx, ys - shape.cy
    # (u, v): the shape's own frame, rotated by `angle`; u is its long axis.
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    a = shape.aspect
    if shape.kind == "circle":
        return u * u + v * v <= r * r
    if shape.kind == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (a * r) ** 2)
    if shape.kind == "ellipse":
        return (u / r) ** 2 + (v / (a * r)) ** 2 <= 1.0
    if shape.kind == "rectangle":
        # half sides (hu, hv) with hv = a * hu and the corner on the circle of radius r.
        hu = r / math.sqrt(1.0 + a * a)
        return (np.abs(u) <= hu) & (np.abs(v) <= a * hu)
    if shape.kind == "cross":
        w = a * r
        arm = math.sqrt(r * r - w * w)  # arm end corners (arm, w) lie on the circle
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= w)) | ((au <= w) & (av <= arm))
    if shape.kind == "triangle":
        # apex at angle 0, base corners at +-beta; beta = 2pi/3 (a = 1) is equilateral.
        beta = math.pi / 2 + (math.pi / 6) * a
        corners = [(r, 0.0), (r * math.cos(beta), r * math.sin(beta))]
        corners.append((corners[1][0], -corners[1][1]))
        inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        # corners run counter-clockwise (angles 0, beta, -beta), so a point is inside when it is
        # left of every edge: cross(edge, point - edge start) >= 0.
        for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
            inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
        return inside
    # star: fold the angle into one half-spike wedge [0, pi/n] (the star is symmetric), then a
    # point is inside when it lies on the centre's side of the edge from the outer tip O = (r, 0)
    # to the inner corner I = (a r cos(pi/n), a r sin(pi/n)).
    n = 5
    wedge = math.pi / n
    rho = np.sqrt(u * u + v * v)
    phi = np.mod(np.arctan2(v, u), 2 * wedge)
    phi = np.minimum(phi, 2 * wedge - phi)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    ix, iy = a * r * math.cos(wedge), a * r * math.sin(wedge)
    return (ix - r) * py - iy * (px - r) >= 0


def rasterize(shape: Shape, height: int, width: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """The pixels of ``shape`` inside its bounding square, clipped to the image.

    Returns:
        ``(window, mask)`` where ``window`` is a ``(rows, cols)`` pair of slices into the image and
        ``mask`` the ``bool [h, w]`` pixels of the shape inside that window (possibly empty when
        the shape lies outside the image).
    """
    r = shape.size / 2
    x0, x1 = max(0, math.floor(shape.cx - r)), min(width, math.ceil(shape.cx + r) + 1)
    y0, y1 = max(0, math.floor(shape.cy - r)), min(height, math.ceil(shape.cy + r) + 1)
    x0, y0 = min(x0, x1), min(y0, y1)
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5  # [1, w] pixel centres
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5  # [h, 1]
    window = (slice(y0, y1), slice(x0, x1))
    return window, np.broadcast_to(shape_mask(shape, xs, ys), (y1 - y0, x1 - x0))


def paint(background: np.ndarray, shapes: list[Shape]) -> Scene:
    """Paint ``shapes`` in order onto ``background`` and work out what stays visible.

    A later shape overwrites the pixels of earlier ones, so each shape owns exactly the pixels
    where it was painted last: ``owner[y, x]`` is the index of that shape (−1 for background) and
    the visible mask of shape ``k`` is ``owner == k``. Shapes with fewer than
    :data:`MIN_VISIBLE_PIXELS` visible pixels are dropped.

    Args:
        background: ``float32`` or ``uint8 [H, W, 3]``, values in ``[0, 255]``.
        shapes: painted first to last.

    Returns:
        a :class:`Scene`. Its ``masks`` are a ``[K, H, W]`` view of an array stored as
        ``[K, W, H]``, which is the column-major layout pycocotools encodes without a copy.
    """
    height, width = background.shape[:2]
    image = _to_uint8(background)  # a fresh array: the caller's background is untouched
    owner = np.full((height, width), -1, dtype=np.int16)
    for k, shape in enumerate(shapes):
        window, inside = rasterize(shape, height, width)
        if not inside.any():
            continue
        owner[window][inside] = k
        color = np.asarray(shape.color, dtype=np.float32)  # [3]
        if shape.shade == 0.0:
            image[window][inside] = _to_uint8(color)
        else:
            # brightness ramps linearly along the long axis u, from 1 - shade to 1 + shade.
            rows, cols = window
            xs = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5 - shape.cx
            ys = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5 - shape.cy
            u = xs * math.cos(shape.angle) + ys * math.sin(shape.angle)  # [h, w]
            gain = 1.0 + shape.shade * u / (shape.size / 2)
            shaded = gain[..., None] * color  # [h, w, 3]
            image[window][inside] = _to_uint8(shaded[inside])
    # visible pixels per shape: owner + 1 is 0 for background, k + 1 for shape k
    visible = np.bincount(owner.ravel() + 1, minlength=len(shapes) + 1)[1:]  # [len(shapes)]
    kept = np.flatnonzero(visible >= MIN_VISIBLE_PIXELS)
    owner_t = np.ascontiguousarray(owner.T)  # [W, H]
    masks = owner_t[None] == kept[:, None, None].astype(np.int16)  # [K, W, H]
    return Scene(image, masks.transpose(0, 2, 1), kept.astype(np.int64))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round ``[0, 255]`` floats to ``uint8`` (a copy, also for uint8 input)."""
    if values.dtype == np.uint8:
        return values.copy()
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def random_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured background: gradient, stripes, smooth noise or checkerboard.

    Returns:
        ``uint8 [H, W, 3]``.
    """
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    kind = rng.integers(4)
    theta = rng.uniform(0, 2 * math.pi)
    xs = np.arange(width, dtype=np.float32)[None, :]  # [1, W]
    ys = np.arange(height, dtype=np.float32)[:, None]  # [H, 1]
    if kind == 0:  # linear gradient between two unrelated colours
        c1 = rng.uniform(0, 255, 3).astype(np.float32)
        along = xs * math.cos(theta) + ys * math.sin(theta)  # [H, W], distance along theta
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    else:  # a texture in two related colours, so objects stay the salient thing
        c1 = np.clip(c0 + rng.uniform(-70, 70, 3), 0, 255).astype(np.float32)
        if kind == 1:  # stripes
            period = rng.uniform(6, 48)
            along = xs * math.cos(theta) + ys * math.sin(theta)  # [H, W]
            t = 0.5 + 0.5 * np.sin(along * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi))
        elif kind == 2:  # smooth noise: a coarse random grid upsampled bilinearly
            cells = int(rng.integers(3, 16))
            coarse = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
            t = np.asarray(
                Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR)
            )
        else:  # checkerboard
            p = int(rng.integers(6, 48))
            t = ((xs // p + ys // p) % 2).astype(np.float32)
    # Mix the two colours through a 256-entry lookup table: t in [0, 1] -> level 0..255 -> RGB.
    # (Cheaper than mixing H*W*3 floats; an 8-bit image has no more levels anyway.)
    levels = (t * 255 + 0.5).astype(np.uint8)  # [H, W]
    ramp = np.arange(256, dtype=np.float32)[:, None] / 255  # [256, 1]
    table = (c0 + 0.5 + ramp * (c1 - c0)).astype(np.uint8)  # [256, 3]
    return np.take(table, levels, axis=0)  # [H, W, 3]; take is much faster than table[levels]


def random_shapes(rng: np.random.Generator, background: np.ndarray, count: int) -> list[Shape]:
    """``count`` random shapes for one image, sorted from largest to smallest (painting order).

    Sizes are log-uniform in ``[MIN_SIZE, MAX_SIZE_FRACTION * side]``: each octave (8-16 px,
    16-32 px, ...) gets about as many objects, which is what a feature pyramid wants. Colours are
    re-drawn until they differ clearly from the background under the shape's centre.
    """
    height, width = background.shape[:2]
    side = min(height, width)
    hi = max(MAX_SIZE_FRACTION * side, MIN_SIZE)
    sizes = np.exp(rng.uniform(math.log(MIN_SIZE), math.log(hi), count))
    sizes = np.sort(sizes)[::-1]  # big shapes at the back, small ones in front
    aspect_range = {
        "circle": (1.0, 1.0),
        "rectangle": (0.3, 1.0),
        "triangle": (0.3, 1.0),
        "ellipse": (0.35, 0.8),
        "star": (0.38, 0.6),
        "ring": (0.4, 0.7),
        "cross": (0.18, 0.35),
    }
    shapes = []
    for size in sizes:
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        under = background[min(int(cy), height - 1), min(int(cx), width - 1)]
        for _ in range(20):
            color = rng.uniform(0, 255, 3)
            if np.abs(color - under).sum() >= 150:
                break
        shade = 0.0 if rng.uniform() < 0.5 else float(rng.uniform(-0.3, 0.3))
        shapes.append(
            Shape(
                kind=kind,
                cx=float(cx),
                cy=float(cy),
                size=float(size),
                angle=float(rng.uniform(0, 2 * math.pi)),
                aspect=float(rng.uniform(*aspect_range[kind])),
                color=tuple(float(c) for c in color),
                shade=shade,
            )
        )
    return shapes


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of image ``index`` of ``split``: independent of how work is split."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def render_image(
    seed: int,
    split: str,
    index: int,
    image_size: int,
    shapes_per_image: tuple[int, int] = SHAPES_PER_IMAGE,
) -> tuple[Scene, list[Shape]]:
    """Draw one dataset image (without writing anything); ``shapes_per_image`` is the inclusive
    range the number of painted shapes is drawn from.

    Returns:
        ``(scene, shapes)``: the painted :class:`Scene` and every shape that was painted
        (``scene.kept`` indexes into ``shapes``).
    """
    rng = image_rng(seed, split, index)
    background = random_background(rng, image_size, image_size)
    low, high = shapes_per_image
    shapes = random_shapes(rng, background, int(rng.integers(low, high + 1)))
    return paint(background, shapes), shapes


def _write_image(job: tuple[int, str, int, int, str, tuple[int, int]]) -> tuple[dict, list[dict]]:
    """Worker: draw image ``index``, write its PNG and return its COCO image and annotations.

    Annotation ids are assigned by the caller, in image order, so they do not depend on workers.
    """
    seed, split, index, image_size, out_dir, shapes_per_image = job
    scene, shapes = render_image(seed, split, index, image_size, shapes_per_image)
    file_name = f"{index:06d}.png"
    Image.fromarray(scene.image).save(
        Path(out_dir) / file_name, format="PNG", compress_level=_PNG_COMPRESS_LEVEL
    )
    image_id = index + 1
    annotations = []
    if len(scene.kept):
        # pycocotools wants column-major uint8 [H, W, K]; scene.masks is stored that way already.
        rles = mask_utils.encode(np.asfortranarray(scene.masks.transpose(1, 2, 0).view(np.uint8)))
        boxes = mask_utils.toBbox(rles)  # [K, 4] xywh: the tight box of each visible mask
        areas = mask_utils.area(rles)
        for k, rle, box, area in zip(scene.kept, rles, boxes, areas):
            annotations.append(
                {
                    "image_id": image_id,
                    "category_id": CLASSES.index(shapes[k].kind) + 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": int(area),
                    "bbox": [float(b) for b in box],
                    "iscrowd": 0,
                }
            )
    image = {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
    return image, annotations


def _default_workers(num_images: int) -> int:
    # Process start-up costs more than drawing a handful of images.
    if num_images < 32:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cores or 1, 8)


def _pool_context():
    # fork is fastest (the parent's imports are inherited); elsewhere use the platform default.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def make_shapes_dataset(
    root: str | os.PathLike,
    num_images: int,
    image_size: int = 512,
    seed: int = 0,
    split: str = "train",
    workers: int | None = None,
    shapes_per_image: tuple[int, int] = SHAPES_PER_IMAGE,
) -> Path:
    """Generate (or reuse) one split of the shapes dataset.

    Writes ``root/<split>/000000.png ...`` and ``root/<split>.json``. If that JSON already exists,
    was made with the same parameters (stored in its ``info``) and all its images exist, nothing
    is redrawn. The JSON is written last, through a temporary file, so an interrupted run is never
    mistaken for a finished one.

    Args:
        root: dataset folder (created if missing).
        num_images: number of images in this split.
        image_size: side of the square images, pixels.
        seed: base seed; the same seed gives byte-identical files.
        split: split name, also part of each image's seed (train and val never share images).
        workers: processes drawing in parallel; ``None`` picks one per CPU (one for tiny jobs).
            The output does not depend on it.
        shapes_per_image: ``(low, high)``, the inclusive range of shapes painted per image.
            :data:`SHAPES_PER_IMAGE` is the standard dataset's; a denser split is another
            dataset (the CPU tier's Mask R-CNN trains on ``(10, 20)``), best written under its
            own :func:`split_name`.

    Returns:
        path of the COCO instances JSON; the images live in ``root/<split>``.

    Raises:
        ValueError: ``num_images < 0``, ``image_size < 16``, a split name that is empty or has a
            path separator, or ``shapes_per_image`` not two ints with ``1 <= low <= high``.
    """
    if num_images < 0:
        raise ValueError(f"num_images={num_images} must be >= 0")
    if image_size < 16:
        raise ValueError(f"image_size={image_size} must be >= 16")
    if not split or "/" in split or "\\" in split:
        raise ValueError(f"split={split!r} must be a plain non-empty name")
    low, high = check_shapes_per_image(shapes_per_image)
    root = Path(root)
    ann_file = root / f"{split}.json"
    image_dir = root / split
    params = {
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "split": split,
        "generator_version": GENERATOR_VERSION,
    }
    if (low, high) != SHAPES_PER_IMAGE:  # the standard files keep the parameters they had
        params["shapes_per_image"] = [low, high]
    if _is_up_to_date(ann_file, image_dir, params):
        return ann_file

    # An old JSON must not outlive the images it describes if this run is interrupted.
    ann_file.unlink(missing_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, split, i, image_size, str(image_dir), (low, high)) for i in range(num_images)]
    workers = _default_workers(num_images) if workers is None else max(1, int(workers))
    if workers == 1:
        results = [_write_image(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            results = list(
                pool.map(_write_image, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
            )

    images, annotations = [], []
    for image, image_annotations in results:
        images.append(image)
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, **annotation})
    coco = {
        "info": {
            "description": "instseg_edu procedural shapes",
            "version": str(GENERATOR_VERSION),
            "params": params,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)
        ],
    }
    for stale in image_dir.glob("*.png"):  # images of an earlier, larger run of this split
        if stale.stem.isdigit() and len(stale.stem) == 6 and int(stale.stem) >= num_images:
            stale.unlink()
    tmp = ann_file.with_name(ann_file.name + ".tmp")
    tmp.write_text(json.dumps(coco, separators=(",", ":")))
    os.replace(tmp, ann_file)
    return ann_file


def check_shapes_per_image(value, name: str = "shapes_per_image") -> tuple[int, int]:
    """``value`` as a ``(low, high)`` tuple of shapes per image; a list (as a checkpoint or JSON
    gives it back) is accepted.

    Raises:
        ValueError: naming ``name``, unless ``value`` is two ints with ``1 <= low <= high``.
    """
    pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    if not (len(pair) == 2 and all(isinstance(n, int) for n in pair) and 1 <= pair[0] <= pair[1]):
        raise ValueError(f"{name}={value!r} must be (low, high) ints with 1 <= low <= high")
    return pair


def split_name(split: str, shapes_per_image: tuple[int, int] = SHAPES_PER_IMAGE) -> str:
    """Where a split with ``shapes_per_image`` shapes per image lives: ``split`` itself for the
    standard :data:`SHAPES_PER_IMAGE`, else ``"<split>-<low>-<high>-shapes"``, so that a denser
    split never overwrites the standard one in the same folder (and, the split name being part
    of each image's seed, it has images of its own)."""
    low, high = shapes_per_image
    return split if (low, high) == SHAPES_PER_IMAGE else f"{split}-{low}-{high}-shapes"


def _is_up_to_date(ann_file: Path, image_dir: Path, params: dict) -> bool:
    if not ann_file.is_file():
        return False
    try:
        coco = json.loads(ann_file.read_text())
        if coco["info"]["params"] != params:
            return False
        return all((image_dir / image["file_name"]).is_file() for image in coco["images"])
    except (ValueError, KeyError, TypeError):
        return False


def make_shapes_splits(
    root: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int = 512,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Path]:
    """Generate the ``train`` and ``val`` splits; returns ``{"train": json, "val": json}``."""
    return {
        split: make_shapes_dataset(root, n, image_size, seed, split, workers)
        for split, n in (("train", num_train), ("val", num_val))
    }
