"""Your own COCO data, as people really have it: six cases that went wrong, and their neighbours.

Each case is a tiny synthetic file of the form annotation tools and exporters write, taken through
the dataset, COCO evaluation and the ``instseg-edu`` command as a new user would.

1. box-only files (``"segmentation": []``);
2. train and validation files that list different categories;
3. photos with an EXIF orientation;
4. polygons with fewer than 3 points, or ``[[]]``, next to valid ones;
5. errors found while loading an item (also in a DataLoader worker, also during evaluation);
6. a dataset in which nothing is trainable.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from instseg_edu.cli import _datasets, _evaluate_and_report, main
from instseg_edu.data.annotations import DataError
from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.transforms import collate, train_transforms
from instseg_edu.engine.evaluate import evaluate_coco, evaluate_model
from instseg_edu.engine.train import _default_evaluate_fn, make_loader
from instseg_edu.structures import Detections

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
SIZE = 64  # every image is SIZE x SIZE unless said otherwise

# Pillow's exif_transpose turns a stored image by these; the inverse stores a shown one.
_INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}  # fmt: skip


def _noise(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, (h, w, 3), dtype=np.uint8)


def write_coco(folder, name, images, annotations, categories=CATS, pixels=None):
    """``folder/name.json`` plus one PNG per image (noise, or ``pixels[id]`` as shown)."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for image in images:
        image_id, h, w = image["id"], image.get("h", SIZE), image.get("w", SIZE)
        file_name = image.get("file_name", f"{name}_{image_id}.png")
        shown = pixels[image_id] if pixels and image_id in pixels else _noise(image_id, h, w)
        orientation = image.get("exif")
        pil = Image.fromarray(shown)
        if orientation:  # store the pixels a camera would, with the tag that turns them back
            exif = Image.Exif()
            exif[0x0112] = orientation
            if orientation in _INVERSE:
                pil = pil.transpose(_INVERSE[orientation])
            pil.save(images_dir / file_name, exif=exif)
        else:
            pil.save(images_dir / file_name)
        json_hw = image.get("json_hw", (h, w))
        entries.append({"id": image_id, "file_name": file_name, "height": json_hw[0],
                        "width": json_hw[1]})  # fmt: skip
    ann_file = folder / f"{name}.json"
    ann_file.write_text(
        json.dumps({"images": entries, "annotations": annotations, "categories": categories})
    )
    return ann_file, images_dir


def box(ann_id, image_id, category_id, x, y, w, h, **fields):
    """A box-only annotation, as a detection-only exporter writes it."""
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h],
           "iscrowd": 0, "area": w * h, "segmentation": []}  # fmt: skip
    ann.update(fields)
    return ann


def rect(ann_id, image_id, category_id, x, y, w, h, **fields):
    """An object whose polygon is its box."""
    fields.setdefault("segmentation", [[x, y, x + w, y, x + w, y + h, x, y + h]])
    return box(ann_id, image_id, category_id, x, y, w, h, **fields)


class Oracle(torch.nn.Module):
    """A "model" whose detections are the ground truth of each image it is shown (found by the
    image's pixels): the perfect predictor, to check what evaluation makes of perfection."""

    def __init__(self, dataset):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.answers = [dataset[i] for i in range(len(dataset))]

    def forward(self, images):
        return images

    def predict(self, images, image_sizes):
        out = []
        for image, (h, w) in zip(images, image_sizes):
            _, t = next(a for a in self.answers if torch.equal(a[0], image[:, :h, :w]))
            masks = t.masks[:, :h, :w].clone()
            for k in torch.nonzero(~t.has_mask).flatten().tolist():  # box-only: a box-shaped mask
                x1, y1, x2, y2 = t.boxes[k].round().int().tolist()
                masks[k, y1:y2, x1:x2] = True
            out.append(Detections(t.boxes.clone(), torch.ones(len(t)), t.labels.clone(), masks))
        return out


def _train_args(ann_file, images_dir, out, *extra):
    return ["train", "--train-json", str(ann_file), "--train-images", str(images_dir),
            "--image-size", str(SIZE), "--batch-size", "2", "--device", "cpu", "--workers", "0",
            "--warmup-steps", "1", "--out", str(out), "--no-progress", *extra]  # fmt: skip


