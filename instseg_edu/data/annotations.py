"""Which annotations of a COCO file become objects: one set of rules for training and evaluation.

A COCO instances file made by an annotation tool, an exporter or a script takes many forms that
the reference readers (pycocotools, detectron2, torchvision's references) accept. The rules here
decide, once, what each annotation is:

- an **object with a mask**: polygons (``[[x1, y1, x2, y2, ...], ...]``), uncompressed RLE
  (``{"size": [h, w], "counts": [n0, n1, ...]}``) or compressed RLE (``"counts": "..."``);
- a **box-only object**: ``"segmentation": []``, ``null`` or no ``segmentation`` key. It keeps
  its box (as in detectron2 and torchvision, which read an empty segmentation as "no mask");
- a **crowd region**: ``"iscrowd": 1``. Not an object to detect; a detector is not punished for
  firing on it (training: ``Target.ignore_boxes``; evaluation: COCOeval's crowd matching);
- **dropped**, with a reason, while the rest of the file is used:
  every polygon invalid (fewer than 3 points, e.g. ``[[]]``, or an odd number of coordinates:
  detectron2's ``load_coco_json`` filter), a box under 1 px wide or high once clipped to the image
  (which includes a box outside the image), or a mask that covers no pixel. The first two are
  known from the JSON alone (:func:`check_coco`); the last needs the mask rasterised
  (:func:`apply_pixel_rule`), which the training set does when it is built, and evaluation when
  it builds its ground truth (:func:`evaluation_ground_truth`). Invalid polygons next to valid
  ones are removed and the object keeps the valid ones.

Everything else that is wrong is **refused** with a :class:`DataError` naming the file, the image
or annotation id and the field: a missing key, an unknown image or category id, a duplicate id, a
non-finite or negative number in ``bbox``, ``area``, the polygons or the image size, polygon
points far outside the image, an RLE whose size is not the image's.

The training set (:class:`~instseg_edu.data.coco.CocoDataset`) and the ground truth handed to
COCOeval (:func:`instseg_edu.engine.evaluate.evaluate_coco`) are both built by these functions,
so nothing the loader accepts can crash evaluation, and both see the same objects. In evaluation a
box-only object counts fully for ``bbox``; for ``segm`` it becomes a crowd region (its box), since
there is no mask to score a predicted mask against: a mask predicted on it is neither a hit nor a
false positive.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

REQUIRED_TOP = ("images", "annotations", "categories")
REQUIRED_IMAGE = ("id", "file_name", "width", "height")
REQUIRED_ANNOTATION = ("id", "image_id", "category_id", "bbox")
REQUIRED_CATEGORY = ("id", "name")

#: Polygon points may lie outside the image (they are clipped when rasterised), but not further
#: than this many image widths / heights beyond its edges: such a point is a broken annotation,
#: and rasterising it would allocate memory in proportion to its distance.
POLYGON_MARGIN = 1.0

#: The kinds of annotation (:func:`annotation_kind`).
MASK, BOX_ONLY, CROWD = "mask", "box_only", "crowd"


class DataError(ValueError):
    """A problem in the user's data, in one line naming the file, the image or annotation id and
    the field. The command line prints :attr:`line` and exits with status 2."""

    @property
    def line(self) -> str:
        """The message as one line, also when a ``DataLoader`` worker re-raised it.

        torch re-raises a worker's exception as the same class with the worker's whole traceback
        as message; its last line is ``<module>.<class>: <original message>``.
        """
        text = str(self)
        prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
        for line in reversed(text.splitlines()):
            if line.startswith(prefix):
                return line[len(prefix) :]
        return " ".join(text.split("\n")).strip()


class MissingFileError(DataError, FileNotFoundError):
    """An image file named by the JSON is not there (a :class:`DataError` and a
    ``FileNotFoundError``)."""


# -- reading and checking a file ------------------------------------------------------------------


def load_coco_json(ann_file: str | os.PathLike) -> dict:
    """Read a COCO JSON file and check its top level.

    Raises:
        FileNotFoundError: no such file.
        DataError: not JSON, not an object, or without ``images`` / ``annotations`` /
            ``categories`` lists.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: annotation file not found")
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann_file}: not valid JSON: {e}") from e
    check_top_level(data, str(ann_file))
    return data


def check_top_level(data, source: str) -> None:
    if not isinstance(data, dict):
        raise DataError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
    for key in REQUIRED_TOP:
        if key not in data:
            raise DataError(
                f"{source}: missing top-level key {key!r} (a COCO instances file has "
                f"{', '.join(REQUIRED_TOP)})"
            )
        if not isinstance(data[key], list):
            raise DataError(f"{source}: top-level {key!r} must be a list")


