"""COCO evaluation: turn a model's detections into COCO result dicts and score them with COCOeval.

The COCO protocol (Lin et al., "Microsoft COCO", Sec. 5 and the cocodataset.org detection-eval page)
reports twelve numbers per IoU type:

- ``AP``: precision averaged over IoU thresholds 0.50:0.05:0.95, recall levels 0:0.01:1 and classes;
  ``AP50`` and ``AP75`` at a single IoU threshold; ``APs``, ``APm``, ``APl`` for small
  (area < 32²), medium and large (area > 96²) objects;
- ``AR1``, ``AR10``, ``AR100``: recall with at most 1, 10, 100 detections per image, averaged over
  IoU thresholds; ``ARs``, ``ARm``, ``ARl`` by object size (100 detections).

pycocotools writes ``-1`` for a number that has no ground truth to measure (e.g. ``APl`` when no
object is large); we keep that convention and :func:`format_ap_table` prints it as ``n/a``.

Boxes in COCO results are ``[x, y, w, h]`` in pixels of the *original* image file, masks are
run-length encoded (RLE) at that size. :func:`detections_to_coco` does both conversions from the
network-input coordinates that :class:`instseg_edu.structures.Detections` uses.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from instseg_edu.data.annotations import (
    BOX_ONLY,
    MASK,
    annotation_kind,
    check_coco,
    evaluation_ground_truth,
    load_coco_json,
    match_categories,
    report_dropped,
    segm_ground_truth,
)
from instseg_edu.structures import Detections, Target

#: Readable names of ``COCOeval.stats``, in its order.
METRIC_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip

IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")


def _gt_dataset(coco_gt) -> tuple[dict, str | None]:
    """The ground truth as a COCO dict, and the file it came from (None: not from a file)."""
    if isinstance(coco_gt, (str, os.PathLike)):
        if not os.path.isfile(coco_gt):
            raise FileNotFoundError(f"COCO annotation file {str(coco_gt)!r} does not exist")
        return load_coco_json(coco_gt), str(coco_gt)
    if isinstance(coco_gt, dict):
        return coco_gt, None
    if hasattr(coco_gt, "dataset"):  # CocoDataset.coco names its file in .source
        return coco_gt.dataset, getattr(coco_gt, "source", None)
    raise TypeError(f"coco_gt must be a COCO, a dict or a JSON path, not {type(coco_gt)}")


def _coco(dataset: dict, backend: str):
    """A ground-truth COCO object of the backend's own class over ``dataset``."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
    else:
        from faster_coco_eval import COCO
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _empty_results(gt):
    """A result object with no detections (``loadRes([])`` crashes in pycocotools)."""
    res = type(gt)()
    res.dataset = {
        "images": list(gt.dataset.get("images", [])),
        "categories": copy.deepcopy(gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _evaluation_gt(coco_gt) -> tuple[dict, str]:
    """The ground truth as COCOeval gets it for ``bbox``, and its source for messages: the same
    rules as the training set decide which objects exist (and refuse what it refuses); the drops
    are reported once. ``segm_ground_truth`` of it is the ``segm`` ground truth."""
    dataset, file = _gt_dataset(coco_gt)
    source = file or "the ground truth"
    gt_dict, dropped = evaluation_ground_truth(dataset, source)
    report_dropped(source, dropped, remember=file is not None)
    return gt_dict, source


def evaluate_coco(
    coco_gt,
    results: Sequence[dict],
    iou_types: Iterable[str] = IOU_TYPES,
    *,
    backend: str = "pycocotools",
    image_ids: Iterable[int] | None = None,
    quiet: bool = True,
) -> dict[str, dict[str, float]]:
    """Score COCO-format results against ground truth with the standard COCOeval protocol.

    Args:
        coco_gt: a pycocotools ``COCO``, a COCO dataset ``dict`` or the path of a COCO JSON file.
            It is cleaned by the training set's rules (:mod:`instseg_edu.data.annotations`):
            dropped annotations are left out (one warning names them); a box-only object counts
            for ``bbox`` and is a crowd region ("don't care") for ``segm``; ``segm`` is skipped
            when no object has a mask.
        results: COCO result dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score",
            "segmentation": RLE}`` as made by :func:`detections_to_coco`. Not modified.
        iou_types: any of ``"bbox"``, ``"segm"``. ``"segm"`` is skipped (absent from the returned
            dict) when results are non-empty but none carries a ``"segmentation"``: a box-only model
            has no masks to score, and pycocotools would otherwise score its boxes as polygons.
        backend: ``"pycocotools"`` (default) or ``"faster_coco_eval"`` (a C++ drop-in with the same
            numbers; ``pip install faster-coco-eval``).
        image_ids: evaluate only these images (default: every image of ``coco_gt``). Use it when the
            predictions cover a subset, e.g. a quick check on the first few validation images.
        quiet: swallow the evaluator's printed tables.

    Returns:
        ``{iou_type: {"AP": .., "AP50": .., ..., "ARl": ..}}`` with the twelve numbers of
        :data:`METRIC_NAMES` as Python floats in ``[0, 1]``, or ``-1.0`` where no ground truth
        exists for that number (pycocotools' convention).

    Raises:
        DataError: the ground truth breaks a rule the training set refuses too (one line naming
            the annotation id and field).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in IOU_TYPES:
            raise ValueError(f"iou_types contains {t!r}; allowed are {IOU_TYPES}")
    results = list(results)
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCOeval_faster as COCOeval

    gt_dict, source = _evaluation_gt(coco_gt)
    kinds = {annotation_kind(a) for a in gt_dict["annotations"]}
    out = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    with out:
        metrics: dict[str, dict[str, float]] = {}
        for iou_type in iou_types:
            if iou_type == "segm" and results and not any("segmentation" in r for r in results):
                continue
            if iou_type == "segm" and BOX_ONLY in kinds and MASK not in kinds:
                warnings.warn(
                    f"{source}: no object has a mask (all are box-only), so 'segm' is not "
                    "evaluated",
                    stacklevel=2,
                )
                continue
            gt = _coco(gt_dict if iou_type == "bbox" else segm_ground_truth(gt_dict), backend)
            if results:
                # loadRes writes "area", "id" (and for segm "bbox") into each dict: give it copies.
                dt = gt.loadRes([dict(r) for r in results])
            else:
                dt = _empty_results(gt)
            if backend == "pycocotools":
                ev = COCOeval(gt, dt, iouType=iou_type)
            else:
                ev = COCOeval(gt, dt, iouType=iou_type, print_function=print)
            if image_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats = [float(s) for s in ev.stats[: len(METRIC_NAMES)]]
            metrics[iou_type] = dict(zip(METRIC_NAMES, stats))
    return metrics


def _encode_masks(masks: torch.Tensor) -> list[dict]:
    """``bool [K, H, W]`` → K COCO RLE dicts whose ``counts`` are ``str`` (JSON-serialisable)."""
    from pycocotools import mask as mask_util

    if masks.shape[0] == 0:
        return []
    # pycocotools wants a Fortran-ordered uint8 array shaped [H, W, K].
    arr = np.asfortranarray(masks.permute(1, 2, 0).to(torch.uint8).cpu().numpy())  # [H, W, K]
    rles = mask_util.encode(arr)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def detections_to_coco(
    detections: Sequence[Detections],
    targets: Sequence[Target],
    image_sizes: Sequence[tuple[int, int]],
    label_to_cat_id: Sequence[int],
) -> list[dict]:
    """Convert per-image :class:`Detections` to COCO result dicts in original-image pixels.

    A dataset transform resizes each image from ``target.orig_size = (H0, W0)`` to
    ``image_sizes[i] = (h, w)``; the model predicts in that ``(h, w)`` frame. Boxes are scaled by
    ``(W0 / w, H0 / h)`` and converted xyxy → xywh; masks are cropped to ``(h, w)`` (in case they
    carry batch padding), resized to ``(H0, W0)`` bilinearly and thresholded at 0.5, then
    RLE-encoded. Example: a box ``[10, 20, 30, 60]`` predicted on a 256×256 input of a 512×512 file
    becomes ``bbox = [20, 40, 40, 80]``.

    Args:
        detections: one :class:`Detections` per image (``boxes [K, 4]`` xyxy, ``scores [K]``,
            ``labels [K]`` in ``0..C-1``, optional ``masks bool [K, h, w]``).
        targets: the matching :class:`Target` (gives ``image_id`` and ``orig_size``; when
            ``orig_size`` is ``None`` no rescaling happens).
        image_sizes: each image's true ``(h, w)`` in the network input (``Batch.image_sizes``).
        label_to_cat_id: contiguous label → COCO ``category_id``.

    Returns:
        A list of dicts ``{"image_id", "category_id", "bbox", "score"}`` plus ``"segmentation"``
        (RLE with ``str`` counts) when the detections have masks.
    """
    if not (len(detections) == len(targets) == len(image_sizes)):
        raise ValueError(
            f"detections ({len(detections)}), targets ({len(targets)}) and image_sizes "
            f"({len(image_sizes)}) must have the same length"
        )
    results: list[dict] = []
    for det, target, (h, w) in zip(detections, targets, image_sizes):
        if len(det) == 0:
            continue
        h0, w0 = target.orig_size if target.orig_size is not None else (h, w)
        boxes = det.boxes.detach().float().cpu()
        scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h])
        boxes = boxes * scale  # [K, 4] xyxy in original pixels
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # [K, 4]
        labels = det.labels.detach().cpu().tolist()
        if max(labels) >= len(label_to_cat_id) or min(labels) < 0:
            raise ValueError(
                f"detection label {max(labels)} has no entry in label_to_cat_id "
                f"(length {len(label_to_cat_id)}): labels are indices into the category list "
                "the model was trained with; pass that list (the training set's or the "
                "checkpoint's label_to_cat_id), not the validation file's"
            )
        rles = None
        if det.masks is not None:
            masks = det.masks.detach()[:, :h, :w]  # [K, h, w], drop any batch padding
            if (h, w) != (h0, w0):
                masks = F.interpolate(
                    masks[:, None].float(), size=(h0, w0), mode="bilinear", align_corners=False
                )[:, 0]  # [K, H0, W0]
                masks = masks >= 0.5
            rles = _encode_masks(masks.bool())
        for k, (box, score, label) in enumerate(
            zip(xywh.tolist(), det.scores.detach().float().cpu().tolist(), labels)
        ):
            r = {
                "image_id": int(target.image_id),
                "category_id": int(label_to_cat_id[label]),
                "bbox": [round(v, 3) for v in box],
                "score": float(score),
            }
            if rles is not None:
                r["segmentation"] = rles[k]
            results.append(r)
    return results


def coco_to_detections(
    results: Sequence[dict],
    target: Target,
    image_size: tuple[int, int],
    label_to_cat_id: Sequence[int],
) -> Detections:
    """One image's COCO result dicts back to :class:`Detections` in the network input's frame.

    The inverse of :func:`detections_to_coco` (for drawing results that no single forward pass
    made, e.g. the output of :func:`merge_scales`): boxes xywh in original pixels are scaled by
    ``(w / W0, h / H0)`` and converted to xyxy; RLE masks are decoded at ``(H0, W0)``, resized to
    ``(h, w)`` bilinearly and thresholded at 0.5. Detections are sorted by score, best first.

    Args:
        results: the image's result dicts (``image_id`` equal to ``target.image_id``).
        target: gives ``orig_size`` ``(H0, W0)`` (``None``: no rescaling).
        image_size: the image's ``(h, w)`` in the network input.
        label_to_cat_id: contiguous label → COCO ``category_id``.

    Returns:
        :class:`Detections` with ``masks`` when every result has a ``segmentation``.

    Raises:
        ValueError: a result of another image, or a ``category_id`` not in ``label_to_cat_id``.
    """
    h, w = image_size
    h0, w0 = target.orig_size if target.orig_size is not None else (h, w)
    label_of = {int(c): k for k, c in enumerate(label_to_cat_id)}
    results = sorted(results, key=lambda r: -r["score"])
    for r in results:
        if int(r["image_id"]) != int(target.image_id):
            raise ValueError(f"coco_to_detections: a result of image {r['image_id']} given for "
                             f"image {int(target.image_id)}")  # fmt: skip
        if int(r["category_id"]) not in label_of:
            raise ValueError(f"coco_to_detections: category_id {r['category_id']} is not in "
                             f"label_to_cat_id {list(label_to_cat_id)}")  # fmt: skip
    xywh = torch.tensor([r["bbox"] for r in results], dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)  # [K, 4] original pixels
    boxes = boxes * torch.tensor([w / w0, h / h0, w / w0, h / h0])
    scores = torch.tensor([float(r["score"]) for r in results], dtype=torch.float32)
    labels = torch.tensor([label_of[int(r["category_id"])] for r in results], dtype=torch.int64)
    masks = None
    if results and all("segmentation" in r for r in results):
        from pycocotools import mask as mask_util

        decoded = mask_util.decode([r["segmentation"] for r in results])  # [H0, W0, K] uint8
        masks = torch.from_numpy(np.ascontiguousarray(decoded)).permute(2, 0, 1)  # [K, H0, W0]
        if (h, w) != (h0, w0):
            masks = (
                F.interpolate(
                    masks[:, None].float(), size=(h, w), mode="bilinear", align_corners=False
                )[:, 0]
                >= 0.5
            )
        masks = masks.bool()
    return Detections(boxes, scores, labels, masks)


def coco_to_batch_detections(
    results: Sequence[dict],
    targets: Sequence[Target],
    image_sizes: Sequence[tuple[int, int]],
    label_to_cat_id: Sequence[int],
) -> list[Detections]:
    """:func:`coco_to_detections` for each image of a batch: ``results`` of any images (e.g.
    :func:`merge_scales`' output over a whole split) are grouped by ``image_id``, and each
    target's image gets its own (none: empty :class:`Detections`).

    Returns:
        One :class:`Detections` per target, in the batch's input frame.

    Raises:
        ValueError: as :func:`coco_to_detections`.
    """
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    return [
        coco_to_detections(by_image.get(int(t.image_id), []), t, size, label_to_cat_id)
        for t, size in zip(targets, image_sizes)
    ]


def _outputs_to_float(obj):
    """Cast floating tensors in (nested) outputs to float32, so post-processing runs in full
    precision even when the forward pass ran under bf16 autocast."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(_outputs_to_float(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_outputs_to_float(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _outputs_to_float(v) for k, v in obj.items()}
    return obj


@torch.inference_mode()
def predict_loader(model, loader, device=None, *, amp: bool = False, max_batches=None):
    """Run ``model.predict(model(images), image_sizes)`` over a loader of :class:`Batch`.

    Yields ``(batch, detections)`` per batch, with ``batch`` on ``device`` and ``detections`` on
    the CPU. The model is put in eval mode and restored to its previous mode afterwards.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = model(batch.images)
            detections = model.predict(_outputs_to_float(outputs), batch.image_sizes)
            yield batch, [d.to("cpu") for d in detections]
    finally:
        model.train(was_training)


def predict_coco(
    model,
    loader,
    label_to_cat_id: Sequence[int],
    device=None,
    *,
    amp: bool = False,
    max_batches: int | None = None,
) -> tuple[dict[int, list[dict]], bool]:
    """Predict over ``loader`` and convert every image's detections to COCO result dicts.

    :func:`predict_loader` then :func:`detections_to_coco` (boxes and masks in the original
    image's pixels, label ``k`` reported as category ``label_to_cat_id[k]``). ``amp`` applies on
    CUDA only.

    Returns:
        ``(per_image, has_masks)``: ``per_image`` maps each image id the loader produced, in
        loader order, to its result dicts — an image the loader repeats (a
        ``DistributedSampler`` pads its share that way) keeps its first copy; ``has_masks`` is
        True when the model returned masks (even empty ones).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = amp and device.type == "cuda"
    per_image: dict[int, list[dict]] = {}  # image id -> its results, in loader order
    has_masks = False
    for batch, detections in predict_loader(
        model, loader, device, amp=amp, max_batches=max_batches
    ):
        has_masks = has_masks or any(d.masks is not None for d in detections)
        for det, target, size in zip(detections, batch.targets, batch.image_sizes):
            if int(target.image_id) not in per_image:
                per_image[int(target.image_id)] = detections_to_coco(
                    [det], [target], [size], label_to_cat_id
                )
    return per_image, has_masks


def merge_scales(
    results_per_scale: Sequence[Sequence[dict]],
    size_ranges: Sequence[tuple[float, float]],
    max_per_img: int = 100,
) -> list[dict]:
    """Merge predictions of the same images at several input sizes, each scale for its own sizes.

    A detector sees objects best at the sizes it trained on. Shown an image enlarged, it finds
    the small objects it missed but loses the large ones it found; shown it as drawn, the reverse.
    SNIP's test (Singh & Davis, *An Analysis of Scale Invariance in Object Detection — SNIP*,
    CVPR 2018, Sec. 5) keeps from each scale only the detections whose size falls in that scale's
    *valid range*, then merges them. Here a detection's size is the longest side of its box, in
    pixels of the original image, and scale ``k`` contributes the detections with
    ``size_ranges[k][0] <= size < size_ranges[k][1]``. The ranges should not overlap (no NMS
    runs across scales). Each image then keeps its ``max_per_img`` best-scored detections, as a
    model's ``test_cfg.max_per_img`` does.

    Args:
        results_per_scale: for each scale, COCO result dicts (``image_id``, ``bbox`` xywh in
            original pixels, ``score``, optionally ``segmentation``), e.g. from
            :func:`predict_coco` over one loader per input size.
        size_ranges: ``[(low, high)]`` per scale, in original pixels; ``high`` may be ``inf``.
        max_per_img: detections kept per image after the merge.

    Returns:
        The kept result dicts (the same objects), by image id in order of first appearance, best
        score first within an image.

    Raises:
        ValueError: the two sequences differ in length, or a range has ``low > high`` or
        ``low < 0``, or ``max_per_img < 1``.
    """
    if len(results_per_scale) != len(size_ranges):
        raise ValueError(f"merge_scales: {len(results_per_scale)} result lists but "
                         f"{len(size_ranges)} size_ranges")  # fmt: skip
    for low, high in size_ranges:
        if not 0 <= low <= high:
            raise ValueError(f"merge_scales: size range ({low}, {high}) needs 0 <= low <= high")
    if max_per_img < 1:
        raise ValueError(f"merge_scales: max_per_img={max_per_img} must be at least 1")
    per_image: dict[int, list[dict]] = {}
    for results, (low, high) in zip(results_per_scale, size_ranges):
        for r in results:
            if low <= max(r["bbox"][2], r["bbox"][3]) < high:
                per_image.setdefault(int(r["image_id"]), []).append(r)
    merged = []
    for kept in per_image.values():
        merged += sorted(kept, key=lambda r: -r["score"])[:max_per_img]
    return merged


def predict_at_sizes(
    model,
    datasets: Sequence,
    size_cuts: Sequence[float],
    label_to_cat_id: Sequence[int],
    device=None,
    *,
    batch_size: int = 8,
    workers: int = 0,
    max_per_img: int = 100,
) -> tuple[list[dict], list[int], list[list[dict]]]:
    """Predict the same images once per test size and keep each size for its own boxes.

    ``datasets[k]`` holds the validation images resized to the ``k``-th test size, the size for
    the smallest boxes first (a :class:`~instseg_edu.recipes.Recipe`'s ``test_sizes``). Size
    ``k`` keeps the detections whose box's longest side, in original pixels, lies between
    ``size_cuts[k - 1]`` and ``size_cuts[k]`` (``0`` and ``inf`` at the ends):
    :func:`merge_scales`, SNIP's valid ranges. One dataset and no cuts: its pass as it is.

    Args:
        model: a detector in any mode (prediction runs it in eval mode).
        datasets: the same images, one dataset per test size.
        size_cuts: ``len(datasets) - 1`` increasing box sizes, pixels.
        label_to_cat_id: the model's category ids (label ``k`` -> ``label_to_cat_id[k]``).
        batch_size, workers: of each pass's loader.
        max_per_img: detections kept per image after the merge.

    Returns:
        ``(merged, image_ids, per_size)``: the merged COCO result dicts (boxes xywh and masks in
        original pixels), the image ids predicted, and each size's own results.

    Raises:
        ValueError: ``size_cuts`` is not ``len(datasets) - 1`` increasing positive sizes.
    """
    from instseg_edu.engine.train import make_loader

    cuts = [float(c) for c in size_cuts]
    if len(cuts) != len(datasets) - 1 or any(c <= 0 for c in cuts) or cuts != sorted(set(cuts)):
        raise ValueError(f"size_cuts={list(size_cuts)} must be {len(datasets) - 1} increasing "
                         f"positive sizes, one between each two of the {len(datasets)} "
                         "datasets")  # fmt: skip
    per_size = []
    for dataset in datasets:
        loader = make_loader(dataset, batch_size, shuffle=False, workers=workers)
        per_image, _ = predict_coco(model, loader, label_to_cat_id, device)
        per_size.append([r for results in per_image.values() for r in results])
    image_ids = list(per_image)
    if len(datasets) == 1:
        return per_size[0], image_ids, per_size
    bounds = [0.0, *cuts, float("inf")]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    return merge_scales(per_size, ranges, max_per_img), image_ids, per_size


def evaluate_model(
    model,
    loader,
    coco_gt,
    label_to_cat_id: Sequence[int],
    device=None,
    *,
    iou_types: Iterable[str] | None = None,
    backend: str = "pycocotools",
    amp: bool = False,
    max_batches: int | None = None,
    quiet: bool = True,
) -> dict[str, dict[str, float]]:
    """Predict over ``loader`` and score the detections with :func:`evaluate_coco`.

    ``label_to_cat_id`` is the *model's* category list (the training set's, or the one a
    checkpoint stores): label ``k`` is reported as category ``label_to_cat_id[k]``, and the
    ground truth's categories are matched to it by id. Ground truth of a category the model was
    never trained on raises :class:`~instseg_edu.data.annotations.DataError` (naming the ids)
    before anything is predicted.

    Only the images the loader produced are evaluated (``image_ids``), so a partial pass
    (``max_batches``) gives a fair number for those images. ``iou_types=None`` means ``bbox`` plus
    ``segm`` when the model returns masks. ``amp`` runs the forward pass under bf16 autocast on
    CUDA; decoding always runs in float32.

    Under a process group (``torchrun``) every process predicts on its loader's share (a
    ``DistributedSampler``, see :func:`~instseg_edu.engine.train.make_loader`); rank 0 gathers the
    results (``all_gather_object``), keeps one copy of each image (the sampler repeats a few to
    give every process as many), scores them once with pycocotools and sends the metrics to every
    process. The numbers are those of one process over the whole set (torchvision's detection
    references merge their evaluators the same way).
    """
    from instseg_edu.engine.distributed import all_gather_object, broadcast_object, get_rank

    dataset, file = _gt_dataset(coco_gt)
    source = file or "the ground truth"
    checked = check_coco(dataset, source)  # cheap, and fails before the prediction pass
    used = {a["category_id"] for a in checked.data["annotations"]}
    names = checked.categories
    match_categories(
        names, used, [{"id": c, "name": names.get(c, str(c))} for c in label_to_cat_id], source
    )
    per_image, has_masks = predict_coco(
        model, loader, label_to_cat_id, device, amp=amp, max_batches=max_batches
    )
    shares = all_gather_object((per_image, has_masks))  # [(dict, bool)] per process
    if get_rank() != 0:
        return broadcast_object(None)
    merged: dict[int, list[dict]] = {}
    for share, share_has_masks in shares:
        has_masks = has_masks or share_has_masks
        for image_id, image_results in share.items():
            merged.setdefault(image_id, image_results)  # the first copy of a repeated image
    if iou_types is None:
        iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    results = [r for image_results in merged.values() for r in image_results]
    metrics = evaluate_coco(
        coco_gt, results, iou_types, backend=backend, image_ids=list(merged), quiet=quiet
    )
    return broadcast_object(metrics)


def format_ap_table(metrics: dict[str, dict[str, float]], digits: int = 3) -> str:
    """A Markdown table: one row per metric, one column per IoU type; ``-1`` prints as ``n/a``."""
    iou_types = list(metrics)
    if not iou_types:
        return "(no metrics)"
    names = [n for n in METRIC_NAMES if any(n in metrics[t] for t in iou_types)]
    lines = [
        "| metric | " + " | ".join(iou_types) + " |",
        "|---|" + "---:|" * len(iou_types),
    ]
    for name in names:
        cells = []
        for t in iou_types:
            v = metrics[t].get(name)
            cells.append("n/a" if v is None or v < 0 else f"{v:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
