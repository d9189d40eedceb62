"""Non-maximum suppression variants of the instance-segmentation families.

Ordinary greedy box NMS (RetinaNet, Mask R-CNN) is torchvision's compiled ``nms``;
:func:`class_aware_nms` runs it once for all classes. This module also holds the variants that the
one-stage mask models introduced, each a few tensor operations:

- :func:`fast_nms` — YOLACT (Bolya et al. 2019, Sec. 5 "Fast NMS"). Greedy NMS is sequential: a
  box may suppress others only if it survived itself. Fast NMS drops that rule so everything is one
  matrix: sort each class by score, compute the ``[k, k]`` IoU matrix, keep its upper triangle
  (``iou[i, j]`` for ``i`` scored above ``j``) and discard box ``j`` when its largest IoU with any
  higher-scored box exceeds the threshold — even if that box was itself discarded. Slightly more
  boxes are removed than with greedy NMS (0.1 mAP in the paper), in a fraction of the time.
  :func:`fast_nms_batched` does it for a batch of images with data-independent shapes: the caller
  reads the numbers of kept boxes once (one host synchronisation for the whole batch).
- :func:`matrix_nms` — SOLOv2 (Wang et al. 2020, Sec. 3.3 "Matrix NMS"). Instead of removing masks,
  *decay* each mask's score by how much it overlaps higher-scored masks of its class, compensated by
  how much those masks were overlapped themselves; then a score threshold does the removal.
- :func:`points_nms` — SOLO's category-grid peak picking: a grid cell keeps its score only if it is
  the maximum of the 2×2 window made of itself and its top, left and top-left neighbours.
- :func:`mask_nms` — plain greedy NMS with mask IoU instead of box IoU (a readable reference).

Taught in the SOLO and YOLACT walkthroughs in ``notebooks/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from instseg_edu.ops.boxes import batched_box_iou, box_iou

__all__ = [
    "NMSConfig",
    "FastNMSResult",
    "PREFIX_FACTOR",
    "class_aware_nms",
    "fast_nms",
    "fast_nms_batched",
    "fast_nms_reference",
    "mask_nms",
    "matrix_nms",
    "points_nms",
]


@dataclass(frozen=True)
class NMSConfig:
    """``nms=dict(type='nms', iou_threshold=...)`` of an MMDetection ``test_cfg``: greedy box NMS
    (:func:`class_aware_nms`) that discards a box whose IoU with a kept, higher-scored box of its
    class is above ``iou_threshold``, in ``(0, 1]``."""

    iou_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"nms.iou_threshold={self.iou_threshold} must be in (0, 1]")


#: :func:`class_aware_nms` with ``max_num`` first runs NMS on the ``PREFIX_FACTOR * max_num``
#: best-scored boxes only (and on twice as many again, in the rare case that too few survive).
PREFIX_FACTOR = 4


def class_aware_nms(
    boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, max_num: int = -1
) -> Tensor:
    """Greedy NMS inside each class (or any group id), in one ``nms`` call.

    The coordinate trick: shift every box by ``label * span`` along both axes, ``span`` one more
    than the extent of all coordinates. Boxes of different classes then lie in disjoint squares
    and never overlap, so one NMS over
    the shifted boxes suppresses exactly what NMS per class would. torchvision's ``batched_nms``
    does the same for small inputs but above 4 000 coordinates (CPU) or 20 000 (CUDA) switches to a
    loop over the classes — one ``nonzero`` and one NMS per class, each a host synchronisation;
    here it is always one call (one synchronisation: greedy NMS finishes on the host).

    ``max_num``: only the first ``max_num`` kept boxes are wanted (a detector's
    ``max_per_img``). Greedy NMS visits the boxes by descending score, and whether it keeps a box
    depends only on the boxes visited before it. So NMS over the ``M`` best-scored boxes keeps
    exactly the kept boxes of the full run that lie among those ``M``; if that is at least
    ``max_num`` boxes, they are the full run's first ``max_num``. The prefix (``M =
    PREFIX_FACTOR * max_num``, doubled until enough survive or it holds every box) turns an
    ``N x kept`` pass into an ``M x kept`` one: for RetinaNet at score threshold 0, ``N`` is about
    4 000 candidates and ``M`` 400. Example: scores ``[.9, .8, .7, .6]``, ``max_num=1`` with a
    prefix of 2: NMS over the first two keeps box 0, and box 0 is the full run's first kept box
    whatever boxes 2 and 3 are. The shift ``span`` is computed over all ``N`` boxes, so the
    shifted coordinates, and with them every IoU, are those of the full run.

    Args:
        boxes: ``float [N, 4]`` xyxy; scores: ``float [N]``; labels: ``int64 [N]`` group ids.
        iou_threshold: discard a box whose IoU with a kept, higher-scored box of its class is
            above this.
        max_num: return at most this many kept boxes (``-1``: all).

    Returns:
        ``int64 [K]`` indices of the kept boxes, by descending score (``K <= max_num`` when
        ``max_num >= 0``): the full run's first ``max_num``, which for distinct scores is
        torchvision's ``batched_nms(...)[:max_num]``.
    """
    if boxes.numel() == 0 or max_num == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    span = boxes.max() - boxes.min() + 1  # 0-d tensor: stays on the device
    offsets = labels.to(boxes.dtype) * span  # [N]
    shifted, scores = boxes + offsets[:, None], scores.float()  # [N, 4], [N]
    n = scores.shape[0]
    prefix = PREFIX_FACTOR * max_num if max_num > 0 else n
    if prefix >= n:
        kept = nms(shifted, scores, iou_threshold)  # [K]
        return kept[:max_num] if max_num > 0 else kept
    # Stable, like torchvision's CPU nms: tied scores are visited in the same order as in the
    # full run (a static-size sort, no host synchronisation).
    order = scores.argsort(descending=True, stable=True)  # [N]
    while True:
        top = order[:prefix]  # [M] the best-scored boxes, in visiting order
        kept = nms(shifted[top], scores[top], iou_threshold)  # [K'] into top
        if kept.numel() >= max_num or prefix >= n:
            return top[kept[:max_num]]
        prefix *= 2  # too few survived among the M: look further down the ranking


class FastNMSResult(NamedTuple):
    """Kept detections, sorted by descending score.

    Attributes:
        boxes: ``float [K, 4]`` xyxy pixels.
        scores: ``float [K]``.
        labels: ``int64 [K]`` classes ``0..C-1``.
        indices: ``int64 [K]`` index of each kept box among the ``N`` inputs (to gather its mask
            coefficients).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    indices: Tensor


