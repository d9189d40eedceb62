"""CocoDataset: the three mask encodings, crowds, empty images, label mapping, clear errors."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.shapes import make_shapes_dataset, render_image
from instseg_edu.data.transforms import collate, train_transforms

# A hand-made 3x4 mask and its column-major runs: column 0 is (0, 1, 1), columns 1 is empty,
# columns 2 and 3 are full -> 1 zero, 2 ones, 3 zeros, 6 ones.
MASK_3x4 = np.array([[0, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1]], dtype=bool)
COUNTS_3x4 = [1, 2, 3, 6]


def _write(tmp_path, data, images=None):
    """Write ``data`` as ann.json and a black PNG per ``images`` entry {file_name: (h, w)}."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for name, (h, w) in (images or {}).items():
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / name)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path, tmp_path / "img"


def _dataset(images, annotations, categories=None):
    return {
        "images": images,
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


def _image(image_id, h, w):
    return {"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w}


def _ann(ann_id, image_id, segmentation, bbox, category_id=3, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "bbox": bbox,
        "iscrowd": iscrowd,
        "area": 1.0,
    }


def test_polygon_and_both_rle_encodings_decode_to_the_same_hand_made_masks(tmp_path):
    compressed = mask_utils.encode(np.asfortranarray(MASK_3x4, dtype=np.uint8))
    data = _dataset(
        [_image(1, 12, 16), _image(2, 3, 4)],
        [
            # the rectangle (2, 2)-(10, 8): pycocotools fills columns 2..9 and rows 2..7
            _ann(10, 1, [[2, 2, 10, 2, 10, 8, 2, 8]], [2, 2, 8, 6], category_id=7),
            _ann(11, 2, {"size": [3, 4], "counts": COUNTS_3x4}, [0, 0, 4, 3]),
            _ann(
                12,
                2,
                {"size": [3, 4], "counts": compressed["counts"].decode()},
                [0, 0, 4, 3],
                category_id=7,
            ),
        ],
    )
    ds = CocoDataset(*_write(tmp_path, data, {"1.png": (12, 16), "2.png": (3, 4)}))
    assert len(ds) == 2
    image, target = ds[0]
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32
    expected = np.zeros((12, 16), dtype=bool)
    expected[2:8, 2:10] = True
    np.testing.assert_array_equal(target.masks[0].numpy(), expected)
    assert target.boxes.tolist() == [[2.0, 2.0, 10.0, 8.0]]
    assert target.labels.tolist() == [1]  # cat id 7 -> label 1
    assert target.image_id == 1 and target.orig_size == (12, 16)

    _, target = ds[1]
    assert target.masks.dtype == torch.bool
    np.testing.assert_array_equal(target.masks[0].numpy(), MASK_3x4)  # uncompressed RLE
    np.testing.assert_array_equal(target.masks[1].numpy(), MASK_3x4)  # compressed RLE
    assert target.labels.tolist() == [0, 1]


def test_labels_follow_sorted_category_ids(tmp_path):
    cats = [{"id": 90, "name": "z"}, {"id": 2, "name": "a"}, {"id": 15, "name": "m"}]
    image = {"id": 1, "file_name": "1.png", "height": 4.0, "width": 4}  # 4.0 is fine, 4.5 is not
    ds = CocoDataset(*_write(tmp_path, _dataset([image], [], cats), {"1.png": (4, 4)}))
    assert repr(ds).endswith("1 images, 0 annotations, 3 classes)")
    assert ds.label_to_cat_id == [2, 15, 90]
    assert ds.classes == ["a", "m", "z"]
    assert ds.cat_id_to_label == {2: 0, 15: 1, 90: 2}
    assert ds.coco.getCatIds() == [90, 2, 15]  # the pycocotools index of the same file


def test_crowd_becomes_an_ignore_box_and_empty_images_are_kept(tmp_path):
    data = _dataset(
        [_image(1, 3, 4), _image(2, 5, 6)],
        [
            _ann(1, 1, {"size": [3, 4], "counts": COUNTS_3x4}, [0, 0, 4, 3], iscrowd=1),
            _ann(2, 1, [[0, 0, 2, 0, 2, 2, 0, 2]], [0.5, 0.5, 1.5, 1.5]),
        ],
    )
    ds = CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4), "2.png": (5, 6)}))
    _, target = ds[0]
    assert target.ignore_boxes.tolist() == [[0.0, 0.0, 4.0, 3.0]]
    assert target.boxes.tolist() == [[0.5, 0.5, 2.0, 2.0]]
    image, empty = ds[1]
    assert image.shape == (3, 5, 6)
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    assert empty.masks.shape == (0, 5, 6) and empty.ignore_boxes.shape == (0, 4)


