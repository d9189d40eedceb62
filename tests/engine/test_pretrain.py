"""Classification pretraining on object crops (instseg_edu.engine.pretrain)."""

import pytest
import torch

from instseg_edu.engine.pretrain import (
    CropClassifier,
    ObjectCrops,
    crop_accuracy,
    pretrain_backbone,
)
from instseg_edu.structures import Target


class _Images:
    """A dataset of given ``(image, Target)`` items, with class names."""

    def __init__(self, items, classes=("a", "b")):
        self.items, self.classes = items, classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def _target(boxes, labels, size):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    return Target(boxes, torch.tensor(labels, dtype=torch.int64), masks)


def _square_image(size=64, box=(16, 16, 32, 32), colour=(1.0, 1.0, 1.0)):
    image = torch.zeros(3, size, size)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = torch.tensor(colour)[:, None, None]
    return image


def test_a_crop_is_the_box_with_context_around_it():
    # A white 16 px square at x, y in [16, 32). context 1, margin 0: the crop is the box itself,
    # white (its outermost pixels sample the black outside too, bilinearly: 0.75 to 1).
    # context 2: a 32 px crop [8, 40), the square in its middle half.
    image = _square_image()
    data = _Images([(image, _target([16, 16, 32, 32], [1], 64))])
    tight = ObjectCrops(data, crop_size=16, context=1.0, margin=0.0)
    assert tight.crops.shape == (1, 3, 16, 16) and tight.labels.tolist() == [1]
    assert tight.crops.dtype == torch.uint8  # kept small: 0-255
    assert (tight.crops[0, :, 1:15, 1:15] == 255).all() and tight.crops.min() >= 0.75 * 255
    wide = ObjectCrops(data, crop_size=16, context=2.0, margin=0.0)
    crop = wide.crops[0]  # 2 input pixels per crop pixel
    assert (crop[:, 5:11, 5:11] == 255).all()
    assert (crop[:, :3] == 0).all() and (crop[:, :, 13:] == 0).all()
    # the margin widens every crop by the same pixels: 16 + 16 = 32 px across, as context 2
    torch.testing.assert_close(ObjectCrops(data, 16, 1.0, 16.0).crops, wide.crops)


def test_crops_of_every_object_with_their_labels_and_a_target_the_loop_takes():
    from instseg_edu.data.transforms import collate

    items = [
        (_square_image(), _target([[16, 16, 32, 32], [40, 8, 60, 20]], [0, 1], 64)),
        (torch.zeros(3, 64, 64), _target([], [], 64)),  # no object: nothing to cut
        (_square_image(box=(0, 0, 10, 10)), _target([0, 0, 10, 10], [1], 64)),  # at the border
    ]
    crops = ObjectCrops(_Images(items), crop_size=24)
    assert len(crops) == 3 and crops.labels.tolist() == [0, 1, 1]
    assert crops.crops.shape == (3, 3, 24, 24) and crops.classes == ("a", "b")
    image, target = crops[1]
    assert image.shape == (3, 24, 24) and target.labels.tolist() == [1]
    assert target.boxes.tolist() == [[0.0, 0.0, 24.0, 24.0]]
    batch = collate([crops[i] for i in range(3)], size_divisor=1)
    assert batch.images.shape == (3, 3, 24, 24)


def test_an_item_is_the_crop_or_its_mirror_image():
    image = torch.rand(3, 32, 32)
    crops = ObjectCrops(_Images([(image, _target([4, 4, 28, 20], [0], 32))]), crop_size=16)
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        item, _ = crops[0]
        crop = crops.crops[0].float() / 255
        if torch.equal(item, crop):
            seen.add("as cut")
        elif torch.equal(item, crop.flip(-1)):
            seen.add("mirrored")
        else:
            raise AssertionError("an item is neither the crop nor its mirror image")
    assert seen == {"as cut", "mirrored"}