@dataclass
class CocoFile:
    """A COCO file after :func:`check_coco`: every refusal checked, the rules applied.

    Attributes:
        source: the file's name (or another label) used in messages.
        data: a COCO dict of the same images and categories and the *kept* annotations, each
            normalised: ``bbox`` clipped to the image (``[x, y, w, h]``), ``iscrowd`` 0 or 1,
            ``segmentation`` its valid polygons, its RLE, or ``[]`` for a box-only object;
            ``area`` kept when the file gives it.
        sizes: image id -> ``(height, width)``.
        categories: category id -> name, in file order.
        dropped: annotation id -> reason, for the annotations left out.
    """

    source: str
    data: dict
    sizes: dict[int, tuple[int, int]]
    categories: dict[int, str]
    dropped: dict[int, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """How many kept annotations of each kind, and how many were dropped."""
        kinds = [annotation_kind(a) for a in self.data["annotations"]]
        return {
            MASK: kinds.count(MASK),
            BOX_ONLY: kinds.count(BOX_ONLY),
            CROWD: kinds.count(CROWD),
            "dropped": len(self.dropped),
        }


def annotation_kind(ann: dict) -> str:
    """:data:`CROWD`, :data:`BOX_ONLY` or :data:`MASK` of a *checked* annotation."""
    if ann.get("iscrowd", 0):
        return CROWD
    return BOX_ONLY if is_box_only(ann.get("segmentation")) else MASK


def is_box_only(segmentation) -> bool:
    """True for "no mask": ``None`` (or no key) and ``[]``, as detectron2 reads them."""
    return segmentation is None or (isinstance(segmentation, list) and len(segmentation) == 0)


def check_coco(data: dict, source: str) -> CocoFile:
    """Check a COCO instances dict completely but cheaply (no pixels) and apply the rules.

    Args:
        data: the parsed JSON (not modified).
        source: how messages name the file.

    Returns:
        a :class:`CocoFile`.

    Raises:
        DataError: the first refused entry, naming its id and field.
    """
    check_top_level(data, source)
    sizes = _check_images(source, data["images"])
    categories = _check_categories(source, data["categories"])
    kept, dropped = [], {}
    seen: set[int] = set()
    for ann in data["annotations"]:
        clean = _check_annotation(source, ann, sizes, categories, seen)
        if isinstance(clean, str):
            dropped[ann["id"]] = clean
        else:
            kept.append(clean)
    out = {k: v for k, v in data.items() if k != "annotations"}
    out["annotations"] = kept
    return CocoFile(source, out, sizes, categories, dropped)


def _require(source: str, entry, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{source}: every {what} must be a JSON object, got {entry!r:.80}")
    for key in keys:
        if key not in entry:
            name = f"{what} {entry['id']}" if "id" in entry else f"a {what} ({entry!r:.80})"
            raise DataError(f"{source}: {name} is missing the key {key!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    """``math.isfinite`` that says False for an integer beyond float range instead of raising."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_count(value) -> bool:
    """A positive whole number (some tools write 640.0 for 640)."""
    return _is_number(value) and _finite(value) and value > 0 and float(value).is_integer()


def _check_images(source: str, images: list) -> dict[int, tuple[int, int]]:
    sizes: dict[int, tuple[int, int]] = {}
    for image in images:
        _require(source, image, REQUIRED_IMAGE, "image")
        if not _is_int(image["id"]):
            raise DataError(f"{source}: image id {image['id']!r} must be an integer")
        if image["id"] in sizes:
            raise DataError(f"{source}: image id {image['id']} appears twice")
        h, w = image["height"], image["width"]
        if not (_is_count(h) and _is_count(w)):
            raise DataError(
                f"{source}: image {image['id']} has width={w!r} height={h!r}; both must be "
                "positive integers"
            )
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise DataError(
                f"{source}: image {image['id']}: file_name must be a non-empty string, got "
                f"{image['file_name']!r:.80}"
            )
        sizes[image["id"]] = (int(h), int(w))
    return sizes


def _check_categories(source: str, categories: list) -> dict[int, str]:
    names: dict[int, str] = {}
    for category in categories:
        _require(source, category, REQUIRED_CATEGORY, "category")
        if not _is_int(category["id"]):
            raise DataError(f"{source}: category id {category['id']!r} must be an integer")
        if category["id"] in names:
            raise DataError(f"{source}: category id {category['id']} appears twice")
        names[category["id"]] = str(category["name"])
    return names


_ANNOTATION_KEYS = frozenset(REQUIRED_ANNOTATION)
_NUMBER_TYPES = (int, float)  # exact types, as json gives them (so no bool)


def _check_annotation(source, ann, sizes, categories, seen) -> dict | str:
    """The normalised annotation, or the reason it is dropped (a str). Raises on refusals.

    Called once per annotation of files with millions of them: the common case takes the
    cheapest checks (exact ``type`` tests, one ``sum`` per list), a failing one a slower path
    that finds and names the culprit.
    """
    if type(ann) is not dict or not _ANNOTATION_KEYS <= ann.keys():
        _require(source, ann, REQUIRED_ANNOTATION, "annotation")
    where = f"{source}: annotation {ann['id']}"
    if type(ann["id"]) is not int:
        raise DataError(f"{source}: annotation id {ann['id']!r} must be an integer")
    if ann["id"] in seen:
        raise DataError(f"{where}: annotation id appears twice")
    seen.add(ann["id"])
    if type(ann["image_id"]) is not int or ann["image_id"] not in sizes:
        raise DataError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
    if type(ann["category_id"]) is not int or ann["category_id"] not in categories:
        raise DataError(
            f"{where}: unknown category id {ann['category_id']!r} (known ids: {sorted(categories)})"
        )
    height, width = sizes[ann["image_id"]]
    x, y, w, h = _check_bbox(where, ann["bbox"])
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1):  # True and False compare equal to 1 and 0
        raise DataError(f"{where}: iscrowd must be 0 or 1, got {crowd!r:.40}")
    area = ann.get("area", 0)
    if type(area) not in _NUMBER_TYPES or not 0 <= area < math.inf:  # also catches NaN
        raise DataError(f"{where}: area must be a finite number >= 0, got {area!r:.40}")
    segmentation = _check_segmentation(where, ann.get("segmentation"), (height, width))

    if w < 1 or h < 1:
        return f"its box {ann['bbox']} is under 1 px wide or high"
    bbox = ann["bbox"]
    if not (0 <= x and 0 <= y and x + w <= width and y + h <= height):  # clip to the image
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 - x1 < 1 or y2 - y1 < 1:
            return f"its box {bbox} lies outside the {width}x{height} image"
        bbox = [x1, y1, x2 - x1, y2 - y1]
    if type(segmentation) is str:
        if crowd:  # a crowd region's polygons only shape segm evaluation: its box will do
            segmentation = []
        else:
            return segmentation
    clean = {
        "id": ann["id"],
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "bbox": list(bbox),
        "iscrowd": int(crowd),
        "segmentation": segmentation,
    }
    if "area" in ann:
        clean["area"] = ann["area"]
    return clean


def _check_bbox(where: str, bbox) -> tuple[float, float, float, float]:
    if not (
        type(bbox) is list
        and len(bbox) == 4
        and type(bbox[0]) in _NUMBER_TYPES
        and type(bbox[1]) in _NUMBER_TYPES
        and type(bbox[2]) in _NUMBER_TYPES
        and type(bbox[3]) in _NUMBER_TYPES
    ):
        raise DataError(f"{where}: bbox must be [x, y, w, h], got {bbox!r:.80}")
    x, y, w, h = bbox
    if not _finite(x + y + w + h):  # NaN or inf somewhere (or a sum past 1e308)
        for name, value in zip(("x", "y", "width", "height"), bbox):
            if not _finite(value):
                raise DataError(f"{where}: bbox {name} is {value!r:.24}; it must be finite")
    if w < 0 or h < 0:
        raise DataError(f"{where}: bbox {bbox} has a negative width or height")
    return x, y, w, h


def _check_segmentation(where: str, seg, image_hw: tuple[int, int]):
    """Valid polygons / the RLE / ``[]`` for box-only; a str is the reason to drop."""
    if is_box_only(seg):
        return []
    if isinstance(seg, list):
        return _check_polygons(where, seg, image_hw)
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise DataError(
            f"{where}: segmentation must be a list of polygons or an RLE dict with 'size' and "
            f"'counts', got {seg!r:.80}"
        )
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise DataError(f"{where}: RLE size must be [height, width], got {size!r:.40}")
    if list(size) != list(image_hw):
        raise DataError(
            f"{where}: mask/image size mismatch, the RLE size is {list(size)} (h, w) but "
            f"the image is {list(image_hw)}"
        )
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            raise DataError(f"{where}: uncompressed RLE counts must be integers >= 0")
        if sum(counts) != image_hw[0] * image_hw[1]:
            raise DataError(
                f"{where}: uncompressed RLE counts sum to {sum(counts)}, but the mask has "
                f"{image_hw[0]} * {image_hw[1]} = {image_hw[0] * image_hw[1]} pixels"
            )
    elif not isinstance(counts, (str, bytes)):
        raise DataError(
            f"{where}: RLE counts must be a list of run lengths or a compressed string, got "
            f"{type(counts).__name__}"
        )
    return seg


def _check_polygons(where: str, seg: list, image_hw: tuple[int, int]):
    height, width = image_hw
    lo_x, hi_x = -POLYGON_MARGIN * width, (1 + POLYGON_MARGIN) * width
    lo_y, hi_y = -POLYGON_MARGIN * height, (1 + POLYGON_MARGIN) * height
    valid = []
    for i, polygon in enumerate(seg):
        if type(polygon) is not list:
            raise DataError(
                f"{where}: segmentation[{i}] must be a flat list [x1, y1, x2, y2, ...], got "
                f"{polygon!r:.40}"
            )
        # One sum checks every coordinate: a string, null or list raises TypeError, a NaN or
        # an infinity makes it non-finite. Only then is the culprit looked for.
        try:
            total = sum(polygon)
        except TypeError:
            total = math.nan
        if not _finite(total):
            for j, v in enumerate(polygon):
                if not _is_number(v):
                    raise DataError(
                        f"{where}: segmentation[{i}][{j}] is {v!r:.40}, not a number"
                    ) from None
                if not _finite(v):
                    raise DataError(
                        f"{where}: segmentation[{i}][{j}] is {v!r:.24}; it must be finite"
                    )
        if len(polygon) < 6 or len(polygon) % 2:
            continue  # fewer than 3 points, or half a point: no area (detectron2 drops these)
        xs, ys = polygon[0::2], polygon[1::2]
        if min(xs) < lo_x or max(xs) > hi_x or min(ys) < lo_y or max(ys) > hi_y:
            x, y = next(
                (x, y) for x, y in zip(xs, ys) if not (lo_x <= x <= hi_x and lo_y <= y <= hi_y)
            )
            raise DataError(
                f"{where}: segmentation[{i}] has the point ({x:g}, {y:g}), far outside the "
                f"{width}x{height} image"
            )
        valid.append(polygon)
    if not valid:
        return (
            "its segmentation has no valid polygon (each needs at least 3 points, "
            f"[x1, y1, x2, y2, x3, y3, ...]; got lengths {[len(p) for p in seg]})"
        )
    return valid


# -- masks ----------------------------------------------------------------------------------------


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """One compressed RLE for a checked segmentation (polygons are merged into one mask)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A checked annotation's mask as ``bool [H, W]`` (all False for box-only)."""
    if is_box_only(segmentation):
        return np.zeros((height, width), dtype=bool)
    return mask_utils.decode(segmentation_to_rle(segmentation, height, width)).astype(bool)


NO_PIXELS = "its mask covers no pixel"


# -- evaluation ground truth ----------------------------------------------------------------------


def apply_pixel_rule(checked: CocoFile) -> CocoFile:
    """The one rule that needs pixels: drop an object whose mask covers no pixel.

    Each mask is rasterised to a compressed RLE and its pixels counted (pycocotools, about 20 us
    for a 20-point polygon on a 640x480 image). ``area`` is filled in where the file gives none
    (the mask's pixel count, or ``w * h`` for a box-only object), as COCOeval needs it. A crowd
    region covering no pixel is kept: it only excuses detections.

    Args:
        checked: :func:`check_coco`'s result (not modified).

    Returns:
        A :class:`CocoFile` of the same images and categories with the kept annotations (new
        dicts: COCOeval writes into its ground truth's) and ``dropped`` extended by these drops.
    """
    dropped = dict(checked.dropped)
    anns = []
    for ann in checked.data["annotations"]:
        height, width = checked.sizes[ann["image_id"]]
        ann = dict(ann)
        if is_box_only(ann["segmentation"]):
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        else:
            pixels = float(mask_utils.area(segmentation_to_rle(ann["segmentation"], height, width)))
            if pixels == 0 and not ann["iscrowd"]:
                dropped[ann["id"]] = NO_PIXELS
                continue
            ann.setdefault("area", pixels)
        anns.append(ann)
    data = {**checked.data, "annotations": anns}
    return CocoFile(checked.source, data, checked.sizes, checked.categories, dropped)


def evaluation_ground_truth(data: dict, source: str) -> tuple[dict, dict]:
    """The ground truth COCOeval gets for ``bbox``: the same objects as training.

    :func:`check_coco`'s rules, then :func:`apply_pixel_rule` (a mask covering no pixel is
    dropped; ``area`` and ``iscrowd`` filled in). :func:`segm_ground_truth` turns it into the
    ``segm`` ground truth.

    Args:
        data: a COCO dict (not modified; the result shares its images and categories).
        source: how messages name the file.

    Returns:
        ``(gt_dict, dropped)``: the cleaned COCO dict and ``{annotation_id: reason}``.

    Raises:
        DataError: as :func:`check_coco`.
    """
    checked = apply_pixel_rule(check_coco(data, source))
    return checked.data, checked.dropped


def segm_ground_truth(gt: dict) -> dict:
    """``segm`` ground truth from :func:`evaluation_ground_truth`'s: every box-only object (and a
    crowd region without polygons or RLE) becomes a crowd region shaped like its box.

    A crowd region is COCOeval's "don't care": a predicted mask that matches nothing else but
    lies in it is neither a hit nor a false positive. That is the honest score for an object
    whose mask nobody drew.
    """
    anns = []
    for ann in gt["annotations"]:
        if is_box_only(ann["segmentation"]):
            x, y, w, h = ann["bbox"]
            ann = {**ann, "iscrowd": 1, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}
        anns.append(ann)
    return {**gt, "annotations": anns}


# -- categories -----------------------------------------------------------------------------------


def categories_list(label_to_cat_id: Sequence[int], classes: Sequence[str]) -> list[dict]:
    """``[{"id": .., "name": ..}, ...]`` in label order: the plain-data form of a category list
    (what a checkpoint stores as ``label_to_cat_id`` and ``classes``)."""
    if len(label_to_cat_id) != len(classes):
        raise ValueError(
            f"label_to_cat_id has {len(label_to_cat_id)} entries but classes {len(classes)}"
        )
    return [{"id": int(c), "name": str(n)} for c, n in zip(label_to_cat_id, classes)]


def match_categories(
    file_categories: dict[int, str],
    used: Iterable[int],
    model_categories: Sequence[dict],
    source: str,
) -> None:
    """Check a file's categories against a trained model's list; categories match **by id**.

    Refuses (:class:`DataError`, one line naming the ids) a file that has annotations of
    categories the model never saw: their objects could only be missed, and the AP would blame
    the model for classes it was never taught. Categories the file lists but never uses are
    harmless (COCOeval skips a category without ground truth or detections). A name that differs
    for the same id is warned about once.

    Args:
        file_categories: the file's category id -> name.
        used: the category ids of its kept annotations.
        model_categories: ``[{"id", "name"}, ...]`` in the model's label order.
        source: how messages name the file.
    """
    known = {int(c["id"]): str(c["name"]) for c in model_categories}
    unseen = sorted(set(used) - set(known))
    if unseen:
        named = ", ".join(f"{c} ({file_categories.get(c, '?')!r})" for c in unseen)
        raise DataError(
            f"{source}: has annotations of categories the model was not trained on: ids "
            f"{named}; the model knows ids {sorted(known)} (categories are matched by id; "
            "evaluate on a file without these categories, or train with them)"
        )
    renamed = [
        f"{c}: {file_categories[c]!r} here, {known[c]!r} in the model"
        for c in sorted(set(file_categories) & set(known))
        if file_categories[c] != known[c]
    ]
    if renamed:
        warnings.warn(
            f"{source}: category names differ from the model's for the same ids "
            f"({'; '.join(renamed)}); categories are matched by id",
            stacklevel=3,
        )


# -- reporting ------------------------------------------------------------------------------------

_reported: dict[str, set[int]] = {}


def report_dropped(
    source: str, dropped: dict[int, str], stacklevel: int = 3, *, remember: bool = True
) -> None:
    """Warn once, naming the annotation ids, about drops not reported before in this process.

    ``remember=False`` (ground truth that is not a file) reports every drop and records none.
    """
    seen = _reported.setdefault(source, set()) if remember else set()
    new = {k: v for k, v in dropped.items() if k not in seen}
    if not new:
        return
    seen.update(new)
    shown = list(new.items())[:5]
    reasons = "; ".join(f"annotation {k}: {v}" for k, v in shown)
    more = f"; and {len(new) - len(shown)} more" if len(new) > len(shown) else ""
    warnings.warn(
        f"{source}: dropped {len(new)} annotation(s) ({reasons}{more})", stacklevel=stacklevel
    )
