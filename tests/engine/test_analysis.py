"""Error analysis read from COCOeval: hand-built golden cases for each outcome, and equality with
pycocotools (per-class AP at every threshold, area range and max_dets; COCOeval.ious; stats)."""

from __future__ import annotations

import contextlib
import html
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_edu.engine.analysis import (
    AREA_NAMES,
    BACKGROUND,
    COUNT_NAMES,
    DROPPED,
    DUPLICATE,
    FALSE_POSITIVE_KINDS,
    FOUND,
    GT_IGNORED,
    IGNORED,
    MISSED,
    POOR_LOCALISATION,
    TRUE_POSITIVE,
    WRONG_CLASS,
    best_f1_threshold,
    error_analysis,
    match_coco,
    match_model,
    per_class_ap,
    precision_recall,
    predict_results,
    rank_images,
    score_sweep,
)
from instseg_edu.engine.evaluate import evaluate_coco, evaluate_model
from instseg_edu.structures import Detections

H = W = 100
A, B = 1, 2  # category ids of the golden case ("a" -> label 0, "b" -> label 1)


def _rle(x, y, w, h, height=H, width=W):
    m = np.zeros((height, width), dtype=np.uint8)
    m[int(y) : int(y + h), int(x) : int(x + w)] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _gt(objects, images=(1,), size=(H, W)):
    """objects: (image_id, category_id, x, y, w, h[, iscrowd]) axis-aligned rectangles."""
    anns = []
    for n, (img, cat, x, y, w, h, *crowd) in enumerate(objects):
        anns.append({
            "id": 10 + n, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
            "area": w * h, "iscrowd": int(crowd[0]) if crowd else 0,
            "segmentation": _rle(x, y, w, h, *size),
        })  # fmt: skip
    return {
        "images": [
            {"id": i, "height": size[0], "width": size[1], "file_name": f"{i}.png"} for i in images
        ],  # fmt: skip
        "annotations": anns,
        "categories": [{"id": A, "name": "a"}, {"id": B, "name": "b"}],
    }


def _det(img, cat, x, y, w, h, score, size=(H, W)):
    return {"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "score": score,
            "segmentation": _rle(x, y, w, h, *size)}  # fmt: skip


# One image. Ground truth: a0 (class a) top left, b0 (class b) top right, a1 (class a) bottom left.
GOLDEN_GT = _gt([(1, A, 10, 10, 30, 30), (1, B, 60, 10, 30, 30), (1, A, 10, 60, 30, 30)])
GOLDEN_DT = [
    _det(1, A, 10, 10, 30, 30, 0.9),  # d0: exactly a0 -> true positive (IoU 1)
    _det(1, A, 12, 10, 30, 30, 0.8),  # d1: a0 shifted 2 px: IoU 840/960 = 0.875, a0 taken: dup
    _det(1, A, 60, 10, 30, 30, 0.7),  # d2: exactly b0 but labelled a -> wrong class
    _det(1, A, 10, 60, 12, 30, 0.6),  # d3: 12 of a1's 30 columns: IoU 360/900 = 0.4 -> poor loc
    _det(1, B, 80, 80, 15, 15, 0.5),  # d4: on nothing -> background
    _det(1, A, 60, 10, 15, 20, 0.4),  # d5: IoU 300/900 = 1/3 with b0 only -> background
]


def _rows_by_score(m):
    """Detection rows in the order of GOLDEN_DT (scores are distinct and decreasing)."""
    return np.argsort(-m.dt_score, kind="stable")


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_golden_outcomes_at_iou_050(iou_type):
    m = match_coco(GOLDEN_GT, GOLDEN_DT, iou_type)
    e = error_analysis(m, 0.5, score_thr=0.0)
    d = _rows_by_score(m)
    assert e.dt_outcome[d].tolist() == [
        TRUE_POSITIVE, DUPLICATE, WRONG_CLASS, POOR_LOCALISATION, BACKGROUND, BACKGROUND,
    ]  # fmt: skip
    gt_row = {int(g): r for r, g in enumerate(m.gt_id)}  # annotation id -> row
    a0, b0, a1 = gt_row[10], gt_row[11], gt_row[12]
    assert e.dt_gt[d].tolist() == [a0, a0, b0, a1, -1, b0]
    np.testing.assert_allclose(e.dt_iou[d], [1.0, 840 / 960, 1.0, 0.4, 0.0, 1 / 3])
    assert e.dt_suppressor[d].tolist() == [-1, d[0], -1, -1, -1, -1]  # d1 lost a0 to d0
    assert e.gt_outcome[[a0, b0, a1]].tolist() == [FOUND, MISSED, MISSED]
    assert e.gt_dt[[a0, b0, a1]].tolist() == [d[0], -1, -1]
    assert e.totals() == {"true positive": 1, "wrong class": 1, "duplicate": 1,
                          "poor localisation": 1, "background": 2, "missed": 2}  # fmt: skip
    assert e.totals(label=1) == {"true positive": 0, "wrong class": 0, "duplicate": 0,
                                 "poor localisation": 0, "background": 1, "missed": 1}  # fmt: skip
    # Rows a, b, background; columns a, b, missed. d2 (an "a" on b0) is the one confusion.
    assert e.confusion.tolist() == [[1, 0, 1], [1, 0, 1], [3, 1, 0]]
    assert e.num_gt.tolist() == [2, 1]


def test_golden_outcomes_move_with_iou_and_score_thresholds():
    m = match_coco(GOLDEN_GT, GOLDEN_DT, "bbox")
    d = _rows_by_score(m)
    # At 0.9 the 0.875 duplicate is no longer a good enough box for a0: poor localisation.
    e = error_analysis(m, 0.9, score_thr=0.0)
    assert e.dt_outcome[d].tolist() == [
        TRUE_POSITIVE, POOR_LOCALISATION, WRONG_CLASS, POOR_LOCALISATION, BACKGROUND, BACKGROUND,
    ]  # fmt: skip
    assert e.dt_suppressor[d[1]] == -1
    # Score >= 0.75 keeps d0 and d1: one hit, one duplicate, a1 and b0 missed.
    e = error_analysis(m, 0.5, score_thr=0.75)
    assert e.dt_outcome[d].tolist() == [TRUE_POSITIVE, DUPLICATE] + [DROPPED] * 4
    recall, precision = e.precision_recall_point()
    np.testing.assert_allclose(recall, [0.5, 0.0])  # a: 1 of 2 found; b: 0 of 1
    np.testing.assert_allclose(precision, [0.5, np.nan])  # a: 1 of 2 kept is a hit; b: none kept
    # max_dets=1 keeps only the best detection of each class in the image.
    e = error_analysis(m, 0.5, max_dets=1, score_thr=0.0)
    assert e.dt_outcome[d].tolist() == [TRUE_POSITIVE] + [DROPPED] * 3 + [BACKGROUND, DROPPED]


def test_golden_score_sweep():
    m = match_coco(GOLDEN_GT, GOLDEN_DT, "bbox")
    sweep = score_sweep(m, 0.5)
    # In score order: a hit, then a duplicate, a wrong class, a poor box, two on background; three
    # objects to find (a0, b0, a1).
    assert sweep.num_gt == 3
    np.testing.assert_allclose(sweep.score, np.sort(m.dt_score)[::-1])
    np.testing.assert_allclose(sweep.precision, [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    np.testing.assert_allclose(sweep.recall, [1 / 3] * 6)
    np.testing.assert_allclose(sweep.f1[0], 0.5)  # 2 * 1 * (1/3) / (1 + 1/3)
    thr, precision, recall, f1 = sweep.best_f1()
    assert thr == sweep.score[0] and (precision, recall, f1) == pytest.approx((1, 1 / 3, 0.5))
    assert sweep.at(sweep.score[1]) == pytest.approx((0.5, 1 / 3))
    precision, recall = sweep.at(2.0)  # above every score: nothing kept
    assert np.isnan(precision) and recall == 0
    empty = score_sweep(match_coco(GOLDEN_GT, [], "bbox"))
    assert len(empty.score) == 0 and empty.best_f1()[0] == float("inf")


def test_wrong_class_takes_precedence_over_poor_localisation():
    # d sits exactly on the b object and covers a third of the a object next to it.
    gt = _gt([(1, A, 10, 10, 30, 30), (1, B, 30, 10, 30, 30)])
    m = match_coco(gt, [_det(1, A, 30, 10, 30, 30, 0.9)], "bbox")
    e = error_analysis(m, 0.5)
    assert e.dt_outcome.tolist() == [WRONG_CLASS]
    assert m.dt_best_same_iou[0] == pytest.approx(300 / 1500)  # would be poor localisation
    assert m.gt_label[e.dt_gt[0]] == 1


def test_crowd_regions_and_area_ranges_are_ignored_as_coco_does():
    # a crowd region of class a; a small (10x10) and a large (100x100 > 96²) object of class b.
    gt = _gt([(1, A, 0, 0, 40, 40, 1), (1, B, 60, 60, 10, 10), (1, B, 0, 100, 100, 100)],
             size=(200, 200))  # fmt: skip
    dt = [
        _det(1, A, 5, 5, 20, 20, 0.9, size=(200, 200)),  # inside the crowd: matched, ignored
        _det(1, B, 60, 60, 10, 10, 0.8, size=(200, 200)),  # the small b: TP at "all"/"small"
        _det(1, B, 0, 100, 100, 100, 0.7, size=(200, 200)),  # the large b
    ]
    m = match_coco(gt, dt, "bbox")
    d = _rows_by_score(m)
    e = error_analysis(m, 0.5, "all")
    assert e.dt_outcome[d].tolist() == [IGNORED, TRUE_POSITIVE, TRUE_POSITIVE]
    assert e.gt_outcome[m.gt_crowd].tolist() == [GT_IGNORED]
    # "small": the large object is ignored ground truth, its detection is ignored too.
    e = error_analysis(m, 0.5, "small")
    assert e.dt_outcome[d].tolist() == [IGNORED, TRUE_POSITIVE, IGNORED]
    assert e.num_gt.tolist() == [0, 1]
    assert e.totals()["missed"] == 0
    # The explorer says which of COCO's two reasons applies.
    from instseg_edu.viz.evaluation import detection_text

    crowd, large = (html.unescape(detection_text(m, e, int(r))) for r in d[[0, 2]])
    assert crowd.endswith("COCO ignores it: it matched ground truth 10 (a, a crowd region)")
    assert large.endswith("COCO ignores it: it matched ground truth 12 (b), outside area 'small'")


def test_rank_images_by_errors():
    gt = _gt([(1, A, 10, 10, 30, 30), (2, A, 10, 10, 30, 30), (3, A, 10, 10, 30, 30)],
             images=(1, 2, 3))  # fmt: skip
    dt = [
        _det(1, A, 10, 10, 30, 30, 0.9),  # image 1: perfect
        _det(2, A, 60, 60, 20, 20, 0.9),  # image 2: one background FP and one miss
        _det(3, A, 10, 10, 30, 30, 0.9),  # image 3: a hit and one background FP
        _det(3, A, 60, 60, 20, 20, 0.8),
    ]
    e = error_analysis(match_coco(gt, dt, "bbox"), 0.5)
    assert rank_images(e).tolist() == [1, 2, 0]  # image 2 (2 errors), image 3 (1), image 1 (0)
    # By misses alone images 1 and 3 tie at 0: the one with more false positives (3) comes first.
    assert rank_images(e, columns=["missed"]).tolist() == [1, 2, 0]
    assert rank_images(e, columns=["true positive"]).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="column 'misses'"):
        rank_images(e, columns=["misses"])


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="result 0 has image_id 99"):
        match_coco(GOLDEN_GT, [_det(99, A, 0, 0, 5, 5, 0.5)])
    with pytest.raises(ValueError, match="result 1 .* category_id 5"):
        match_coco(GOLDEN_GT, [_det(1, A, 0, 0, 5, 5, 0.5), _det(1, 5, 0, 0, 5, 5, 0.5)])
    no_mask = {k: v for k, v in GOLDEN_DT[0].items() if k != "segmentation"}
    with pytest.raises(ValueError, match="result 0 .* no segmentation"):
        match_coco(GOLDEN_GT, [no_mask], "segm")
    with pytest.raises(ValueError, match="iou_type"):
        match_coco(GOLDEN_GT, GOLDEN_DT, "keypoints")
    m = match_coco(GOLDEN_GT, GOLDEN_DT)
    with pytest.raises(ValueError, match="iou_thr=0.61 must be one of COCO's thresholds 0.50, "):
        error_analysis(m, 0.61)
    assert error_analysis(m, 0.6).iou_thr == pytest.approx(0.6)  # a float near 0.60 is fine
    with pytest.raises(ValueError, match="area='tiny'"):
        precision_recall(m, 0.5, "tiny")
    with pytest.raises(ValueError, match="max_dets=0"):
        error_analysis(m, 0.5, max_dets=0)
    with pytest.raises(ValueError, match="image_id 5 is not among"):
        m.image_index(5)


def test_no_detections_and_images_without_anything():
    m = match_coco(_gt([(1, A, 10, 10, 30, 30)], images=(1, 2)), [])
    e = error_analysis(m, 0.5)
    assert len(m.dt_id) == 0 and e.totals()["missed"] == 1
    assert precision_recall(m, 0.5).ap.tolist() == [0.0, -1.0]  # a: missed; b: no ground truth
    assert rank_images(e).tolist() == [0, 1]
    assert m.image_overlaps(1).shape == (0, 0)


# ------------------------------------------------------------------------------------------------
# Equality with pycocotools on random inputs
# ------------------------------------------------------------------------------------------------

SIZE = 64


@st.composite
def scenes(draw):
    """Two or three images with random rectangles: ground truth (some crowd) and detections
    (some jittered copies of the ground truth, some anywhere; scores with ties)."""
    images = draw(st.sampled_from([(1, 2), (3, 1, 7)]))
    box = st.tuples(st.integers(0, SIZE - 4), st.integers(0, SIZE - 4), st.integers(2, 40),
                    st.integers(2, 40))  # fmt: skip
    objects, results = [], []
    for img in images:
        for x, y, w, h in draw(st.lists(box, max_size=5)):
            w, h = min(w, SIZE - x), min(h, SIZE - y)
            cat, crowd = draw(st.sampled_from([A, B])), draw(st.integers(0, 9)) == 0
            objects.append((img, cat, x, y, w, h, int(crowd)))
        for x, y, w, h in draw(st.lists(box, max_size=8)):
            mine = [o for o in objects if o[0] == img]
            if mine and draw(st.booleans()):  # near a ground truth object
                _, _, x, y, w, h, _ = draw(st.sampled_from(mine))
                dx, dy = draw(st.integers(-4, 4)), draw(st.integers(-4, 4))
                x, y = max(0, x + dx), max(0, y + dy)
            w, h = max(1, min(w, SIZE - x)), max(1, min(h, SIZE - y))
            score = draw(st.sampled_from([0.9, 0.5, 0.5, 0.3, 0.123, 0.77]))
            results.append(_det(img, draw(st.sampled_from([A, B])), x, y, w, h, score,
                                size=(SIZE, SIZE)))  # fmt: skip
    return _gt(objects, images, size=(SIZE, SIZE)), results


def _cocoeval(gt, results, iou_type):
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iou_type)
        ev.evaluate()
        ev.accumulate()
    return ev


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@settings(max_examples=25, deadline=None)
@given(scene=scenes())
def test_per_class_ap_and_counts_equal_pycocotools(iou_type, scene):
    gt, results = scene
    if not results:  # loadRes cannot take an empty list; covered by the test above
        return
    m = match_coco(gt, results, iou_type)
    ev = _cocoeval(gt, results, iou_type)
    for t, thr in enumerate(m.iou_thrs):
        for a, area in enumerate(AREA_NAMES):
            for k, max_dets in enumerate(m.max_dets):
                pr = precision_recall(m, float(thr), area, max_dets)
                reference = ev.eval["precision"][t, :, :, a, k].T  # [C, R]
                np.testing.assert_array_equal(pr.precision, reference)
                e = error_analysis(m, float(thr), area, max_dets, score_thr=0.5)
                totals = e.totals()
                kept = int((e.dt_outcome <= BACKGROUND).sum())
                fps = sum(totals[COUNT_NAMES[o]] for o in FALSE_POSITIVE_KINDS)
                assert totals["true positive"] + fps == kept
                assert totals["true positive"] + totals["missed"] == e.num_gt.sum()
                assert (
                    e.confusion[:, :-1].sum(axis=0).tolist()
                    == np.bincount(m.dt_label[e.dt_outcome <= BACKGROUND], minlength=2).tolist()
                )
                dup = np.flatnonzero(e.dt_outcome == DUPLICATE)
                assert (m.dt_match[t, a, e.dt_suppressor[dup]] == e.dt_gt[dup]).all()
                assert (m.dt_score[e.dt_suppressor[dup]] >= m.dt_score[dup]).all()
    # The score sweep reads error_analysis's totals at every threshold (ties kept together).
    for area in AREA_NAMES:
        sweep = score_sweep(m, 0.5, area)
        assert (np.diff(sweep.score) < 0).all()
        for thr in [*sweep.score.tolist(), 0.4, 0.95]:
            totals = error_analysis(m, 0.5, area, score_thr=thr).totals()
            tp = totals["true positive"]
            kept = tp + sum(totals[COUNT_NAMES[o]] for o in FALSE_POSITIVE_KINDS)
            precision, recall = sweep.at(thr)
            assert recall == pytest.approx(tp / max(sweep.num_gt, 1))
            if kept:
                assert precision == pytest.approx(tp / kept)
            else:
                assert np.isnan(precision)
    # COCO's summary numbers, from the rebuilt curves and from the run itself.
    assert m.stats == evaluate_coco(gt, results, (iou_type,))[iou_type]
    valid = per_class_ap(m)[per_class_ap(m) > -1]
    assert (valid.mean() if len(valid) else -1.0) == pytest.approx(m.stats["AP"], abs=1e-12)
    assert precision_recall(m, 0.5).mean_ap == pytest.approx(m.stats["AP50"], abs=1e-12)
    assert precision_recall(m, 0.75).mean_ap == pytest.approx(m.stats["AP75"], abs=1e-12)
    # Same-class blocks of the all-pairs IoU are COCOeval's own IoU matrices.
    for (img, cat), ious in ev.ious.items():
        if len(ious) == 0:
            continue
        i, k = m.image_index(img), int(np.searchsorted(m.cat_ids, cat))
        dt_rows = np.flatnonzero((m.dt_image == i) & (m.dt_label == k))
        gt_rows = [int(np.flatnonzero(m.gt_id == g["id"])[0]) for g in ev._gts[img, cat]]
        block = m.image_overlaps(i)[
            np.ix_(dt_rows - m.dt_start[i], np.asarray(gt_rows, dtype=int) - m.gt_start[i])
        ]
        np.testing.assert_array_equal(block, np.asarray(ious).reshape(block.shape))  # fmt: skip


