"""The annotation rules: what is an object, a box-only object, a crowd region, dropped, refused."""

import copy
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from instseg_edu.data.annotations import (
    BOX_ONLY,
    CROWD,
    MASK,
    DataError,
    annotation_kind,
    categories_list,
    check_coco,
    decode_mask,
    evaluation_ground_truth,
    match_categories,
    report_dropped,
    segm_ground_truth,
)

SQUARE = [[2, 2, 8, 2, 8, 8, 2, 8]]  # pycocotools fills columns 2..7, rows 2..7: 36 pixels


def _data(*annotations, h=10, w=12):
    return {
        "images": [{"id": 1, "file_name": "1.png", "height": h, "width": w}],
        "annotations": list(annotations),
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _ann(ann_id, bbox=(2, 2, 6, 6), **fields):
    ann = {"id": ann_id, "image_id": 1, "category_id": 1, "bbox": list(bbox), "iscrowd": 0}
    ann.update(fields)
    return ann


def test_kinds_of_annotation():
    rle = mask_utils.encode(np.asfortranarray(np.ones((10, 12), dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode()
    checked = check_coco(
        _data(
            _ann(1, segmentation=SQUARE),
            _ann(2, segmentation=[]),  # box-only, as detectron2 and torchvision read it
            _ann(3),  # no segmentation key: box-only
            _ann(4, segmentation=None),  # null: box-only
            _ann(5, segmentation=rle, iscrowd=1),
            _ann(6, segmentation={"size": [10, 12], "counts": [120]}),  # RLE, no pixel yet known
            _ann(7, segmentation=SQUARE, iscrowd=True),  # JSON true is 1
        ),
        "f.json",
    )
    kinds = {a["id"]: annotation_kind(a) for a in checked.data["annotations"]}
    assert kinds == {1: MASK, 2: BOX_ONLY, 3: BOX_ONLY, 4: BOX_ONLY, 5: CROWD, 6: MASK, 7: CROWD}
    assert checked.counts() == {MASK: 2, BOX_ONLY: 3, CROWD: 2, "dropped": 0}
    assert all(a["segmentation"] == [] for a in checked.data["annotations"] if a["id"] in (2, 3, 4))


def test_invalid_polygons_are_removed_and_an_object_without_any_is_dropped():
    checked = check_coco(
        _data(
            _ann(1, segmentation=[[]]),
            _ann(2, segmentation=[[1, 1, 5, 5]]),  # a 2-point polygon has no area
            _ann(3, segmentation=[[1, 1, 5, 5, 3]]),  # half a point
            _ann(4, segmentation=[[1, 1, 5, 5], *SQUARE, []]),  # the valid part stays
        ),
        "f.json",
    )
    assert sorted(checked.dropped) == [1, 2, 3]
    assert "no valid polygon" in checked.dropped[1] and "[0]" in checked.dropped[1]
    assert "[4]" in checked.dropped[2] and "[5]" in checked.dropped[3]
    (kept,) = checked.data["annotations"]
    assert kept["id"] == 4 and kept["segmentation"] == SQUARE
    assert decode_mask(kept["segmentation"], 10, 12).sum() == 36


def test_a_crowd_region_without_a_usable_polygon_keeps_its_box():
    checked = check_coco(_data(_ann(1, segmentation=[[]], iscrowd=1)), "f.json")
    assert checked.dropped == {}
    gt = segm_ground_truth(evaluation_ground_truth(checked.data, "f.json")[0])
    assert gt["annotations"][0]["segmentation"] == [[2, 2, 8, 2, 8, 8, 2, 8]]


def test_boxes_are_clipped_and_boxes_outside_the_image_dropped():
    checked = check_coco(
        _data(
            _ann(1, bbox=(-3, 4, 10, 20), segmentation=SQUARE),  # overhangs left and bottom
            _ann(2, bbox=(30, 2, 5, 5)),  # right of the 12 px wide image
            _ann(3, bbox=(11.5, 2, 5, 5)),  # half a pixel left inside
            _ann(4, bbox=(0, 0, 0.5, 5)),  # under 1 px wide
            _ann(5, bbox=(0.25, 0.5, 3.5, 2), segmentation=SQUARE),  # inside: kept as written
        ),
        "f.json",
    )
    anns = {a["id"]: a for a in checked.data["annotations"]}
    assert anns[1]["bbox"] == [0.0, 4.0, 7.0, 6.0]
    assert anns[5]["bbox"] == [0.25, 0.5, 3.5, 2]
    assert "outside the 12x10 image" in checked.dropped[2]
    assert "outside" in checked.dropped[3] and "under 1 px" in checked.dropped[4]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bbox": [0, 0, float("nan"), 3]}, r"annotation 1: bbox width is nan; it must be finite"),
        ({"bbox": [float("inf"), 0, 3, 3]}, r"annotation 1: bbox x is inf"),
        ({"bbox": [0, 0, -3, 3]}, r"annotation 1: bbox \[0, 0, -3, 3\] has a negative width"),
        ({"bbox": [0, 0, True, 3]}, r"annotation 1: bbox must be \[x, y, w, h\]"),
        ({"bbox": [0, 0, 3]}, r"annotation 1: bbox must be \[x, y, w, h\]"),
        ({"area": float("nan")}, r"annotation 1: area must be a finite number >= 0, got nan"),
        ({"area": -4}, r"annotation 1: area must be a finite number >= 0, got -4"),
        ({"area": "36"}, r"annotation 1: area must be a finite number"),
        ({"iscrowd": 2}, r"annotation 1: iscrowd must be 0 or 1, got 2"),
        ({"segmentation": [[1, 1, 5, float("nan"), 3, 3]]},
         r"annotation 1: segmentation\[0\]\[3\] is nan; it must be finite"),
        ({"segmentation": [[1, 1, 5, "5", 3, 3]]},
         r"annotation 1: segmentation\[0\]\[3\] is '5', not a number"),
        ({"segmentation": [[1, 1, 5, None, 3, 3]]}, r"segmentation\[0\]\[3\] is None"),
        ({"segmentation": [[1, 1, 5, [5], 3, 3]]}, r"segmentation\[0\]\[3\] is \[5\]"),
        ({"segmentation": [[1, 1, 5, 5, 3, 1e9]]},
         r"annotation 1: segmentation\[0\] has the point \(3, 1e\+09\), far outside the 12x10"),
        ({"segmentation": {"size": [10.0, 12], "counts": [120]}},
         r"annotation 1: RLE size must be \[height, width\]"),
        ({"segmentation": {"size": [10, 12], "counts": [130, -10]}},
         r"annotation 1: uncompressed RLE counts must be integers >= 0"),
        ({"segmentation": {"size": [10, 12], "counts": 5}}, r"RLE counts must be a list"),
        ({"segmentation": "polygon"}, r"annotation 1: segmentation must be a list of polygons"),
        ({"id": 1.5}, r"annotation id 1.5 must be an integer"),
        ({"image_id": "1"}, r"annotation 1: image_id '1' is not in 'images'"),
        ({"category_id": 3}, r"annotation 1: unknown category id 3 \(known ids: \[1, 2\]\)"),
    ],
)  # fmt: skip
def test_every_number_is_checked_and_a_bad_one_names_the_annotation_and_field(change, message):
    ann = _ann(1, segmentation=SQUARE)
    ann.update(change)
    with pytest.raises(DataError, match=rf"^f\.json: .*{message}"):
        check_coco(_data(ann), "f.json")


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ({"width": float("nan")}, r"image 1 has width=nan height=10; both must be positive"),
        ({"width": 0}, r"image 1 has width=0"),
        ({"height": -10}, r"height=-10"),
        ({"height": "10"}, r"height='10'"),
        ({"id": "a"}, r"image id 'a' must be an integer"),
        ({"file_name": ""}, r"image 1: file_name must be a non-empty string"),
    ],
)
def test_image_fields_are_checked(image, message):
    data = _data()
    data["images"][0].update(image)
    with pytest.raises(DataError, match=message):
        check_coco(data, "f.json")


