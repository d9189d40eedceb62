"""InMemoryDataset: the same items as the dataset it wraps, stored compactly, with the wrapped
dataset's attributes read through and augmentation applied on every access."""

from __future__ import annotations

import pickle

import pytest
import torch

from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.memory import InMemoryDataset
from instseg_edu.data.shapes import make_shapes_splits
from instseg_edu.data.transforms import eval_transforms, train_transforms
from instseg_edu.engine.train import make_loader


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    splits = make_shapes_splits(root, 4, 2, image_size=72, seed=0)
    return CocoDataset(splits["train"], root / "train", eval_transforms(72))


def test_items_equal_the_wrapped_datasets(coco):
    memory = InMemoryDataset(coco)
    assert len(memory) == len(coco)
    for i in range(len(coco)):
        (image, target), (ref_image, ref_target) = memory[i], coco[i]
        assert image.dtype == torch.float32 and torch.equal(image, ref_image)
        assert torch.equal(target.masks, ref_target.masks) and target.masks.dtype == torch.bool
        assert torch.equal(target.boxes, ref_target.boxes)
        assert torch.equal(target.labels, ref_target.labels)
        assert target.image_id == ref_target.image_id
    # 8-bit images at their own size are stored as uint8, masks as bits (72 px -> 9 bytes a row)
    assert memory._images[0].dtype == torch.uint8
    assert memory._targets[0].masks.shape[-1] == 9


def test_float_images_that_are_not_8_bit_stay_exact(coco):
    class Scaled(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            image, target = coco[i]
            return image * 0.3, target

    memory = InMemoryDataset(Scaled())
    assert memory._images[0].dtype == torch.float32
    assert torch.equal(memory[0][0], coco[0][0] * 0.3)


def test_attributes_pass_through_and_it_pickles(coco):
    memory = InMemoryDataset(coco)
    for name in ("coco", "classes", "label_to_cat_id", "categories", "image_ids"):
        assert getattr(memory, name) == getattr(coco, name)
    assert memory.check_trainable(needs_masks=True) is None
    with pytest.raises(AttributeError):
        memory.no_such_attribute  # noqa: B018
    clone = pickle.loads(pickle.dumps(memory))  # what a DataLoader worker receives
    assert clone.classes == coco.classes and torch.equal(clone[1][0], memory[1][0])


def test_augmentation_runs_on_every_access(coco):
    memory = InMemoryDataset(coco, train_transforms(72, flip_prob=1.0, jitter=False))
    image, target = memory[0]
    ref_image, ref_target = coco[0]
    assert torch.equal(image, ref_image.flip(-1))
    assert torch.equal(target.masks, ref_target.masks.flip(-1))
    batch = next(iter(make_loader(memory, 2, shuffle=False)))
    assert batch.images.shape == (2, 3, 96, 96)  # padded to a multiple of 32
