"""COCO evaluation on hand-built ground truth with hand-reasoned AP values."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from instseg_edu.engine.evaluate import (
    METRIC_NAMES,
    coco_to_batch_detections,
    coco_to_detections,
    detections_to_coco,
    evaluate_coco,
    format_ap_table,
    merge_scales,
)
from instseg_edu.structures import Detections, Target

H = W = 200


def _rect_mask(x, y, w, h):
    m = np.zeros((H, W), dtype=np.uint8)
    m[y : y + h, x : x + w] = 1
    return m


def _rle(m):
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _gt(objects):
    """objects: list of (image_id, category_id, x, y, w, h) axis-aligned rectangles."""
    anns = []
    for i, (img, cat, x, y, w, h) in enumerate(objects):
        anns.append({
            "id": i + 1, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
            "area": w * h, "iscrowd": 0, "segmentation": _rle(_rect_mask(x, y, w, h)),
        })  # fmt: skip
    return {
        "images": [{"id": i, "width": W, "height": H, "file_name": f"{i}.png"} for i in (1, 2)],
        "annotations": anns,
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
    }


# small (20x20=400 < 32^2), medium (50x50), large (120x120 > 96^2): every area range has an object.
OBJECTS = [(1, 3, 10, 10, 20, 20), (1, 7, 60, 60, 50, 50), (2, 3, 40, 40, 120, 120)]


def _result(img, cat, x, y, w, h, score=1.0, with_mask=True):
    r = {"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "score": score}
    if with_mask:
        r["segmentation"] = _rle(_rect_mask(x, y, w, h))
    return r


def test_perfect_predictions_score_one():
    gt = _gt(OBJECTS)
    results = [_result(*o) for o in OBJECTS]
    metrics = evaluate_coco(gt, results)
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert list(metrics[iou_type]) == list(METRIC_NAMES)
        for name in METRIC_NAMES:
            if name == "AR1":  # image 1 has two objects: one detection per image finds 2 of 3
                continue
            assert metrics[iou_type][name] == pytest.approx(1.0), (iou_type, name)


def test_no_predictions_give_zeros_without_crashing(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_gt(OBJECTS)))
    metrics = evaluate_coco(path, [])
    for iou_type in ("bbox", "segm"):
        assert all(v == 0.0 for v in metrics[iou_type].values()), metrics[iou_type]


def test_area_range_without_ground_truth_is_minus_one():
    # Only a small object: APm/APl have nothing to measure (pycocotools' -1).
    gt = _gt([OBJECTS[0]])
    m = evaluate_coco(gt, [_result(*OBJECTS[0])], iou_types=("bbox",))["bbox"]
    assert m["AP"] == pytest.approx(1.0)
    assert m["APm"] == -1.0 and m["APl"] == -1.0
    assert "n/a" in format_ap_table({"bbox": m})


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_shifted_prediction(iou_type):
    # A 100x100 box shifted 20 px right: IoU = 80*100 / (2*100*100 - 80*100) = 2/3.
    # It matches at IoU thresholds 0.50, 0.55, 0.60, 0.65 (4 of 10) with precision 1 → AP = 0.4.
    gt = _gt([(1, 3, 50, 50, 100, 100)])
    metrics = evaluate_coco(gt, [_result(1, 3, 70, 50, 100, 100)], iou_types=(iou_type,))
    m = metrics[iou_type]
    assert m["AP"] == pytest.approx(0.4)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["AR100"] == pytest.approx(0.4)
    assert m["APl"] == pytest.approx(0.4)  # 100x100 = 10000 > 96^2: a large object


def test_half_recall_and_false_positive_goldens():
    gt = _gt([(1, 3, 10, 10, 40, 40), (2, 3, 100, 100, 40, 40)])
    # Finding one of two objects: precision 1 up to recall 0.5, so 51 of COCO's 101 recall
    # points (0, 0.01, ..., 0.50) have precision 1 → AP = 51/101.
    m = evaluate_coco(gt, [_result(1, 3, 10, 10, 40, 40)], iou_types=("bbox",))["bbox"]
    assert m["AP"] == pytest.approx(51 / 101)
    assert m["AR100"] == pytest.approx(0.5)
    # Both found, but a higher-scored false positive comes first: precision 1/2 then 2/3,
    # interpolated precision is 2/3 at every recall level → AP = 2/3.
    results = [
        _result(1, 3, 150, 150, 40, 40, score=0.9),
        _result(1, 3, 10, 10, 40, 40, score=0.8),
        _result(2, 3, 100, 100, 40, 40, score=0.7),
    ]
    m = evaluate_coco(gt, results, iou_types=("bbox",))["bbox"]
    assert m["AP"] == pytest.approx(2 / 3)


def test_results_are_not_modified_and_box_only_results_skip_segm():
    gt = _gt(OBJECTS)
    results = [_result(*o, with_mask=False) for o in OBJECTS]
    before = json.dumps(results)
    metrics = evaluate_coco(gt, results)
    assert json.dumps(results) == before  # loadRes adds keys; we hand it copies
    assert set(metrics) == {"bbox"}
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_image_ids_restrict_evaluation():
    gt = _gt(OBJECTS)
    results = [_result(*o) for o in OBJECTS if o[0] == 2]
    assert evaluate_coco(gt, results, ("bbox",))["bbox"]["AR100"] < 1.0
    only2 = evaluate_coco(gt, results, ("bbox",), image_ids=[2])["bbox"]
    assert only2["AP"] == pytest.approx(1.0)


def test_quiet_swallows_output(capsys):
    gt = _gt(OBJECTS)
    evaluate_coco(gt, [_result(*OBJECTS[0])], iou_types=("bbox",))
    assert capsys.readouterr().out == ""
    evaluate_coco(gt, [_result(*OBJECTS[0])], iou_types=("bbox",), quiet=False)
    assert "Average Precision" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco(_gt(OBJECTS), [], iou_types=("keypoints",))
    with pytest.raises(ValueError, match="backend"):
        evaluate_coco(_gt(OBJECTS), [], backend="nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_coco("/nonexistent/gt.json", [])


def test_faster_coco_eval_gives_the_same_numbers():
    pytest.importorskip("faster_coco_eval")
    gt = _gt(OBJECTS + [(2, 7, 150, 10, 30, 30)])
    rng = np.random.default_rng(0)
    results = []
    for img, cat, x, y, w, h in OBJECTS:
        for k in range(3):
            dx, dy = rng.integers(-8, 9, size=2)
            results.append(_result(img, cat, int(x + dx), int(y + dy), w, h, score=0.9 - 0.2 * k))
    results.append(_result(2, 7, 0, 0, 30, 30, score=0.95))
    ref = evaluate_coco(gt, results)
    fast = evaluate_coco(gt, results, backend="faster_coco_eval")
    for iou_type in ("bbox", "segm"):
        for name in METRIC_NAMES:
            assert fast[iou_type][name] == pytest.approx(ref[iou_type][name], abs=1e-6), name
    assert 0.1 < ref["bbox"]["AP"] < 0.95  # a non-trivial case


def _target(size, **kw):
    empty = torch.zeros(0, size, size, dtype=torch.bool)
    return Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), empty, **kw)


def test_detections_to_coco_scales_boxes_and_masks():
    # Network input 50x50 (padded to 64x64), original file 100x100: everything doubles.
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 10:20, 5:15] = True
    det = Detections(
        boxes=torch.tensor([[5.0, 10.0, 15.0, 20.0]]),
        scores=torch.tensor([0.75]),
        labels=torch.tensor([1]),
        masks=masks,
    )
    target = _target(64, image_id=42, orig_size=(100, 100))
    (r,) = detections_to_coco([det], [target], [(50, 50)], label_to_cat_id=[3, 7])
    assert r["image_id"] == 42 and r["category_id"] == 7 and r["score"] == pytest.approx(0.75)
    assert r["bbox"] == pytest.approx([10.0, 20.0, 20.0, 20.0])  # xywh in original pixels
    assert isinstance(r["segmentation"]["counts"], str)
    json.dumps(r)  # JSON-serialisable
    decoded = mask_util.decode(r["segmentation"])
    assert decoded.shape == (100, 100)
    expected = np.zeros((100, 100), dtype=np.uint8)
    expected[20:40, 10:30] = 1  # bilinear x2 then >= 0.5 reproduces the block exactly
    np.testing.assert_array_equal(decoded, expected)


def test_detections_to_coco_non_uniform_scale_and_no_masks():
    det = Detections(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.tensor([0.5]),
                     torch.tensor([0]))  # fmt: skip
    target = _target(1, image_id=1, orig_size=(300, 200))
    (r,) = detections_to_coco([det], [target], [(150, 50)], [5])
    # x scales by 200/50 = 4, y by 300/150 = 2: [40, 40, 120, 120] xyxy → xywh [40, 40, 80, 80]
    assert r["bbox"] == pytest.approx([40.0, 40.0, 80.0, 80.0])
    assert "segmentation" not in r
    empty = Detections.empty()
    assert detections_to_coco([empty], [target], [(150, 50)], [5]) == []
    with pytest.raises(ValueError, match="label_to_cat_id"):
        detections_to_coco([det], [target], [(150, 50)], [])


def test_round_trip_through_evaluation_is_perfect():
    # Predictions made at half resolution, mapped back by detections_to_coco, score AP 1.
    gt = _gt([(1, 3, 40, 40, 80, 60)])
    masks = torch.zeros(1, 100, 100, dtype=torch.bool)
    masks[0, 20:50, 20:60] = True
    det = Detections(torch.tensor([[20.0, 20.0, 60.0, 50.0]]), torch.tensor([0.9]),
                     torch.tensor([0]), masks)  # fmt: skip
    target = _target(100, image_id=1, orig_size=(H, W))
    results = detections_to_coco([det], [target], [(100, 100)], [3, 7])
    metrics = evaluate_coco(gt, results, image_ids=[1])
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


def test_format_ap_table():
    table = format_ap_table({"bbox": dict.fromkeys(METRIC_NAMES, 0.5), "segm": {"AP": 0.25}})
    lines = table.splitlines()
    assert lines[0] == "| metric | bbox | segm |"
    assert "| AP | 0.500 | 0.250 |" in lines
    assert "| AP50 | 0.500 | n/a |" in lines


class _Oracle(torch.nn.Module):
    """Predicts the loader's ground truth, remembered in order (the loader does not shuffle)."""

    def __init__(self, boxes_in_order):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.queue = list(boxes_in_order)
        self.modes = []

    def forward(self, images):
        self.modes.append(self.training)
        return images.mean(dim=(1, 2, 3))  # [B]

    def predict(self, outputs, image_sizes):
        dets = []
        for _ in image_sizes:
            box = self.queue.pop(0)
            dets.append(Detections(box[None], torch.ones(1), torch.zeros(1, dtype=torch.long)))
        return dets


