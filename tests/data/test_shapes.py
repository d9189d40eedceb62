"""The procedural shapes dataset: determinism, occlusion, tight boxes, COCO round trip."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from instseg_edu.data.shapes import (
    CLASSES,
    MIN_VISIBLE_PIXELS,
    SHAPES_PER_IMAGE,
    Shape,
    make_shapes_dataset,
    make_shapes_splits,
    paint,
    render_image,
    shape_mask,
    split_name,
)


def _files(root, split="train"):
    """{relative name: bytes} of the JSON and every PNG of a split."""
    out = {f"{split}.json": (root / f"{split}.json").read_bytes()}
    for png in sorted((root / split).glob("*.png")):
        out[png.name] = png.read_bytes()
    return out


def _tight_xywh(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", 4, image_size=64, seed=3, workers=1)
    b = make_shapes_dataset(tmp_path / "b", 4, image_size=64, seed=3, workers=2)
    files_a, files_b = _files(a.parent), _files(b.parent)
    assert len(files_a) == 5
    assert files_a == files_b


def test_different_seed_or_split_differs(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", 3, image_size=64, seed=0)
    b = make_shapes_dataset(tmp_path / "b", 3, image_size=64, seed=1)
    c = make_shapes_dataset(tmp_path / "a", 3, image_size=64, seed=0, split="val")
    assert a.read_bytes() != b.read_bytes()
    for i in range(3):
        name = f"{i:06d}.png"
        assert (a.parent / "train" / name).read_bytes() != (b.parent / "train" / name).read_bytes()
        assert (a.parent / "train" / name).read_bytes() != (c.parent / "val" / name).read_bytes()


def test_boxes_are_tight_boxes_of_the_visible_masks(tmp_path):
    ann_file = make_shapes_dataset(tmp_path, 8, image_size=128, seed=5)
    data = json.loads(ann_file.read_text())
    assert len(data["annotations"]) > 20
    for ann in data["annotations"]:
        mask = mask_utils.decode(ann["segmentation"])  # [H, W] uint8
        assert mask.shape == (128, 128)
        assert ann["bbox"] == _tight_xywh(mask)
        assert ann["area"] == mask.sum() >= MIN_VISIBLE_PIXELS
        assert ann["iscrowd"] == 0


def test_coco_round_trip_equals_what_was_painted(tmp_path):
    ann_file = make_shapes_dataset(tmp_path, 5, image_size=96, seed=2)
    coco = COCO(str(ann_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        scene, shapes = render_image(2, "train", image_id - 1, 96)
        png = np.asarray(Image.open(tmp_path / "train" / info["file_name"]))
        np.testing.assert_array_equal(png, scene.image)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(scene.kept)
        for ann, mask, k in zip(anns, scene.masks, scene.kept):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["category_id"] == CLASSES.index(shapes[k].kind) + 1


def test_occluded_mask_excludes_the_overlap_and_hidden_objects_are_dropped():
    background = np.zeros((64, 80, 3), dtype=np.float32)
    # A square of diameter 40 has half side 20/sqrt(2) = 14.14: centred at x = 32 it covers the
    # pixel centres in [17.86, 46.14], i.e. columns 18..45 (and rows 18..45 for cy = 32).
    a = Shape("rectangle", cx=32.0, cy=32.0, size=40.0, color=(200, 0, 0))
    # The same square at x = 48 covers columns 34..61 and is painted over a.
    b = Shape("rectangle", cx=48.0, cy=32.0, size=40.0, color=(0, 200, 0))
    # A small disc completely under the big square d, and a 4-pixel disc: both must vanish.
    c = Shape("circle", cx=70.0, cy=10.0, size=6.0, color=(0, 0, 200))
    d = Shape("rectangle", cx=70.0, cy=10.0, size=20.0, color=(9, 9, 9))
    tiny = Shape("circle", cx=10.0, cy=10.0, size=3.0, color=(50, 50, 50))
    scene = paint(background, [a, b, c, d, tiny])

    assert scene.kept.tolist() == [0, 1, 3]
    mask_a, mask_b, _ = scene.masks
    assert _tight_xywh(mask_a) == [18, 18, 16, 28]  # columns 18..33: cut where b begins
    assert _tight_xywh(mask_b) == [34, 18, 28, 28]  # b is whole
    assert mask_a.sum() == 16 * 28
    assert not (mask_a & mask_b).any()
    assert (scene.image[mask_b] == (0, 200, 0)).all()
    assert (scene.image[mask_a] == (200, 0, 0)).all()
    # without b, a is whole again
    alone = paint(background, [a])
    assert _tight_xywh(alone.masks[0]) == [18, 18, 28, 28]


def test_shape_masks_hand_checked_points():
    xs = np.array([0.0, 9.0, 10.0, 16.0, 19.9, 20.1])
    zero = np.zeros_like(xs)
    circle = Shape("circle", 0.0, 0.0, size=40.0)
    assert shape_mask(circle, xs, zero).tolist() == [True] * 5 + [False]
    ring = Shape("ring", 0.0, 0.0, size=40.0, aspect=0.5)  # radii 10..20
    assert shape_mask(ring, xs, zero).tolist() == [False, False, True, True, True, False]
    # five-point star, outer radius 20, inner 8: a tip on the +u axis, inner corners at 36 deg.
    star = Shape("star", 0.0, 0.0, size=40.0, aspect=0.4)
    assert shape_mask(star, xs, zero).tolist() == [True] * 5 + [False]
    corner = 8.0 * np.array([math.cos(math.pi / 5), math.sin(math.pi / 5)])
    assert shape_mask(star, corner[0] * 0.95, corner[1] * 0.95)
    assert not shape_mask(star, corner[0] * 1.1, corner[1] * 1.1)
    cross = Shape("cross", 0.0, 0.0, size=40.0, aspect=0.25)  # arms 5 px half-wide
    assert shape_mask(cross, np.array([19.0, 4.9, 5.1]), np.array([4.9, 19.0, 5.1])).tolist() == [
        True,
        True,
        False,
    ]
    # triangle with a = 1 is equilateral: apex (20, 0), base at u = 20 cos(120 deg) = -10.
    tri = Shape("triangle", 0.0, 0.0, size=40.0, aspect=1.0)
    assert shape_mask(tri, np.array([19.5, -9.5, -10.5]), zero[:3]).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="kind"):
        shape_mask(Shape("hexagon", 0.0, 0.0, 10.0), xs, zero)


def test_six_or_more_classes_and_sizes_from_tiny_to_half_the_image():
    assert len(CLASSES) >= 6
    kinds, longest_sides = set(), []
    for i in range(30):
        scene, shapes = render_image(0, "train", i, 512)
        for k, mask in zip(scene.kept, scene.masks):
            kinds.add(shapes[k].kind)
            _, _, w, h = _tight_xywh(mask)
            longest_sides.append(max(w, h))
    assert kinds == set(CLASSES)
    assert min(longest_sides) < 16
    assert max(longest_sides) > 256
    assert sum(s < 16 for s in longest_sides) >= 5
    assert sum(s > 256 for s in longest_sides) >= 5


def test_reuses_an_up_to_date_dataset_and_redraws_a_stale_one(tmp_path):
    ann_file = make_shapes_dataset(tmp_path, 2, image_size=64)
    stamp = ann_file.stat().st_mtime_ns
    assert make_shapes_dataset(tmp_path, 2, image_size=64) == ann_file
    assert ann_file.stat().st_mtime_ns == stamp
    (tmp_path / "train" / "000001.png").unlink()  # missing image: redraw
    make_shapes_dataset(tmp_path, 2, image_size=64)
    assert (tmp_path / "train" / "000001.png").is_file()
    make_shapes_dataset(tmp_path, 3, image_size=64)  # new parameters: redraw
    data = json.loads(ann_file.read_text())
    assert len(data["images"]) == 3
    assert data["info"]["params"]["num_images"] == 3
    make_shapes_dataset(tmp_path, 1, image_size=64)  # fewer images: the extra files go
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000000.png"]


def test_splits_and_bad_arguments(tmp_path):
    paths = make_shapes_splits(tmp_path, 2, 1, image_size=64, seed=0)
    assert paths == {"train": tmp_path / "train.json", "val": tmp_path / "val.json"}
    assert len(json.loads(paths["val"].read_text())["images"]) == 1
    with pytest.raises(ValueError, match="num_images"):
        make_shapes_dataset(tmp_path, -1)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(tmp_path, 1, image_size=8)


def test_shapes_per_image_sets_how_many_are_painted_and_is_part_of_the_parameters(tmp_path):
    # The default draws exactly what the standard dataset always drew: a count in 3..10.
    counts = [len(render_image(0, "train", i, 64)[1]) for i in range(40)]
    assert min(counts) >= 3 and max(counts) <= 10 and len(set(counts)) > 3
    assert counts == [len(render_image(0, "train", i, 64, (3, 10))[1]) for i in range(40)]
    assert {len(render_image(0, "train", i, 64, (12, 12))[1]) for i in range(5)} == {12}

    standard = make_shapes_dataset(tmp_path / "a", 3, image_size=64)
    assert "shapes_per_image" not in json.loads(standard.read_text())["info"]["params"]
    dense = make_shapes_dataset(tmp_path / "b", 3, image_size=64, shapes_per_image=(12, 12))
    dense_json = json.loads(dense.read_text())
    assert dense_json["info"]["params"]["shapes_per_image"] == [12, 12]
    # Occlusion drops some, but far more objects stay than the standard images' at most 10.
    assert len(dense_json["annotations"]) > len(json.loads(standard.read_text())["annotations"])
    # Another range is another dataset: the same folder is redrawn, not reused.
    stamp = dense.stat().st_mtime_ns
    make_shapes_dataset(tmp_path / "b", 3, image_size=64, shapes_per_image=(3, 10))
    assert "shapes_per_image" not in json.loads(dense.read_text())["info"]["params"]
    assert dense.stat().st_mtime_ns != stamp
    # A denser split is written under its own name, next to the standard ones.
    assert split_name("train") == split_name("train", SHAPES_PER_IMAGE) == "train"
    assert split_name("train", (10, 20)) == "train-10-20-shapes"
    for bad in [(0, 3), (5, 4), (2.0, 4), (3,), "3-10"]:
        with pytest.raises(ValueError, match="shapes_per_image"):
            make_shapes_dataset(tmp_path / "c", 1, image_size=64, shapes_per_image=bad)
