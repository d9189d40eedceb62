import math

import pytest
import torch

from instseg_edu.engine.host_sync import count_host_syncs
from instseg_edu.ops.nms import (
    PREFIX_FACTOR,
    class_aware_nms,
    fast_nms,
    fast_nms_batched,
    fast_nms_reference,
    mask_nms,
    matrix_nms,
    points_nms,
)


def test_fast_nms_golden_differs_from_greedy():
    # A (0.9) overlaps B (0.8) with IoU 0.6; B overlaps C (0.7) with IoU 0.6; A and C: IoU 0.25.
    # Greedy NMS at 0.5 keeps A and C (B is gone, so it cannot remove C). Fast NMS removes C too:
    # C's max IoU with any higher-scored box (B, suppressed or not) is 0.6.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.5, 0.0, 12.5, 10.0], [5.0, 0.0, 15.0, 10.0]])
    # IoU(A, B) = 75 / 125 = 0.6, IoU(B, C) = 0.6, IoU(A, C) = 50 / 150 = 1/3
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    out = fast_nms(boxes, scores, iou_threshold=0.5)
    assert out.indices.tolist() == [0] and out.labels.tolist() == [0]
    torch.testing.assert_close(out.scores, torch.tensor([0.9]))
    torch.testing.assert_close(out.boxes, boxes[:1])
    # a looser threshold keeps all three, sorted by score
    assert fast_nms(boxes, scores, iou_threshold=0.65).indices.tolist() == [0, 1, 2]


def test_fast_nms_classes_are_independent_and_thresholds():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([[0.9, 0.8, 0.03], [0.1, 0.95, 0.6]])  # [C=2, N=3]
    out = fast_nms(boxes, scores, iou_threshold=0.5, score_threshold=0.05)
    # class 0: box 1 removed by box 0 (IoU 0.9); box 2 below score_threshold.
    # class 1: box 0 removed by box 1; box 2 kept.
    assert list(zip(out.labels.tolist(), out.indices.tolist())) == [(1, 1), (0, 0), (1, 2)]
    assert fast_nms(boxes, scores, score_threshold=0.05, max_num=2).indices.tolist() == [1, 0]
    # top_k=1: only the best box of each class takes part
    assert fast_nms(boxes, scores, top_k=1).indices.tolist() == [1, 0]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("per_class", [False, True])
def test_fast_nms_equals_loop_reference(seed, per_class):
    g = torch.Generator().manual_seed(seed)
    c, n = 3, 40
    xy = torch.rand(c, n, 2, generator=g) * 60
    wh = torch.rand(c, n, 2, generator=g) * 30 + 5
    boxes = torch.cat([xy, xy + wh], dim=-1)
    boxes = boxes if per_class else boxes[0]
    scores = torch.rand(c, n, generator=g)
    kw = dict(iou_threshold=0.4, top_k=25, score_threshold=0.1, max_num=30)
    fast, ref = fast_nms(boxes, scores, **kw), fast_nms_reference(boxes, scores, **kw)
    assert fast.indices.tolist() == ref.indices.tolist()
    assert fast.labels.tolist() == ref.labels.tolist()
    torch.testing.assert_close(fast.scores, ref.scores)
    torch.testing.assert_close(fast.boxes, ref.boxes)


def test_fast_nms_empty():
    out = fast_nms(torch.zeros(0, 4), torch.zeros(2, 0))
    assert all(len(f) == 0 for f in out)
    with pytest.raises(ValueError, match="boxes"):
        fast_nms(torch.zeros(3, 4), torch.zeros(2, 4))


@pytest.mark.parametrize("per_class", [False, True])
def test_fast_nms_batched_equals_the_loop_reference_per_image(per_class):
    # Three images keeping different numbers of boxes: image 1 none (every score below the
    # threshold), so the padding after each image's kept boxes really differs.
    g = torch.Generator().manual_seed(0)
    b, c, n = 3, 3, 40
    xy = torch.rand(b, c, n, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + torch.rand(b, c, n, 2, generator=g) * 30 + 5], dim=-1)
    boxes = boxes if per_class else boxes[:, 0]  # [B, C, N, 4] or [B, N, 4]
    scores = torch.rand(b, c, n, generator=g)
    scores[1] *= 0.1
    kw = dict(iou_threshold=0.4, top_k=25, score_threshold=0.1, max_num=30)
    with count_host_syncs() as syncs:
        ranked, num_kept = fast_nms_batched(boxes, scores, **kw)
    assert syncs.count == 0, syncs.summary()
    assert ranked.boxes.shape == (3, 30, 4) and ranked.indices.shape == (3, 30)  # max_num < C·k
    for i in range(b):
        ref = fast_nms_reference(boxes[i], scores[i], **kw)
        k = int(num_kept[i])
        assert k == len(ref.indices)
        assert ranked.indices[i, :k].tolist() == ref.indices.tolist()
        assert ranked.labels[i, :k].tolist() == ref.labels.tolist()
        torch.testing.assert_close(ranked.scores[i, :k], ref.scores)
        torch.testing.assert_close(ranked.boxes[i, :k], ref.boxes)
    assert num_kept[1] == 0 and num_kept[0] > 0 and num_kept[2] > 0
    # without max_num every candidate of every class is ranked: M = C · min(top_k, N)
    ranked, _ = fast_nms_batched(boxes, scores, top_k=25)
    assert ranked.scores.shape == (3, 3 * 25)


