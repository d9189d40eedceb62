import pytest
import torch

from instseg_edu.ops.assign import IGNORED, NEGATIVE, POSITIVE, Assignment
from instseg_edu.ops.sampling import random_sample, random_sample_batched


def make_assignment(num_pos, num_neg, num_ign, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt_inds = torch.cat(
        [
            torch.randint(1, 4, (num_pos,), generator=g),
            torch.zeros(num_neg, dtype=torch.long),
            torch.full((num_ign,), -1, dtype=torch.long),
        ]
    )
    gt_inds = gt_inds[torch.randperm(len(gt_inds), generator=g)]
    n = len(gt_inds)
    reason = torch.where(gt_inds > 0, POSITIVE, torch.where(gt_inds == 0, NEGATIVE, IGNORED))
    return Assignment.from_gt_inds(
        gt_inds, torch.zeros(n), torch.full((n,), -1), reason.to(torch.uint8)
    )


@pytest.mark.parametrize(
    "num_pos, num_neg, exp_pos, exp_neg",
    [
        (500, 5000, 128, 128),  # plenty of both: half and half
        (20, 5000, 20, 236),  # few positives: negatives fill the budget
        (500, 50, 128, 50),  # few negatives
        (0, 10, 0, 10),
    ],
)
def test_counts(num_pos, num_neg, exp_pos, exp_neg):
    a = make_assignment(num_pos, num_neg, 300)
    pos, neg = random_sample(a, 256, 0.5, generator=torch.Generator().manual_seed(1))
    assert len(pos) == exp_pos and len(neg) == exp_neg
    assert (a.gt_inds[pos] > 0).all() and (a.gt_inds[neg] == 0).all()
    assert len(set(pos.tolist())) == len(pos) and len(set(neg.tolist())) == len(neg)
    assert pos.dtype == torch.int64 and (pos.diff() > 0).all()


def test_neg_pos_ub():
    a = make_assignment(10, 5000, 0)
    pos, neg = random_sample(a, 512, 0.25, neg_pos_ub=3, generator=torch.Generator().manual_seed(0))
    assert len(pos) == 10 and len(neg) == 30
    # no positives: max(num_pos, 1) keeps int(3 * 1) = 3 negatives
    b = make_assignment(0, 5000, 0)
    pos, neg = random_sample(b, 512, 0.25, neg_pos_ub=3, generator=torch.Generator().manual_seed(0))
    assert len(pos) == 0 and len(neg) == 3
    # fractional bound is floored: int(1.5 * 3) = 4
    c = make_assignment(3, 5000, 0)
    pos, neg = random_sample(
        c, 512, 0.25, neg_pos_ub=1.5, generator=torch.Generator().manual_seed(0)
    )
    assert len(pos) == 3 and len(neg) == 4


def test_reproducible_and_random():
    a = make_assignment(300, 3000, 10)
    p1, n1 = random_sample(a, 256, 0.5, generator=torch.Generator().manual_seed(7))
    p2, n2 = random_sample(a, 256, 0.5, generator=torch.Generator().manual_seed(7))
    p3, n3 = random_sample(a, 256, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(p1, p2) and torch.equal(n1, n2)
    assert not torch.equal(p1, p3)


def test_uniform_over_candidates():
    # 4 positives, draw 2: each should be picked about half the time
    gt_inds = torch.tensor([1, 1, 1, 1, 0, 0])
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(6)
    for _ in range(400):
        pos, _ = random_sample(gt_inds, 4, 0.5, generator=gen)
        hits[pos] += 1
    assert hits[4:].sum() == 0
    assert ((hits[:4] / 400 - 0.5).abs() < 0.1).all()


def test_batched_rows_counts_and_equal_to_single():
    rows = [
        make_assignment(5, 1000, 20, seed=1).gt_inds,
        make_assignment(400, 900, 20, seed=2).gt_inds,
    ]
    gt_inds = torch.stack([r[:1000] for r in rows])  # [2, 1000]
    pos, neg = random_sample_batched(
        gt_inds, 256, 0.5, neg_pos_ub=-1, generator=torch.Generator().manual_seed(3)
    )
    assert pos.shape == neg.shape == (2, 1000) and pos.dtype == torch.bool
    assert not (pos & neg).any()
    assert (gt_inds[pos] > 0).all() and (gt_inds[neg] == 0).all()
    n_pos = (gt_inds > 0).sum(1)
    assert pos.sum(1).tolist() == [min(int(n_pos[0]), 128), 128]
    assert (pos.sum(1) + neg.sum(1)).tolist() == [256, 256]
    # one image through the batched path == random_sample with the same generator state
    p1, n1 = random_sample(gt_inds[0], 256, 0.5, generator=torch.Generator().manual_seed(5))
    pb, nb = random_sample_batched(
        gt_inds[:1], 256, 0.5, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(p1, pb[0].nonzero().flatten()) and torch.equal(n1, nb[0].nonzero().flatten())


def test_invalid_arguments():
    a = make_assignment(3, 3, 0)
    with pytest.raises(ValueError, match="pos_fraction"):
        random_sample(a, 10, 1.5)
    with pytest.raises(ValueError, match="num"):
        random_sample(a, -1, 0.5)


@pytest.mark.gpu
def test_batched_on_cuda_has_no_host_sync():
    gt_inds = torch.stack([make_assignment(30, 900, 70, seed=s).gt_inds for s in range(3)]).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pos, neg = random_sample_batched(gt_inds, 256, 0.5, neg_pos_ub=3, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pos.sum(1).tolist() == [30, 30, 30]
    assert neg.sum(1).tolist() == [90, 90, 90]