def test_degenerate_boxes_and_empty_masks_are_dropped_with_a_reason(tmp_path):
    data = _dataset(
        [_image(1, 3, 4)],
        [
            _ann(1, 1, {"size": [3, 4], "counts": COUNTS_3x4}, [0, 0, 0.5, 3]),  # 0.5 px wide
            _ann(2, 1, {"size": [3, 4], "counts": [12]}, [0, 0, 4, 3]),  # no pixel set
            _ann(3, 1, {"size": [3, 4], "counts": COUNTS_3x4}, [0, 0, 4, 3]),
        ],
    )
    # Both found when the dataset is built (the mask is rasterised then), in one warning.
    with pytest.warns(UserWarning) as record:
        ds = CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))
    assert [str(w.message) for w in record] == [
        f"{tmp_path / 'ann.json'}: dropped 2 annotation(s) (annotation 1: its box [0, 0, 0.5, 3] "
        "is under 1 px wide or high; annotation 2: its mask covers no pixel)"
    ]
    assert sorted(ds.dropped) == [1, 2] and ds.counts["dropped"] == 2
    assert "1 px" in ds.dropped[1] and "no pixel" in ds.dropped[2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # loading announces nothing more
        _, target = ds[0]
    assert len(target) == 1
    assert len(ds.dropped) == 2


def test_drops_are_announced_once_whatever_the_number_of_workers(tmp_path):
    """A mask covering no pixel used to be found, and announced, by each DataLoader worker."""
    data = _dataset(
        [_image(1, 3, 4), _image(2, 3, 4)],
        [
            _ann(1, 1, {"size": [3, 4], "counts": [12]}, [0, 0, 4, 3]),  # no pixel set
            _ann(2, 2, {"size": [3, 4], "counts": [12]}, [0, 0, 4, 3]),
            _ann(3, 2, {"size": [3, 4], "counts": COUNTS_3x4}, [0, 0, 4, 3]),
        ],
    )
    path, images = _write(tmp_path, data, {"1.png": (3, 4), "2.png": (3, 4)})
    with pytest.warns(UserWarning, match=r"dropped 2 annotation\(s\)") as record:
        ds = CocoDataset(path, images)
    assert len(record) == 1
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=list,
                                         multiprocessing_context="fork")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert [len(t) for ((_, t),) in loader] == [0, 1]


def test_shapes_dataset_loads_with_the_masks_it_painted(tmp_path):
    ann_file = make_shapes_dataset(tmp_path, 3, image_size=64, seed=4)
    ds = CocoDataset(ann_file, tmp_path / "train")
    for index in range(3):
        image, target = ds[index]
        scene, _ = render_image(4, "train", index, 64)
        np.testing.assert_array_equal(
            (image.permute(1, 2, 0) * 255).round().byte().numpy(), scene.image
        )
        np.testing.assert_array_equal(target.masks.numpy(), scene.masks)
        for box, mask in zip(target.boxes, target.masks):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert box.tolist() == [float(v) for v in tight]


def test_dataloader_with_transforms_and_collate(tmp_path):
    ann_file = make_shapes_dataset(tmp_path, 4, image_size=64, seed=1)
    ds = CocoDataset(ann_file, tmp_path / "train", transforms=train_transforms(48))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch.images.shape == (2, 3, 64, 64)
        assert batch.image_sizes == [(48, 48), (48, 48)]
        for target in batch.targets:
            assert target.masks.shape[1:] == (64, 64) and target.orig_size == (64, 64)
            assert len(target.boxes) == len(target.labels) == len(target.masks)