def _one_line_error(capsys, command, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"instseg-edu {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


# -- 1. box-only files ----------------------------------------------------------------------------


def _box_only_file(folder, segmentation_form=lambda ann: ann):
    anns = [box(1, 1, 1, 8, 8, 24, 20), box(2, 1, 2, 30, 30, 20, 26),
            box(3, 2, 3, 4, 10, 40, 30), box(4, 2, 1, 40, 2, 16, 16)]  # fmt: skip
    return write_coco(folder, "boxes", [{"id": 1}, {"id": 2}],
                      [segmentation_form(a) for a in anns])  # fmt: skip


@pytest.mark.parametrize(
    "form",
    [lambda a: a, lambda a: {k: v for k, v in a.items() if k != "segmentation"},
     lambda a: {**a, "segmentation": None}],
    ids=["empty list", "no key", "null"],
)  # fmt: skip
def test_case1_box_only_annotations_keep_their_boxes(tmp_path, form):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped, so nothing to warn about
        ds = CocoDataset(*_box_only_file(tmp_path, form))
    _, target = ds[0]
    assert target.boxes.tolist() == [[8.0, 8.0, 32.0, 28.0], [30.0, 30.0, 50.0, 56.0]]
    assert target.labels.tolist() == [0, 1]
    assert target.has_mask.tolist() == [False, False] and not target.masks.any()
    assert ds.counts == {"mask": 0, "box_only": 4, "crowd": 0, "dropped": 0}
    assert ds.dropped == {}


def test_case1_box_only_objects_survive_resize_flip_and_collate(tmp_path):
    ann_file, images = _box_only_file(tmp_path)
    ds = CocoDataset(ann_file, images, train_transforms(32, flip_prob=1.0, jitter=False))
    batch = collate([ds[0], ds[1]])
    target = batch.targets[0]
    assert target.boxes.tolist() == [[16.0, 4.0, 28.0, 14.0], [7.0, 15.0, 17.0, 28.0]]
    assert target.has_mask.tolist() == [False, False] and target.masks.shape == (2, 32, 32)
    assert [len(t) for t in batch.targets] == [2, 2]


def test_case1_retinanet_trains_on_a_box_only_file_with_positives(tmp_path, capsys):
    ann_file, images = _box_only_file(tmp_path)
    out = tmp_path / "run"
    assert main(_train_args(ann_file, images, out, "--steps", "2",
                            "--preset", "RETINANET_R18_SMALL")) == 0  # fmt: skip
    history = json.loads((out / "history.json").read_text())
    assert [s["num_pos"] > 0 for s in history["steps"]] == [True, True]
    assert all(s["loss_bbox"] > 0 for s in history["steps"])


@pytest.mark.parametrize("model", ["mask_rcnn", "solo", "yolact"])
def test_case1_a_mask_model_refuses_a_file_without_any_mask_in_one_line(tmp_path, capsys, model):
    ann_file, images = _box_only_file(tmp_path)
    assert main(_train_args(ann_file, images, tmp_path / "run", "--model", model)) == 2
    _one_line_error(capsys, "train", "boxes.json: no annotation has a mask (4 box-only objects",
                    "train a box model (retinanet)")  # fmt: skip


def test_case1_a_mask_model_on_a_mixed_file_says_once_what_it_skips(tmp_path, capsys):
    anns = [rect(1, 1, 1, 8, 8, 24, 20), box(2, 1, 2, 30, 30, 20, 26),
            rect(3, 2, 3, 4, 10, 40, 30)]  # fmt: skip
    ann_file, images = write_coco(tmp_path, "mixed", [{"id": 1}, {"id": 2}], anns)
    assert main(_train_args(ann_file, images, tmp_path / "run", "--model", "solo", "--steps",
                            "1", "--preset", "SOLO_R18_SMALL")) == 0  # fmt: skip
    out = capsys.readouterr().out
    # SOLO has no box branch: the note says what it does instead (no "box term").
    note = (
        "note: " + str(ann_file) + ": 1 of 3 objects are box-only: SOLO has no box branch: each "
        "is placed on the category grid by its box (its centre and area stand in for the mask's) "
        "and its cells are trained on its class; its mask term is skipped (solo)"
    )
    assert out.count(note) == 1, out


# -- 2. train and validation files with different category lists ---------------------------------


def _category_files(tmp_path, val_categories):
    train = write_coco(tmp_path, "train", [{"id": 1}],
                       [rect(1, 1, 1, 4, 4, 20, 20), rect(2, 1, 2, 30, 30, 20, 20),
                        rect(3, 1, 3, 8, 36, 12, 20)])  # fmt: skip
    used = {c["id"] for c in val_categories}
    objects = [rect(1, 7, 2, 6, 6, 30, 22), rect(2, 7, 3, 40, 10, 16, 40),
               rect(3, 8, 3, 2, 2, 20, 20), rect(4, 8, 2, 24, 24, 36, 30)]  # fmt: skip
    val = write_coco(tmp_path, "val", [{"id": 7}, {"id": 8}],
                     [a for a in objects if a["category_id"] in used], val_categories)  # fmt: skip
    return train, val


@pytest.mark.parametrize(
    "val_categories",
    [CATS[1:], [CATS[1]], [CATS[2], CATS[1]], CATS],
    ids=["dog+bird", "dog only", "bird+dog in another order", "same list"],
)
def test_case2_perfect_predictions_score_ap_one_whatever_the_val_files_category_list(
    tmp_path, capsys, val_categories
):
    (train_json, train_dir), (val_json, val_dir) = _category_files(tmp_path, val_categories)
    train_set, val_set = _datasets(train_json, train_dir, val_json, val_dir, SIZE)
    assert val_set.label_to_cat_id == [1, 2, 3] and val_set.classes == ["cat", "dog", "bird"]
    metrics = _evaluate_and_report(Oracle(val_set), val_set, "cpu", None, 2, 0)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    # The training loop's own evaluation reports labels with the training set's ids too.
    evaluate = _default_evaluate_fn(make_loader(val_set, 2, shuffle=False), "cpu",
                                    make_loader(train_set, 2))  # fmt: skip
    assert evaluate(Oracle(val_set))["bbox"]["AP"] == pytest.approx(1.0)


def test_case2_mapping_through_the_val_files_own_order_would_score_zero(tmp_path):
    """The control: labels read through the val file's own list point at the wrong categories."""
    (train_json, train_dir), (val_json, val_dir) = _category_files(tmp_path, CATS[1:])
    train_set, val_set = _datasets(train_json, train_dir, val_json, val_dir, SIZE)
    own = CocoDataset(val_json, val_dir)
    assert own.label_to_cat_id == [2, 3]
    loader = make_loader(val_set, 2, shuffle=False)
    with pytest.raises(ValueError, match="detection label 2 has no entry in label_to_cat_id "
                       r"\(length 2\): labels are indices into the category list the model was "
                       "trained with"):  # fmt: skip
        evaluate_model(Oracle(val_set), loader, own.coco, own.label_to_cat_id, "cpu")


def test_case2_a_val_file_with_categories_the_model_never_saw_is_refused_naming_the_ids(tmp_path):
    horse = {"id": 9, "name": "horse"}
    (train_json, train_dir), _ = _category_files(tmp_path, CATS)
    val_json, val_dir = write_coco(tmp_path, "val9", [{"id": 7}],
                                   [rect(1, 7, 2, 6, 6, 30, 22), rect(2, 7, 9, 40, 10, 16, 40)],
                                   [CATS[1], horse])  # fmt: skip
    with pytest.raises(
        Exception,
        match=r"val9\.json: has annotations of categories the model "
        r"was not trained on: ids 9 \('horse'\); the model knows ids \[1, 2, 3\]",
    ):
        _datasets(train_json, train_dir, val_json, val_dir, SIZE)
    train_set = CocoDataset(train_json, train_dir)
    val_set = CocoDataset(val_json, val_dir)  # its own list: evaluation refuses before predicting
    with pytest.raises(DataError, match=r"ids 9 \('horse'\)"):
        evaluate_model(Oracle(val_set), make_loader(val_set, 1, shuffle=False), val_set.coco,
                       train_set.label_to_cat_id, "cpu")  # fmt: skip


def test_case2_the_checkpoint_carries_the_category_list_to_evaluate(tmp_path, capsys):
    (train_json, train_dir), (val_json, val_dir) = _category_files(tmp_path, CATS[1:])
    out = tmp_path / "run"
    assert main(_train_args(train_json, train_dir, out, "--steps", "1", "--preset",
                            "RETINANET_R18_SMALL")) == 0  # fmt: skip
    meta = torch.load(out / "last.pt", weights_only=True)["meta"]
    assert meta["classes"] == ["cat", "dog", "bird"] and meta["label_to_cat_id"] == [1, 2, 3]
    capsys.readouterr()
    evaluate = ["evaluate", "--checkpoint", str(out / "last.pt"), "--val-images", str(val_dir),
                "--device", "cpu", "--workers", "0"]  # fmt: skip
    assert main([*evaluate, "--val-json", str(val_json)]) == 0
    horse = [{"id": 9, "name": "horse"}]
    horse_json, _ = write_coco(tmp_path, "horse", [{"id": 7}], [rect(1, 7, 9, 6, 6, 30, 22)], horse)
    capsys.readouterr()
    assert main([*evaluate, "--val-json", str(horse_json)]) == 2
    _one_line_error(capsys, "evaluate", "ids 9 ('horse')", "the model knows ids [1, 2, 3]")
    # predict reads images like the datasets do, and refuses a broken one in one line
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff broken")
    predict = ["predict", "--checkpoint", str(out / "last.pt"), "--device", "cpu", "--out",
               str(tmp_path / "pred")]  # fmt: skip
    assert main([*predict, str(tmp_path / "junk.jpg")]) == 2
    _one_line_error(capsys, "predict", "cannot read", "junk.jpg")


# -- 3. photos with an EXIF orientation -----------------------------------------------------------


def _bright_square_scene():
    """A dark 40 x 64 (h x w) image with a bright square at x 40..56, y 8..24."""
    shown = np.full((40, 64, 3), 20, dtype=np.uint8)
    shown[8:24, 40:56] = 250
    return shown


@pytest.mark.parametrize("orientation", range(1, 9))
def test_case3_boxes_drawn_on_the_image_as_shown_land_on_the_object(tmp_path, orientation):
    ann_file, images = write_coco(tmp_path, "photo", [{"id": 1, "h": 40, "w": 64,
                                                       "exif": orientation}],
                                  [rect(1, 1, 1, 40, 8, 16, 16)],
                                  pixels={1: _bright_square_scene()})  # fmt: skip
    image, target = CocoDataset(ann_file, images)[0]
    assert image.shape == (3, 40, 64)
    x1, y1, x2, y2 = target.boxes[0].int().tolist()
    inside = image[:, y1:y2, x1:x2]
    assert inside.mean() == pytest.approx(250 / 255)  # the object, not background
    assert target.masks[0].sum() == 16 * 16
    assert image.mean() < 60 / 255


def test_case3_annotations_made_on_the_unturned_pixels_are_refused_naming_exif(tmp_path):
    # The file is stored 64 wide x 40 high with orientation 6 (shown 40 x 64); the JSON says
    # 64 x 40: the tool that made it ignored the tag.
    ann_file, images = write_coco(tmp_path, "photo", [{"id": 3, "h": 64, "w": 40, "exif": 6,
                                                       "json_hw": (40, 64)}], [])  # fmt: skip
    ds = CocoDataset(ann_file, images)
    message = (
        r"photo\.json: image 3: size mismatch, the JSON says width=64 height=40 but .*photo_3\.png "
        r"is 40x64 once its EXIF orientation 6 is applied \(stored unturned it is 64x40, as the "
        r"JSON says"
    )
    with pytest.raises(DataError, match=message):
        ds[0]


# -- 4. polygons with fewer than 3 points, or [[]], next to valid ones ---------------------------


def _bad_polygon_file(folder):
    anns = [rect(1, 1, 1, 4, 4, 20, 20),
            rect(2, 1, 2, 30, 30, 20, 20, segmentation=[[]]),
            rect(3, 1, 3, 30, 2, 20, 20, segmentation=[[30, 2, 50, 22]]),  # 2 points
            rect(4, 2, 1, 10, 10, 30, 30,
                 segmentation=[[10, 10, 40, 10, 40, 40, 10, 40], [12, 12, 14, 14], []]),
            box(5, 2, 2, 44, 44, 16, 16)]  # fmt: skip
    return write_coco(folder, "polys", [{"id": 1}, {"id": 2}], anns)


def test_case4_segm_evaluation_of_a_file_with_bad_polygons_scores_instead_of_crashing(tmp_path):
    ann_file, images = _bad_polygon_file(tmp_path)
    with pytest.warns(UserWarning, match=r"polys\.json: dropped 2 annotation\(s\) \(annotation 2: "
                      r"its segmentation has no valid polygon .*annotation 3: "):  # fmt: skip
        val_set = CocoDataset(ann_file, images)
    assert val_set.counts == {"mask": 2, "box_only": 1, "crowd": 0, "dropped": 2}
    _, target = val_set[1]
    assert target.masks[0].sum() == 30 * 30  # the valid part of annotation 4
    # Without predictions: zeros (and -1 where no ground truth), no crash, nothing re-reported.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = evaluate_coco(val_set.coco, [], iou_types=("bbox", "segm"))
        metrics_from_path = evaluate_coco(ann_file, [], iou_types=("bbox", "segm"))
    assert metrics == metrics_from_path
    assert metrics["segm"]["AP"] == 0.0 and metrics["bbox"]["AR100"] == 0.0
    # Perfect predictions (through the same command-line helpers as `train --val-json`).
    metrics = _evaluate_and_report(Oracle(val_set), val_set, "cpu", None, 2, 0)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)  # the box-only object: a crowd region


# -- 5. errors found while loading an item --------------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "1"])
def test_case5_a_size_mismatch_found_while_loading_is_one_line_and_exit_2(tmp_path, capsys,
                                                                          workers):  # fmt: skip
    ann_file, images = write_coco(tmp_path, "sizes", [{"id": 1}, {"id": 5, "json_hw": (48, 64)}],
                                  [rect(1, 1, 1, 4, 4, 20, 20)])  # fmt: skip
    args = _train_args(ann_file, images, tmp_path / "run", "--steps", "2", "--preset",
                       "RETINANET_R18_SMALL")  # fmt: skip
    args[args.index("--workers") + 1] = workers
    assert main(args) == 2
    line = _one_line_error(capsys, "train", "sizes.json: image 5: size mismatch, the JSON says "
                           "width=64 height=48 but")  # fmt: skip
    assert line.endswith("sizes_5.png is 64x64")


def test_case5_a_truncated_file_and_debug(tmp_path, capsys):
    ann_file, images = write_coco(tmp_path, "cut", [{"id": 1}, {"id": 2}],
                                  [rect(1, 1, 1, 4, 4, 20, 20)])  # fmt: skip
    path = images / "cut_2.png"
    path.write_bytes(path.read_bytes()[:-300])
    args = _train_args(ann_file, images, tmp_path / "run", "--steps", "2", "--preset",
                       "RETINANET_R18_SMALL", "--workers", "1")  # fmt: skip
    assert main(args) == 2
    _one_line_error(capsys, "train", "cut.json: image 2: cannot read", "cut_2.png")
    with pytest.raises(DataError, match=r"cut\.json: image 2: cannot read"):
        main([*args, "--debug"])


