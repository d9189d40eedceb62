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

Which annotations become objects is decided by :mod:`instseg_edu.data.annotations`, the same
rules that build the ground truth for COCO evaluation: masks in any encoding, **box-only** objects
(``"segmentation": []`` or no key; ``Target.has_mask`` is False for them), crowd regions, and
drops (an annotation whose polygons are all invalid, a box under 1 px, a mask covering no pixel),
each reported once with its annotation id.

Validation happens in two steps. At construction the JSON is checked completely — keys, ids,
categories, every number (finite, in range), RLE sizes against image sizes, every mask's pixel
count (so every drop is known, and announced once, before training starts; about 20 us per
polygon) — and every image file's existence is checked with one directory listing per folder.
What needs the image file's pixels (its real size, whether it can be decoded) is checked when an
item is loaded. Images are
read by :func:`instseg_edu.data.images.read_image` (EXIF orientation applied, every mode and bit
depth scaled to ``[0, 1]``). Every problem raises a
:class:`~instseg_edu.data.annotations.DataError` (a ``ValueError``; ``FileNotFoundError`` for
missing files) naming the file and the offending image or annotation id and field.

Categories: by default labels follow the file's category ids in ascending order. A validation
set is built with the training set's list (``categories=train_set.categories``, or the list a
checkpoint stores) so that its labels are the model's labels, matched by id.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from instseg_edu.data.annotations import (
    BOX_ONLY,
    CROWD,
    MASK,
    DataError,
    annotation_kind,
    apply_pixel_rule,
    check_coco,
    decode_mask,
    load_coco_json,
    match_categories,
    report_dropped,
)
from instseg_edu.data.images import exif_orientation, read_image
from instseg_edu.structures import Target


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
        categories: the category list labels refer to, ``[{"id", "name"}, ...]`` in label order
            (a trained model's list: ``train_set.categories``, or a checkpoint's). ``None``: this
            file's categories by ascending id. Given a list, the file's categories are matched
            to it by id, and annotations of categories not in it are refused
            (:func:`~instseg_edu.data.annotations.match_categories`).

    Items are ``(image, target)``: ``image`` is ``float32 [3, H, W]`` in ``[0, 1]`` and ``target``
    a :class:`~instseg_edu.structures.Target` with ``boxes [G, 4]`` xyxy pixels (the annotation's
    ``bbox``, clipped to the image), ``labels [G]`` in ``0..C-1``, ``masks bool [G, H, W]``,
    ``has_mask bool [G]`` (False for box-only objects, whose mask rows are empty),
    ``ignore_boxes [I, 4]`` (the ``iscrowd`` regions), ``image_id`` (the COCO id) and
    ``orig_size = (H, W)`` of the file. Images without annotations are kept, with ``G = 0``.

    Annotations the rules drop (see :mod:`instseg_edu.data.annotations`) are all found at
    construction, recorded in :attr:`dropped` and announced by one warning naming them (the first
    five, with the count of the others). Loading an item drops nothing more, so DataLoader
    workers have nothing to announce.

    Attributes:
        coco: the pycocotools ``COCO`` index of the checked annotations (for evaluation; its
            ``source`` attribute is the file's name).
        classes: category names, indexed by label.
        label_to_cat_id: COCO category id of each label.
        cat_id_to_label: the inverse mapping.
        categories: ``[{"id", "name"}, ...]`` in label order.
        image_ids: COCO image ids in file order; item ``i`` is image ``image_ids[i]``.
        counts: kept annotations by kind (``"mask"``, ``"box_only"``, ``"crowd"``) and the number
            ``"dropped"`` at construction.
        dropped: ``{annotation_id: reason}`` of every annotation left out.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        images_dir: str | os.PathLike,
        transforms=None,
        *,
        check_files: bool = True,
        categories: Sequence[dict] | None = None,
    ):
        self.ann_file = Path(ann_file)
        self.images_dir = Path(images_dir)
        self.transforms = transforms
        source = str(self.ann_file)
        checked = apply_pixel_rule(check_coco(load_coco_json(self.ann_file), source))
        self._sizes = checked.sizes  # image id -> (height, width)

        if categories is None:
            cat_ids = sorted(checked.categories)
            names = [checked.categories[c] for c in cat_ids]
        else:
            used = {a["category_id"] for a in checked.data["annotations"]}
            match_categories(checked.categories, used, categories, source)
            cat_ids = [int(c["id"]) for c in categories]
            names = [str(c["name"]) for c in categories]
        self.label_to_cat_id: list[int] = cat_ids
        self.cat_id_to_label: dict[int, int] = {c: k for k, c in enumerate(cat_ids)}
        self.classes: list[str] = names
        self.image_ids: list[int] = [image["id"] for image in checked.data["images"]]
        self.counts: dict[str, int] = checked.counts()

        coco = COCO()
        coco.dataset = checked.data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        coco.source = source
        self.coco = coco
        self.dropped: dict[int, str] = dict(checked.dropped)
        report_dropped(source, checked.dropped)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"{self.ann_file}: images folder {self.images_dir} does not exist"
            )
        if check_files:
            self._check_files_exist(checked.data["images"])

    @property
    def categories(self) -> list[dict]:
        return [{"id": c, "name": n} for c, n in zip(self.label_to_cat_id, self.classes)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return (
            f"CocoDataset({str(self.ann_file)!r}, {len(self)} images, "
            f"{len(self.coco.anns)} annotations, {len(self.classes)} classes)"
        )

    def check_trainable(self, needs_masks: bool = False) -> str | None:
        """Refuse a dataset a model cannot learn from; say what a mask model will skip.

        Args:
            needs_masks: the model learns masks (Mask R-CNN, SOLO, YOLACT).

        Returns:
            ``None``, or for a mask model on a file with box-only objects a one-line note: how
            many there are, and that no mask is trained on them (what each family does with their
            boxes is in docs/own_data.md: Mask R-CNN and YOLACT train their box and class terms;
            SOLO, which has no box branch, places them on its category grid by their box).

        Raises:
            DataError: no object at all (every annotation a crowd region or dropped: training
                would run at loss 0 and learn nothing), or ``needs_masks`` and not one mask.
        """
        c = self.counts
        objects = c[MASK] + c[BOX_ONLY]
        if objects == 0:
            raise DataError(
                f"{self.ann_file}: nothing to train on: {len(self)} images and no object "
                f"({c[CROWD]} crowd regions (iscrowd=1), which are not objects; {c['dropped']} "
                "annotations dropped by the annotation rules)"
            )
        if needs_masks and c[MASK] == 0:
            raise DataError(
                f"{self.ann_file}: no annotation has a mask ({c[BOX_ONLY]} box-only objects, "
                "'segmentation' empty or missing), so a mask model cannot learn masks from it; "
                "train a box model (retinanet) or add segmentations"
            )
        if needs_masks and c[BOX_ONLY]:
            return (
                f"{self.ann_file}: {c[BOX_ONLY]} of {objects} objects are box-only: their mask "
                "term is skipped, the model's other terms still train on them"
            )
        return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = self._load_image(info)  # [3, H, W]
        height, width = self._sizes[image_id]

        boxes, labels, masks, has_mask, ignore = [], [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]  # clipped to the image by the rules
            box = [x, y, x + w, y + h]
            kind = annotation_kind(ann)
            if kind == CROWD:
                ignore.append(box)
                continue
            if kind == MASK:  # at least one pixel: apply_pixel_rule dropped the others
                mask = decode_mask(ann["segmentation"], height, width)  # [H, W]
            else:  # box-only: an empty mask row that no mask loss will look at
                mask = np.zeros((height, width), dtype=bool)
            boxes.append(box)
            labels.append(self.cat_id_to_label[ann["category_id"]])
            masks.append(mask)
            has_mask.append(kind == MASK)

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
            has_mask=torch.tensor(has_mask, dtype=torch.bool),
        )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    # -- helpers -----------------------------------------------------------------------------

    def _load_image(self, info: dict) -> torch.Tensor:
        where = f"{self.ann_file}: image {info['id']}"
        path = self.images_dir / info["file_name"]
        image = read_image(path, where)  # [3, H, W], as a viewer shows it
        height, width = self._sizes[info["id"]]
        if tuple(image.shape[-2:]) != (height, width):
            raise DataError(_size_mismatch(where, path, info, image.shape[-2:]))
        return image

    def _check_files_exist(self, images: list[dict]) -> None:
        listed: dict[Path, set[str]] = {}
        missing = []
        for image in images:
            path = self.images_dir / image["file_name"]
            folder = path.parent
            if folder not in listed:
                listed[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
            if path.name not in listed[folder]:
                missing.append(f"image {image['id']} ({path})")
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise FileNotFoundError(
                f"{self.ann_file}: {len(missing)} image file(s) missing: {shown}"
            )


def _size_mismatch(where: str, path: Path, info: dict, shown_hw) -> str:
    """The size-mismatch message; it names the EXIF orientation when the file has one."""
    h, w = int(shown_hw[0]), int(shown_hw[1])
    message = (
        f"{where}: size mismatch, the JSON says width={info['width']} height={info['height']} "
        f"but {path} is {w}x{h}"
    )
    orientation = exif_orientation(path)
    if orientation == 1:
        return message
    message += f" once its EXIF orientation {orientation} is applied"
    if orientation >= 5 and (w, h) == (info["height"], info["width"]):
        message += (
            f" (stored unturned it is {h}x{w}, as the JSON says: the annotations were made on "
            "the unturned pixels; save the image turned without the orientation tag, or "
            "annotate the image as viewers show it)"
        )
    return message


def _clip(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip ``[N, 4]`` xyxy boxes to the image (float rounding of ``x + w`` may overhang)."""
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes
