import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.ops.assign import (
    IGNORED,
    LOW_QUALITY_POSITIVE,
    NEGATIVE,
    POSITIVE,
    Assignment,
    assignment_summary,
    max_iou_assign,
    max_iou_assign_batched,
    max_iou_assign_steps,
)
from instseg_edu.ops.boxes import box_iou

RETINA = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0)

# Three anchors, two ground truths; IoUs computed by hand:
#   anchor 0 = (20,0,30,8):   inside gt1 (area 100): 80 / 100 = 0.8;  gt0: 0
#   anchor 1 = (0,0,10,4.5):  inside gt0: 45 / 100 = 0.45;           gt1: 0
#   anchor 2 = (5,0,15,10):   gt0: 50 / (100 + 100 - 50) = 1/3;     gt1: 0
ANCHORS = torch.tensor([[20.0, 0.0, 30.0, 8.0], [0.0, 0.0, 10.0, 4.5], [5.0, 0.0, 15.0, 10.0]])
GTS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
LABELS = torch.tensor([3, 7])


def test_golden_iou_and_each_step():
    iou = box_iou(ANCHORS, GTS)
    torch.testing.assert_close(iou, torch.tensor([[0.0, 0.8], [0.45, 0.0], [1 / 3, 0.0]]))
    steps = max_iou_assign_steps(iou, **RETINA)
    assert steps.step1_all_ignored.tolist() == [-1, -1, -1]
    assert steps.step2_negatives.tolist() == [-1, -1, 0]  # 1/3 < 0.4
    assert steps.step3_positives.tolist() == [2, -1, 0]  # 0.8 >= 0.5 -> gt1
    assert steps.step4_low_quality.tolist() == [2, 1, 0]  # anchor 1 is gt0's best

    a = max_iou_assign(ANCHORS, GTS, LABELS, **RETINA)
    assert a.gt_inds.tolist() == [2, 1, 0]
    assert a.labels.tolist() == [7, 3, -1]
    assert a.reason.tolist() == [POSITIVE, LOW_QUALITY_POSITIVE, NEGATIVE]
    assert a.reason.dtype == torch.uint8 and a.gt_inds.dtype == torch.int64
    torch.testing.assert_close(a.max_iou, torch.tensor([0.8, 0.45, 1 / 3]))

    # without step 4 anchor 1 (between the thresholds) stays ignored
    b = max_iou_assign(ANCHORS, GTS, LABELS, **RETINA, match_low_quality=False)
    assert b.gt_inds.tolist() == [2, -1, 0]
    assert b.reason.tolist() == [POSITIVE, IGNORED, NEGATIVE]
    # min_pos_iou above gt0's best IoU: no rescue either
    c = max_iou_assign(ANCHORS, GTS, LABELS, pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.46)
    assert c.gt_inds.tolist() == [2, -1, 0]


def test_neg_iou_range():
    iou = torch.tensor([[0.05], [0.2], [0.45], [0.9]])
    steps = max_iou_assign_steps(
        iou, pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4), min_pos_iou=0.0, match_low_quality=False
    )
    assert steps.step4_low_quality.tolist() == [-1, 0, -1, 1]


def test_low_quality_overwrites_step3_later_gt_wins():
    # MMDetection's own comment: box A has IoU 0.9 with gt0 and 0.8 with gt1; A is gt1's best box,
    # so step 4 hands A to gt1 although gt0 is A's best ground truth.
    iou = torch.tensor([[0.9, 0.8], [0.95, 0.1]])
    steps = max_iou_assign_steps(iou, **RETINA)
    assert steps.step3_positives.tolist() == [1, 1]
    assert steps.step4_low_quality.tolist() == [2, 1]
    # reason stays POSITIVE: the box passed pos_iou_thr in step 3
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gts = torch.tensor([[0.0, 0.0, 10.0, 9.0], [1.0, 0.0, 10.0, 10.0]])  # IoU 0.9 both
    a = max_iou_assign(anchors, gts, torch.tensor([0, 1]), **RETINA)
    assert a.gt_inds.tolist() == [2] and a.reason.tolist() == [POSITIVE]


def test_gt_max_assign_all_ties():
    iou = torch.tensor([[0.3, 0.0], [0.3, 0.0], [0.1, 0.0], [0.0, 0.6]])
    all_ties = max_iou_assign_steps(iou, **RETINA, gt_max_assign_all=True)
    first = max_iou_assign_steps(iou, **RETINA, gt_max_assign_all=False)
    assert all_ties.step4_low_quality.tolist() == [1, 1, 0, 2]
    assert first.step4_low_quality.tolist() == [1, 0, 0, 2]