def test_evaluate_model_maps_predictions_back_to_original_pixels():
    from _engine_toy import ToyDataset

    from instseg_edu.data.transforms import collate
    from instseg_edu.engine.evaluate import evaluate_model

    ds = ToyDataset(5, flip=False)
    items = [ds[i] for i in range(5)]
    # Pretend each 32 px image was resized from a 64x96 (h x w) file: the JSON is in file pixels.
    anns, images = [], []
    for k, (_, t) in enumerate(items):
        x1, y1, x2, y2 = (t.boxes[0] * torch.tensor([3.0, 2.0, 3.0, 2.0])).tolist()
        images.append({"id": t.image_id, "width": 96, "height": 64, "file_name": f"{k}.png"})
        w, h = x2 - x1, y2 - y1
        anns.append({"id": k + 1, "image_id": t.image_id, "category_id": 9, "iscrowd": 0,
                     "bbox": [x1, y1, w, h], "area": w * h})  # fmt: skip
    gt = {"images": images, "annotations": anns, "categories": [{"id": 9, "name": "box"}]}
    for _, t in items:
        t.orig_size = (64, 96)
    loader = torch.utils.data.DataLoader(items, batch_size=2, collate_fn=collate)
    model = _Oracle([t.boxes[0] for _, t in items]).train()
    metrics = evaluate_model(model, loader, gt, label_to_cat_id=[9], device="cpu")
    assert set(metrics) == {"bbox"}  # no masks predicted: no segm
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert model.modes == [False, False, False] and model.training  # eval inside, restored after
    # Only the images the loader produced are evaluated.
    model.queue = [t.boxes[0] for _, t in items[:2]]
    first = evaluate_model(model, loader, gt, [9], "cpu", max_batches=1)
    assert first["bbox"]["AP"] == pytest.approx(1.0)


