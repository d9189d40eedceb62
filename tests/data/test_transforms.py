"""Transforms keep boxes and masks on the image; collate pads to a multiple of 32."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import v2

from instseg_edu.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ObjectTransform,
    RandomResizeCrop,
    ResizeKeepAspect,
    collate,
    eval_transforms,
    normalize,
    resized_size,
    train_transforms,
)
from instseg_edu.structures import Target


def _tight_boxes(masks):
    """[G, H, W] bool -> [G, 4] xyxy pixel-edge boxes."""
    boxes = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _target(masks, labels=None, ignore=None):
    return Target(
        boxes=_tight_boxes(masks),
        labels=torch.arange(len(masks)) if labels is None else labels,
        masks=masks,
        image_id=7,
        ignore_boxes=torch.zeros(0, 4) if ignore is None else ignore,
        orig_size=tuple(masks.shape[-2:]),
    )


def test_resized_size_golden():
    assert resized_size(480, 640, 512) == (384, 512)
    assert resized_size(100, 50, 200) == (200, 100)
    assert resized_size(3, 1000, 100) == (1, 100)  # never zero


def test_normalize_golden():
    image = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).repeat(1, 2, 2)
    assert torch.allclose(normalize(image), torch.zeros(3, 2, 2), atol=1e-6)
    ones = normalize(torch.ones(2, 3, 1, 1))
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(ones[1, :, 0, 0], torch.tensor(expected))
    with pytest.raises(ValueError, match="images must be"):
        normalize(torch.ones(4, 5, 5))


def test_flip_moves_image_box_mask_and_ignore_box_together():
    image = torch.rand(3, 8, 10)
    masks = torch.zeros(1, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 1:4] = True  # box (1, 2)-(4, 5)
    target = _target(masks, ignore=torch.tensor([[0.0, 0.0, 2.0, 8.0]]))
    out_image, out = ObjectTransform([v2.RandomHorizontalFlip(p=1.0)])(image, target)
    assert torch.equal(out_image, image.flip(-1))
    assert out.boxes.tolist() == [[6.0, 2.0, 9.0, 5.0]]  # x1' = W - x2 = 10 - 4
    assert torch.equal(out.masks, masks.flip(-1))
    assert out.ignore_boxes.tolist() == [[8.0, 0.0, 10.0, 8.0]]
    assert out.image_id == 7 and out.orig_size == (8, 10)
    assert type(out_image) is torch.Tensor and type(out.boxes) is torch.Tensor


def test_resize_keep_aspect_golden():
    image = torch.rand(3, 20, 40)
    masks = torch.zeros(1, 20, 40, dtype=torch.bool)
    masks[0, 2:10, 4:12] = True  # box (4, 2)-(12, 10)
    out_image, out = eval_transforms(20)(image, _target(masks))
    assert out_image.shape == (3, 10, 20)
    assert out.boxes.tolist() == [[2.0, 1.0, 6.0, 5.0]]
    expected = torch.zeros(1, 10, 20, dtype=torch.bool)
    expected[0, 1:5, 2:6] = True
    assert torch.equal(out.masks, expected)
    assert out.masks.dtype == torch.bool
    assert 0.0 <= out_image.min() and out_image.max() <= 1.0


def test_resize_to_the_same_size_changes_nothing(monkeypatch):
    # Images already at size skip every resize; the resizes themselves would be the identity.
    from instseg_edu.data import transforms

    image = torch.rand(3, 24, 32)
    masks = torch.rand(3, 24, 32) > 0.5
    target = _target(masks, ignore=torch.tensor([[1.0, 2.0, 9.0, 20.0]]))
    step = transforms.ResizeKeepAspect(32)
    from torchvision import tv_tensors

    tv_image = tv_tensors.Image(image)  # what a step sees
    parts = {
        "boxes": tv_tensors.BoundingBoxes(target.boxes, format="XYXY", canvas_size=(24, 32)),
        "masks": tv_tensors.Mask(masks.to(torch.uint8)),
    }
    got_image, got_parts = step(tv_image, parts)
    assert got_image is tv_image and got_parts is parts
    same_size = [24, 32]  # (h, w): resizing for real gives identical tensors
    assert torch.equal(transforms._resize_masks(parts["masks"], same_size), parts["masks"])
    resized = v2.functional.resize(
        tv_image, same_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True
    )
    assert torch.equal(resized, tv_image)
    assert torch.equal(v2.functional.resize(parts["boxes"], same_size), parts["boxes"])
    calls = []
    monkeypatch.setattr(transforms, "_resize_masks", lambda *a: calls.append(a))
    out_image, out = eval_transforms(32)(image, target)
    assert calls == [] and torch.equal(out_image, image) and torch.equal(out.masks, masks)
    assert torch.equal(out.boxes, target.boxes)


def test_objects_that_vanish_are_dropped():
    image = torch.rand(3, 64, 64)
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 10:40, 10:40] = True
    masks[1, 20:30, 50:51] = True  # 1 px wide: 0.25 px after shrinking by 4
    masks[2, 50:51, 5:20] = True  # 1 px high
    # the second ignore region becomes 0.125 px wide and goes
    target = _target(masks, ignore=torch.tensor([[0.0, 0.0, 8.0, 64.0], [5.0, 5.0, 5.5, 9.0]]))
    _, out = eval_transforms(16)(image, target)
    assert out.labels.tolist() == [0]
    assert out.boxes.tolist() == [[2.5, 2.5, 10.0, 10.0]]
    assert out.masks.shape == (1, 16, 16)
    assert out.ignore_boxes.tolist() == [[0.0, 0.0, 2.0, 16.0]]


def test_mismatched_mask_size_is_a_clear_error():
    target = _target(torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must be"):
        eval_transforms(8)(torch.rand(3, 5, 4), target)


@st.composite
def _scenes(draw):
    """An image size, 1-4 axis-aligned rectangles or discs, a target size and a flip."""
    h, w = draw(st.integers(24, 96)), draw(st.integers(24, 96))
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            y0, x0 = draw(st.integers(0, h - 4)), draw(st.integers(0, w - 4))
            y1, x1 = draw(st.integers(y0 + 4, h)), draw(st.integers(x0 + 4, w))
            masks.append((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1))
        else:
            r = draw(st.integers(4, min(h, w) // 2))
            cy, cx = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
            masks.append((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r)
    # down to half the size, up to twice: nearest sampling skips at most every other row
    size = draw(st.integers(max(h, w) // 2 + 1, 2 * max(h, w)))
    return torch.stack(masks), size, draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(_scenes())
def test_boxes_stay_the_tight_boxes_of_the_masks(scene):
    masks, size, flip = scene
    image = torch.rand(3, *masks.shape[-2:])
    transform = ObjectTransform(
        [ResizeKeepAspect(size), v2.RandomHorizontalFlip(p=1.0 if flip else 0.0)]
    )
    out_image, out = transform(image, _target(masks))
    assert out_image.shape[-2:] == out.masks.shape[-2:]
    assert max(out_image.shape[-2:]) == size
    assert len(out) == len(masks)  # nothing this big vanishes
    assert (out.boxes - _tight_boxes(out.masks)).abs().max() <= 1.0
    assert out.labels.tolist() == list(range(len(masks)))


def test_train_transforms_jitter_only_touches_the_image():
    torch.manual_seed(0)
    image = torch.rand(3, 32, 48)
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[0, 4:20, 6:30] = True
    masks[1, 10:30, 30:46] = True
    target = _target(masks)
    out_image, out = train_transforms(48, flip_prob=0.0, jitter=True)(image, target)
    ref_image, ref = train_transforms(48, flip_prob=0.0, jitter=False)(image, target)
    assert not torch.allclose(out_image, ref_image)
    assert 0.0 <= out_image.min() and out_image.max() <= 1.0
    assert torch.equal(out.boxes, ref.boxes) and torch.equal(out.masks, ref.masks)
    assert torch.equal(ref_image, image)  # 48 is already the longest side
    flips = [
        train_transforms(48, jitter=False)(image, target)[1].boxes[0, 0].item() for _ in range(40)
    ]
    assert set(flips) == {6.0, 48.0 - 30.0}  # flip_prob=0.5: both outcomes happen


def test_random_resize_crop_golden():
    """Ratio 2: the image doubles to 40 px and a 20 px window of it is kept, masks and boxes cut
    the same way; the cut-off object's box is its visible part's, the box-only object's clipped."""
    image = torch.rand(3, 20, 20)
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[0, 2:6, 2:6] = True  # (2, 2)-(6, 6), at 40 px (4, 4)-(12, 12)
    masks[1, 4:16, 8:18] = True  # (8, 4)-(18, 16), at 40 px (16, 8)-(36, 32)
    boxes = torch.tensor([[2.0, 2.0, 6.0, 6.0], [8.0, 4.0, 18.0, 16.0], [0.0, 0.0, 20.0, 20.0]])
    has_mask = torch.tensor([True, True, False])
    target = Target(boxes, torch.arange(3), masks, has_mask=has_mask, orig_size=(20, 20))
    step = RandomResizeCrop(20, (2.0, 2.0))
    torch.manual_seed(3)
    out_image, out = ObjectTransform([step])(image, target)
    torch.manual_seed(3)
    torch.rand(())  # the ratio
    top, left = (int(torch.randint(21, ())) for _ in range(2))
    big_image, big = eval_transforms(40)(image, target)
    window = (slice(top, top + 20), slice(left, left + 20))
    assert out_image.shape == (3, 20, 20)
    assert torch.equal(out_image, big_image[:, window[0], window[1]])
    kept = big.masks[:, window[0], window[1]].flatten(1).any(1) | ~big.has_mask
    assert torch.equal(out.masks, big.masks[kept][:, window[0], window[1]])
    assert out.labels.tolist() == torch.arange(3)[kept].tolist()
    for box, mask, with_mask in zip(out.boxes, out.masks, out.has_mask):
        if with_mask:
            assert box.tolist() == _tight_boxes(mask[None])[0].tolist()
        else:  # the whole 40 px image's box, shifted and clipped: the window
            assert box.tolist() == [0.0, 0.0, 20.0, 20.0]