def test_zero_iou_ground_truth_gets_no_match():
    # gt1 touches no anchor. MMDetection (min_pos_iou=0) would make every anchor with IoU 0 to gt1
    # -- here anchors 1 and 2, true background -- positive for gt1. We give gt1 no match.
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [80.0, 0.0, 90.0, 9.0]]
    )
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [200.0, 200.0, 210.0, 210.0]])
    a = max_iou_assign(anchors, gts, torch.tensor([0, 1]), **RETINA)
    assert a.gt_inds.tolist() == [1, 0, 0]
    assert a.reason.tolist() == [POSITIVE, NEGATIVE, NEGATIVE]
    summary = assignment_summary(a, num_gt=2)
    assert summary.pos_per_gt.tolist() == [1, 0]
    assert summary.unmatched_gt.tolist() == [1]
    # the same with gt_max_assign_all=False (MMDetection would give gt1 the first zero-IoU anchor)
    b = max_iou_assign(anchors, gts, torch.tensor([0, 1]), **RETINA, gt_max_assign_all=False)
    assert b.gt_inds.tolist() == [1, 0, 0]


def test_no_ground_truth_all_negative_and_no_anchors_empty():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    a = max_iou_assign(anchors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), **RETINA)
    assert a.gt_inds.tolist() == [0, 0]
    assert a.labels.tolist() == [-1, -1]
    assert a.max_iou.tolist() == [0.0, 0.0]
    assert a.reason.tolist() == [NEGATIVE, NEGATIVE]
    e = max_iou_assign(torch.zeros(0, 4), GTS, LABELS, **RETINA)
    assert all(f.shape == (0,) for f in e)


def test_ignore_regions():
    # anchor 0 lies inside the crowd box (IoF 1 > 0.5); anchor 2 only 20% inside.
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [100.0, 0.0, 110.0, 10.0], [16.0, 0.0, 26.0, 10.0]]
    )
    gts = torch.tensor([[0.0, 0.0, 10.0, 11.0]])  # IoU with anchor 0 = 100/110
    crowd = torch.tensor([[-5.0, -5.0, 18.0, 18.0]])
    a = max_iou_assign(
        anchors, gts, torch.tensor([4]), **RETINA, ignore_iof_thr=0.5, gt_boxes_ignore=crowd
    )
    # anchor 0 would be positive but is inside the ignore region; it cannot be rescued either,
    # and the gt has no other overlapping anchor -> no positive at all.
    assert a.gt_inds.tolist() == [-1, 0, 0]
    assert a.reason.tolist() == [IGNORED, NEGATIVE, NEGATIVE]
    torch.testing.assert_close(a.max_iou[0], torch.tensor(100 / 110))  # true IoU kept
    # ignore regions also apply without ground truth
    b = max_iou_assign(
        anchors,
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
        **RETINA,
        ignore_iof_thr=0.5,
        gt_boxes_ignore=crowd,
    )
    assert b.gt_inds.tolist() == [-1, 0, 0]
    # disabled with ignore_iof_thr <= 0
    c = max_iou_assign(anchors, gts, torch.tensor([4]), **RETINA, gt_boxes_ignore=crowd)
    assert c.gt_inds.tolist() == [1, 0, 0]


def test_inputs_not_modified():
    anchors, gts, labels = ANCHORS.clone(), GTS.clone(), LABELS.clone()
    max_iou_assign(anchors, gts, labels, **RETINA)
    assert torch.equal(anchors, ANCHORS) and torch.equal(gts, GTS) and torch.equal(labels, LABELS)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(pos_iou_thr=0.4, neg_iou_thr=0.5), "neg_iou_thr"),
        (dict(pos_iou_thr=0.5, neg_iou_thr=(0.3, 0.6)), "neg_iou_thr"),
        (dict(pos_iou_thr=0.5, neg_iou_thr=(0.3, 0.1)), "neg_iou_thr"),
        (dict(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.2, 0.3)), "neg_iou_thr"),
        (dict(pos_iou_thr=1.5, neg_iou_thr=0.4), "pos_iou_thr"),
        (dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=-0.1), "min_pos_iou"),
    ],
)
def test_invalid_thresholds_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        max_iou_assign(ANCHORS, GTS, LABELS, **kwargs)
    with pytest.raises(ValueError, match=field):
        max_iou_assign_batched(
            ANCHORS, GTS[None], LABELS[None], torch.ones(1, 2, dtype=torch.bool), **kwargs
        )


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="gt_labels"):
        max_iou_assign(ANCHORS, GTS, torch.tensor([1]), **RETINA)
    with pytest.raises(ValueError, match="anchors"):
        max_iou_assign_batched(
            ANCHORS[None].expand(3, -1, -1),
            GTS[None],
            LABELS[None],
            torch.ones(1, 2, dtype=torch.bool),
            **RETINA,
        )


# ------------------------------------------------------------------------------------------------
# batched == per image