def _check_fast_nms(boxes: Tensor, scores: Tensor, batched: bool = False) -> None:
    b = "B, " if batched else ""
    if scores.dim() != 2 + batched:
        raise ValueError(f"scores must be [{b}C, N], got {tuple(scores.shape)}")
    *lead, c, n = scores.shape  # lead: () or (B,)
    if boxes.shape not in ((*lead, n, 4), (*lead, c, n, 4)):
        raise ValueError(
            f"boxes must be [{b}N, 4] or [{b}C, N, 4] for scores {tuple(scores.shape)}, "
            f"got {tuple(boxes.shape)}"
        )


def fast_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.5,
    top_k: int = 200,
    score_threshold: float = 0.0,
    max_num: int = -1,
) -> FastNMSResult:
    """YOLACT's Fast NMS, every class at once (Bolya et al. 2019, Sec. 5).

    One image; :func:`fast_nms_batched` does the work (for a batch of one), and the single host
    synchronisation is reading how many detections were kept.

    Args:
        boxes: ``float [N, 4]`` xyxy (shared by all classes) or ``[C, N, 4]`` (per class).
        scores: ``float [C, N]`` class scores (background excluded).
        iou_threshold: box ``j`` is removed when its IoU with some higher-scored box of its class
            is ``> iou_threshold``.
        top_k: only the ``top_k`` best boxes per class take part (YOLACT: 200).
        score_threshold: kept boxes must also score ``> score_threshold`` (YOLACT: 0.05).
        max_num: keep at most this many detections overall (``-1``: all).

    Returns:
        :class:`FastNMSResult`, sorted by descending score.
    """
    _check_fast_nms(boxes, scores)
    ranked, num_kept = fast_nms_batched(
        boxes[None], scores[None], iou_threshold, top_k, score_threshold, max_num
    )
    num = int(num_kept[0])  # the host waits here, once: the number of detections K
    return FastNMSResult(*(f[0, :num] for f in ranked))  # each [1, M, ...] -> [K, ...]


