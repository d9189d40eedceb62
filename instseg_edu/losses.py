"""Losses used by the four model families, each a small function.

All element-wise losses share one reduction rule (MMDetection's ``weight_reduce_loss``):

1. compute the loss per element (``reduction="none"`` returns exactly this, times ``weight``);
2. multiply by ``weight`` if given (broadcastable to the loss: a 0 removes an element, e.g. an
   ignored anchor);
3. reduce: ``"sum"``, ``"mean"`` (over all elements), or — when ``avg_factor`` is given — the sum
   divided by ``avg_factor``. RetinaNet divides its focal loss by the number of positive anchors,
   not by the number of anchors (Lin et al. 2017, Sec. 3.3: "normalized by the number of anchors
   assigned to a ground-truth box"), because almost all of the ~100k anchors are easy negatives.

``avg_factor`` may be a Python number or a 0-d tensor (so a positive count computed on the GPU
needs no host synchronisation). As in MMDetection a tiny ``eps`` is added to it, so
``avg_factor=0`` gives 0 for an all-zero loss instead of NaN.

Under data-parallel training (``torchrun`` + ``DistributedDataParallel``) every process sees only
its share of the batch, so a count such as "positive anchors of the batch" must be the count of
the *whole* batch: :func:`global_avg_factor` sums it over the processes (MMDetection's
``reduce_mean(num_total_pos)``) and does nothing in a single process.

A model's config names each of its loss terms with one of the loss configs at the end of this
module (MMDetection's ``loss_cls=dict(type='FocalLoss', ...)`` and friends, without ``type``): the
parameters of the loss and its ``loss_weight``, the factor the term is multiplied by. The focal,
L1 and smooth-L1 configs are called like MMDetection's loss modules,
``cfg(pred, target, weight=..., avg_factor=...)``: the summed, weighted loss divided by
``avg_factor``, times ``loss_weight``. A family reduces its cross-entropy and dice terms its own
way and multiplies them by their ``loss_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from instseg_edu.config import check_at_least, check_in_range

__all__ = [
    "CrossEntropyLossConfig",
    "DiceLossConfig",
    "FocalLossConfig",
    "L1LossConfig",
    "SmoothL1LossConfig",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "dice_loss",
    "global_avg_factor",
    "l1_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_reference",
    "smooth_l1_loss",
    "weight_reduce_loss",
]

_REDUCTIONS = ("none", "mean", "sum")


def weight_reduce_loss(
    loss: Tensor,
    reduction: str = "mean",
    *,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Weight an element-wise loss and reduce it (see the module docstring).

    Args:
        loss: element-wise loss, any shape.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        weight: broadcastable to ``loss``; multiplies it element-wise.
        avg_factor: when given, the result is ``loss.sum() / avg_factor`` (``reduction`` must
            then be ``"mean"`` or ``"sum"``).

    Returns:
        A scalar, or ``loss * weight`` for ``reduction="none"``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {_REDUCTIONS}")
    if weight is not None:
        loss = loss * weight
    if avg_factor is not None:
        if reduction == "none":
            raise ValueError("avg_factor needs reduction='mean' or 'sum', got reduction='none'")
        return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def global_avg_factor(
    count: Tensor | int | float, clamp_min: float | None = None, offset: float = 0.0
) -> Tensor | int | float:
    """A loss normaliser of this process that makes data-parallel training exact.

    A loss of the form ``Σ over the batch / count(batch)`` (positives, sampled RoIs, mask pixels)
    is computed by each of ``W`` processes on its share of the global batch, and
    ``DistributedDataParallel`` then *averages* the gradients (divides their sum by ``W``). Dividing
    each share's sum by ``total / W``, where ``total`` is the count summed over every process,
    makes that average exactly the gradient of one process over the whole global batch::

        mean_r ∇(Σ_r / (total / W)) = ∇(Σ_all) / total

    (e.g. 2 processes with 3 and 5 positives: each divides by 8 / 2 = 4, not by its own 3 or 5).
    ``clamp_min`` and ``offset`` are applied to the *total*, as one process would apply them to
    its count: ``(max(total, clamp_min) + offset) / W``. The mean over processes of the logged
    losses is then also the single-process loss.

    Without an initialised process group this is ``max(count, clamp_min) + offset`` of ``count``
    itself (same type, no copy, no host synchronisation). With one, it costs one ``all_reduce``
    of a scalar (queued on the GPU like any kernel, so no host synchronisation either).

    Source: MMDetection ``mmdet/utils/dist_utils.py`` ``reduce_mean`` as used by its dense heads.

    Args:
        count: the local count, a 0-d tensor or a Python number.
        clamp_min: lower bound of the total (e.g. 1, so that a batch without positives divides by
            1), or ``None``.
        offset: added to the total after clamping (SOLO's ``num_pos + 1``).

    Returns:
        A 0-d tensor (or, in a single process, the same kind as ``count``).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if clamp_min is not None and isinstance(count, Tensor):
            count = count.clamp(min=clamp_min)
        elif clamp_min is not None:
            count = max(count, clamp_min)
        return count + offset if offset else count
    if isinstance(count, Tensor):
        total = count.detach().clone()
    else:
        cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        total = torch.full((), float(count), device=device)  # a fill: no host-to-GPU copy
    dist.all_reduce(total)  # sum over processes
    if clamp_min is not None:
        total = total.clamp(min=clamp_min)
    if offset:
        total = total + offset
    return total / dist.get_world_size()


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
    *,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Focal loss on independent per-class sigmoids (RetinaNet, Lin et al. 2017, Sec. 3.2, Eq. 5).

    ``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)``: the cross-entropy of each (anchor, class)
    logit, scaled down by ``(1 - p_t)^gamma`` when the prediction is already right. With
    ``gamma=2`` an easy negative at ``p = 0.1`` contributes 100× less than plain cross-entropy.
    Equal to :func:`torchvision.ops.sigmoid_focal_loss` (which defaults to ``reduction="none"``)
    and to :func:`sigmoid_focal_loss_reference`, Eq. 5 written term by term.

    How it is computed: flip the sign of the logit where the target is 1, ``s = x`` for a
    negative and ``s = -x`` for a positive. Then ``s`` is the logit of being *wrong*:
    ``1 - p_t = sigmoid(s)`` and ``-log(p_t) = softplus(s)``, so
    ``FL = alpha_t · softplus(s) · sigmoid(s)^gamma``. That is five element-wise passes over
    ``[..., C]`` where the term-by-term form takes about twelve; RetinaNet evaluates this on every
    anchor and class (2 × 12 276 × 80 values for two 256 px images), so it is a visible part of a
    CPU training step.

    Args:
        logits: ``float [..., C]`` raw scores (one binary classifier per foreground class).
        targets: same shape, one-hot ``{0, 1}`` (an all-zero row is background); float, int or
            bool. Soft targets in between are not supported (the sign flip needs 0 or 1).
        alpha: weight of the positive term in ``[0, 1]``; ``< 0`` disables the alpha weighting.
        gamma: focusing parameter ``>= 0`` (0 gives plain BCE, times ``alpha_t``).
        reduction, weight, avg_factor: see :func:`weight_reduce_loss`.

    Returns:
        A scalar, or the element-wise loss (shape of ``logits``) for ``reduction="none"``.

    Raises:
        ValueError: ``gamma < 0``.
    """
    if gamma < 0:
        raise ValueError(f"gamma={gamma} must be >= 0")
    targets = targets.to(logits.dtype)
    s = logits * (1 - 2 * targets)  # the logit of being wrong: x for a negative, -x for a positive
    loss = F.softplus(s) * torch.sigmoid(s) ** gamma  # -log(p_t) · (1 - p_t)^gamma
    if alpha >= 0:
        loss = loss * ((1 - alpha) + (2 * alpha - 1) * targets)  # alpha_t: alpha or 1 - alpha
    return weight_reduce_loss(loss, reduction, weight=weight, avg_factor=avg_factor)


def sigmoid_focal_loss_reference(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """:func:`sigmoid_focal_loss` with ``reduction="none"``, written as Eq. 5 reads: ``p``,
    ``p_t``, the cross-entropy, the modulating factor and ``alpha_t`` one by one (as
    torchvision's ``sigmoid_focal_loss``). Element-wise ``[..., C]``; tested equal."""
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def smooth_l1_loss(
    pred: Tensor,
    target: Tensor,
    beta: float = 1.0,
    reduction: str = "mean",
    *,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Smooth L1 (Huber-like) loss (Fast R-CNN, Girshick 2015, Sec. 2.3, Eq. 3).

    ``0.5 x² / beta`` for ``|x| < beta``, ``|x| - 0.5 beta`` otherwise (``x = pred - target``):
    quadratic near zero, linear for outliers. ``beta=0`` is plain L1. Equal to
    :func:`torch.nn.functional.smooth_l1_loss`.

    Args:
        pred, target: ``float``, same shape (e.g. ``[N, 4]`` deltas).
        beta: the switch point, ``>= 0`` (Fast R-CNN: 1; MMDetection's R-CNN configs: 1.0 or 1/9).
        reduction, weight, avg_factor: see :func:`weight_reduce_loss`.
    """
    if beta < 0:
        raise ValueError(f"beta={beta} must be >= 0")
    diff = (pred - target).abs()
    if beta == 0:
        loss = diff
    else:
        loss = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    return weight_reduce_loss(loss, reduction, weight=weight, avg_factor=avg_factor)


def l1_loss(
    pred: Tensor,
    target: Tensor,
    reduction: str = "mean",
    *,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """L1 loss ``|pred - target|`` (RetinaNet's box loss in MMDetection 2.x/3.x).

    Args:
        pred, target: ``float``, same shape.
        reduction, weight, avg_factor: see :func:`weight_reduce_loss`.
    """
    loss = (pred - target).abs()
    return weight_reduce_loss(loss, reduction, weight=weight, avg_factor=avg_factor)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    reduction: str = "mean",
    *,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy, one loss per sample (R-CNN box classifier: ``C + 1`` logits with
    background last, as in MMDetection).

    Args:
        logits: ``float [N, K]``.
        labels: ``int64 [N]`` in ``0..K-1``.
        weight: per-sample weights ``[N]`` (not per-class weights).
        reduction, avg_factor: see :func:`weight_reduce_loss`.
    """
    loss = F.cross_entropy(logits, labels, reduction="none")  # [N]
    return weight_reduce_loss(loss, reduction, weight=weight, avg_factor=avg_factor)


def binary_cross_entropy_with_logits(
    logits: Tensor,
    targets: Tensor,
    reduction: str = "mean",
    *,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Per-element sigmoid cross-entropy (Mask R-CNN's mask loss, He et al. 2017, Sec. 3;
    YOLACT's mask loss).

    Args:
        logits, targets: ``float``, same shape; targets in ``[0, 1]``.
        reduction, weight, avg_factor: see :func:`weight_reduce_loss`.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return weight_reduce_loss(loss, reduction, weight=weight, avg_factor=avg_factor)


def dice_loss(probs: Tensor, targets: Tensor, eps: float = 1e-3) -> Tensor:
    """Dice loss, one value per instance (V-Net, Milletari et al. 2016, Eq. 1; SOLO, Wang et al.
    2020, Sec. 3.3, Eq. 4).

    ``1 - 2 Σ p·t / (Σ p² + eps + Σ t² + eps)`` over each instance's pixels: it compares the whole
    predicted mask with the whole target, so a small object counts as much as a large one and the
    many background pixels do not swamp the loss. Values in ``[0, 1]``; 0 for a perfect mask.

    Args:
        probs: ``float [N, H, W]`` (or ``[N, ...]``) mask probabilities in ``[0, 1]``.
        targets: same shape, ``{0, 1}`` (bool is accepted).
        eps: added to each sum of squares (MMDetection's SOLO: 1e-3).

    Returns:
        ``float [N]``.
    """
    if probs.shape != targets.shape:
        raise ValueError(
            f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} "
            "must have the same shape"
        )
    p = probs.flatten(1)  # [N, H*W]
    t = targets.flatten(1).to(p.dtype)  # [N, H*W]
    a = (p * t).sum(dim=1)
    b = (p * p).sum(dim=1) + eps
    c = (t * t).sum(dim=1) + eps
    return 1 - 2 * a / (b + c)


# --------------------------------------------------------------------------------------------------
# Loss configs (MMDetection's ``loss_*`` keys)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FocalLossConfig:
    """``FocalLoss``: :func:`sigmoid_focal_loss` with ``alpha`` in ``[0, 1]`` (the weight of
    positives) and ``gamma >= 0``, times ``loss_weight``."""

    alpha: float = 0.25
    gamma: float = 2.0
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check_in_range(self, "alpha", 0, 1)
        check_at_least(self, 0, "gamma", "loss_weight")

    def __call__(self, logits: Tensor, targets: Tensor, *, weight=None, avg_factor=None) -> Tensor:
        """``loss_weight ×`` :func:`sigmoid_focal_loss` summed (``weight``, ``avg_factor``)."""
        loss = sigmoid_focal_loss(
            logits, targets, self.alpha, self.gamma, "sum", weight=weight, avg_factor=avg_factor
        )
        return self.loss_weight * loss


@dataclass(frozen=True)
class L1LossConfig:
    """``L1Loss``: :func:`l1_loss` times ``loss_weight``."""

    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check_at_least(self, 0, "loss_weight")

    def __call__(self, pred: Tensor, target: Tensor, *, weight=None, avg_factor=None) -> Tensor:
        """``loss_weight ×`` :func:`l1_loss` summed (``weight``, ``avg_factor``)."""
        loss = l1_loss(pred, target, "sum", weight=weight, avg_factor=avg_factor)
        return self.loss_weight * loss


@dataclass(frozen=True)
class SmoothL1LossConfig:
    """``SmoothL1Loss``: :func:`smooth_l1_loss` with switch point ``beta >= 0``, times
    ``loss_weight``."""

    beta: float = 1.0
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check_at_least(self, 0, "beta", "loss_weight")

    def __call__(self, pred: Tensor, target: Tensor, *, weight=None, avg_factor=None) -> Tensor:
        """``loss_weight ×`` :func:`smooth_l1_loss` summed (``weight``, ``avg_factor``)."""
        loss = smooth_l1_loss(pred, target, self.beta, "sum", weight=weight, avg_factor=avg_factor)
        return self.loss_weight * loss


@dataclass(frozen=True)
class CrossEntropyLossConfig:
    """``CrossEntropyLoss``: softmax cross-entropy, or per-element sigmoid cross-entropy where the
    head predicts independent sigmoids (an objectness, a mask), times ``loss_weight``."""

    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check_at_least(self, 0, "loss_weight")


@dataclass(frozen=True)
class DiceLossConfig:
    """``DiceLoss``: :func:`dice_loss` times ``loss_weight`` (SOLO: 3)."""

    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check_at_least(self, 0, "loss_weight")