def grid_boxes(g, n, size=6):
    # integer boxes on a small canvas: many exact ties and zero IoUs
    xy = torch.randint(0, size, (n, 2), generator=g).float()
    wh = torch.randint(1, 4, (n, 2), generator=g).float()
    return torch.cat([xy, xy + wh], dim=1)


def reference_for_image(anchors, gts, labels, valid, ign, kwargs):
    """Per-image function on the valid anchors, invalid anchors scattered back as IGNORED."""
    n = anchors.shape[0]
    out = max_iou_assign(anchors[valid], gts, labels, **kwargs, gt_boxes_ignore=ign)
    gt_inds = torch.full((n,), -1, dtype=torch.long)
    lab = torch.full((n,), -1, dtype=torch.long)
    reason = torch.full((n,), IGNORED, dtype=torch.uint8)
    gt_inds[valid], lab[valid], reason[valid] = out.gt_inds, out.labels, out.reason
    max_iou = box_iou(anchors, gts).amax(1) if len(gts) else torch.zeros(n)
    return Assignment.from_gt_inds(gt_inds, max_iou, lab, reason)


CONFIGS = [
    dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0),
    dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3),
    dict(pos_iou_thr=0.5, neg_iou_thr=0.5, match_low_quality=False),
    dict(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4), gt_max_assign_all=False),
    dict(pos_iou_thr=0.5, neg_iou_thr=0.4, ignore_iof_thr=0.5),
]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), config=st.sampled_from(CONFIGS), shared=st.booleans())
def test_batched_equals_per_image(seed, config, shared):
    g = torch.Generator().manual_seed(seed)
    b, n, g_max, i_max = 3, 24, 4, 2
    anchors = grid_boxes(g, n) if shared else torch.stack([grid_boxes(g, n) for _ in range(b)])
    gts = torch.stack([grid_boxes(g, g_max) for _ in range(b)])  # [B, G, 4]
    num_gt = torch.randint(0, g_max + 1, (b,), generator=g)
    gt_valid = torch.arange(g_max)[None, :] < num_gt[:, None]  # padding at the end
    labels = torch.where(gt_valid, torch.randint(0, 5, (b, g_max), generator=g), -1)
    anchor_valid = torch.rand(b, n, generator=g) > 0.2
    ignore = torch.stack([grid_boxes(g, i_max) for _ in range(b)])
    ignore_valid = torch.rand(b, i_max, generator=g) > 0.5

    out = max_iou_assign_batched(
        anchors,
        gts,
        labels,
        gt_valid,
        **config,
        anchor_valid=anchor_valid,
        gt_boxes_ignore=ignore,
        ignore_valid=ignore_valid,
    )
    assert all(f.shape == (b, n) for f in out)
    assert out.gt_inds.dtype == torch.int64 and out.reason.dtype == torch.uint8
    for i in range(b):
        anc = anchors if shared else anchors[i]
        k = int(num_gt[i])
        ref = reference_for_image(
            anc, gts[i, :k], labels[i, :k], anchor_valid[i], ignore[i][ignore_valid[i]], config
        )
        assert out.gt_inds[i].tolist() == ref.gt_inds.tolist()
        assert out.labels[i].tolist() == ref.labels.tolist()
        assert out.reason[i].tolist() == ref.reason.tolist()
        torch.testing.assert_close(out.max_iou[i], ref.max_iou)


def test_batched_retinanet_anchors_with_valid_flags():
    gen = AnchorGenerator(
        strides=(8, 16, 32), ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3
    )
    sizes = [(12, 12), (6, 6), (3, 3)]  # a 96x96 padded batch
    anchors = torch.cat(gen.grid_anchors(sizes))  # [N, 4]
    image_sizes = [(96, 96), (64, 80)]
    valid = torch.stack([torch.cat(gen.valid_flags(sizes, hw)) for hw in image_sizes])  # [2, N]
    gts = torch.tensor(
        [
            [[10.0, 10.0, 40.0, 30.0], [50.0, 20.0, 90.0, 90.0], [0.0, 0.0, 0.0, 0.0]],
            [[5.0, 40.0, 20.0, 60.0], [30.0, 5.0, 75.0, 50.0], [60.0, 50.0, 79.0, 63.0]],
        ]
    )
    gt_valid = torch.tensor([[True, True, False], [True, True, True]])
    labels = torch.tensor([[0, 1, -1], [2, 0, 1]])
    out = max_iou_assign_batched(anchors, gts, labels, gt_valid, **RETINA, anchor_valid=valid)
    for i in range(2):
        k = int(gt_valid[i].sum())
        ref = reference_for_image(anchors, gts[i, :k], labels[i, :k], valid[i], None, RETINA)
        assert torch.equal(out.gt_inds[i], ref.gt_inds)
        assert torch.equal(out.reason[i], ref.reason)
        assert (out.gt_inds[i] > 0).sum() >= k  # every ground truth got at least one anchor
    assert (out.reason[1][~valid[1]] == IGNORED).all() and (~valid[1]).any()