def test_fast_nms_waits_for_the_device_once():
    """Reading how many boxes were kept is the only host synchronisation (four boolean-mask
    indexes before)."""
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(30, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 20], dim=1)
    with count_host_syncs() as syncs:
        out = fast_nms(boxes, torch.rand(2, 30, generator=g), score_threshold=0.2)
    assert len(out.indices) > 0
    assert syncs.count == 1, syncs.summary()
    assert "nms.py" in syncs.events[0].where and "in fast_nms" in syncs.events[0].where


def test_fast_nms_batched_checks_shapes():
    with pytest.raises(ValueError, match="scores"):
        fast_nms_batched(torch.zeros(2, 4, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="boxes"):
        fast_nms_batched(torch.zeros(3, 4, 4), torch.zeros(2, 3, 4))


def square_mask(x0, x1, size=10):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[:, x0:x1] = True
    return m


def test_matrix_nms_golden():
    # masks as column bands of a 10x10 image: A = cols 0-4, B = cols 1-5 (IoU 4/6), C = cols 5-9
    # (IoU with B 1/9, with A 0), D = cols 0-4 but another class.
    masks = torch.stack(
        [square_mask(0, 5), square_mask(1, 6), square_mask(5, 10), square_mask(0, 5)]
    )
    labels = torch.tensor([0, 0, 0, 1])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    out = matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0)
    f = lambda x: math.exp(-2.0 * x * x)  # noqa: E731
    iou_ab, iou_bc = 4 / 6, 1 / 9
    # B: decayed by A (A itself not overlapped: compensation 1)
    # C: min(f(0)/f(0) from A, f(1/9)/f(2/3) from B) = 1; f(1/9)/f(2/3) > 1 so C keeps its score
    expected = torch.tensor([0.9, 0.8 * f(iou_ab), 0.7 * min(1.0, f(iou_bc) / f(iou_ab)), 0.6])
    torch.testing.assert_close(out, expected)
    lin = matrix_nms(masks, labels, scores, kernel="linear")
    expected_lin = torch.tensor([0.9, 0.8 * (1 - iou_ab), 0.7, 0.6])
    torch.testing.assert_close(lin, expected_lin)


def test_matrix_nms_input_order_and_errors():
    masks = torch.stack([square_mask(1, 6), square_mask(0, 5)])
    out = matrix_nms(masks, torch.tensor([0, 0]), torch.tensor([0.8, 0.9]))
    torch.testing.assert_close(out, torch.tensor([0.8 * math.exp(-2.0 * (4 / 6) ** 2), 0.9]))
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(masks, torch.tensor([0, 0]), torch.tensor([0.8, 0.9]), kernel="box")
    assert matrix_nms(torch.zeros(0, 4, 4), torch.zeros(0), torch.zeros(0)).shape == (0,)


def test_points_nms_golden():
    heat = torch.tensor([[0.2, 0.9, 0.5], [0.1, 0.3, 0.95], [0.4, 0.6, 0.1]])[None, None]
    # cell (i, j) compared with (i-1, j-1), (i-1, j), (i, j-1), (i, j)
    expected = torch.tensor([[0.2, 0.9, 0.0], [0.0, 0.0, 0.95], [0.4, 0.6, 0.0]])[None, None]
    torch.testing.assert_close(points_nms(heat), expected)
    with pytest.raises(ValueError, match="kernel"):
        points_nms(heat, kernel=3)


def test_points_nms_equals_loop():
    torch.manual_seed(0)
    heat = torch.rand(2, 3, 7, 7)
    out = points_nms(heat)
    ref = heat.clone()
    for i in range(7):
        for j in range(7):
            window = heat[:, :, max(i - 1, 0) : i + 1, max(j - 1, 0) : j + 1].amax(dim=(2, 3))
            ref[:, :, i, j] = torch.where(heat[:, :, i, j] == window, heat[:, :, i, j], 0.0)
    torch.testing.assert_close(out, ref)