def test_bad_settings_are_named():
    data = _Images([(_square_image(), _target([16, 16, 32, 32], [0], 64))])
    with pytest.raises(ValueError, match="crop_size=4 must be >= 8"):
        ObjectCrops(data, crop_size=4)
    with pytest.raises(ValueError, match="context=0.5 must be >= 1"):
        ObjectCrops(data, context=0.5)
    with pytest.raises(ValueError, match="no objects to crop"):
        ObjectCrops(_Images([(torch.zeros(3, 8, 8), _target([], [], 8))]))


def _retinanet():
    from instseg_edu.models import build_model
    from instseg_edu.models.retinanet import RETINANET_R18_CPU

    torch.manual_seed(0)
    return build_model("retinanet", RETINANET_R18_CPU.with_num_classes(2))


def test_the_classifier_trains_the_detectors_own_resnet():
    model = _retinanet()
    classifier = CropClassifier(model.backbone.resnet, num_classes=2)
    assert classifier.resnet is model.backbone.resnet
    assert classifier.fc.in_features == 256  # the half-width ResNet-18's C5
    logits = classifier(torch.rand(4, 3, 32, 32))
    assert logits.shape == (4, 2)


def _colour_squares(n, size=48):
    # Class 0: red squares, class 1: blue ones, of 10-20 px, anywhere: a task a minute of
    # pretraining solves, to see it learn in seconds.
    g = torch.Generator().manual_seed(n)
    items = []
    for i in range(n):
        label = i % 2
        side = int(torch.randint(10, 21, (), generator=g))
        x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
        colour = (0.9, 0.1, 0.1) if label == 0 else (0.1, 0.1, 0.9)
        image = _square_image(size, (x, y, x + side, y + side), colour) * 0.8 + 0.1
        items.append((image, _target([x, y, x + side, y + side], [label], size)))
    return _Images(items)


def test_pretraining_learns_the_classes_and_leaves_the_rest_of_the_detector_alone():
    model = _retinanet()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = pretrain_backbone(model, _colour_squares(64), 4.0, _colour_squares(32),
                             batch_size=32, warmup_steps=2)  # fmt: skip
    assert done.num_crops == 64 and len(done.history.steps) >= 3
    assert done.accuracy >= 0.9, done.describe()  # chance: 0.5
    assert not model.training  # its mode as it was
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("backbone.resnet.") for k in changed)
    line = done.describe()
    assert "classifier of 64 object crops" in line and "validation objects named right" in line


def test_crop_accuracy_counts_the_right_names():
    model = _retinanet()
    classifier = CropClassifier(model.backbone.resnet, num_classes=2)
    crops = ObjectCrops(_colour_squares(6), crop_size=16)
    with torch.no_grad():
        classifier.fc.weight.zero_()
        classifier.fc.bias.copy_(torch.tensor([1.0, 0.0]))  # always class 0
    assert crop_accuracy(classifier, crops, batch_size=4) == 0.5  # half the squares are red


def test_pretrain_backbone_refuses_bad_settings():
    model = _retinanet()
    data = _colour_squares(4)
    with pytest.raises(ValueError, match="seconds=0 must be > 0"):
        pretrain_backbone(model, data, 0)
    with pytest.raises(ValueError, match=r"unknown settings \['crop'\]"):
        pretrain_backbone(model, data, 1.0, crop=32)


def test_crops_figure_shows_each_crop_with_its_class_name():
    pytest.importorskip("plotly")
    from instseg_edu.viz.training import crops_figure

    crops = ObjectCrops(_colour_squares(5), crop_size=16)
    fig = crops_figure(crops.crops, crops.labels, crops.classes, columns=4)
    pixels = fig.data[0].z  # 2 rows of 4 cells: 16 px crops, 4 px gaps, 10 px for the names
    assert pixels.shape == (2 * 26 + 4, 4 * 20 + 4, 3)
    assert [a.text for a in fig.layout.annotations] == ["a", "b", "a", "b", "a"]
    first = crops.crops[0].permute(1, 2, 0).numpy()  # uint8, as drawn
    assert (pixels[4:20, 4:20] == first).all()
    with pytest.raises(ValueError, match="crops must be"):
        crops_figure(crops.crops[:2], crops.labels[:1], crops.classes)