def test_predict_coco_is_what_evaluate_model_and_match_model_score(monkeypatch):
    """One prediction pass for both: per image, the first copy of an image the loader repeats (as
    a DistributedSampler pads a share), in loader order; evaluate_model and predict_results (behind
    match_model) both take their results from it."""
    from _engine_toy import ToyDataset

    from instseg_edu.data.transforms import collate
    from instseg_edu.engine import analysis, evaluate
    from instseg_edu.engine.evaluate import predict_coco

    ds = ToyDataset(3, flip=False)
    items = [ds[i] for i in (0, 1, 2, 0)]  # image 0 again at the end
    loader = torch.utils.data.DataLoader(items, batch_size=2, collate_fn=collate)
    boxes = [t.boxes[0] for _, t in items]
    per_image, has_masks = predict_coco(_Oracle(boxes), loader, [9], "cpu")
    ids = [t.image_id for _, t in items[:3]]
    assert list(per_image) == ids and not has_masks
    expected = detections_to_coco(
        [Detections(boxes[0][None], torch.ones(1), torch.zeros(1, dtype=torch.long))],
        [items[0][1]],
        [(32, 32)],
        [9],
    )
    assert per_image[ids[0]] == expected  # the first copy

    calls = []
    real = evaluate.predict_coco

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "predict_coco", spy)
    monkeypatch.setattr(analysis, "predict_coco", spy)
    results, image_ids = analysis.predict_results(_Oracle(boxes), loader, [9], "cpu")
    assert image_ids == ids and results == [r for rs in per_image.values() for r in rs]
    gt = {
        "images": [{"id": i, "width": 32, "height": 32, "file_name": f"{i}.png"} for i in ids],
        "annotations": [],
        "categories": [{"id": 9, "name": "box"}],
    }
    evaluate.evaluate_model(_Oracle(boxes), loader, gt, [9], "cpu")
    assert len(calls) == 2