def test_mask_nms_greedy():
    # same chain as the Fast NMS test, with masks: greedy keeps A and C
    masks = torch.stack([square_mask(0, 4), square_mask(1, 5), square_mask(2, 6)])
    # IoU(A, B) = 3/5 = 0.6, IoU(B, C) = 0.6, IoU(A, C) = 2/6
    keep = mask_nms(masks, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    keep = mask_nms(masks, torch.tensor([0.7, 0.8, 0.9]), iou_threshold=0.5)
    assert keep.tolist() == [2, 0]
    assert mask_nms(masks, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.7).tolist() == [0, 1, 2]


def test_class_aware_nms_golden():
    # Boxes 0 and 1 overlap (IoU 81/119 = 0.68); box 2 is identical to 0 but of another class.
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    assert class_aware_nms(boxes, scores, labels, 0.5).tolist() == [0, 2, 3]
    assert class_aware_nms(boxes, scores, labels, 0.7).tolist() == [0, 1, 2, 3]
    assert class_aware_nms(boxes[:0], scores[:0], labels[:0], 0.5).shape == (0,)


@pytest.mark.parametrize("n", [50, 3000])  # 3000 boxes: torchvision loops over the classes
@pytest.mark.parametrize("seed", [0, 1])
def test_class_aware_nms_equals_torchvision_batched_nms(n, seed):
    from torchvision.ops import batched_nms

    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 300 - 20  # some negative coordinates
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=gen) * 60], 1)
    scores = torch.rand(n, generator=gen)
    labels = torch.randint(0, 7, (n,), generator=gen)
    for thr in (0.3, 0.5, 0.7):
        expected = batched_nms(boxes, scores, labels, thr)
        assert torch.equal(class_aware_nms(boxes, scores, labels, thr), expected)


def _random_detections(n, seed, num_classes=7, levels=None):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 200 - 20
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=gen) * 80], 1)
    scores = torch.rand(n, generator=gen)
    if levels is not None:  # few distinct values: many tied scores
        scores = (scores * levels).floor() / levels
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return boxes, scores, labels


@pytest.mark.parametrize("n", [30, 400, 4000])
@pytest.mark.parametrize("max_num", [1, 10, 100, 2000])
@pytest.mark.parametrize("ties", [None, 20])
def test_class_aware_nms_prefix_equals_the_full_run(n, max_num, ties):
    # The first max_num kept boxes of NMS over a score prefix are those of the full run, also
    # with tied scores; 2000 > what survives: the prefix grows until it holds every box. (Tied
    # scores are visited in index order here; torchvision's per-class loop, above 4000
    # coordinates, re-sorts its result unstably, so the tie order is only compared with ours.)
    from torchvision.ops import batched_nms

    boxes, scores, labels = _random_detections(n, seed=n + max_num, levels=ties)
    for thr in (0.3, 0.5, 0.7):
        full = class_aware_nms(boxes, scores, labels, thr)
        if ties is None:
            assert torch.equal(full, batched_nms(boxes, scores, labels, thr))
        assert torch.equal(class_aware_nms(boxes, scores, labels, thr, max_num), full[:max_num])


def test_class_aware_nms_prefix_grows_when_too_few_survive():
    # 50 copies of one box per class, best first, then 100 distinct boxes: at max_num=10 the first
    # prefix (40 boxes, all copies of class 0's box) keeps 1 box, so the prefix must double twice.
    copies = torch.tensor([[0.0, 0, 10, 10]]).expand(50, 4)
    spread = torch.arange(100.0)[:, None] * 20 + torch.tensor([100.0, 100, 110, 110])
    boxes = torch.cat([copies, spread])
    scores = torch.cat([torch.linspace(1.0, 0.9, 50), torch.linspace(0.8, 0.1, 100)])
    labels = torch.zeros(150, dtype=torch.long)
    assert PREFIX_FACTOR * 10 < 50 + 9  # the first prefix is too short
    with count_host_syncs() as syncs:
        kept = class_aware_nms(boxes, scores, labels, 0.5, max_num=10)
    assert kept.tolist() == [0, *range(50, 59)]
    assert syncs.count > 1  # one NMS per prefix tried


def test_class_aware_nms_prefix_is_one_nms():
    boxes, scores, labels = _random_detections(4000, seed=0)
    with count_host_syncs() as syncs:
        kept = class_aware_nms(boxes, scores, labels, 0.5, max_num=100)
    assert len(kept) == 100 and syncs.count == 1, syncs.summary()
