"""Random sampling of a fixed budget of positive and negative boxes (Faster R-CNN, Ren et al. 2015,
Sec. 3.1.3: "we randomly sample 256 anchors in an image ... where the sampled positive and negative
anchors have a ratio of up to 1:1. If there are fewer than 128 positive samples ... we pad the
mini-batch with negative ones").

An assignment leaves tens of thousands of negatives for a handful of positives. Two-stage detectors
train the RPN and the box head on a small, balanced subset (RPN: 256 anchors, half positive at most;
R-CNN: 512 proposals, a quarter positive), which is what :func:`random_sample` draws — the numbers
of MMDetection's ``RandomSampler``:

- ``num_pos = min(#positives, int(num * pos_fraction))``,
- ``num_neg = min(#negatives, num - num_pos)``, and with ``neg_pos_ub >= 0`` at most
  ``int(neg_pos_ub * max(num_pos, 1))`` negatives.

Drawing ``k`` of the candidates uniformly at random, vectorised: give every box an independent
random key in ``[0, 1)``, push non-candidates to -1, and keep the ``k`` largest keys (``topk``).
Every ``k``-subset of the candidates is equally likely, and a ``torch.Generator`` makes it
reproducible. The batched form does the same for a whole ``[B, N]`` batch with a fixed ``k``, so it
needs no host synchronisation. A model configures it with :class:`SamplerConfig`.

One-stage detectors that sample do it by loss instead: :func:`ohem_negatives` keeps each image's
hardest negatives (SSD; YOLACT).

Shape legend: ``B`` images, ``N`` boxes (anchors or proposals).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from instseg_edu.config import check, check_in_range
from instseg_edu.ops.assign import NEGATIVE, Assignment

__all__ = ["SamplerConfig", "ohem_negatives", "random_sample", "random_sample_batched"]


def _check(num: int, pos_fraction: float) -> None:
    if int(num) != num or num < 0:
        raise ValueError(f"num={num!r} must be an integer >= 0")
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction={pos_fraction!r} must be in [0, 1]")


@dataclass(frozen=True)
class SamplerConfig:
    """``sampler`` (MMDetection's ``RandomSampler`` keys): ``num`` boxes per image, at most
    ``num * pos_fraction`` of them positive. Defaults are the RPN's (Faster R-CNN Sec. 3.1.3).

    Attributes:
        num: the budget per image (RPN 256, R-CNN 512), ``> 0``.
        pos_fraction: the largest share of positives, in ``(0, 1]``.
        neg_pos_ub: when ``>= 0``, at most ``neg_pos_ub * max(num_pos, 1)`` negatives.
        add_gt_as_proposals: the R-CNN stage adds the ground-truth boxes to the proposals.
    """

    num: int = 256
    pos_fraction: float = 0.5
    neg_pos_ub: float = -1
    add_gt_as_proposals: bool = False

    def __post_init__(self) -> None:
        check(int(self.num) == self.num and self.num > 0, f"num={self.num} must be an integer > 0")
        check_in_range(self, "pos_fraction", 0, 1, lo_open=True)


def _topk_mask(candidates: Tensor, keys: Tensor, k: int, limit: Tensor | None = None) -> Tensor:
    """``bool [B, N]``: up to ``k`` (and up to ``limit[b]``) random candidates per row."""
    b, n = candidates.shape
    k = min(k, n)
    mask = torch.zeros_like(candidates)
    if k == 0:
        return mask
    scored = torch.where(candidates, keys, -1.0)  # [B, N]; non-candidates can never win
    values, idx = scored.topk(k, dim=1)  # [B, k] each, best key first
    keep = values >= 0  # fewer than k candidates: drop the -1 fillers
    if limit is not None:
        keep &= torch.arange(k, device=keys.device)[None, :] < limit[:, None]  # [B, k]
    return mask.scatter_(1, idx, keep)


def random_sample_batched(
    assignment: Assignment | Tensor,
    num: int,
    pos_fraction: float,
    neg_pos_ub: float = -1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample positives and negatives for a whole batch without leaving the device.

    Args:
        assignment: a batched :class:`~instseg_edu.ops.assign.Assignment` (fields ``[B, N]``) or
            MMDetection's ``gt_inds`` (``int64 [B, N]``: > 0 positive, 0 negative, -1 ignored).
        num: total budget per image (RPN 256, R-CNN 512).
        pos_fraction: at most ``int(num * pos_fraction)`` positives per image.
        neg_pos_ub: when ``>= 0``, at most ``int(neg_pos_ub * max(num_pos, 1))`` negatives.
        generator: a ``torch.Generator`` on the tensors' device, for reproducible draws.

    Returns:
        ``(pos_mask, neg_mask)``, ``bool [B, N]`` each, disjoint.
    """
    _check(num, pos_fraction)
    if isinstance(assignment, Assignment):
        positive, negative = assignment.gt_index >= 0, assignment.reason == NEGATIVE
    else:
        positive, negative = assignment > 0, assignment == 0
    if positive.dim() != 2:
        raise ValueError(f"the assignment must be [B, N], got {tuple(positive.shape)}")
    keys = torch.rand(positive.shape, generator=generator, device=positive.device)  # [B, N]
    pos_mask = _topk_mask(positive, keys, int(num * pos_fraction))
    num_pos = pos_mask.sum(dim=1)  # [B], stays on the device
    num_neg = num - num_pos  # [B]
    if neg_pos_ub >= 0:
        upper = torch.floor(neg_pos_ub * num_pos.clamp(min=1).double()).long()  # [B]
        num_neg = torch.minimum(num_neg, upper)
    neg_mask = _topk_mask(negative, keys, int(num), limit=num_neg)
    return pos_mask, neg_mask


def random_sample(
    assignment: Assignment,
    num: int,
    pos_fraction: float,
    neg_pos_ub: float = -1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample a fixed budget of positive and negative boxes of one image.

    Args:
        assignment: one image's :class:`~instseg_edu.ops.assign.Assignment` (fields ``[N]``), or
            MMDetection's ``gt_inds`` tensor.
        num: total budget (RPN 256, R-CNN 512).
        pos_fraction: at most ``int(num * pos_fraction)`` positives (RPN 0.5, R-CNN 0.25).
        neg_pos_ub: when ``>= 0``, at most ``int(neg_pos_ub * max(num_pos, 1))`` negatives
            (-1: no bound).
        generator: a ``torch.Generator`` on the assignment's device, for reproducible draws.

    Returns:
        ``(pos_inds, neg_inds)``: ``int64`` indices into the ``N`` boxes, ascending.
    """
    one = assignment.gt_index if isinstance(assignment, Assignment) else assignment
    if one.dim() != 1:
        raise ValueError(f"random_sample takes one image ([N]), got {tuple(one.shape)}")
    batch = (
        Assignment(*(f[None] for f in assignment))
        if isinstance(assignment, Assignment)
        else assignment[None]
    )
    pos_mask, neg_mask = random_sample_batched(
        batch, num, pos_fraction, neg_pos_ub=neg_pos_ub, generator=generator
    )  # [1, N] each
    return pos_mask[0].nonzero().flatten(), neg_mask[0].nonzero().flatten()


def ohem_negatives(neg_loss: Tensor, neg: Tensor, num_pos: Tensor, neg_pos_ratio: int) -> Tensor:
    """Online hard example mining (SSD Sec. 2.2; YOLACT Sec. 4): per image, keep the
    ``min(neg_pos_ratio · num_pos, num_neg)`` negatives with the largest loss.

    Vectorised by ranking: sort each image's losses with non-negatives at ``-inf`` (so they sort
    last), turn the sort order into a rank per anchor, and keep the negatives whose rank is below
    the quota. Example: losses ``[0.1, 2.0, 0.5, 0.7]`` all negative, one positive elsewhere,
    ratio 3 → ranks ``[3, 0, 2, 1]``, quota 3, kept ``[F, T, T, T]``.

    Args:
        neg_loss: ``float [B, N]`` classification loss of each anchor (detached).
        neg: ``bool [B, N]`` negative anchors.
        num_pos: ``[B]`` positives per image.
        neg_pos_ratio: negatives per positive.

    Returns:
        ``bool [B, N]`` kept negatives.
    """
    ranked = torch.where(neg, neg_loss, float("-inf"))  # [B, N]
    order = ranked.argsort(dim=1, descending=True, stable=True)  # [B, N] anchors, hardest first
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )  # [B, N]: rank[b, order[b, r]] = r
    quota = (num_pos.to(torch.long) * neg_pos_ratio)[:, None]  # [B, 1]
    return neg & (rank < quota)  # rank < num_neg holds for negatives, so min(quota, num_neg)