# ---- ground truth as people write it: cleaned by the training set's rules -------------------


def test_ground_truth_without_area_or_iscrowd_scores_instead_of_a_key_error():
    gt = _gt(OBJECTS)
    for ann in gt["annotations"]:
        del ann["area"], ann["iscrowd"]  # pycocotools' COCOeval would raise KeyError on these
    metrics = evaluate_coco(gt, [_result(*o) for o in OBJECTS])
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["APs"] == pytest.approx(1.0)  # areas computed, so sizes known


def test_box_only_ground_truth_counts_for_bbox_and_is_dont_care_for_segm():
    gt = _gt(OBJECTS)
    gt["annotations"][1]["segmentation"] = []  # the medium object has no mask
    results = [_result(*o) for o in OBJECTS]
    metrics = evaluate_coco(gt, results)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    # segm: the two objects with masks are found; the mask predicted on the box-only object is
    # neither a hit nor a false positive, and it is no missed object either.
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["APm"] == -1.0  # no medium object with a mask to score
    # Without that prediction: the same scores (nothing was missed).
    assert evaluate_coco(gt, results[:1] + results[2:])["segm"]["AP"] == pytest.approx(1.0)


def test_segm_is_skipped_with_a_warning_when_no_object_has_a_mask():
    gt = _gt(OBJECTS)
    for ann in gt["annotations"]:
        ann["segmentation"] = []
    with pytest.warns(UserWarning, match="no object has a mask .* 'segm' is not evaluated"):
        metrics = evaluate_coco(gt, [_result(*o) for o in OBJECTS])
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_ground_truth_the_loader_refuses_is_refused_naming_the_annotation(tmp_path):
    from instseg_edu.data.annotations import DataError

    gt = _gt(OBJECTS)
    gt["annotations"][2]["bbox"][3] = float("nan")
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))  # Python's json writes NaN, and reads it back
    with pytest.raises(DataError, match=r"gt\.json: annotation 3: bbox height is nan"):
        evaluate_coco(str(path), [])