# -- malformed input: each error names the file and the problem --------------------------------


def _good():
    return _dataset(
        [_image(1, 3, 4)], [_ann(1, 1, {"size": [3, 4], "counts": COUNTS_3x4}, [0, 0, 4, 3])]
    )


def test_broken_json(tmp_path):
    path, images = _write(tmp_path, '{"images": [', {"1.png": (3, 4)})
    with pytest.raises(ValueError, match=r"ann\.json: not valid JSON"):
        CocoDataset(path, images)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json: annotation file not found"):
        CocoDataset(tmp_path / "nope.json", tmp_path)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    data = _good()
    del data[key]
    with pytest.raises(ValueError, match=rf"ann\.json: missing top-level key '{key}'"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))


@pytest.mark.parametrize("key", ["category_id", "bbox", "image_id"])  # no segmentation: box-only
def test_annotation_missing_a_key(tmp_path, key):
    data = _good()
    del data["annotations"][0][key]
    with pytest.raises(ValueError, match=rf"ann\.json: annotation 1 is missing the key '{key}'"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))


def test_image_missing_a_key_or_with_a_bad_size(tmp_path):
    data = _good()
    del data["images"][0]["height"]
    with pytest.raises(ValueError, match=r"ann\.json: image 1 is missing the key 'height'"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))
    data["images"][0]["height"] = 4.5
    with pytest.raises(ValueError, match=r"image 1 has width=4 height=4.5; both must be positive"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))


def test_unknown_category_id(tmp_path):
    data = _good()
    data["annotations"][0]["category_id"] = 5
    with pytest.raises(ValueError, match=r"ann\.json: annotation 1: unknown category id 5"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))


def test_unknown_image_id(tmp_path):
    data = _good()
    data["annotations"][0]["image_id"] = 9
    with pytest.raises(ValueError, match=r"ann\.json: annotation 1: image_id 9 is not in"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))


def test_missing_image_file(tmp_path):
    path, images = _write(tmp_path, _good(), {})
    with pytest.raises(
        FileNotFoundError, match=r"ann\.json: 1 image file\(s\) missing: image 1 \(.*1\.png\)$"
    ):
        CocoDataset(path, images)  # fmt: skip
    ds = CocoDataset(path, images, check_files=False)  # or found out when loading
    with pytest.raises(FileNotFoundError, match=r"ann\.json: image 1: file .*1\.png not found"):
        ds[0]


def test_rle_size_differs_from_the_image_in_the_json(tmp_path):
    data = _good()
    data["images"][0].update(height=4, width=3)
    with pytest.raises(ValueError, match=r"annotation 1: mask/image size mismatch.*\[3, 4\]"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (4, 3)}))


def test_image_file_size_differs_from_the_json(tmp_path):
    ds = CocoDataset(*_write(tmp_path, _good(), {"1.png": (5, 4)}))
    with pytest.raises(ValueError, match=r"ann\.json: image 1: size mismatch.*1\.png is 4x5"):
        ds[0]


def test_bad_segmentations_and_boxes(tmp_path):
    data = _good()
    data["annotations"][0]["segmentation"] = [5]
    with pytest.raises(ValueError, match=r"annotation 1: segmentation\[0\] must be a flat list"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))
    data["annotations"][0]["segmentation"] = {"size": [3, 4], "counts": [1, 2]}
    with pytest.raises(ValueError, match="annotation 1: uncompressed RLE counts sum to 3"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))
    data["annotations"][0]["segmentation"] = {"counts": "abc"}
    with pytest.raises(ValueError, match="annotation 1: segmentation must be"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))
    data["annotations"][0]["bbox"] = [0, 0, "4", 3]
    with pytest.raises(ValueError, match=r"annotation 1: bbox must be \[x, y, w, h\]"):
        CocoDataset(*_write(tmp_path, data, {"1.png": (3, 4)}))