def test_duplicate_and_non_integer_ids_are_refused():
    with pytest.raises(DataError, match="annotation 1: annotation id appears twice"):
        check_coco(_data(_ann(1), _ann(1)), "f.json")
    data = _data()
    data["categories"].append({"id": 2, "name": "again"})
    with pytest.raises(DataError, match="category id 2 appears twice"):
        check_coco(data, "f.json")
    data["categories"] = [{"id": None, "name": "x"}]
    with pytest.raises(DataError, match="category id None must be an integer"):
        check_coco(data, "f.json")


def test_evaluation_ground_truth_fills_what_cocoeval_needs_and_applies_the_pixel_rule():
    data = _data(
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 6], "segmentation": SQUARE},
        _ann(2, bbox=(1, 1, 4, 3), segmentation=[]),
        _ann(3, segmentation=[[0, 0, 0.1, 0, 0.1, 0.1]]),  # valid polygon, no pixel inside
        _ann(4, segmentation=[[]]),
        _ann(5, segmentation=SQUARE, area=30.5),  # a given area is COCO's: kept
    )
    original = copy.deepcopy(data)
    gt, dropped = evaluation_ground_truth(data, "f.json")
    assert data == original  # not modified
    assert sorted(dropped) == [3, 4] and "no pixel" in dropped[3]
    anns = {a["id"]: a for a in gt["annotations"]}
    assert anns[1]["area"] == 36.0 and anns[1]["iscrowd"] == 0  # no area, no iscrowd in the file
    assert anns[2]["area"] == 12.0
    assert anns[5]["area"] == 30.5
    segm = segm_ground_truth(gt)
    box_only = next(a for a in segm["annotations"] if a["id"] == 2)
    assert box_only["iscrowd"] == 1 and box_only["segmentation"] == [[1, 1, 5, 1, 5, 4, 1, 4]]
    assert next(a for a in gt["annotations"] if a["id"] == 2)["iscrowd"] == 0  # bbox: an object


def _annotation_strategy():
    number = st.floats(-20, 40, allow_nan=False)  # within the margin of a 24x20 image
    polygon = st.lists(number, min_size=0, max_size=10)
    segmentation = st.one_of(st.just([]), st.none(), st.lists(polygon, min_size=1, max_size=3))
    bbox = st.tuples(number, number, st.floats(0, 20), st.floats(0, 20))
    return st.tuples(bbox, segmentation, st.sampled_from([0, 1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(_annotation_strategy(), max_size=6))
def test_the_rules_are_idempotent_and_what_they_keep_never_crashes_cocoeval(anns):
    """Cleaning cleaned data changes nothing, and pycocotools scores whatever survives."""
    from instseg_edu.engine.evaluate import evaluate_coco

    data = _data(*[_ann(i + 1, bbox=b, segmentation=s, iscrowd=c) for i, (b, s, c) in
                   enumerate(anns)], h=20, w=24)  # fmt: skip
    checked = check_coco(data, "f.json")
    again = check_coco(checked.data, "f.json")
    assert again.data == checked.data and again.dropped == {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = evaluate_coco(data, [], iou_types=("bbox", "segm"))
    for values in metrics.values():
        assert all(v in (-1.0, 0.0) for v in values.values())


def test_match_categories_by_id():
    model = categories_list([1, 2, 3], ["cat", "dog", "bird"])
    assert model[1] == {"id": 2, "name": "dog"}
    match_categories({2: "dog", 3: "bird"}, {2, 3}, model, "val.json")  # a subset: fine
    match_categories({2: "dog", 9: "horse"}, {2}, model, "val.json")  # listed, unused: fine
    with pytest.raises(
        DataError,
        match=r"val\.json: has annotations of categories the model was "
        r"not trained on: ids 9 \('horse'\); the model knows ids \[1, 2, 3\]",
    ):
        match_categories({2: "dog", 9: "horse"}, {2, 9}, model, "val.json")
    with pytest.warns(UserWarning, match=r"2: 'Dog' here, 'dog' in the model"):
        match_categories({2: "Dog"}, {2}, model, "val.json")


def test_drops_are_reported_once_with_their_ids(recwarn):
    report_dropped("r.json", {4: "a reason", 9: "another"})
    report_dropped("r.json", {4: "a reason"})  # already told
    report_dropped("r.json", {4: "a reason", 12: "late"})
    messages = [str(w.message) for w in recwarn.list]
    assert messages == [
        "r.json: dropped 2 annotation(s) (annotation 4: a reason; annotation 9: another)",
        "r.json: dropped 1 annotation(s) (annotation 12: late)",
    ]


def test_decode_mask_of_box_only_is_empty():
    assert decode_mask([], 3, 4).shape == (3, 4) and not decode_mask(None, 3, 4).any()
    assert math.isclose(decode_mask(SQUARE, 10, 12).mean(), 36 / 120)