def test_random_resize_crop_at_ratio_one_is_the_resize_and_checks_its_range():
    image = torch.rand(3, 30, 40)
    masks = torch.zeros(1, 30, 40, dtype=torch.bool)
    masks[0, 3:20, 5:33] = True
    target = _target(masks)
    got_image, got = ObjectTransform([RandomResizeCrop(32, (1.0, 1.0))])(image, target)
    ref_image, ref = eval_transforms(32)(image, target)
    assert torch.equal(got_image, ref_image) and torch.equal(got.boxes, ref.boxes)
    assert torch.equal(got.masks, ref.masks)
    for bad in ((0.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="ratio_range"):
            RandomResizeCrop(32, bad)


@settings(max_examples=40, deadline=None)
@given(_scenes(), st.floats(0.5, 2.0))
def test_random_resize_crop_keeps_boxes_tight_and_images_at_most_size(scene, ratio):
    masks, size, _ = scene
    image = torch.rand(3, *masks.shape[-2:])
    transform = train_transforms(size, jitter=False, ratio_range=(ratio, ratio))
    out_image, out = transform(image, _target(masks))
    assert max(out_image.shape[-2:]) <= size and out_image.shape[-2:] == out.masks.shape[-2:]
    assert out.masks.flatten(1).any(1).all()  # objects left without pixels are dropped
    if len(out) == 0:
        return
    side = max(resized_size(*masks.shape[-2:], round(size * ratio)))
    if side > size:  # cropped: every box recomputed from its mask
        assert torch.equal(out.boxes, _tight_boxes(out.masks))
    elif side >= max(masks.shape[-2:]) / 2:  # resized only, at most halved: as ResizeKeepAspect
        assert (out.boxes - _tight_boxes(out.masks)).abs().max() <= 1.0


def test_collate_pads_images_and_masks_to_a_multiple_of_32():
    a_masks = torch.ones(2, 50, 70, dtype=torch.bool)
    b_masks = torch.zeros(0, 64, 33, dtype=torch.bool)
    a, b = torch.rand(3, 50, 70), torch.rand(3, 64, 33)
    batch = collate([(a, _target(a_masks)), (b, _target(b_masks))])
    assert batch.images.shape == (2, 3, 64, 96)
    assert batch.image_sizes == [(50, 70), (64, 33)]
    assert torch.equal(batch.images[0, :, :50, :70], a)
    assert batch.images[0, :, 50:].abs().sum() == 0 and batch.images[0, :, :, 70:].abs().sum() == 0
    assert torch.equal(batch.images[1, :, :, :33], b)
    assert batch.targets[0].masks.shape == (2, 64, 96)
    assert batch.targets[0].masks.sum() == 2 * 50 * 70
    assert batch.targets[0].masks[:, :50, :70].all()
    assert batch.targets[1].masks.shape == (0, 64, 96)
    assert len(batch) == 2 and batch.targets[0].image_id == 7
    assert collate([(a, _target(a_masks))], size_divisor=1).images.shape == (1, 3, 50, 70)


def test_collate_rejects_bad_items():
    with pytest.raises(ValueError, match="at least one"):
        collate([])
    with pytest.raises(ValueError, match="item 0: masks are"):
        collate([(torch.rand(3, 8, 8), _target(torch.ones(1, 4, 4, dtype=torch.bool)))])


def test_a_box_only_object_lives_as_long_as_its_box():
    """A box-only object has no mask to lose; a thin one still goes when its box does."""
    image = torch.rand(3, 64, 64)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    masks[0, 10:40, 10:40] = True
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 20.0, 51.0, 30.0],
                          [30.0, 30.0, 60.0, 34.0], [0.0, 50.0, 2.0, 51.0]])  # fmt: skip
    has_mask = torch.tensor([True, True, False, False])  # 1: a 1 px wide mask; 2, 3: box-only
    target = Target(boxes, torch.arange(4), masks, has_mask=has_mask, orig_size=(64, 64))
    _, out = eval_transforms(16)(image, target)
    assert out.labels.tolist() == [0, 2]  # 1 lost its pixels, 3 is under 1 px high
    assert out.boxes.tolist() == [[2.5, 2.5, 10.0, 10.0], [7.5, 7.5, 15.0, 8.5]]
    assert out.has_mask.tolist() == [True, False] and not out.masks[1].any()
    batch = collate([eval_transforms(16)(image, target)])
    assert batch.targets[0].has_mask.tolist() == [True, False]


def test_target_has_mask_defaults_to_all_and_must_match_the_objects():
    from instseg_edu.structures import pad_targets

    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    target = Target(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), masks)
    assert target.has_mask.tolist() == [True, True] and target.has_mask.dtype == torch.bool
    with pytest.raises(ValueError, match=r"has_mask is \(3,\) but there are 2 boxes"):
        Target(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), masks,
               has_mask=torch.ones(3, dtype=torch.bool))  # fmt: skip
    box_only = Target(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), masks[:1],
                      has_mask=torch.tensor([False]))  # fmt: skip
    padded = pad_targets([target, box_only])
    assert padded.has_mask.tolist() == [[True, True], [False, False]]
    assert padded.valid.tolist() == [[True, True], [True, False]]
