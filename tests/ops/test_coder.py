import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instseg_edu.ops.coder import DeltaXYWHBBoxCoder


def test_encode_golden():
    # anchor centre (5, 5), size 10x10; target centre (7, 8), size 10x12
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[2.0, 2.0, 12.0, 14.0]])
    plain = DeltaXYWHBBoxCoder().encode(anchor, gt)
    torch.testing.assert_close(plain, torch.tensor([[0.2, 0.3, 0.0, math.log(1.2)]]))
    rcnn = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2)).encode(anchor, gt)
    torch.testing.assert_close(rcnn, torch.tensor([[2.0, 3.0, 0.0, math.log(1.2) / 0.2]]))
    shifted = DeltaXYWHBBoxCoder(target_means=(0.1, 0.0, 0.0, 0.0)).encode(anchor, gt)
    torch.testing.assert_close(shifted, torch.tensor([[0.1, 0.3, 0.0, math.log(1.2)]]))


def test_decode_golden():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size 10x20
    deltas = torch.tensor([[0.5, -0.25, math.log(2.0), 0.0]])
    # centre (5 + 0.5*10, 10 - 0.25*20) = (10, 5); size (20, 20)
    out = DeltaXYWHBBoxCoder().decode(anchor, deltas)
    torch.testing.assert_close(out, torch.tensor([[0.0, -5.0, 20.0, 15.0]]))
    clipped = DeltaXYWHBBoxCoder().decode(anchor, deltas, max_shape=(12, 18))  # (H, W)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 18.0, 12.0]]))


def test_decode_clamps_log_size():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    huge = DeltaXYWHBBoxCoder().decode(anchor, torch.tensor([[0.0, 0.0, 50.0, -50.0]]))
    w, h = huge[0, 2] - huge[0, 0], huge[0, 3] - huge[0, 1]
    torch.testing.assert_close(w, torch.tensor(16 * 1000 / 16))  # exp(|log(16/1000)|) = 62.5
    torch.testing.assert_close(h, torch.tensor(16 * 16 / 1000))
    assert torch.isfinite(huge).all()


def test_broadcast_class_specific_and_no_inplace():
    coder = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0]])
    deltas = torch.randn(2, 3 * 4).reshape(2, 3, 4)  # [N, C, 4]
    before = (boxes.clone(), deltas.clone())
    out = coder.decode(boxes[:, None], deltas)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out[1, 2], coder.decode(boxes[1], deltas[1, 2]))
    assert torch.equal(boxes, before[0]) and torch.equal(deltas, before[1])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target_stds=(1.0, 1.0, 0.0, 1.0)), "target_stds"),
        (dict(target_means=(0.0, 0.0)), "target_means"),
    ],
)
def test_invalid_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DeltaXYWHBBoxCoder(**kwargs)


xy = st.floats(-100, 600, allow_nan=False, width=32)
wh = st.floats(2, 300, allow_nan=False, width=32)


@settings(max_examples=80, deadline=None)
@given(
    st.tuples(xy, xy, wh, wh),
    st.tuples(xy, xy, wh, wh),
    st.sampled_from([(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)]),
)
def test_round_trip(anchor, gt, stds):
    to_xyxy = lambda t: torch.tensor([[t[0], t[1], t[0] + t[2], t[1] + t[3]]], dtype=torch.float64)  # noqa: E731
    a, g = to_xyxy(anchor), to_xyxy(gt)
    # sizes within a factor 1000/16 of each other, as the decoder's clamp allows
    ratio = (g[0, 2:] - g[0, :2]) / (a[0, 2:] - a[0, :2])
    if not ((ratio < 62.0) & (ratio > 1 / 62.0)).all():
        return
    coder = DeltaXYWHBBoxCoder(target_means=(0.01, -0.02, 0.0, 0.03), target_stds=stds)
    torch.testing.assert_close(coder.decode(a, coder.encode(a, g)), g, atol=1e-6, rtol=1e-9)
    a32, g32 = a.float(), g.float()
    torch.testing.assert_close(coder.decode(a32, coder.encode(a32, g32)), g32, atol=2e-3, rtol=1e-5)
