"""Where a detector goes wrong: COCOeval's own matches, read back and sorted into error kinds.

COCO's twelve numbers (:mod:`instseg_edu.engine.evaluate`) say how good a model is; this module says
*where* it fails. It runs pycocotools' ``COCOeval`` once and reads what ``evaluateImg`` decided for
every (image, class, area range): ``dtMatches`` / ``gtMatches`` (who matched whom at each of the
ten IoU thresholds), ``dtIgnore`` / ``gtIgnore`` and the score order. Nothing is matched again
here, so every count below adds up to what COCO reports: the per-class AP that
:func:`precision_recall` rebuilds from these tables equals ``COCOeval.accumulate``'s.

For one setting (IoU threshold, area range, ``max_dets``, score threshold) :func:`error_analysis`
gives each detection and each ground-truth object an outcome. A kept detection that COCO counts
as a false positive gets one of four kinds, after the error analyses of Hoiem et al. 2012
("Diagnosing Error in Object Detectors", Sec. 2) and TIDE (Bolya et al. 2020, "TIDE: A General
Toolbox for Identifying Object Detection Errors", Sec. 2.2), with ``t`` the IoU threshold and the
overlaps taken against every ground-truth object of the image (crowd regions with COCO's crowd
IoU, intersection over the detection's area):

1. **wrong class** — IoU ≥ ``t`` with an object of *another* class: right place, wrong label
   (TIDE's classification error; checked first, as the brief wording of the kind says: a box that
   fits an object is an object found, only named wrong);
2. **duplicate** — IoU ≥ ``t`` with an object of its own class that an earlier detection in
   COCOeval's order (higher score; ties in input order) already matched at this threshold. Under
   COCO's greedy matching this is exactly "its best same-class IoU is ≥ ``t``": a detection left
   unmatched while such an object is free is impossible;
3. **poor localisation** — best IoU with an object of its own class in ``[0.1, t)``: it found the
   object but its box or mask is off (Hoiem's and TIDE's 0.1 background threshold);
4. **background** — everything else: less than 0.1 IoU with every object of its class and less
   than ``t`` with every object of another class (this includes TIDE's small "both wrong class and
   poorly localised" group).

Example at ``t = 0.5``: a "circle" detection with IoU 0.8 on a triangle is *wrong class*; a second
"circle" box on a circle already taken by a higher score is a *duplicate*; a "circle" box with
IoU 0.3 on a circle is *poor localisation*; a box on empty floor is *background*.

Detections COCO ignores (matched to a crowd region or to an object outside the area range, or
unmatched and themselves outside it) are neither true nor false positives, and ground truth COCO
ignores is never missed. Ground truth is *found* when its matching detection is kept, *missed*
otherwise, so at every setting ``TP + FP = kept detections that COCO does not ignore`` and
``TP + missed = ground truth COCO does not ignore``.

Everything is numpy arrays over two flat tables — detections (``D``) and ground-truth objects
(``G``), both grouped by image, then class — so a new setting is a few vectorised operations.
Shape legend: ``T`` IoU thresholds, ``A`` area ranges, ``I`` images, ``C`` classes, ``R`` recall
thresholds (101).

Taught in ``notebooks/01_data_and_coco.py``; the figures are in :mod:`instseg_edu.viz.evaluation`
and :mod:`instseg_edu.viz.report`, the explorer is ``instseg_edu.widgets.EvaluationExplorer``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from instseg_edu.data.annotations import segm_ground_truth
from instseg_edu.engine.evaluate import (
    IOU_TYPES,
    METRIC_NAMES,
    _coco,
    _empty_results,
    _evaluation_gt,
    predict_coco,
)

__all__ = [
    "AREA_NAMES",
    "BACKGROUND",
    "COUNT_NAMES",
    "DETECTION_OUTCOMES",
    "DROPPED",
    "DUPLICATE",
    "FALSE_POSITIVE_KINDS",
    "FOUND",
    "GT_IGNORED",
    "GT_OUTCOMES",
    "IGNORED",
    "LOCALISATION_MIN_IOU",
    "MISSED",
    "POOR_LOCALISATION",
    "TRUE_POSITIVE",
    "WRONG_CLASS",
    "CocoMatches",
    "ErrorAnalysis",
    "PrecisionRecall",
    "ScoreSweep",
    "best_f1_threshold",
    "error_analysis",
    "match_coco",
    "match_model",
    "per_class_ap",
    "precision_recall",
    "predict_results",
    "rank_images",
    "score_sweep",
]

# Outcome of a detection at one setting (ErrorAnalysis.dt_outcome).
TRUE_POSITIVE = 0
WRONG_CLASS = 1
DUPLICATE = 2
POOR_LOCALISATION = 3
BACKGROUND = 4
IGNORED = 5  # COCO counts it neither as a true nor as a false positive
DROPPED = 6  # below the score threshold, or past max_dets in its image and class
DETECTION_OUTCOMES = (
    "true positive", "wrong class", "duplicate", "poor localisation", "background", "ignored",
    "dropped",
)  # fmt: skip
FALSE_POSITIVE_KINDS = (WRONG_CLASS, DUPLICATE, POOR_LOCALISATION, BACKGROUND)

# Outcome of a ground-truth object (ErrorAnalysis.gt_outcome).
FOUND = 0
MISSED = 1
GT_IGNORED = 2
GT_OUTCOMES = ("found", "missed", "ignored")

#: Columns of ``ErrorAnalysis.counts``: the detection outcomes 0..4, then missed ground truth.
COUNT_NAMES = DETECTION_OUTCOMES[:5] + ("missed",)
_MISSED_COLUMN = 5

#: Best same-class IoU from which a false positive counts as poorly localised rather than
#: background (Hoiem et al. 2012, Sec. 2; TIDE's background threshold t_b).
LOCALISATION_MIN_IOU = 0.1

#: COCOeval's area ranges, in its order (``params.areaRngLbl``).
AREA_NAMES = ("all", "small", "medium", "large")


@dataclass(frozen=True, eq=False)
class CocoMatches:
    """Everything one ``COCOeval`` run decided, as flat arrays (read-only by convention).

    Detections ``D`` and ground-truth objects ``G`` are grouped by image (in ``image_ids`` order),
    then by class; within an (image, class) detections are in COCOeval's order (score descending,
    ties in input order) and ground truth in ``evaluateImg``'s (crowd regions last). Only what
    COCOeval looks at is here: the images evaluated, the ground truth's categories, and per image
    and class the ``max_dets[-1]`` (100) best detections.

    Attributes:
        iou_type: ``"bbox"`` or ``"segm"``.
        iou_thrs: ``float64 [T]``, COCO's 0.50:0.05:0.95.
        rec_thrs: ``float64 [R]``, COCO's 0:0.01:1.
        area_ranges: ``float64 [A, 2]`` object area bounds in px² (``AREA_NAMES`` order).
        max_dets: COCOeval's ``(1, 10, 100)``.
        image_ids: ``int64 [I]`` the COCO image ids evaluated, ascending.
        image_sizes: ``int64 [I, 2]`` each image's ``(height, width)`` from the ground truth.
        file_names: each image's ``file_name`` (``""`` when absent).
        cat_ids: ``int64 [C]`` category ids, ascending; label ``k`` is ``cat_ids[k]``.
        class_names: ``C`` category names.
        dt_id: ``int64 [D]`` the detection's id in COCOeval's result set (1 + its position in the
            results list given to :func:`match_coco`).
        dt_image: ``int64 [D]`` image index (into ``image_ids``).
        dt_label: ``int64 [D]`` class index ``0..C-1``.
        dt_score: ``float64 [D]``.
        dt_rank: ``int64 [D]`` rank among its image's detections of its class (0 = best score).
        dt_box: ``float64 [D, 4]`` xyxy in the pixels of the original image file.
        dt_area: ``float64 [D]`` px² (the mask's area for ``segm``).
        dt_segm: ``D`` RLE dicts (``segm``) or ``None`` entries (``bbox``), for drawing.
        dt_match: ``int64 [T, A, D]`` row of the ground truth matched (``-1``: none), from
            ``dtMatches``.
        dt_ignore: ``bool [T, A, D]`` from ``dtIgnore``.
        gt_id, gt_image, gt_label, gt_box, gt_area, gt_segm: as for detections (``gt_area`` is the
            annotation's ``area``, which decides its area range, as in COCOeval).
        gt_crowd: ``bool [G]`` ``iscrowd``.
        gt_ignore: ``bool [A, G]`` from ``gtIgnore`` (crowd, or outside the area range).
        gt_match: ``int64 [T, A, G]`` row of the detection that matched it (``-1``: none), from
            ``gtMatches``.
        dt_start, gt_start: ``int64 [I + 1]``: image ``i``'s rows are ``dt_start[i]:dt_start[i+1]``.
        overlap_values, overlap_start: every image's ``float64 [D_i, G_i]`` IoU matrix of its
            detections with its ground truth (every class against every class), flattened and
            concatenated; image ``i``'s starts at ``overlap_start[i]``. Computed by
            ``pycocotools.mask.iou`` exactly as ``COCOeval.computeIoU`` does, so its same-class
            blocks equal ``COCOeval.ious``. Read them with :meth:`image_overlaps` and
            :meth:`pair_iou`.
        dt_best_same, dt_best_same_iou: ``int64 [D]``, ``float64 [D]``: the ground-truth row of the
            detection's class it overlaps most (``-1`` / ``0.0`` when it overlaps none).
        dt_best_other, dt_best_other_iou: the same over ground truth of the other classes.
        stats: the twelve numbers of ``COCOeval.stats`` by name (:data:`METRIC_NAMES`), equal to
            :func:`~instseg_edu.engine.evaluate.evaluate_coco`'s on the same inputs.
    """

    iou_type: str
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    area_ranges: np.ndarray
    max_dets: tuple[int, ...]
    image_ids: np.ndarray
    image_sizes: np.ndarray
    file_names: tuple[str, ...]
    cat_ids: np.ndarray
    class_names: tuple[str, ...]
    dt_id: np.ndarray
    dt_image: np.ndarray
    dt_label: np.ndarray
    dt_score: np.ndarray
    dt_rank: np.ndarray
    dt_box: np.ndarray
    dt_area: np.ndarray
    dt_segm: tuple
    dt_match: np.ndarray
    dt_ignore: np.ndarray
    gt_id: np.ndarray
    gt_image: np.ndarray
    gt_label: np.ndarray
    gt_box: np.ndarray
    gt_area: np.ndarray
    gt_segm: tuple
    gt_crowd: np.ndarray
    gt_ignore: np.ndarray
    gt_match: np.ndarray
    dt_start: np.ndarray
    gt_start: np.ndarray
    overlap_values: np.ndarray
    overlap_start: np.ndarray
    dt_best_same: np.ndarray
    dt_best_same_iou: np.ndarray
    dt_best_other: np.ndarray
    dt_best_other_iou: np.ndarray
    stats: dict[str, float]

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def image_index(self, image_id: int) -> int:
        """Position of a COCO image id in ``image_ids`` (``ValueError`` when not evaluated)."""
        i = int(np.searchsorted(self.image_ids, image_id))
        if i >= len(self.image_ids) or self.image_ids[i] != image_id:
            raise ValueError(f"image_id {image_id} is not among the {len(self.image_ids)} images")
        return i

    def image_overlaps(self, i: int) -> np.ndarray:
        """``float64 [D_i, G_i]``: IoU of image ``i``'s detections (rows ``dt_start[i]:...``) with
        its ground truth (rows ``gt_start[i]:...``)."""
        num_d = self.dt_start[i + 1] - self.dt_start[i]
        num_g = self.gt_start[i + 1] - self.gt_start[i]
        flat = self.overlap_values[self.overlap_start[i] : self.overlap_start[i + 1]]
        return flat.reshape(num_d, num_g)  # [D_i, G_i]

    def pair_iou(self, dt_rows, gt_rows) -> np.ndarray:
        """``float64 [N]``: IoU of each detection row with the ground-truth row beside it.

        Raises ``ValueError`` when a pair lies on two different images (they have no IoU)."""
        d = np.asarray(dt_rows, dtype=np.int64).reshape(-1)
        g = np.asarray(gt_rows, dtype=np.int64).reshape(-1)
        i = self.dt_image[d]  # [N]
        if (self.gt_image[g] != i).any():
            raise ValueError("pair_iou: a detection and its ground truth are on different images")
        num_g = self.gt_start[i + 1] - self.gt_start[i]  # [N] columns of each image's matrix
        at = self.overlap_start[i] + (d - self.dt_start[i]) * num_g + (g - self.gt_start[i])
        return self.overlap_values[at]

    def iou_index(self, iou_thr: float) -> int:
        """Index of ``iou_thr`` in ``iou_thrs`` (``ValueError`` unless it is one of them)."""
        t = int(np.abs(self.iou_thrs - iou_thr).argmin())
        if abs(self.iou_thrs[t] - iou_thr) > 1e-6:
            allowed = ", ".join(f"{v:.2f}" for v in self.iou_thrs)
            raise ValueError(f"iou_thr={iou_thr} must be one of COCO's thresholds {allowed}")
        return t

    def area_index(self, area: str) -> int:
        if area not in AREA_NAMES:
            raise ValueError(f"area={area!r} must be one of {AREA_NAMES}")
        return AREA_NAMES.index(area)

    def setting_index(self, iou_thr: float, area: str, max_dets: int) -> tuple[int, int]:
        """``(t, a)``: the indices of ``iou_thr`` and ``area``; checks all three (``ValueError``
        naming the argument that is out of range)."""
        t, a = self.iou_index(iou_thr), self.area_index(area)
        if not 1 <= max_dets <= self.max_dets[-1]:
            raise ValueError(f"max_dets={max_dets} must be between 1 and {self.max_dets[-1]}")
        return t, a


def _check_results(gt, results: Sequence[dict], iou_type: str) -> None:
    """One clear line for results COCOeval would reject with an assertion or skip silently."""
    images, cats = set(gt.getImgIds()), set(gt.getCatIds())
    for n, r in enumerate(results):
        if r.get("image_id") not in images:
            raise ValueError(
                f"result {n} has image_id {r.get('image_id')!r}, which the ground truth lacks"
            )
        if r.get("category_id") not in cats:
            raise ValueError(
                f"result {n} (image {r['image_id']}) has category_id {r.get('category_id')!r}, "
                f"not one of the ground truth's categories {sorted(cats)}"
            )
        if iou_type == "segm" and "segmentation" not in r:
            raise ValueError(f"result {n} (image {r['image_id']}) has no segmentation to score")


def _xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    b = boxes.reshape(-1, 4).astype(np.float64)  # [N, 4] xywh
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)  # [N, 4] xyxy


def _rows_of(ids: np.ndarray, table_ids: np.ndarray, sorter: np.ndarray) -> np.ndarray:
    """Rows of annotation ``ids`` in a table whose ids are ``table_ids``; id 0 (none) → -1."""
    ids = ids.astype(np.int64)
    if len(table_ids) == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    rows = sorter[np.searchsorted(table_ids, ids, sorter=sorter).clip(max=len(table_ids) - 1)]
    return np.where(ids > 0, rows, -1)


def _best_overlaps(iou: np.ndarray, dt_label: np.ndarray, gt_label: np.ndarray, same: bool):
    """Per detection, the ground-truth column (of its class if ``same``, else of the others)
    overlapping it most and that IoU; ``(-1, 0.0)`` where none overlaps it. ``iou [D_i, G_i]``."""
    mask = (dt_label[:, None] == gt_label[None, :]) == same  # [D_i, G_i]
    masked = np.where(mask, iou, -1.0)  # [D_i, G_i]
    if masked.shape[1] == 0:
        return np.full(len(dt_label), -1), np.zeros(len(dt_label))
    col = masked.argmax(axis=1)  # [D_i]
    best = np.take_along_axis(masked, col[:, None], axis=1)[:, 0]  # [D_i]
    return np.where(best > 0, col, -1), best.clip(min=0.0)


def match_coco(
    coco_gt,
    results: Sequence[dict],
    iou_type: str = "bbox",
    *,
    image_ids: Iterable[int] | None = None,
) -> CocoMatches:
    """Run ``COCOeval`` (evaluate, accumulate, summarize) and read its matches into flat arrays.

    Args:
        coco_gt: a pycocotools ``COCO``, a COCO dataset ``dict`` or a JSON path (as
            :func:`~instseg_edu.engine.evaluate.evaluate_coco` takes it).
        results: COCO result dicts (``image_id, category_id, bbox`` xywh, ``score``, and
            ``segmentation`` RLE for ``segm``), e.g. from
            :func:`~instseg_edu.engine.evaluate.detections_to_coco`. Not modified.
        iou_type: ``"bbox"`` or ``"segm"``.
        image_ids: evaluate only these images (default: every image of ``coco_gt``).

    Returns:
        A :class:`CocoMatches`.

    Raises:
        ValueError: a bad ``iou_type``, or a result whose image or category the ground truth lacks
            (or, for ``segm``, without a segmentation), naming the result.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type={iou_type!r} must be one of {IOU_TYPES}")
    results = list(results)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        # The ground truth evaluate_coco scores: cleaned by the training set's rules; for segm,
        # box-only objects are crowd regions ("don't care").
        gt_dict, _ = _evaluation_gt(coco_gt)
        gt = _coco(gt_dict if iou_type == "bbox" else segm_ground_truth(gt_dict), "pycocotools")
        _check_results(gt, results, iou_type)
        # loadRes writes "area", "id" (and for segm "bbox") into each dict: give it copies.
        dt = gt.loadRes([dict(r) for r in results]) if results else _empty_results(gt)
        ev = COCOeval(gt, dt, iouType=iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    p = ev.params
    img_ids = np.asarray(p.imgIds, dtype=np.int64)  # evaluate() sorted and de-duplicated them
    cat_ids = np.asarray(p.catIds, dtype=np.int64)
    num_t, num_a, num_i, num_c = len(p.iouThrs), len(p.areaRng), len(img_ids), len(cat_ids)

    # evalImgs is ordered [category][area range][image]; None where an (image, class) has neither
    # detections nor ground truth. The "all" entries (area 0) fix the tables' row order.
    def entry(k: int, a: int, i: int):
        return ev.evalImgs[(k * num_a + a) * num_i + i]

    dt_ids: list[int] = []
    gt_ids: list[int] = []
    dt_rank: list[int] = []
    for i in range(num_i):
        for k in range(num_c):
            e = entry(k, 0, i)
            if e is None:
                continue
            dt_ids += e["dtIds"]
            dt_rank += range(len(e["dtIds"]))
            gt_ids += e["gtIds"]
    dt_anns = [ev.cocoDt.anns[d] for d in dt_ids]
    gt_anns = [ev.cocoGt.anns[g] for g in gt_ids]
    dt_id = np.asarray(dt_ids, dtype=np.int64)  # [D]
    gt_id = np.asarray(gt_ids, dtype=np.int64)  # [G]
    num_d, num_g = len(dt_id), len(gt_id)
    image_pos = {int(img): i for i, img in enumerate(img_ids)}
    label_of = {int(c): k for k, c in enumerate(cat_ids)}
    dt_image = np.asarray([image_pos[a["image_id"]] for a in dt_anns], dtype=np.int64)
    gt_image = np.asarray([image_pos[a["image_id"]] for a in gt_anns], dtype=np.int64)
    dt_label = np.asarray([label_of[a["category_id"]] for a in dt_anns], dtype=np.int64)
    gt_label = np.asarray([label_of[a["category_id"]] for a in gt_anns], dtype=np.int64)

    # Matches and ignore flags of every area range, gathered in one pass per range and mapped
    # from annotation ids to table rows with one sorted lookup.
    dt_sorter, gt_sorter = np.argsort(dt_id), np.argsort(gt_id)
    dt_match = np.full((num_t, num_a, num_d), -1, dtype=np.int64)
    dt_ignore = np.zeros((num_t, num_a, num_d), dtype=bool)
    gt_match = np.full((num_t, num_a, num_g), -1, dtype=np.int64)
    gt_ignore = np.zeros((num_a, num_g), dtype=bool)
    for a in range(num_a):
        entries = [e for k in range(num_c) for i in range(num_i) if (e := entry(k, a, i))]
        if not entries:
            continue
        d_ids = np.concatenate([np.asarray(e["dtIds"], dtype=np.int64) for e in entries])
        g_ids = np.concatenate([np.asarray(e["gtIds"], dtype=np.int64) for e in entries])
        d_rows = _rows_of(d_ids, dt_id, dt_sorter)  # [n_d]
        g_rows = _rows_of(g_ids, gt_id, gt_sorter)  # [n_g]
        dtm = np.concatenate([e["dtMatches"].reshape(num_t, -1) for e in entries], axis=1)
        gtm = np.concatenate([e["gtMatches"].reshape(num_t, -1) for e in entries], axis=1)
        dt_match[:, a, d_rows] = _rows_of(dtm, gt_id, gt_sorter)  # [T, n_d] gt id -> row
        gt_match[:, a, g_rows] = _rows_of(gtm, dt_id, dt_sorter)  # [T, n_g] dt id -> row
        dt_ignore[:, a, d_rows] = np.concatenate(
            [e["dtIgnore"].reshape(num_t, -1) for e in entries], axis=1
        ).astype(bool)
        gt_ignore[a, g_rows] = np.concatenate([e["gtIgnore"] for e in entries]).astype(bool)

    # Every detection against every ground truth of its image, with the call computeIoU makes.
    dt_start = np.searchsorted(dt_image, np.arange(num_i + 1))  # [I + 1]
    gt_start = np.searchsorted(gt_image, np.arange(num_i + 1))  # [I + 1]
    geometry = "segmentation" if iou_type == "segm" else "bbox"
    overlaps = [np.zeros(0)]  # a leading empty block, so that cumsum gives the starts
    best = np.zeros((4, num_d))  # same row, same IoU, other row, other IoU
    for i in range(num_i):
        ds, gs = slice(dt_start[i], dt_start[i + 1]), slice(gt_start[i], gt_start[i + 1])
        d_geo = [a[geometry] for a in dt_anns[ds]]
        g_geo = [a[geometry] for a in gt_anns[gs]]
        crowd = [int(a.get("iscrowd", 0)) for a in gt_anns[gs]]
        if d_geo and g_geo:
            iou = np.asarray(mask_utils.iou(d_geo, g_geo, crowd), dtype=np.float64)
        else:
            iou = np.zeros((len(d_geo), len(g_geo)))
        iou = iou.reshape(len(d_geo), len(g_geo))  # [D_i, G_i]
        overlaps.append(iou.reshape(-1))
        for j, same in ((0, True), (2, False)):
            col, value = _best_overlaps(iou, dt_label[ds], gt_label[gs], same)
            best[j, ds] = np.where(col >= 0, col + gt_start[i], -1)
            best[j + 1, ds] = value

    def boxes(anns):
        return _xywh_to_xyxy(np.asarray([a["bbox"] for a in anns], dtype=np.float64))

    images = [ev.cocoGt.imgs[int(img)] for img in img_ids]
    return CocoMatches(
        iou_type=iou_type,
        iou_thrs=np.asarray(p.iouThrs, dtype=np.float64),
        rec_thrs=np.asarray(p.recThrs, dtype=np.float64),
        area_ranges=np.asarray(p.areaRng, dtype=np.float64),
        max_dets=tuple(int(m) for m in p.maxDets),
        image_ids=img_ids,
        image_sizes=np.asarray(
            [(im.get("height", 0), im.get("width", 0)) for im in images], dtype=np.int64
        ).reshape(-1, 2),
        file_names=tuple(str(im.get("file_name", "")) for im in images),
        cat_ids=cat_ids,
        class_names=tuple(str(gt.cats[int(c)].get("name", c)) for c in cat_ids),
        dt_id=dt_id,
        dt_image=dt_image,
        dt_label=dt_label,
        dt_score=np.asarray([a["score"] for a in dt_anns], dtype=np.float64),
        dt_rank=np.asarray(dt_rank, dtype=np.int64),
        dt_box=boxes(dt_anns),
        dt_area=np.asarray([a["area"] for a in dt_anns], dtype=np.float64),
        dt_segm=tuple(a["segmentation"] if iou_type == "segm" else None for a in dt_anns),
        dt_match=dt_match,
        dt_ignore=dt_ignore,
        gt_id=gt_id,
        gt_image=gt_image,
        gt_label=gt_label,
        gt_box=boxes(gt_anns),
        gt_area=np.asarray([a["area"] for a in gt_anns], dtype=np.float64),
        gt_segm=tuple(a["segmentation"] if iou_type == "segm" else None for a in gt_anns),
        gt_crowd=np.asarray([bool(a.get("iscrowd", 0)) for a in gt_anns], dtype=bool),
        gt_ignore=gt_ignore,
        gt_match=gt_match,
        dt_start=dt_start,
        gt_start=gt_start,
        overlap_values=np.concatenate(overlaps),
        overlap_start=np.cumsum([len(o) for o in overlaps]).astype(np.int64),  # [I + 1]
        dt_best_same=best[0].astype(np.int64),
        dt_best_same_iou=best[1],
        dt_best_other=best[2].astype(np.int64),
        dt_best_other_iou=best[3],
        stats=dict(zip(METRIC_NAMES, (float(s) for s in ev.stats[: len(METRIC_NAMES)]))),
    )


class ErrorAnalysis(NamedTuple):
    """Every detection's and ground-truth object's outcome at one setting (:func:`error_analysis`).

    Attributes:
        iou_thr, area, max_dets, score_thr: the setting.
        dt_outcome: ``int8 [D]``, one of ``TRUE_POSITIVE``, ``WRONG_CLASS``, ``DUPLICATE``,
            ``POOR_LOCALISATION``, ``BACKGROUND``, ``IGNORED``, ``DROPPED``.
        dt_gt: ``int64 [D]`` the ground-truth row behind the outcome: the object matched (true
            positive, ignored), the other-class object it sits on (wrong class), the object already
            taken (duplicate) or poorly covered (poor localisation), else the object it overlaps
            most; ``-1`` when it overlaps none.
        dt_iou: ``float64 [D]`` the IoU with ``dt_gt`` (0 without one).
        dt_suppressor: ``int64 [D]`` for a duplicate, the row of the detection that took its
            object; ``-1`` otherwise.
        gt_outcome: ``int8 [G]``, ``FOUND``, ``MISSED`` or ``GT_IGNORED``.
        gt_dt: ``int64 [G]`` the kept detection that found it (``-1``: none).
        counts: ``int64 [I, C, 6]`` per image and class, the columns of :data:`COUNT_NAMES`: true
            positives and the four false-positive kinds by *predicted* class, missed objects by
            their class.
        num_gt: ``int64 [C]`` ground truth COCO does not ignore, per class.
        confusion: ``int64 [C + 1, C + 1]``; rows: ground-truth class, then "background"; columns:
            predicted class, then "missed". A true positive adds to ``[c, c]``, a wrong-class
            detection of class ``p`` on an object of class ``g`` to ``[g, p]``, any other false
            positive of class ``p`` to ``[C, p]``, a missed object of class ``g`` to ``[g, C]``.
            So column ``p`` sums to the kept detections of class ``p``, and in row ``g`` the
            diagonal plus "missed" is ``num_gt[g]`` (an object can be missed *and* lie under a
            wrong-class detection: that is the confusion the row shows).
    """

    iou_thr: float
    area: str
    max_dets: int
    score_thr: float
    dt_outcome: np.ndarray
    dt_gt: np.ndarray
    dt_iou: np.ndarray
    dt_suppressor: np.ndarray
    gt_outcome: np.ndarray
    gt_dt: np.ndarray
    counts: np.ndarray
    num_gt: np.ndarray
    confusion: np.ndarray

    def totals(self, label: int | None = None) -> dict[str, int]:
        """``{count name: total}`` over all images, for one class or (``None``) all of them."""
        c = self.counts if label is None else self.counts[:, label : label + 1]
        return {name: int(v) for name, v in zip(COUNT_NAMES, c.sum(axis=(0, 1)))}

    def precision_recall_point(self) -> tuple[np.ndarray, np.ndarray]:
        """Per class, ``(recall [C], precision [C])`` of the detections kept at ``score_thr``.

        The point of the raw precision–recall curve at this score; ``nan`` where a class has no
        ground truth (recall) or no kept detection (precision).
        """
        per_class = self.counts.sum(axis=0)  # [C, 6]
        tp = per_class[:, TRUE_POSITIVE].astype(np.float64)
        fp = per_class[:, list(FALSE_POSITIVE_KINDS)].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(self.num_gt > 0, tp / self.num_gt, np.nan)
            precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        return recall, precision


def error_analysis(
    matches: CocoMatches,
    iou_thr: float = 0.5,
    area: str = "all",
    max_dets: int = 100,
    score_thr: float = 0.0,
) -> ErrorAnalysis:
    """Sort every detection and ground-truth object into its outcome at one setting.

    A detection is *kept* when its score is ``>= score_thr`` and it is among the ``max_dets`` best
    of its class in its image (COCOeval's per-image, per-class cut). Kept detections are true
    positives, false positives (split into the four kinds of the module docstring, in that order
    of precedence) or ignored, as COCOeval decided at ``iou_thr`` and ``area``; ground truth is
    found, missed or ignored. Matching never changes with the score threshold: COCO matches in
    score order, so dropping the lowest scores leaves the matches of the others as they were.

    Args:
        matches: from :func:`match_coco`.
        iou_thr: one of ``matches.iou_thrs`` (0.50, 0.55, ..., 0.95).
        area: one of :data:`AREA_NAMES`.
        max_dets: ``1 <= max_dets <= matches.max_dets[-1]``.
        score_thr: detections scoring below it are ``DROPPED``.

    Returns:
        An :class:`ErrorAnalysis`.
    """
    t, a = matches.setting_index(iou_thr, area, max_dets)
    num_i, num_c = matches.num_images, matches.num_classes
    thr = float(matches.iou_thrs[t])

    match = matches.dt_match[t, a]  # [D] ground-truth row or -1
    ignore = matches.dt_ignore[t, a]  # [D]
    considered = (matches.dt_rank < max_dets) & (matches.dt_score >= score_thr)  # [D]
    kept = considered & ~ignore
    fp = kept & (match < 0)
    wrong = fp & (matches.dt_best_other_iou >= thr)
    duplicate = fp & ~wrong & (matches.dt_best_same_iou >= thr)
    poor = fp & ~wrong & ~duplicate & (matches.dt_best_same_iou >= LOCALISATION_MIN_IOU)
    outcome = np.full(len(match), DROPPED, dtype=np.int8)
    outcome[considered & ignore] = IGNORED
    outcome[kept & (match >= 0)] = TRUE_POSITIVE
    outcome[fp] = BACKGROUND
    outcome[poor] = POOR_LOCALISATION
    outcome[duplicate] = DUPLICATE
    outcome[wrong] = WRONG_CLASS

    # The ground truth behind each outcome, and its IoU.
    other_is_best = matches.dt_best_other_iou > matches.dt_best_same_iou
    best_any = np.where(other_is_best, matches.dt_best_other, matches.dt_best_same)  # [D]
    dt_gt = np.where(match >= 0, match, best_any)
    dt_gt = np.where(wrong, matches.dt_best_other, dt_gt)
    dt_gt = np.where(duplicate | poor, matches.dt_best_same, dt_gt)
    dt_iou = np.zeros(len(match))
    has_gt = np.flatnonzero(dt_gt >= 0)
    dt_iou[has_gt] = matches.pair_iou(has_gt, dt_gt[has_gt])
    gt_taker = matches.gt_match[t, a]  # [G] detection row or -1
    dt_suppressor = np.full(len(match), -1, dtype=np.int64)
    dup_rows = np.flatnonzero(duplicate)
    dt_suppressor[dup_rows] = gt_taker[dt_gt[dup_rows]]

    gt_ign = matches.gt_ignore[a]  # [G]
    found = ~gt_ign & (gt_taker >= 0)
    found[found] = kept[gt_taker[found]]
    gt_outcome = np.full(len(gt_ign), MISSED, dtype=np.int8)
    gt_outcome[gt_ign] = GT_IGNORED
    gt_outcome[found] = FOUND
    gt_dt = np.where(found, gt_taker, -1)

    # Per image and class counts: one bincount over (image, class, column) cells.
    counts = np.zeros(num_i * num_c * 6, dtype=np.int64)
    shown = outcome <= BACKGROUND
    cell = (matches.dt_image * num_c + matches.dt_label) * 6 + outcome.astype(np.int64)
    counts += np.bincount(cell[shown], minlength=counts.size)
    missed = gt_outcome == MISSED
    cell = (matches.gt_image * num_c + matches.gt_label) * 6 + _MISSED_COLUMN
    counts += np.bincount(cell[missed], minlength=counts.size)
    counts = counts.reshape(num_i, num_c, 6)

    # Confusion: rows ground-truth class + background, columns predicted class + missed.
    rows = np.where(outcome == TRUE_POSITIVE, matches.dt_label, num_c)
    rows[wrong] = matches.gt_label[matches.dt_best_other[wrong]]
    cells = rows[shown] * (num_c + 1) + matches.dt_label[shown]
    cells = np.concatenate([cells, matches.gt_label[missed] * (num_c + 1) + num_c])
    confusion = np.bincount(cells, minlength=(num_c + 1) ** 2).reshape(num_c + 1, num_c + 1)

    return ErrorAnalysis(
        iou_thr=thr,
        area=area,
        max_dets=int(max_dets),
        score_thr=float(score_thr),
        dt_outcome=outcome,
        dt_gt=dt_gt.astype(np.int64),
        dt_iou=dt_iou,
        dt_suppressor=dt_suppressor,
        gt_outcome=gt_outcome,
        gt_dt=gt_dt.astype(np.int64),
        counts=counts,
        num_gt=np.bincount(matches.gt_label[~gt_ign], minlength=num_c).astype(np.int64),
        confusion=confusion.astype(np.int64),
    )


def rank_images(
    errors: ErrorAnalysis, label: int | None = None, columns: Sequence[str] | None = None
) -> np.ndarray:
    """Image indices, most errors first (ties: more false positives first, then image order).

    Args:
        errors: from :func:`error_analysis`.
        label: count only this class (predicted class for false positives, true class for
            misses); ``None``: all classes.
        columns: the :data:`COUNT_NAMES` to add up (default: the four false-positive kinds and
            ``"missed"``).

    Returns:
        ``int64 [I]``.
    """
    columns = COUNT_NAMES[1:] if columns is None else tuple(columns)
    for name in columns:
        if name not in COUNT_NAMES:
            raise ValueError(f"column {name!r} must be one of {COUNT_NAMES}")
    c = errors.counts if label is None else errors.counts[:, label : label + 1]
    per_image = c.sum(axis=1)  # [I, 6]
    total = per_image[:, [COUNT_NAMES.index(n) for n in columns]].sum(axis=1)  # [I]
    fps = per_image[:, list(FALSE_POSITIVE_KINDS)].sum(axis=1)  # [I]
    index = np.arange(len(total))
    return np.lexsort((index, -fps, -total)).astype(np.int64)  # last key sorts first


class PrecisionRecall(NamedTuple):
    """Per-class precision–recall at one IoU threshold, area range and ``max_dets``.

    Attributes:
        iou_thr, area, max_dets: the setting.
        rec_thrs: ``float64 [R]`` COCO's recall points 0:0.01:1.
        precision: ``float64 [C, R]`` COCO's interpolated precision (the best precision at any
            recall ≥ r), as ``COCOeval.accumulate`` computes it; ``-1`` for a class without ground
            truth in this area range.
        ap: ``float64 [C]`` the mean of ``precision`` over ``R`` (``-1`` likewise): the class's AP
            at this threshold.
        curves: per class, ``(recall [n], precision [n], score [n])`` after each of its ``n``
            detections that COCO does not ignore, best score first: the raw curve whose upper
            envelope ``precision`` samples.
        num_gt: ``int64 [C]`` ground truth COCO does not ignore.
    """

    iou_thr: float
    area: str
    max_dets: int
    rec_thrs: np.ndarray
    precision: np.ndarray
    ap: np.ndarray
    curves: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]
    num_gt: np.ndarray

    @property
    def mean_ap(self) -> float:
        """The mean of ``ap`` over the classes that have ground truth (``-1`` if none has)."""
        valid = self.ap[self.ap > -1]
        return float(valid.mean()) if len(valid) else -1.0


def precision_recall(
    matches: CocoMatches, iou_thr: float = 0.5, area: str = "all", max_dets: int = 100
) -> PrecisionRecall:
    """Rebuild each class's precision–recall curve and AP from the match tables.

    This is ``COCOeval.accumulate`` for one (IoU, area, max_dets) cell, written over the flat
    tables: per class, sort the considered detections by score (stable, in COCOeval's image and
    rank order, so ties fall as they do there), accumulate true and false positives (ignored
    detections count as neither), take ``recall = TP / num_gt`` and
    ``precision = TP / (TP + FP)``, make precision non-increasing from the right (the upper
    envelope) and read it at the 101 recall points; recall points past the last one reached read
    0. The mean of those 101 values is the class's AP at this threshold; averaged over the ten
    thresholds and the classes it is COCO's AP.
    """
    t, a = matches.setting_index(iou_thr, area, max_dets)
    rec_thrs = matches.rec_thrs
    num_c = matches.num_classes
    num_gt = np.bincount(matches.gt_label[~matches.gt_ignore[a]], minlength=num_c)
    precision = -np.ones((num_c, len(rec_thrs)))
    curves = []
    considered = matches.dt_rank < max_dets  # [D]
    for k in range(num_c):
        rows = np.flatnonzero(considered & (matches.dt_label == k))  # table order: image, rank
        rows = rows[np.argsort(-matches.dt_score[rows], kind="mergesort")]  # [n] COCO's order
        ignore = matches.dt_ignore[t, a, rows]
        tp = np.cumsum((matches.dt_match[t, a, rows] >= 0) & ~ignore).astype(np.float64)
        fp = np.cumsum((matches.dt_match[t, a, rows] < 0) & ~ignore).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = tp / num_gt[k]
        pr = tp / (fp + tp + np.spacing(1))
        counted = ~ignore
        curves.append((recall[counted], pr[counted], matches.dt_score[rows][counted]))
        if num_gt[k] == 0:
            continue
        if len(pr) == 0:
            precision[k] = 0.0
            continue
        envelope = np.maximum.accumulate(pr[::-1])[::-1]  # [n] best precision at recall >= r
        at = np.searchsorted(recall, rec_thrs, side="left")  # [R]
        precision[k] = np.where(at < len(pr), envelope[at.clip(max=len(pr) - 1)], 0.0)
    ap = np.where(num_gt > 0, precision.mean(axis=1), -1.0)
    return PrecisionRecall(
        iou_thr=float(matches.iou_thrs[t]),
        area=area,
        max_dets=int(max_dets),
        rec_thrs=rec_thrs,
        precision=precision,
        ap=ap,
        curves=tuple(curves),
        num_gt=num_gt.astype(np.int64),
    )


class ScoreSweep(NamedTuple):
    """Precision, recall and F1 of every class's detections together, as the score threshold
    rises (:func:`score_sweep`).

    Attributes:
        iou_thr, area, max_dets: the setting.
        score: ``float64 [n]`` the distinct scores of the detections COCO counts, descending:
            each a threshold (keep the detections scoring ``>= score``).
        precision, recall, f1: ``float64 [n]`` of the detections kept at each threshold, all
            classes pooled: ``TP / kept``, ``TP / ground truth``, their harmonic mean.
        num_gt: ground truth COCO does not ignore, all classes.
    """

    iou_thr: float
    area: str
    max_dets: int
    score: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    num_gt: int

    def best_f1(self) -> tuple[float, float, float, float]:
        """``(score threshold, precision, recall, F1)`` where F1 is highest (the highest such
        threshold on a tie); ``(inf, nan, 0, 0)`` without a detection."""
        if len(self.score) == 0:
            return float("inf"), float("nan"), 0.0, 0.0
        k = int(np.argmax(self.f1))  # the first maximum: the highest threshold
        return (float(self.score[k]), float(self.precision[k]), float(self.recall[k]),
                float(self.f1[k]))  # fmt: skip

    def best_threshold(self) -> float | None:
        """The score threshold of :meth:`best_f1`, or ``None`` when no detection is right."""
        thr, _, _, f1 = self.best_f1()
        return thr if f1 > 0 else None

    def at(self, score_thr: float) -> tuple[float, float]:
        """``(precision, recall)`` of the detections scoring ``>= score_thr`` (precision ``nan``
        when none is kept)."""
        k = np.searchsorted(-self.score, -score_thr, side="right") - 1  # last score >= score_thr
        if k < 0:
            return float("nan"), 0.0
        return float(self.precision[k]), float(self.recall[k])

    def describe(self, score_thr: float, against: float | None = None) -> str:
        """What drawing the boxes scoring ``>= score_thr`` gives, e.g. ``"score >= 0.64: 66% of
        the boxes right, 56% of the objects found"`` (right: at ``iou_thr``); with ``against``,
        followed by the same for that threshold in brackets, unless the two read the same."""
        precision, recall = self.at(score_thr)
        if precision != precision:  # nan: nothing kept
            line = f"score >= {score_thr:.2f}: no box"
        else:
            line = (f"score >= {score_thr:.2f}: {precision:.0%} of the boxes right, {recall:.0%} "
                    "of the objects found")  # fmt: skip
        if against is not None and f"{against:.2f}" != f"{score_thr:.2f}":
            line += f" (at {self.describe(against)})"
        return line


def score_sweep(
    matches: CocoMatches, iou_thr: float = 0.5, area: str = "all", max_dets: int = 100
) -> ScoreSweep:
    """Precision and recall of the kept detections at every score threshold, classes pooled.

    A gallery or an application draws the detections above one score; this answers which one:
    at a threshold ``s`` the kept detections are those scoring ``>= s`` among the ``max_dets``
    best of their image and class, and they are counted as :func:`error_analysis` counts them
    at ``score_thr=s`` (true positives against every false-positive kind, COCO's ignored ones
    left out), for every ``s`` at once: sort by score, accumulate, and read the totals at the
    last detection of each distinct score. The threshold of the best F1 is a common choice of
    operating point (e.g. the F1-optimal confidence of Ultralytics' validation reports); COCO's
    AP averages over all of them instead.

    Args:
        matches: from :func:`match_coco`.
        iou_thr, area, max_dets: as :func:`error_analysis`.

    Returns:
        A :class:`ScoreSweep`.
    """
    t, a = matches.setting_index(iou_thr, area, max_dets)
    counted = (matches.dt_rank < max_dets) & ~matches.dt_ignore[t, a]  # [D]
    rows = np.flatnonzero(counted)
    rows = rows[np.argsort(-matches.dt_score[rows], kind="mergesort")]  # [n] best first
    score = matches.dt_score[rows]
    tp = np.cumsum(matches.dt_match[t, a, rows] >= 0).astype(np.float64)  # [n]
    kept = np.arange(1, len(rows) + 1, dtype=np.float64)
    last = np.flatnonzero(np.append(score[1:] != score[:-1], len(score) > 0))  # a score's last
    num_gt = int((~matches.gt_ignore[a]).sum())
    precision = tp[last] / kept[last]
    recall = tp[last] / max(num_gt, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return ScoreSweep(
        iou_thr=float(matches.iou_thrs[t]),
        area=area,
        max_dets=int(max_dets),
        score=score[last].astype(np.float64),
        precision=precision,
        recall=recall,
        f1=f1,
        num_gt=num_gt,
    )


def best_f1_threshold(
    model, loader, coco_gt, label_to_cat_id: Sequence[int], device=None, *, iou_thr: float = 0.5
) -> tuple[float | None, ScoreSweep]:
    """The score threshold at which a model's boxes have their best F1 on ``loader``'s images.

    Predicts over the loader (:func:`match_model`, boxes only) and sweeps the threshold
    (:func:`score_sweep`). Used to choose the threshold of a gallery: the notebooks' and
    ``instseg-edu demo``'s pictures draw the boxes scoring at least it.

    Returns:
        ``(threshold, sweep)``; the threshold is ``None`` when no box is right at ``iou_thr``.
    """
    matches = match_model(model, loader, coco_gt, label_to_cat_id, device, iou_types=("bbox",))
    sweep = score_sweep(matches["bbox"], iou_thr)
    return sweep.best_threshold(), sweep


def per_class_ap(matches: CocoMatches, area: str = "all", max_dets: int = 100) -> np.ndarray:
    """``float64 [C]``: each class's COCO AP, averaged over the ten IoU thresholds (``-1``: no
    ground truth in this area range). Their mean over classes with ground truth is ``stats["AP"]``
    (``"APs"``/``"APm"``/``"APl"`` for the other area ranges)."""
    aps = np.stack(
        [precision_recall(matches, float(t), area, max_dets).ap for t in matches.iou_thrs]
    )  # [T, C]
    return np.where((aps > -1).all(axis=0), aps.mean(axis=0), -1.0)


# ------------------------------------------------------------------------------------------------
# From a model
# ------------------------------------------------------------------------------------------------


def predict_results(model, loader, label_to_cat_id: Sequence[int], device=None, **options):
    """Run a model over a loader and return ``(COCO result dicts, image ids seen)``.

    :func:`~instseg_edu.engine.evaluate.predict_coco` — the prediction and conversion of
    :func:`~instseg_edu.engine.evaluate.evaluate_model` (boxes and masks in the original image's
    pixels; an image the loader repeats counts once) — flattened over images. ``options`` are
    its keyword arguments ``amp`` and ``max_batches``.

    Returns:
        ``(list[dict], list[int])``.
    """
    per_image, _ = predict_coco(model, loader, label_to_cat_id, device, **options)
    results = [r for image_results in per_image.values() for r in image_results]
    return results, list(per_image)


def match_model(
    model,
    loader,
    coco_gt,
    label_to_cat_id: Sequence[int],
    device=None,
    *,
    iou_types: Iterable[str] | None = None,
    amp: bool = False,
    max_batches: int | None = None,
) -> dict[str, CocoMatches]:
    """Predict over ``loader`` and :func:`match_coco` the results, for each IoU type.

    ``iou_types=None`` means ``bbox``, plus ``segm`` when the model returned masks. Only the images
    the loader produced are evaluated, so ``stats`` equal
    :func:`~instseg_edu.engine.evaluate.evaluate_model`'s on the same loader.

    Returns:
        ``{iou_type: CocoMatches}``.
    """
    results, image_ids = predict_results(
        model, loader, label_to_cat_id, device, amp=amp, max_batches=max_batches
    )
    if iou_types is None:
        has_masks = any("segmentation" in r for r in results)
        iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    return {t: match_coco(coco_gt, results, t, image_ids=image_ids) for t in iou_types}