def test_batched_golden_and_no_ground_truth_at_all():
    valid = torch.tensor([[True, True], [False, False]])
    gts = torch.stack([GTS, torch.zeros(2, 4)])
    out = max_iou_assign_batched(ANCHORS, gts, torch.stack([LABELS, LABELS]), valid, **RETINA)
    assert out.gt_inds.tolist() == [[2, 1, 0], [0, 0, 0]]
    assert out.labels.tolist() == [[7, 3, -1], [-1, -1, -1]]
    shared = max_iou_assign_batched(
        ANCHORS[None], gts, torch.stack([LABELS, LABELS]), valid, **RETINA
    )
    assert shared.gt_inds.tolist() == [[2, 1, 0], [0, 0, 0]]
    empty = max_iou_assign_batched(
        ANCHORS,
        torch.zeros(2, 0, 4),
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0, dtype=torch.bool),
        **RETINA,
        anchor_valid=torch.tensor([[True, False, True]] * 2),
    )
    assert empty.gt_inds.tolist() == [[0, -1, 0]] * 2
    assert empty.reason.tolist() == [[NEGATIVE, IGNORED, NEGATIVE]] * 2


def test_summary_per_level():
    a = max_iou_assign(ANCHORS, GTS, LABELS, **RETINA)
    s = assignment_summary(a, num_gt=2, level_sizes=[2, 1])
    assert s.pos_per_gt.tolist() == [1, 1]
    assert s.unmatched_gt.tolist() == []
    assert s.counts.tolist() == [1, 0, 1, 1]  # NEGATIVE, IGNORED, POSITIVE, LOW_QUALITY
    assert s.counts_per_level.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="level_sizes"):
        assignment_summary(a, num_gt=2, level_sizes=[1, 1])


@pytest.mark.gpu
def test_batched_on_cuda_has_no_host_sync_and_matches_cpu():
    g = torch.Generator().manual_seed(0)
    anchors = grid_boxes(g, 500, size=40)
    gts = torch.stack([grid_boxes(g, 6, size=40) for _ in range(4)])
    valid = torch.rand(4, 6, generator=g) > 0.3
    labels = torch.randint(0, 3, (4, 6), generator=g)
    anchor_valid = torch.rand(4, 500, generator=g) > 0.1
    kw = dict(**RETINA, anchor_valid=anchor_valid)
    cpu = max_iou_assign_batched(anchors, gts, labels, valid, **kw)
    cuda_args = [t.cuda() for t in (anchors, gts, labels, valid)]
    kw["anchor_valid"] = anchor_valid.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        out = max_iou_assign_batched(*cuda_args, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(out, cpu):
        assert torch.equal(a.cpu(), b)


def test_padded_form_takes_the_assigner_config():
    from instseg_edu.ops.assign import MaxIoUAssignerConfig, max_iou_assign_padded
    from instseg_edu.structures import Target, pad_targets

    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(2, 60, 2, generator=gen) * 80
    anchors = torch.cat([xy, xy + 8 + 30 * torch.rand(2, 60, 2, generator=gen)], -1)  # [B, N, 4]
    targets = [
        Target(torch.tensor([[10.0, 10, 50, 40], [60, 5, 90, 30]]), torch.tensor([1, 0]),
               torch.zeros(2, 4, 4, dtype=torch.bool),
               ignore_boxes=torch.tensor([[0.0, 60, 30, 90]])),
        Target(torch.tensor([[20.0, 30, 70, 80]]), torch.tensor([2]),
               torch.zeros(1, 4, 4, dtype=torch.bool)),
    ]  # fmt: skip
    gt = pad_targets(targets)
    cfg = MaxIoUAssignerConfig(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.1,
                               match_low_quality=True, ignore_iof_thr=0.5)  # fmt: skip
    valid = torch.rand(2, 60, generator=gen) > 0.1
    got = max_iou_assign_padded(anchors, gt, cfg, valid)
    expected = max_iou_assign_batched(
        anchors, gt.boxes, gt.labels, gt.valid, pos_iou_thr=0.5, neg_iou_thr=0.4,
        min_pos_iou=0.1, match_low_quality=True, gt_max_assign_all=True, ignore_iof_thr=0.5,
        anchor_valid=valid, gt_boxes_ignore=gt.ignore_boxes, ignore_valid=gt.ignore_valid,
    )  # fmt: skip
    for field in got._fields:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert (got.reason == IGNORED).any() and (got.gt_inds > 0).any()
