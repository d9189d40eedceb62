"""MaxIoU assignment: which anchor learns which ground-truth box (Faster R-CNN, Ren et al. 2015,
Sec. 3.1.2; RetinaNet, Lin et al. 2017, Sec. 4 "anchors ... assigned to ground-truth object boxes
using an IoU threshold of 0.5; and to background if their IoU is in [0, 0.4)").

The rule is MMDetection's ``MaxIoUAssigner``, in four steps over the ``[N, G]`` IoU matrix of ``N``
anchors and ``G`` ground-truth boxes. The steps are written in MMDetection's ``gt_inds`` encoding,
which needs three states per anchor: ``-1`` ignored, ``0`` negative (background), ``k >= 1``
positive for ground truth ``k - 1``. The :class:`Assignment` they produce speaks the library's
encoding instead (:mod:`instseg_edu.structures`): ``gt_index`` is 0-based with ``-1`` for none, and
``reason`` says why a box is negative or ignored.

1. Everything starts **ignored** (``-1``).
2. An anchor whose best IoU is below ``neg_iou_thr`` (or inside ``[lo, hi)`` when a pair is given)
   becomes **negative** (``0``).
3. An anchor whose best IoU is at least ``pos_iou_thr`` becomes **positive** for that best ground
   truth.
4. With ``match_low_quality``, every ground truth claims its best anchor(s) — even when that IoU is
   below ``pos_iou_thr`` — provided the IoU is at least ``min_pos_iou``. With ``gt_max_assign_all``
   every anchor tied at the best IoU is claimed. Ground truths are visited in order, so a later one
   overwrites an earlier one's claim; a claim also overwrites step 3 (an anchor with IoU 0.9 to
   ground truth 0 and 0.8 to ground truth 1 goes to 1 if it is 1's best anchor).

Worked example (in the spirit of detectron2's ``Matcher`` docstring), ``pos_iou_thr=0.5,
neg_iou_thr=0.4, min_pos_iou=0``::

    IoU        gt0   gt1      step 1   step 2   step 3   step 4   reason
    anchor 0   0.00  0.80       -1       -1        2        2     POSITIVE
    anchor 1   0.45  0.00       -1       -1       -1        1     LOW_QUALITY_POSITIVE
    anchor 2   0.33  0.00       -1        0        0        0     NEGATIVE

Anchor 1 (IoU 0.45, between the thresholds) would be ignored, but it is gt0's best anchor, so step 4
rescues it: without it gt0 would have no positive anchor at all.

Ignore regions (COCO ``iscrowd``): an anchor whose intersection-over-its-own-area with some ignore
box exceeds ``ignore_iof_thr`` stays ignored whatever its IoU, and takes no part in step 4.

Differences from MMDetection, on purpose:

- **Zero-IoU ground truth gets no match.** MMDetection's step 4 tests ``gt_max >= min_pos_iou``;
  with the RetinaNet default ``min_pos_iou=0`` a ground truth that overlaps no anchor at all
  (best IoU 0) then claims *every* anchor with IoU 0 to it — usually almost all anchors of the
  image — turning background into positives for a box they do not touch. Here step 4 also requires
  the best IoU to be ``> 0``, so such a ground truth simply has no positive anchor.
- ``max_iou`` is each anchor's true best IoU, also for anchors ignored through ``ignore_iof_thr``
  (MMDetection writes -1 there).
- Ignore regions still apply in an image without ground truth (MMDetection makes every anchor
  negative there, including those covering a crowd region).

A model configures the assigner with :class:`MaxIoUAssignerConfig` (MMDetection's ``assigner``
keys), the one assigner config of every family, and calls :func:`max_iou_assign_padded` with it.

Shape legend: ``B`` images, ``N`` boxes (anchors or proposals), ``G`` ground truths (padded to the
batch's largest), ``I`` ignore regions, ``L`` FPN levels.

Taught in ``notebooks/03_assignment_and_box_coding.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from instseg_edu.ops.boxes import batched_box_iof, batched_box_iou, box_iof, box_iou
from instseg_edu.structures import BACKGROUND, NO_GT

__all__ = [
    "IGNORED",
    "LOW_QUALITY_POSITIVE",
    "NEGATIVE",
    "POSITIVE",
    "REASON_NAMES",
    "Assignment",
    "AssignmentSteps",
    "MaxIoUAssignerConfig",
    "AssignmentSummary",
    "assignment_summary",
    "max_iou_assign",
    "max_iou_assign_batched",
    "max_iou_assign_padded",
    "max_iou_assign_steps",
]

# Why a box ended up where it did (``Assignment.reason``, uint8).
NEGATIVE = 0  # best IoU below neg_iou_thr (or inside the (lo, hi) range): background
IGNORED = 1  # between the thresholds, inside an ignore region, or an invalid (padding) anchor
POSITIVE = 2  # best IoU >= pos_iou_thr
LOW_QUALITY_POSITIVE = (
    3  # below pos_iou_thr, but rescued as some ground truth's best anchor (step 4)
)
REASON_NAMES = ("negative", "ignored", "positive", "low-quality positive")


class Assignment(NamedTuple):
    """The result of an assignment; every field has shape ``[N]`` (``[B, N]`` when batched).

    Attributes:
        gt_index: ``int64``; the assigned ground truth (0-based, a row of the image's — or the
            padded batch's — ground truth) for positive boxes, ``NO_GT`` (-1) for the others.
        max_iou: ``float32``; the box's best IoU with any (valid) ground truth, 0 without any.
        labels: ``int64``; the class of the assigned ground truth, ``BACKGROUND`` (-1) where not
            positive.
        reason: ``uint8``; one of ``NEGATIVE, IGNORED, POSITIVE, LOW_QUALITY_POSITIVE``: which of
            the non-positive boxes are negatives and which are ignored.
    """

    gt_index: Tensor
    max_iou: Tensor
    labels: Tensor
    reason: Tensor

    @property
    def gt_inds(self) -> Tensor:
        """MMDetection's encoding, read-only: -1 ignored, 0 negative, ``k >= 1`` positive for
        ground truth ``k - 1`` (``gt_index + 1`` for positives)."""
        not_pos = torch.where(self.reason == NEGATIVE, 0, -1)
        return torch.where(self.gt_index >= 0, self.gt_index + 1, not_pos)

    @staticmethod
    def from_gt_inds(gt_inds: Tensor, max_iou: Tensor, labels: Tensor, reason: Tensor):
        """An :class:`Assignment` from MMDetection's 1-based ``gt_inds``."""
        return Assignment(_to_gt_index(gt_inds), max_iou, labels, reason)


def _to_gt_index(gt_inds: Tensor) -> Tensor:
    """MMDetection's ``gt_inds`` (``k >= 1`` positive for ground truth ``k - 1``) → ``gt_index``."""
    return torch.where(gt_inds > 0, gt_inds - 1, NO_GT)


class AssignmentSteps(NamedTuple):
    """``gt_inds`` (``int64 [N]``) after each of the four steps, for teaching and for explorers."""

    step1_all_ignored: Tensor
    step2_negatives: Tensor
    step3_positives: Tensor
    step4_low_quality: Tensor


@dataclass(frozen=True)
class MaxIoUAssignerConfig:
    """``assigner`` (MMDetection's ``MaxIoUAssigner`` keys): the thresholds of the four steps.

    Defaults are RetinaNet's (Sec. 4: positive at IoU >= 0.5, background below 0.4). The RPN uses
    ``0.7, 0.3, min_pos_iou=0.3``; the R-CNN stage ``0.5, 0.5`` without low-quality matches.

    Attributes:
        pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality, gt_max_assign_all,
            ignore_iof_thr: see :func:`max_iou_assign`. ``neg_iou_thr`` is a float or a
            ``(lo, hi)`` pair.

    Raises:
        ValueError: naming the field, for thresholds outside ``[0, 1]`` or a ``neg_iou_thr``
            above ``pos_iou_thr`` (the one check :func:`max_iou_assign` also applies).
    """

    pos_iou_thr: float = 0.5
    neg_iou_thr: float | tuple[float, float] = 0.4
    min_pos_iou: float = 0.0
    match_low_quality: bool = True
    gt_max_assign_all: bool = True
    ignore_iof_thr: float = -1.0

    def __post_init__(self) -> None:
        # The one check of the thresholds: every assigner function builds this config.
        pos, neg = self.pos_iou_thr, self.neg_iou_thr
        if isinstance(neg, list):
            neg = tuple(neg)
            object.__setattr__(self, "neg_iou_thr", neg)
        if not 0.0 <= pos <= 1.0:
            raise ValueError(f"pos_iou_thr={pos} must be in [0, 1]")
        if isinstance(neg, tuple):
            if len(neg) != 2:
                raise ValueError(f"neg_iou_thr={neg!r} must be a float or a (lo, hi) pair")
            if not 0.0 <= neg[0] <= neg[1]:
                raise ValueError(f"neg_iou_thr={neg} must satisfy 0 <= lo <= hi")
            if neg[1] > pos:
                raise ValueError(f"neg_iou_thr={neg}: hi must be <= pos_iou_thr={pos}")
        elif neg > pos:
            raise ValueError(f"neg_iou_thr={neg} must be <= pos_iou_thr={pos}")
        elif neg < 0:
            raise ValueError(f"neg_iou_thr={neg} must be >= 0")
        if not 0.0 <= self.min_pos_iou <= 1.0:
            raise ValueError(f"min_pos_iou={self.min_pos_iou} must be in [0, 1]")


def _config(cfg: MaxIoUAssignerConfig | None, thresholds: dict) -> MaxIoUAssignerConfig:
    """The assigner config of a call: ``cfg``, or one built (and checked) from keywords."""
    if cfg is None:
        return MaxIoUAssignerConfig(**thresholds)
    if thresholds:
        raise TypeError(
            f"give the thresholds as cfg or as keywords, not both: {sorted(thresholds)}"
        )
    return cfg


def _is_negative(max_iou: Tensor, neg_iou_thr) -> Tensor:
    """Step 2's test on the best IoU: below a float threshold, or inside ``[lo, hi)``."""
    if isinstance(neg_iou_thr, (tuple, list)):
        lo, hi = neg_iou_thr
        return (max_iou >= lo) & (max_iou < hi)
    return (max_iou >= 0) & (max_iou < neg_iou_thr)


def _ignored_by_regions(boxes: Tensor, gt_boxes_ignore, ignore_iof_thr: float) -> Tensor:
    """``bool [N]``: the box lies (IoF > thr) inside some ignore region."""
    if ignore_iof_thr <= 0 or gt_boxes_ignore is None or gt_boxes_ignore.numel() == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    return box_iof(boxes, gt_boxes_ignore).amax(dim=1) > ignore_iof_thr  # [N, I] -> [N]


def max_iou_assign_steps(
    iou: Tensor,
    cfg: MaxIoUAssignerConfig | None = None,
    *,
    ignored: Tensor | None = None,
    **thresholds,
) -> AssignmentSteps:
    """The four steps of MaxIoU assignment on a given IoU matrix (the readable reference).

    Args:
        iou: ``float [N, G]`` IoU of every box (anchor) with every ground truth.
        cfg: the thresholds, a :class:`MaxIoUAssignerConfig` — or give its fields as keywords
            (``pos_iou_thr=0.5, neg_iou_thr=0.4, ...``, as to :func:`max_iou_assign`).
        ignored: ``bool [N]`` boxes forced to stay ignored (inside an ignore region); they are
            neither negative nor positive and no ground truth can claim them in step 4.

    Returns:
        :class:`AssignmentSteps`, ``gt_inds`` (``int64 [N]``) after each step.
    """
    cfg = _config(cfg, thresholds)
    pos_iou_thr, neg_iou_thr, min_pos_iou = cfg.pos_iou_thr, cfg.neg_iou_thr, cfg.min_pos_iou
    n, g = iou.shape
    if ignored is not None:
        # As MMDetection: an ignored box's IoUs become -1, so it can win nothing below.
        iou = iou.masked_fill(ignored[:, None], -1.0)  # [N, G]

    # 1. everything ignored
    step1 = torch.full((n,), -1, dtype=torch.long, device=iou.device)
    if g == 0:  # no ground truth: everything not inside an ignore region is background
        step2 = step1.clone() if ignored is not None else torch.zeros_like(step1)
        if ignored is not None:
            step2[~ignored] = 0
        return AssignmentSteps(step1, step2, step2.clone(), step2.clone())
    if n == 0:
        return AssignmentSteps(step1, step1.clone(), step1.clone(), step1.clone())

    max_iou, argmax = iou.max(dim=1)  # [N]: each box's best ground truth

    # 2. negatives: best IoU below the negative threshold
    step2 = step1.clone()
    step2[_is_negative(max_iou, neg_iou_thr)] = 0

    # 3. positives: best IoU at least the positive threshold
    step3 = step2.clone()
    pos = max_iou >= pos_iou_thr
    step3[pos] = argmax[pos] + 1

    # 4. low-quality matches: each ground truth claims its best box(es)
    step4 = step3.clone()
    if cfg.match_low_quality:
        gt_max, gt_argmax = iou.max(dim=0)  # [G]: each ground truth's best box
        for k in range(g):  # in order: a later ground truth overwrites an earlier claim
            # "> 0" is our fix of MMDetection's degenerate case (see the module docstring).
            if gt_max[k] >= min_pos_iou and gt_max[k] > 0:
                if cfg.gt_max_assign_all:
                    step4[iou[:, k] == gt_max[k]] = k + 1
                else:
                    step4[gt_argmax[k]] = k + 1
    return AssignmentSteps(step1, step2, step3, step4)


@torch.no_grad()  # assignment is a target, never differentiated
def max_iou_assign(
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    pos_iou_thr: float,
    neg_iou_thr: float | tuple[float, float],
    min_pos_iou: float = 0.0,
    match_low_quality: bool = True,
    gt_max_assign_all: bool = True,
    ignore_iof_thr: float = -1.0,
    gt_boxes_ignore: Tensor | None = None,
) -> Assignment:
    """Assign each box (anchor or proposal) of one image to a ground truth or to background.

    See the module docstring for the four steps and a worked example.

    Args:
        boxes: ``float [N, 4]`` xyxy pixels (anchors or proposals).
        gt_boxes: ``float [G, 4]`` xyxy pixels.
        gt_labels: ``int64 [G]`` classes ``0..C-1``.
        pos_iou_thr: step 3's threshold (RetinaNet 0.5, RPN 0.7, R-CNN 0.5).
        neg_iou_thr: step 2's threshold (RetinaNet 0.4, RPN 0.3, R-CNN 0.5), or a ``(lo, hi)`` pair.
        min_pos_iou: step 4's lower bound on a ground truth's best IoU (RetinaNet 0, RPN 0.3).
        match_low_quality: run step 4 (RetinaNet and RPN: yes; R-CNN: no).
        gt_max_assign_all: in step 4, claim every box tied at the best IoU, not just the first.
        ignore_iof_thr: boxes whose IoF with an ignore region exceeds this stay ignored; ``<= 0``
            disables.
        gt_boxes_ignore: ``float [I, 4]`` xyxy ignore regions (COCO crowd boxes), or ``None``.

    Returns:
        :class:`Assignment` with fields of shape ``[N]``. No ground truth: everything negative
        (except boxes inside ignore regions). No boxes: empty fields.

    Raises:
        ValueError: for inconsistent thresholds (e.g. ``neg_iou_thr > pos_iou_thr``) or shapes.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [G, 4], got {tuple(gt_boxes.shape)}")
    if gt_labels.shape != gt_boxes.shape[:1]:
        raise ValueError(
            f"gt_labels must be [G] with G={gt_boxes.shape[0]}, got {tuple(gt_labels.shape)}"
        )
    cfg = MaxIoUAssignerConfig(
        pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality, gt_max_assign_all, ignore_iof_thr
    )  # checks the thresholds
    iou = box_iou(boxes, gt_boxes)  # [N, G]
    ignored = _ignored_by_regions(boxes, gt_boxes_ignore, ignore_iof_thr)  # [N]
    steps = max_iou_assign_steps(iou, cfg, ignored=ignored)
    gt_inds = steps.step4_low_quality
    if gt_boxes.shape[0] == 0:
        max_iou = torch.zeros(boxes.shape[0], dtype=boxes.dtype, device=boxes.device)
    else:
        max_iou = iou.amax(dim=1)  # [N], the true best IoU, also for ignored boxes

    reason = torch.full_like(gt_inds, IGNORED, dtype=torch.uint8)
    reason[gt_inds == 0] = NEGATIVE
    # Positive by threshold (step 3) even when step 4 handed the box to another ground truth.
    reason[(steps.step3_positives > 0) & (gt_inds > 0)] = POSITIVE
    reason[(steps.step3_positives <= 0) & (gt_inds > 0)] = LOW_QUALITY_POSITIVE

    labels = torch.full_like(gt_inds, BACKGROUND)
    pos = gt_inds > 0
    labels[pos] = gt_labels[gt_inds[pos] - 1]
    return Assignment(_to_gt_index(gt_inds), max_iou, labels, reason)


@torch.no_grad()  # assignment is a target, never differentiated
def max_iou_assign_batched(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    cfg: MaxIoUAssignerConfig | None = None,
    *,
    anchor_valid: Tensor | None = None,
    gt_boxes_ignore: Tensor | None = None,
    ignore_valid: Tensor | None = None,
    **thresholds,
) -> Assignment:
    """:func:`max_iou_assign` for a whole padded batch in a few tensor operations.

    No Python loop over images or boxes and no host synchronisation (no ``.item()``, no boolean
    indexing with a data-dependent result size), so on a GPU the whole batch is one short burst of
    kernels. Image ``b`` gets exactly what ``max_iou_assign`` gives for
    ``anchors[anchor_valid[b]]`` and its valid ground truth, with the invalid anchors ``IGNORED``.

    Args:
        anchors: ``float [N, 4]`` or ``[1, N, 4]`` (shared by all images) or ``[B, N, 4]``, xyxy
            pixels.
        gt_boxes: ``float [B, G, 4]`` xyxy, padded to the batch's largest ``G``.
        gt_labels: ``int64 [B, G]``.
        gt_valid: ``bool [B, G]``, False for padding rows.
        cfg: the thresholds, a :class:`MaxIoUAssignerConfig` — or give its fields as keywords
            (``pos_iou_thr=0.5, neg_iou_thr=0.4, ...``, as to :func:`max_iou_assign`).
        anchor_valid: ``bool [B, N]`` (e.g. :meth:`AnchorGenerator.valid_flags` of each image);
            invalid anchors are ``IGNORED`` and take no part in step 4. ``None``: all valid.
        gt_boxes_ignore: ``float [B, I, 4]`` ignore regions, padded.
        ignore_valid: ``bool [B, I]``, False for padding rows of ``gt_boxes_ignore``.

    Returns:
        :class:`Assignment` with every field shaped ``[B, N]``; ``gt_index`` indexes the padded
        ``G`` axis of ``gt_boxes`` (so ``torch.gather`` on the padded tensors finds the box).
    """
    cfg = _config(cfg, thresholds)
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, G, 4], got {tuple(gt_boxes.shape)}")
    b, g = gt_boxes.shape[:2]
    if gt_labels.shape != (b, g) or gt_valid.shape != (b, g):
        raise ValueError(
            f"gt_labels and gt_valid must be [B, G] = {(b, g)}, got "
            f"{tuple(gt_labels.shape)} and {tuple(gt_valid.shape)}"
        )
    if anchors.dim() == 2:
        n = anchors.shape[0]
    elif anchors.dim() == 3 and anchors.shape[0] in (1, b):
        n = anchors.shape[1]
    else:
        raise ValueError(
            f"anchors must be [N, 4], [1, N, 4] or [B={b}, N, 4], got {tuple(anchors.shape)}"
        )
    device = gt_boxes.device
    if anchor_valid is None:
        anchor_ok = torch.ones(b, n, dtype=torch.bool, device=device)
    else:
        if anchor_valid.shape != (b, n):
            raise ValueError(
                f"anchor_valid must be [B, N] = {(b, n)}, got {tuple(anchor_valid.shape)}"
            )
        anchor_ok = anchor_valid.clone()
    ignore_used = (
        cfg.ignore_iof_thr > 0 and gt_boxes_ignore is not None and gt_boxes_ignore.shape[1] > 0
    )
    if ignore_used:
        iof = batched_box_iof(anchors, gt_boxes_ignore)  # [B, N, I]
        if ignore_valid is not None:
            iof = iof.masked_fill(~ignore_valid[:, None, :], 0.0)  # padding regions ignore nothing
        anchor_ok &= ~(iof.amax(dim=2) > cfg.ignore_iof_thr)  # [B, N]

    has_gt = gt_valid.any(dim=1, keepdim=True)  # [B, 1]
    if g == 0:
        gt_index = torch.full((b, n), NO_GT, dtype=torch.long, device=device)
        reason = torch.where(anchor_ok, NEGATIVE, IGNORED).to(torch.uint8)
        labels = torch.full((b, n), BACKGROUND, dtype=torch.long, device=device)
        return Assignment(gt_index, torch.zeros(b, n, device=device), labels, reason)

    # The [B, N, G] IoU is the only big tensor; it is modified in place below (it is ours), so the
    # whole assignment makes a handful of passes over it.
    iou = batched_box_iou(anchors, gt_boxes, gt_valid, fill=-1.0)  # [B, N, G]; padding: -1
    best, argmax = iou.max(dim=2)  # [B, N] each: each anchor's best valid ground truth
    max_iou = best.clamp(min=0)  # the true best IoU (0 in an image without ground truth)
    eff_max = torch.where(anchor_ok, best, -1.0)  # invalid / ignored anchors win nothing

    # Step 2 (an image without ground truth: all its valid anchors are background).
    neg = anchor_ok & (_is_negative(eff_max, cfg.neg_iou_thr) | ~has_gt)  # [B, N]
    # Step 3.
    pos = eff_max >= cfg.pos_iou_thr  # [B, N]
    gt_inds = torch.where(pos, argmax + 1, torch.where(neg, 0, -1))  # [B, N]

    # Step 4, vectorised: is_best[b, n, k] = box n is one that ground truth k claims; the claim of
    # the highest k wins, as in the reference loop over ground truth.
    lq = torch.zeros_like(pos)
    if cfg.match_low_quality:
        if anchor_valid is not None or ignore_used:
            iou.masked_fill_(~anchor_ok[:, :, None], -1.0)  # they cannot be claimed either
        gt_max, gt_argmax = iou.max(dim=1)  # [B, G] each: each ground truth's best anchor
        claims = gt_valid & (gt_max >= cfg.min_pos_iou) & (gt_max > 0)  # [B, G]
        if cfg.gt_max_assign_all:
            # every anchor tied at the best IoU; 2.0 (above any IoU) for a ground truth that
            # claims nothing
            target = torch.where(claims, gt_max, 2.0)  # [B, G]
            is_best = iou == target[:, None, :]  # [B, N, G]
        else:
            is_best = torch.zeros(b, n, g, dtype=torch.bool, device=device).scatter_(
                1, gt_argmax[:, None, :], claims[:, None, :]
            )  # [B, N, G]: one box per claiming ground truth
        k = torch.arange(1, g + 1, device=device, dtype=torch.int32)  # [G], 1-based
        winner = (is_best * k).amax(dim=2)  # [B, N] int32, 0 when no claim
        lq = winner > 0
        gt_inds = torch.where(lq, winner.long(), gt_inds)

    reason = torch.full((b, n), IGNORED, dtype=torch.uint8, device=device)
    reason = torch.where(neg, NEGATIVE, reason)
    reason = torch.where(lq & ~pos, LOW_QUALITY_POSITIVE, reason)
    reason = torch.where(pos, POSITIVE, reason).to(torch.uint8)

    assigned = gt_inds > 0
    gathered = torch.gather(gt_labels, 1, (gt_inds - 1).clamp(min=0))  # [B, N]
    labels = torch.where(assigned, gathered, BACKGROUND)
    return Assignment(_to_gt_index(gt_inds), max_iou, labels, reason)


class AssignmentSummary(NamedTuple):
    """What an explorer needs to explain one image's assignment.

    Attributes:
        pos_per_gt: ``int64 [G]`` positive boxes per ground truth.
        unmatched_gt: ``int64 [U]`` indices of ground truth with no positive box.
        counts: ``int64 [4]`` boxes per reason (index with ``NEGATIVE, IGNORED, POSITIVE,
            LOW_QUALITY_POSITIVE``).
        counts_per_level: ``int64 [L, 4]`` the same per FPN level, or ``None`` without
            ``level_sizes``.
    """

    pos_per_gt: Tensor
    unmatched_gt: Tensor
    counts: Tensor
    counts_per_level: Tensor | None


def max_iou_assign_padded(
    anchors: Tensor, gt, cfg: MaxIoUAssignerConfig, anchor_valid: Tensor | None = None
) -> Assignment:
    """:func:`max_iou_assign_batched` with a model's assigner config and padded ground truth.

    Args:
        anchors: ``[N, 4]`` (shared by the batch) or ``[B, N, 4]``.
        gt: a :class:`~instseg_edu.structures.PaddedTargets` (boxes, labels, valid and ignore
            regions of the batch).
        cfg: the model's :class:`MaxIoUAssignerConfig`.
        anchor_valid: ``bool [B, N]`` or None.
    """
    return max_iou_assign_batched(
        anchors,
        gt.boxes,
        gt.labels,
        gt.valid,
        cfg,
        anchor_valid=anchor_valid,
        gt_boxes_ignore=gt.ignore_boxes,
        ignore_valid=gt.ignore_valid,
    )


def assignment_summary(
    assignment: Assignment, num_gt: int, level_sizes: list[int] | None = None
) -> AssignmentSummary:
    """Count an assignment: positives per ground truth, unmatched ground truth, reasons per level.

    Args:
        assignment: one image's :class:`Assignment` (fields ``[N]``).
        num_gt: the image's number of ground truth ``G``.
        level_sizes: anchors per FPN level (``H*W*A`` each, summing to ``N``), in the order the
            anchors were concatenated; optional.

    Returns:
        :class:`AssignmentSummary`.
    """
    gt_index, reason = assignment.gt_index, assignment.reason
    if gt_index.dim() != 1:
        raise ValueError(
            f"assignment_summary takes one image's assignment ([N]), got {tuple(gt_index.shape)}"
        )
    pos = gt_index >= 0
    pos_per_gt = torch.bincount(gt_index[pos], minlength=num_gt)[:num_gt]  # [G]
    unmatched = torch.nonzero(pos_per_gt == 0).flatten()
    r = reason.long()
    counts = torch.bincount(r, minlength=4)[:4]
    per_level = None
    if level_sizes is not None:
        if sum(level_sizes) != gt_index.shape[0]:
            raise ValueError(
                f"level_sizes sum to {sum(level_sizes)} but the assignment has "
                f"{gt_index.shape[0]} boxes"
            )
        per_level = torch.stack(
            [torch.bincount(part, minlength=4)[:4] for part in r.split(list(level_sizes))]
        )  # [L, 4]
    return AssignmentSummary(pos_per_gt, unmatched, counts, per_level)