def test_dropped_ground_truth_is_reported_once_and_left_out():
    gt = _gt(OBJECTS)
    gt["annotations"].append({"id": 9, "image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5],
                              "iscrowd": 0, "segmentation": [[1, 1, 4, 4]]})  # fmt: skip
    with pytest.warns(UserWarning, match=r"dropped 1 annotation\(s\) \(annotation 9: its "
                      r"segmentation has no valid polygon"):  # fmt: skip
        metrics = evaluate_coco(gt, [_result(*o) for o in OBJECTS])
    assert metrics["segm"]["AP"] == pytest.approx(1.0)  # nothing left to miss


def test_merge_scales_keeps_each_scale_for_its_own_sizes():
    # Scale "enlarged" places the small object right and the large one wrong; scale "as drawn"
    # the reverse. Each alone finds two of the three objects; each for its own sizes finds all.
    enlarged = [_result(1, 3, 10, 10, 20, 20, 0.9), _result(1, 7, 100, 0, 50, 50, 0.8),
                _result(2, 3, 0, 0, 120, 120, 0.7)]  # fmt: skip
    as_drawn = [_result(1, 3, 150, 150, 20, 20, 0.6), _result(1, 7, 60, 60, 50, 50, 0.5),
                _result(2, 3, 40, 40, 120, 120, 0.4)]  # fmt: skip
    ranges = [(0, 32), (32, float("inf"))]
    merged = merge_scales([enlarged, as_drawn], ranges)
    assert merged == [enlarged[0], as_drawn[1], as_drawn[2]]  # image 1 best first, then image 2
    assert evaluate_coco(_gt(OBJECTS), merged)["bbox"]["AP"] == pytest.approx(1.0)
    for alone in (enlarged, as_drawn):
        assert evaluate_coco(_gt(OBJECTS), alone)["bbox"]["AP"] < 0.7
    # the cut counts a box's longest side: 31.9 x 40 is 40 wide, so the second scale's
    low_but_long = _result(1, 3, 0, 0, 31.9, 40, 0.3, with_mask=False)
    assert merge_scales([[low_but_long], [low_but_long]], ranges) == [low_but_long]
    assert merge_scales([[low_but_long], []], ranges) == []
    # max_per_img keeps the best-scored of each image
    assert merge_scales([enlarged, as_drawn], ranges, max_per_img=1) == [enlarged[0], as_drawn[2]]


def test_merge_scales_refuses_mismatched_or_bad_ranges():
    with pytest.raises(ValueError, match="2 result lists but 1 size_ranges"):
        merge_scales([[], []], [(0, 32)])
    with pytest.raises(ValueError, match=r"size range \(40, 32\)"):
        merge_scales([[]], [(40, 32)])
    with pytest.raises(ValueError, match="max_per_img=0"):
        merge_scales([[]], [(0, 32)], max_per_img=0)


