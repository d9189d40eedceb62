import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from instseg_edu.ops.boxes import (
    batched_box_iof,
    batched_box_iou,
    box_area,
    box_cxcywh_to_xyxy,
    box_iof,
    box_iou,
    box_xyxy_to_cxcywh,
    clip_boxes,
)


def random_boxes(n, size=100.0, min_wh=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + min_wh
    return torch.cat([xy, xy + wh], dim=1)


def test_iou_iof_golden():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 40.0, 40.0], [20.0, 20.0, 30.0, 30.0]])
    # intersection 50, union 150; inside a 1600 box: 100/1600; disjoint: 0
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 3, 100 / 1600, 0.0]]))
    torch.testing.assert_close(box_iof(a, b), torch.tensor([[0.5, 1.0, 0.0]]))
    # IoF divides by the FIRST box's area: the big box holds only 100 / 1600 of itself inside a
    torch.testing.assert_close(box_iof(b[1:2], a), torch.tensor([[100 / 1600]]))


def test_iou_equals_torchvision():
    a, b = random_boxes(37, seed=1), random_boxes(23, seed=2)
    torch.testing.assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b))


def test_degenerate_boxes_give_zero_not_nan():
    a = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert box_iou(a, a).item() == 0.0
    assert box_iof(a, torch.tensor([[0.0, 0.0, 10.0, 10.0]])).item() == 0.0


def test_empty_inputs():
    assert box_iou(torch.zeros(0, 4), random_boxes(3)).shape == (0, 3)
    assert box_iof(random_boxes(3), torch.zeros(0, 4)).shape == (3, 0)


def test_batched_iou_matches_per_image_and_shared_anchors():
    a = torch.stack([random_boxes(11, seed=s) for s in range(3)])  # [3, 11, 4]
    b = torch.stack([random_boxes(5, seed=10 + s) for s in range(3)])  # [3, 5, 4]
    out = batched_box_iou(a, b)
    assert out.shape == (3, 11, 5)
    for i in range(3):
        torch.testing.assert_close(out[i], box_iou(a[i], b[i]))
        torch.testing.assert_close(batched_box_iou(a[0], b)[i], box_iou(a[0], b[i]))
        torch.testing.assert_close(batched_box_iof(a, b)[i], box_iof(a[i], b[i]))
    with pytest.raises(ValueError, match="b must be"):
        batched_box_iou(a, b[0])
    valid = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    masked = batched_box_iou(a, b, valid)
    torch.testing.assert_close(masked[1, :, :2], out[1, :, :2])
    assert (masked[1, :, 2:] == -1).all() and (masked[2] == -1).all()
    assert (batched_box_iou(a, b, valid, fill=0.0)[2] == 0).all()
    with pytest.raises(ValueError, match="b_valid"):
        batched_box_iou(a, b, valid[:2])


def test_conversions_round_trip_golden():
    xyxy = torch.tensor([[2.0, 4.0, 12.0, 10.0]])
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, torch.tensor([[7.0, 7.0, 10.0, 6.0]]))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_area(xyxy), torch.tensor([60.0]))


def test_clip_boxes_and_no_inplace():
    boxes = torch.tensor([[-5.0, -2.0, 50.0, 30.0], [3.0, 4.0, 5.0, 6.0]])
    before = boxes.clone()
    out = clip_boxes(boxes, (20, 40))  # (H, W)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 40.0, 20.0], [3.0, 4.0, 5.0, 6.0]]))
    torch.testing.assert_close(boxes, before)


def test_clip_boxes_per_image_sizes_in_one_call():
    boxes = torch.tensor([[[-5.0, -2.0, 50.0, 30.0]], [[-5.0, -2.0, 50.0, 30.0]]])  # [B=2, K=1, 4]
    sizes = torch.tensor([[20, 40], [25, 10]])  # (H, W) per image
    out = clip_boxes(boxes, sizes[:, None])
    expected = torch.tensor([[[0.0, 0.0, 40.0, 20.0]], [[0.0, 0.0, 10.0, 25.0]]])
    torch.testing.assert_close(out, expected)
    for i, (h, w) in enumerate(sizes.tolist()):  # the same as one call per image
        torch.testing.assert_close(out[i], clip_boxes(boxes[i], (h, w)))


coord = st.floats(0, 200, allow_nan=False, width=32)
size = st.floats(0.5, 150, allow_nan=False, width=32)
box = st.tuples(coord, coord, size, size).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@settings(max_examples=60, deadline=None)
@given(st.lists(box, min_size=1, max_size=6), st.lists(box, min_size=1, max_size=6))
def test_iou_properties(a, b):
    a, b = torch.tensor(a), torch.tensor(b)
    iou = box_iou(a, b)
    torch.testing.assert_close(iou, box_iou(b, a).T)  # symmetric
    assert (iou >= 0).all() and (iou <= 1 + 1e-6).all()  # range
    torch.testing.assert_close(box_iou(a, a).diagonal(), torch.ones(len(a)), atol=1e-5, rtol=0)
    torch.testing.assert_close(iou, torchvision.ops.box_iou(a, b))
    iof = box_iof(a, b)
    assert (iof >= iou - 1e-6).all()  # the first box's area never exceeds the union