def fast_nms_batched(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.5,
    top_k: int = 200,
    score_threshold: float = 0.0,
    max_num: int = -1,
) -> tuple[FastNMSResult, Tensor]:
    """:func:`fast_nms` for ``B`` images at once, with shapes that do not depend on the data.

    Each image keeps a different number of boxes, so instead of removing the others this returns,
    per image, *all* ``M = C · min(top_k, N)`` candidates (at most ``max_num`` of them) ranked with
    the kept ones first, and how many were kept: image ``b``'s detections are the first
    ``num_kept[b]`` entries of each field, exactly :func:`fast_nms` of that image. Reading
    ``num_kept`` once for the whole batch (``.tolist()``) is then the only host synchronisation —
    a boolean-mask index per image would be one each on a GPU.

    Args:
        boxes: ``float [B, N, 4]`` xyxy (shared by all classes) or ``[B, C, N, 4]`` (per class).
        scores: ``float [B, C, N]``.
        iou_threshold, top_k, score_threshold, max_num: as in :func:`fast_nms`.

    Returns:
        ``(ranked, num_kept)``: a :class:`FastNMSResult` whose fields are ``[B, M, 4]`` and
        ``[B, M]``, each image's kept detections first by descending score (the rest is padding:
        removed candidates), and ``num_kept``, ``int64 [B]``.
    """
    _check_fast_nms(boxes, scores, batched=True)
    b, c, n = scores.shape
    k = min(int(top_k), n)
    top_scores, idx = scores.sort(dim=2, descending=True, stable=True)
    top_scores, idx = top_scores[..., :k], idx[..., :k]  # [B, C, k] each, best first
    if boxes.dim() == 3:  # shared boxes: gather the k best of every class from the N
        cand = torch.gather(boxes, 1, idx.reshape(b, c * k, 1).expand(-1, -1, 4))  # [B, C*k, 4]
        cand = cand.reshape(b, c, k, 4)  # [B, C, k, 4]
    else:
        cand = torch.gather(boxes, 2, idx[..., None].expand(-1, -1, -1, 4))  # [B, C, k, 4]
    per_class = cand.reshape(b * c, k, 4)  # [B*C, k, 4]
    # iou[., i, j] for box i scored above box j of the same class and image (upper triangle)
    iou = batched_box_iou(per_class, per_class).triu(diagonal=1)  # [B*C, k, k]
    iou_max = iou.amax(dim=1).reshape(b, c, k) if k > 0 else top_scores.new_zeros(b, c, 0)
    keep = (iou_max <= iou_threshold) & (top_scores > score_threshold)  # [B, C, k]

    # Rank each image's C·k candidates by score with the removed ones at -inf. A stable sort keeps
    # ties in (class, rank) order, so the kept ones come first in the order of
    # ``top_scores[keep].sort(stable=True)``; static-size instead of a boolean index (no host sync).
    ranked = torch.where(keep, top_scores, -torch.inf).reshape(b, c * k)  # [B, C*k]
    order = ranked.argsort(dim=1, descending=True, stable=True)  # [B, C*k]
    num_kept = keep.reshape(b, c * k).sum(dim=1)  # [B]
    if max_num >= 0:
        order, num_kept = order[:, :max_num], num_kept.clamp(max=max_num)  # [B, M], [B]
    labels = torch.arange(c, device=scores.device)[:, None].expand(c, k)  # [C, k]
    pick = order[..., None].expand(-1, -1, 4)  # [B, M, 4]
    result = FastNMSResult(
        torch.gather(cand.reshape(b, c * k, 4), 1, pick),  # [B, C*k, 4] -> [B, M, 4]
        torch.gather(top_scores.reshape(b, c * k), 1, order),  # [B, C*k] -> [B, M]
        labels.reshape(1, c * k).expand(b, -1).gather(1, order),  # [B, C*k] -> [B, M]
        torch.gather(idx.reshape(b, c * k), 1, order),  # [B, C*k] -> [B, M]
    )
    return result, num_kept