def test_predict_at_sizes_keeps_each_pass_for_its_own_boxes():
    """Two passes over the same two images: the first (the enlarged one, in a recipe) is kept for
    boxes under the cut, the second for the others; one pass is returned as it is."""
    from _engine_toy import ToyDataset

    from instseg_edu.engine.evaluate import predict_at_sizes

    items = [ToyDataset(2, flip=False)[i] for i in range(2)]
    small, large = torch.tensor([2.0, 2.0, 12.0, 12.0]), torch.tensor([0.0, 0.0, 30.0, 30.0])
    # pass 1 predicts [small, large] on images 0 and 1, pass 2 [small, large] again
    oracle = _Oracle([small, large, small + 1, large])
    merged, image_ids, per_size = predict_at_sizes(oracle, [items, items], [16], [9], "cpu",
                                                   batch_size=1)  # fmt: skip
    assert image_ids == [t.image_id for _, t in items]
    assert [len(p) for p in per_size] == [2, 2]
    # image 0: pass 1's small box (10 px < 16); image 1: pass 2's large one (30 px >= 16)
    assert merged == [per_size[0][0], per_size[1][1]]
    oracle.queue = [small, large]
    alone, _, (only,) = predict_at_sizes(oracle, [items], [], [9], "cpu")
    assert alone == only and len(alone) == 2
    for cuts in ([], [16, 8], [0]):
        with pytest.raises(ValueError, match=r"size_cuts=.* must be 1 increasing positive"):
            predict_at_sizes(oracle, [items, items], cuts, [9], "cpu")


def _no_objects(**fields):
    empty = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, 1).bool()
    return Target(*empty, **fields)


def test_coco_to_detections_inverts_detections_to_coco():
    masks = torch.zeros(2, 50, 40, dtype=torch.bool)
    masks[0, 10:30, 4:20] = True
    masks[1, 0:8, 30:40] = True
    det = Detections(
        boxes=torch.tensor([[4.0, 10.0, 20.0, 30.0], [30.0, 0.0, 40.0, 8.0]]),
        scores=torch.tensor([0.9, 0.4]),
        labels=torch.tensor([1, 0]),
        masks=masks,
    )
    same = _no_objects(image_id=5, orig_size=(50, 40))
    results = detections_to_coco([det], [same], [(50, 40)], [3, 7])
    back = coco_to_detections(results[::-1], same, (50, 40), [3, 7])  # any order: sorted again
    assert torch.equal(back.boxes, det.boxes) and torch.equal(back.labels, det.labels)
    assert torch.equal(back.scores, det.scores) and torch.equal(back.masks, det.masks)
    # A file twice the input's size: boxes scale back exactly, masks to the same pixels here
    # (edges on even pixels)
    twice = _no_objects(image_id=5, orig_size=(100, 80))
    results = detections_to_coco([det], [twice], [(50, 40)], [3, 7])
    assert results[0]["bbox"] == [8.0, 20.0, 32.0, 40.0]
    back = coco_to_detections(results, twice, (50, 40), [3, 7])
    assert torch.allclose(back.boxes, det.boxes) and torch.equal(back.masks, det.masks)
    no_masks = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    assert coco_to_detections(no_masks, twice, (50, 40), [3, 7]).masks is None
    assert len(coco_to_detections([], twice, (50, 40), [3, 7])) == 0
    with pytest.raises(ValueError, match="a result of image 5 given for image 6"):
        coco_to_detections(results, _no_objects(image_id=6), (50, 40), [3, 7])
    with pytest.raises(ValueError, match="category_id 7 is not in label_to_cat_id"):
        coco_to_detections(results, twice, (50, 40), [3, 9])
    # a batch: results of several images go each to its own; an image without any gets none
    other = _no_objects(image_id=6, orig_size=(50, 40))
    mixed = results + detections_to_coco([det], [other], [(50, 40)], [3, 7])[:1]
    per_image = coco_to_batch_detections(
        mixed[::-1], [other, twice, _no_objects(image_id=8)], [(50, 40)] * 3, [3, 7]
    )
    assert [len(d) for d in per_image] == [1, 2, 0]
    assert torch.equal(per_image[1].boxes, back.boxes)
