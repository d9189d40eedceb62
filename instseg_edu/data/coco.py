"""A torch ``Dataset`` over any COCO instances file.

COCO's format (https://cocodataset.org/#format-data) is the lingua franca of instance
segmentation: a JSON file with ``images`` (id, file name, size), ``categories`` (id, name) and
``annotations`` (image id, category id, ``bbox`` as ``[x, y, w, h]``, ``segmentation``,
``iscrowd``).
A segmentation comes in one of three encodings, all decoded here through pycocotools:

- **polygons** — ``[[x1, y1, x2, y2, ...], ...]``, one list per connected part;
- **uncompressed RLE** — ``{"size": [h, w], "counts": [n0, n1, ...]}``: run lengths of
  alternating 0s and 1s in column-major order, starting with 0s;
- **compressed RLE** — the same runs packed into a string, ``{"size": [h, w], "counts": "..."}``.

``iscrowd = 1`` marks a region holding many objects (a crowd of people) as one blob. It is not an
object to detect, but a detector should not be punished for firing on it either, so its box goes
to ``Target.ignore_boxes`` (anchors mostly inside it are neither positive nor negative).

COCO category ids are arbitrary (1..90 with gaps for COCO itself); models want labels ``0..C-1``.
Labels follow the category ids in ascending order: ``label_to_cat_id[label]`` maps back for
evaluation and ``classes[label]`` is the name.

Validation happens in two steps. At construction the JSON is checked completely but cheaply —
keys, ids, categories, RLE sizes against image sizes — and every image file's existence is
checked with one directory listing per folder. The things that need pixels (the image file's real
size, decoding masks) are checked when an item is loaded. Every problem raises ``ValueError`` (or
``FileNotFoundError``) naming the file and the offending image or annotation id.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from instseg_edu.structures import Target

_REQUIRED_TOP = ("images", "annotations", "categories")
_REQUIRED_IMAGE = ("id", "file_name", "width", "height")
_REQUIRED_ANNOTATION = ("id", "image_id", "category_id", "bbox", "segmentation")
_REQUIRED_CATEGORY = ("id", "name")


class CocoDataset(Dataset):
    """Images and instance annotations of a COCO-format JSON file.

    Args:
        ann_file: path of the COCO instances JSON.
        images_dir: folder the ``file_name`` of each image is relative to.
        transforms: optional callable ``(image, target) -> (image, target)`` applied to each item,
            e.g. :func:`instseg_edu.data.transforms.train_transforms`. It receives the image as
            ``float32 [3, H, W]`` in ``[0, 1]``.
        check_files: check up front that every image file exists (one directory listing per
            folder; cheap even for COCO's 118k images). Missing files are always reported when
            an item is loaded.

    Items are ``(image, target)``: ``image`` is ``float32 [3, H, W]`` in ``[0, 1]`` and ``target``
    a :class:`~instseg_edu.structures.Target` with ``boxes [G, 4]`` xyxy pixels (the annotation's
    ``bbox``), ``labels [G]`` in ``0..C-1``, ``masks bool [G, H, W]``, ``ignore_boxes [I, 4]`` (the
    ``iscrowd`` regions), ``image_id`` (the COCO id) and ``orig_size = (H, W)`` of the file.
    Images without annotations are kept, with ``G = 0``.

    Annotations that cannot be a training object — a box under 1 px wide or high, or a mask
    without a single pixel — are dropped when their image is loaded. Each drop is recorded in
    :attr:`dropped` and the first one is announced by a warning: never done silently. (DataLoader
    workers each hold their own copy of the dataset, hence of :attr:`dropped`.)

    Attributes:
        coco: the pycocotools ``COCO`` index of the file (for evaluation).
        classes: category names, indexed by label.
        label_to_cat_id: COCO category id of each label.
        cat_id_to_label: the inverse mapping.
        image_ids: COCO image ids in file order; item ``i`` is image ``image_ids[i]``.
        dropped: ``{annotation_id: reason}`` of the annotations skipped so far.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        images_dir: str | os.PathLike,
        transforms=None,
        *,
        check_files: bool = True,
    ):
        self.ann_file = Path(ann_file)
        self.images_dir = Path(images_dir)
        self.transforms = transforms
        data = _load_json(self.ann_file)
        self._sizes = _check_images(self.ann_file, data)  # image id -> (height, width)
        categories = _check_categories(self.ann_file, data)  # category id -> name
        _check_annotations(self.ann_file, data, self._sizes, categories)

        cat_ids = sorted(categories)
        self.label_to_cat_id: list[int] = cat_ids
        self.cat_id_to_label: dict[int, int] = {c: k for k, c in enumerate(cat_ids)}
        self.classes: list[str] = [categories[c] for c in cat_ids]
        self.image_ids: list[int] = [image["id"] for image in data["images"]]

        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        self.coco = coco
        self.dropped: dict[int, str] = {}
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"{self.ann_file}: images folder {self.images_dir} does not exist"
            )
        if check_files:
            self._check_files_exist(data["images"])

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return (
            f"CocoDataset({str(self.ann_file)!r}, {len(self)} images, "
            f"{len(self.coco.anns)} annotations, {len(self.classes)} classes)"
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = self._load_image(info)  # [3, H, W]
        height, width = self._sizes[image_id]

        boxes, labels, masks, ignore = [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = [x, y, x + w, y + h]
            if ann.get("iscrowd", 0):
                ignore.append(box)
                continue
            if w < 1 or h < 1:
                self._drop(ann["id"], f"box {ann['bbox']} is under 1 px wide or high")
                continue
            mask = self._decode(ann, height, width)
            if not mask.any():
                self._drop(ann["id"], "its mask has no pixels")
                continue
            boxes.append(box)
            labels.append(self.cat_id_to_label[ann["category_id"]])
            masks.append(mask)

        target = Target(
            boxes=_clip(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), height, width),
            labels=torch.tensor(labels, dtype=torch.int64),
            masks=(
                torch.from_numpy(np.stack(masks))  # [G, H, W]
                if masks
                else torch.zeros(0, height, width, dtype=torch.bool)
            ),
            image_id=image_id,
            ignore_boxes=_clip(
                torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4), height, width
            ),
            orig_size=(height, width),
        )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    # -- helpers -----------------------------------------------------------------------------

    def _load_image(self, info: dict) -> torch.Tensor:
        path = self.images_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{self.ann_file}: image {info['id']}: file {path} not found")
        try:
            with Image.open(path) as pil:
                pil = pil.convert("RGB")
        except OSError as e:
            raise ValueError(f"{self.ann_file}: image {info['id']}: cannot read {path}: {e}") from e
        height, width = self._sizes[info["id"]]
        if pil.size != (width, height):
            raise ValueError(
                f"{self.ann_file}: image {info['id']}: size mismatch, the JSON says "
                f"width={info['width']} height={info['height']} but {path} is "
                f"{pil.size[0]}x{pil.size[1]}"
            )
        array = np.asarray(pil)  # [H, W, 3] uint8
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)  # [3, H, W]

    def _decode(self, ann: dict, height: int, width: int) -> np.ndarray:
        """The annotation's mask as ``bool [H, W]``, whatever its encoding."""
        seg = ann["segmentation"]
        if isinstance(seg, list):  # polygons; parts with under 3 points have no area
            polygons = [p for p in seg if len(p) >= 6]
            if not polygons:
                return np.zeros((height, width), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(seg["counts"], list):  # uncompressed RLE -> compressed
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        return mask_utils.decode(rle).astype(bool)  # [H, W]

    def _drop(self, ann_id: int, reason: str) -> None:
        first = not self.dropped
        self.dropped[ann_id] = reason
        if first:
            warnings.warn(
                f"{self.ann_file}: dropping annotation {ann_id} because {reason}; further drops "
                "are listed in CocoDataset.dropped",
                stacklevel=3,
            )

    def _check_files_exist(self, images: list[dict]) -> None:
        listed: dict[Path, set[str]] = {}
        missing = []
        for image in images:
            path = self.images_dir / image["file_name"]
            folder = path.parent
            if folder not in listed:
                listed[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
            if path.name not in listed[folder]:
                missing.append(str(path))
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise FileNotFoundError(
                f"{self.ann_file}: {len(missing)} image file(s) missing: {shown}"
            )


def _clip(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip ``[N, 4]`` xyxy boxes to the image (COCO boxes may overhang by a fraction of a px)."""
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


# -- up-front validation (cheap: no pixels are touched) -----------------------------------------


def _load_json(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: annotation file not found")
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(
            f"{ann_file}: the top level must be a JSON object, got {type(data).__name__}"
        )
    for key in _REQUIRED_TOP:
        if key not in data:
            raise ValueError(
                f"{ann_file}: missing top-level key {key!r} (a COCO instances file has "
                f"{', '.join(_REQUIRED_TOP)})"
            )
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: top-level {key!r} must be a list")
    return data


def _require(ann_file: Path, entry, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{ann_file}: every {what} must be a JSON object, got {entry!r:.80}")
    for key in keys:
        if key not in entry:
            name = f"{what} {entry['id']}" if "id" in entry else f"a {what} ({entry!r:.80})"
            raise ValueError(f"{ann_file}: {name} is missing the key {key!r}")


def _check_images(ann_file: Path, data: dict) -> dict[int, tuple[int, int]]:
    """Image id -> (height, width)."""
    sizes: dict[int, tuple[int, int]] = {}
    for image in data["images"]:
        _require(ann_file, image, _REQUIRED_IMAGE, "image")
        if image["id"] in sizes:
            raise ValueError(f"{ann_file}: image id {image['id']} appears twice")
        h, w = image["height"], image["width"]
        if not (_is_count(h) and _is_count(w)):
            raise ValueError(
                f"{ann_file}: image {image['id']} has width={w!r} height={h!r}; both must be "
                "positive integers"
            )
        sizes[image["id"]] = (int(h), int(w))
    return sizes


def _is_count(value) -> bool:
    """A positive whole number (some tools write 640.0 for 640)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
        and float(value).is_integer()
    )


def _check_categories(ann_file: Path, data: dict) -> dict[int, str]:
    """Category id -> name."""
    names: dict[int, str] = {}
    for category in data["categories"]:
        _require(ann_file, category, _REQUIRED_CATEGORY, "category")
        if category["id"] in names:
            raise ValueError(f"{ann_file}: category id {category['id']} appears twice")
        names[category["id"]] = str(category["name"])
    return names


def _check_annotations(
    ann_file: Path, data: dict, sizes: dict[int, tuple[int, int]], categories: dict[int, str]
) -> None:
    seen: set = set()
    for ann in data["annotations"]:
        _require(ann_file, ann, _REQUIRED_ANNOTATION, "annotation")
        where = f"{ann_file}: annotation {ann['id']}"
        if ann["id"] in seen:
            raise ValueError(f"{where}: annotation id appears twice")
        seen.add(ann["id"])
        if ann["image_id"] not in sizes:
            raise ValueError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in categories:
            raise ValueError(
                f"{where}: unknown category id {ann['category_id']!r} (known ids: "
                f"{sorted(categories)})"
            )
        bbox = ann["bbox"]
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        ):
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
        _check_segmentation(where, ann["segmentation"], sizes[ann["image_id"]])


def _check_segmentation(where: str, seg, image_hw: tuple[int, int]) -> None:
    if isinstance(seg, list):
        for polygon in seg:
            if not isinstance(polygon, list) or len(polygon) % 2:
                raise ValueError(
                    f"{where}: a polygon must be a flat list [x1, y1, x2, y2, ...] of even length"
                )
        return
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise ValueError(
            f"{where}: segmentation must be a list of polygons or an RLE dict with 'size' and "
            f"'counts', got {seg!r:.80}"
        )
    if list(seg["size"]) != list(image_hw):
        raise ValueError(
            f"{where}: mask/image size mismatch, the RLE size is {list(seg['size'])} (h, w) but "
            f"the image is {list(image_hw)}"
        )
    if isinstance(seg["counts"], list) and sum(seg["counts"]) != image_hw[0] * image_hw[1]:
        raise ValueError(
            f"{where}: uncompressed RLE counts sum to {sum(seg['counts'])}, but the mask has "
            f"{image_hw[0]} * {image_hw[1]} = {image_hw[0] * image_hw[1]} pixels"
        )