def fast_nms_reference(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.5,
    top_k: int = 200,
    score_threshold: float = 0.0,
    max_num: int = -1,
) -> FastNMSResult:
    """:func:`fast_nms` written as loops over classes and boxes, for reading and for tests."""
    _check_fast_nms(boxes, scores)
    c, n = scores.shape
    found = []  # (score, class, index, box)
    for cls in range(c):
        order = scores[cls].sort(descending=True, stable=True).indices[:top_k]
        cls_boxes = boxes[order] if boxes.dim() == 2 else boxes[cls, order]
        iou = box_iou(cls_boxes, cls_boxes)
        for j in range(len(order)):
            # removed if any higher-scored box overlaps it -- suppressed or not (the Fast NMS rule)
            if any(iou[i, j] > iou_threshold for i in range(j)):
                continue
            s = scores[cls, order[j]]
            if s > score_threshold:
                found.append((float(s), cls, int(order[j]), cls_boxes[j]))
    found.sort(key=lambda t: -t[0])  # Python's sort is stable, like the fast path's
    if max_num >= 0:
        found = found[:max_num]
    if not found:
        return FastNMSResult(
            boxes.new_zeros(0, 4),
            scores.new_zeros(0),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
        )
    return FastNMSResult(
        torch.stack([f[3] for f in found]),
        torch.tensor([f[0] for f in found], dtype=scores.dtype),
        torch.tensor([f[1] for f in found]),
        torch.tensor([f[2] for f in found]),
    )


def _mask_iou_matrix(masks: Tensor) -> Tensor:
    """``[N, H, W]`` masks -> ``[N, N]`` mask IoU (float)."""
    flat = masks.flatten(1).float()  # [N, H*W]
    inter = flat @ flat.T  # [N, N]
    area = flat.sum(dim=1)  # [N]
    union = area[:, None] + area[None, :] - inter
    return inter / union.clamp(min=1e-6)