def test_shapes_dataset_with_simulated_detections(tmp_path):
    """A realistic set: shapes ground truth, detections made from it with jitter, swapped labels,
    duplicates and background boxes; AP from the tables equals COCO's for boxes and masks."""
    from instseg_edu.data.shapes import make_shapes_dataset

    ann = make_shapes_dataset(tmp_path, 6, image_size=96, seed=3)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    rng = np.random.default_rng(0)
    results = []
    cats = sorted(coco.getCatIds())
    for a in coco.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        mask = coco.annToMask(a)
        for _ in range(rng.integers(0, 3)):  # two copies of one object: a duplicate, often
            far = rng.random() < 0.3  # moved by about half its size: poorly localised
            reach = np.array([w, h]) // 2 if far else np.array([1, 1])
            shift = (rng.integers(-reach, reach + 1) if far else rng.integers(-1, 2, 2)).astype(int)
            moved = np.roll(mask, tuple(shift[::-1]), axis=(0, 1))
            rle = mask_util.encode(np.asfortranarray(moved))
            rle["counts"] = rle["counts"].decode("ascii")
            cat = a["category_id"] if rng.random() < 0.8 else int(rng.choice(cats))
            results.append({"image_id": a["image_id"], "category_id": cat, "score":
                            float(rng.random()), "bbox": [x + shift[0], y + shift[1], w, h],
                            "segmentation": rle})  # fmt: skip
    for iou_type in ("bbox", "segm"):
        m = match_coco(str(ann), results, iou_type)
        assert m.stats == evaluate_coco(str(ann), results, (iou_type,))[iou_type]
        assert 0.05 < m.stats["AP"] < 0.95  # a set with real errors in it
        ap = per_class_ap(m)
        assert ap[ap > -1].mean() == pytest.approx(m.stats["AP"], abs=1e-12)
        for area, name in (("small", "APs"), ("medium", "APm"), ("large", "APl")):
            ap = per_class_ap(m, area)
            expected = ap[ap > -1].mean() if (ap > -1).any() else -1.0
            assert expected == pytest.approx(m.stats[name], abs=1e-12)
        e = error_analysis(m, 0.5, score_thr=0.3)
        assert sum(e.totals(k)["missed"] for k in range(m.num_classes)) == e.totals()["missed"]
        for kind in ("wrong class", "duplicate", "poor localisation"):
            assert e.totals()[kind] > 0, (iou_type, e.totals())


class _FixedDetector(torch.nn.Module):
    """Predicts the same two boxes on every image (one near the shapes' centre, one corner)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images):
        return images.mean(dim=(1, 2, 3)) * self.scale  # [B]

    def predict(self, outputs, image_sizes):
        out = []
        for h, w in image_sizes:
            boxes = torch.tensor([[0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h], [0, 0, 0.1 * w, 0.1 * h]])
            out.append(Detections(boxes, torch.tensor([0.9, 0.4]), torch.tensor([0, 1])))
        return out


def test_match_model_equals_evaluate_model(tmp_path):
    from instseg_edu.data.coco import CocoDataset
    from instseg_edu.data.shapes import make_shapes_dataset
    from instseg_edu.data.transforms import eval_transforms
    from instseg_edu.engine.train import make_loader

    ann = make_shapes_dataset(tmp_path, 4, image_size=64, seed=1)
    dataset = CocoDataset(ann, tmp_path / "train", eval_transforms(32))
    loader = make_loader(dataset, 2, shuffle=False)
    model = _FixedDetector()
    matches = match_model(model, loader, dataset.coco, dataset.label_to_cat_id, "cpu")
    assert list(matches) == ["bbox"]
    expected = evaluate_model(model, loader, dataset.coco, dataset.label_to_cat_id, "cpu")
    assert matches["bbox"].stats == expected["bbox"]
    results, image_ids = predict_results(model, loader, dataset.label_to_cat_id, "cpu")
    assert image_ids == dataset.image_ids and len(results) == 2 * len(dataset)
    # Boxes are in the file's pixels (64), not the network input's (32).
    assert np.allclose(matches["bbox"].dt_box[matches["bbox"].dt_score > 0.5][0],
                       [12.8, 12.8, 51.2, 51.2], atol=1e-3)  # fmt: skip
    # The gallery's threshold: the sweep of the same matches, at its best F1 (or None).
    thr, sweep = best_f1_threshold(model, loader, dataset.coco, dataset.label_to_cat_id, "cpu")
    reference = score_sweep(matches["bbox"])
    np.testing.assert_array_equal(sweep.f1, reference.f1)
    best = reference.best_f1()
    assert thr == (best[0] if best[3] > 0 else None)