def test_case5_an_error_during_evaluation_is_one_line_and_exit_2(tmp_path, capsys):
    ann_file, images = _box_only_file(tmp_path)
    val_json, _ = write_coco(tmp_path, "val", [{"id": 1}, {"id": 6}],
                             [box(1, 6, 1, 4, 4, 20, 20)])  # fmt: skip
    (images / "val_6.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "run"
    assert main(_train_args(ann_file, images, out, "--steps", "1", "--preset",
                            "RETINANET_R18_SMALL", "--val-json", str(val_json), "--val-images",
                            str(images), "--workers", "1")) == 2  # fmt: skip
    _one_line_error(capsys, "train", "val.json: image 6: cannot read", "val_6.png")
    assert (out / "last.pt").is_file()  # training itself finished and was saved


# -- 6. nothing trainable -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda i: box(i, 1, 1, 4 * i, 4, 10, 10, iscrowd=1), "(3 crowd regions (iscrowd=1)"),
        (lambda i: rect(i, 1, 1, 4 * i, 4, 10, 10, segmentation=[[]]), "3 annotations dropped"),
        (lambda i: box(i, 1, 1, 4 * i, 4, 0.5, 10), "3 annotations dropped"),
    ],
    ids=["all crowd", "all polygons invalid", "all boxes under 1 px"],
)
def test_case6_a_dataset_with_nothing_to_train_on_is_refused_before_training(
    tmp_path, capsys, make, fragment
):
    ann_file, images = write_coco(tmp_path, "none", [{"id": 1}, {"id": 2}],
                                  [make(i) for i in (1, 2, 3)])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_train_args(ann_file, images, tmp_path / "run", "--steps", "2")) == 2
    _one_line_error(capsys, "train", "none.json: nothing to train on: 2 images and no object",
                    fragment)  # fmt: skip
    assert not (tmp_path / "run" / "history.json").exists()