def matrix_nms(
    masks: Tensor,
    labels: Tensor,
    scores: Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> Tensor:
    """SOLOv2's Matrix NMS: decay scores instead of removing masks (Wang et al. 2020, Sec. 3.3).

    For masks sorted by score, with ``iou[i, j]`` the IoU of a higher-scored mask ``i`` with mask
    ``j`` of the same class, mask ``j``'s score is multiplied by::

        decay_j = min over i<j of  f(iou[i, j]) / f(comp_i),   comp_i = max over k<i of iou[k, i]

    ``f(x) = exp(-sigma x²)`` (gaussian) or ``1 - x`` (linear). Dividing by ``f(comp_i)`` is the
    compensation: if ``i`` is itself heavily overlapped by a better mask, it will be decayed away
    too, so it should not suppress ``j`` much. The first mask of each class keeps its score.

    Args:
        masks: ``bool [N, H, W]`` (or ``{0, 1}`` floats) binary masks.
        labels: ``int64 [N]``; only masks of the same class decay each other.
        scores: ``float [N]``.
        kernel: ``"gaussian"`` (SOLOv2 default) or ``"linear"``.
        sigma: the gaussian kernel's ``sigma`` (SOLOv2: 2.0).

    Returns:
        ``float [N]`` decayed scores, in the input order (SOLOv2 then keeps scores ``>= 0.05``
        and the best ``max_per_img``).
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"kernel={kernel!r} must be 'gaussian' or 'linear'")
    n = scores.shape[0]
    if masks.shape[0] != n or labels.shape[0] != n:
        raise ValueError(
            f"masks, labels and scores must have the same length, got {masks.shape[0]}, "
            f"{labels.shape[0]}, {n}"
        )
    if n == 0:
        return scores.clone()
    order = scores.argsort(descending=True, stable=True)  # [N]
    iou = _mask_iou_matrix(masks[order])  # [N, N] in score order
    same = labels[order][:, None] == labels[order][None, :]  # [N, N]
    decay_iou = (iou * same).triu(diagonal=1)  # [N, N]: rows i above columns j, same class
    comp = decay_iou.amax(dim=0)  # [N]: comp_i, how much mask i is overlapped by better ones
    comp = comp[:, None]  # [N, 1]: indexed by the row i
    if kernel == "gaussian":
        decay = torch.exp(-sigma * decay_iou**2) / torch.exp(-sigma * comp**2)  # [N, N]
    else:
        decay = (1 - decay_iou) / (1 - comp).clamp(min=1e-6)  # [N, N]
    # Min over all rows i, as MMDetection: entries with i >= j or another class have decay_iou 0
    # and give f(0) / f(comp_i) >= 1, and row 0 (comp_0 = 0) gives f(iou[0, j]) <= 1, so the
    # minimum is the one over the better masks of the same class, and never above 1.
    coeff = decay.amin(dim=0)  # [N]
    decayed = scores[order] * coeff
    out = torch.empty_like(scores)
    out[order] = decayed
    return out


def points_nms(heat: Tensor, kernel: int = 2) -> Tensor:
    """SOLO's peak picking on the category grid.

    ``max_pool2d`` with a 2×2 window, stride 1 and padding 1 gives, at ``[i, j]``, the maximum of
    cells ``(i-1, j-1), (i-1, j), (i, j-1), (i, j)``; a cell keeps its score when it equals that
    maximum and becomes 0 otherwise. Example on one row ``[0.2, 0.9, 0.5]``: the windows are
    ``{0.2}, {0.2, 0.9}, {0.9, 0.5}``, so the result is ``[0.2, 0.9, 0]``.

    Args:
        heat: ``float [B, C, S, S]`` category probabilities (after sigmoid).
        kernel: must be 2, as in SOLO.

    Returns:
        ``float [B, C, S, S]``, ``heat`` with non-peaks set to 0.
    """
    if kernel != 2:
        raise ValueError(f"kernel={kernel} is not supported: SOLO's points_nms uses kernel=2")
    hmax = F.max_pool2d(heat, (kernel, kernel), stride=1, padding=1)  # [B, C, S+1, S+1]
    keep = hmax[:, :, :-1, :-1] == heat  # [B, C, S, S]
    return heat * keep


def mask_nms(masks: Tensor, scores: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Greedy NMS with mask IoU: visit masks by descending score and drop every later mask whose IoU
    with a kept one is ``> iou_threshold``.

    Args:
        masks: ``bool [N, H, W]`` binary masks.
        scores: ``float [N]``.
        iou_threshold: suppression threshold.

    Returns:
        ``int64 [K]`` indices of the kept masks, by descending score.
    """
    if masks.shape[0] != scores.shape[0]:
        raise ValueError(
            f"masks ({masks.shape[0]}) and scores ({scores.shape[0]}) must have the same length"
        )
    order = scores.argsort(descending=True, stable=True)
    iou = _mask_iou_matrix(masks[order]).cpu()  # [N, N] in score order, one transfer
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):  # greedy: inherently sequential
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]
