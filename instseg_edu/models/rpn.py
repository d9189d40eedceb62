"""The Region Proposal Network: Mask R-CNN's first stage (Ren et al., "Faster R-CNN", NeurIPS 2015,
Sec. 3.1, on the FPN levels of Lin et al., CVPR 2017, Sec. 4.1).

A dense head like RetinaNet's, with one class: at every cell of every FPN level a 3x3 conv and two
1x1 convs predict, for each of its ``A`` anchors, an **objectness** logit ("is there any object
here?") and four box deltas. Two things are built from it:

- **training targets** (:func:`rpn_targets`, Sec. 3.1.2): MaxIoU assignment of every anchor
  (0.7 / 0.3, low-quality matches at 0.3), a random sample of 256 anchors per image with at most
  half positives (Sec. 3.1.3), objectness 1 / 0 for the sampled positives / negatives and the
  deltas of the positives to their boxes;
- **proposals** (:func:`rpn_proposals`): per image and level the ``nms_pre`` most object-like
  anchors, decoded and clipped, small boxes dropped, NMS per level, the best ``max_per_img`` of
  the image — the boxes the RoI heads then classify and segment.

The anchor plumbing (flattening, anchors, valid flags, per-level top-k, matched-box encoding) is
the same as RetinaNet's and YOLACT's: :mod:`instseg_edu.models.dense_heads`. The readable
per-image, per-level proposals are
:func:`~instseg_edu.models.references.rpn_proposals_reference`.

Shape legend: ``B`` images, ``N`` anchors of all levels, ``A`` anchors per cell, ``G`` ground
truths (padded), ``K`` candidates before NMS (of all levels), ``R`` proposals per image after NMS,
``F`` FPN channels, ``H, W`` a level's feature-map size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg_edu.models.configs.mask_rcnn import ProposalConfig, RPNTrainConfig
from instseg_edu.models.dense_heads import encode_matched, to_B_HWA_K, topk_per_level
from instseg_edu.ops.assign import Assignment, max_iou_assign_padded
from instseg_edu.ops.boxes import clip_boxes
from instseg_edu.ops.coder import DeltaXYWHBBoxCoder
from instseg_edu.ops.nms import class_aware_nms
from instseg_edu.ops.sampling import random_sample_batched
from instseg_edu.structures import PaddedTargets, image_sizes_tensor

__all__ = ["Proposals", "RPNHead", "RPNTargets", "rpn_proposals", "rpn_targets"]


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared by all levels, then 1x1 convs: ``A`` logits and ``4A`` deltas.

    ``forward(features)``: ``L`` maps ``[B, F, H_l, W_l]`` → ``([B, N] logits, [B, N, 4]
    deltas)``, levels concatenated in the anchor order of the generator.
    """

    def __init__(self, in_channels: int, feat_channels: int, num_anchors: int):
        super().__init__()
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features) -> tuple[Tensor, Tensor]:
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.rpn_conv(x), inplace=True)  # [B, F, H, W]
            logits.append(to_B_HWA_K(self.rpn_cls(t), 1)[..., 0])  # [B, H*W*A]
            deltas.append(to_B_HWA_K(self.rpn_reg(t), 4))  # [B, H*W*A, 4]
        return torch.cat(logits, 1), torch.cat(deltas, 1)  # [B, N], [B, N, 4]


class RPNTargets(NamedTuple):
    """What the RPN is trained on (Faster R-CNN Sec. 3.1.2).

    Attributes:
        anchor_valid: ``bool [B, N]``, the anchor's cell starts inside the image (not in the
            padding; see :meth:`~instseg_edu.ops.anchors.AnchorGenerator.valid_flags`).
        assignment: :class:`~instseg_edu.ops.assign.Assignment` with ``[B, N]`` fields.
        pos_mask, neg_mask: ``bool [B, N]``, the sampled positive and negative anchors.
        labels: ``float [B, N]``, the objectness target: 1 for sampled positives, 0 elsewhere.
        bbox_targets: ``float [B, N, 4]`` encoded deltas to the matched box (zeros where not a
            sampled positive).
        num_samples: ``int64 []``, sampled anchors in the batch (the losses' divisor).
    """

    anchor_valid: Tensor
    assignment: Assignment
    pos_mask: Tensor
    neg_mask: Tensor
    labels: Tensor
    bbox_targets: Tensor
    num_samples: Tensor


class Proposals(NamedTuple):
    """RPN proposals before and after NMS.

    Attributes:
        boxes: ``float [B, R, 4]`` xyxy, ``R = max_per_img``, sorted by score within each image.
        scores: ``float [B, R]`` sigmoid objectness.
        levels: ``int64 [B, R]`` FPN level the proposal came from.
        valid: ``bool [B, R]``; False for padding when fewer than ``R`` survive.
        pre_nms_boxes: ``float [B, K, 4]`` the top ``nms_pre`` per level, decoded and clipped.
        pre_nms_scores: ``float [B, K]``; pre_nms_levels: ``int64 [B, K]``.
        pre_nms_valid: ``bool [B, K]``, False where the box is not larger than ``min_bbox_size``.
    """

    boxes: Tensor
    scores: Tensor
    levels: Tensor
    valid: Tensor
    pre_nms_boxes: Tensor
    pre_nms_scores: Tensor
    pre_nms_levels: Tensor
    pre_nms_valid: Tensor


def rpn_targets(
    anchors: Tensor,
    anchor_valid: Tensor,
    gt: PaddedTargets,
    coder: DeltaXYWHBBoxCoder,
    cfg: RPNTrainConfig,
) -> RPNTargets:
    """Assign every anchor of the batch, sample the trained ones, encode the positives' boxes.

    Args:
        anchors: ``float [N, 4]`` xyxy, shared by the batch.
        anchor_valid: ``bool [B, N]``; invalid (padding) anchors are ignored.
        gt: the batch's padded ground truth (at least one column).
        coder: the RPN's box coder.
        cfg: ``train_cfg.rpn`` (assigner and sampler).

    Returns:
        :class:`RPNTargets`. No host synchronisation: the sample is drawn with ``topk`` on random
        keys (:func:`~instseg_edu.ops.sampling.random_sample_batched`).
    """
    assignment = max_iou_assign_padded(anchors, gt, cfg.assigner, anchor_valid)
    s = cfg.sampler
    pos, neg = random_sample_batched(
        assignment, s.num, s.pos_fraction, neg_pos_ub=s.neg_pos_ub
    )  # [B, N]
    bbox_targets = encode_matched(coder, anchors, gt.boxes, assignment.gt_index, pos)  # [B,N,4]
    num = (pos | neg).sum().clamp(min=1)
    return RPNTargets(anchor_valid, assignment, pos, neg, pos.float(), bbox_targets, num)


@torch.no_grad()
def rpn_proposals(
    logits: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    anchor_levels: Tensor,
    level_sizes: list[int],
    image_sizes: list[tuple[int, int]],
    coder: DeltaXYWHBBoxCoder,
    cfg: ProposalConfig,
    trim: bool = False,
) -> Proposals:
    """RPN proposals for the whole batch: top ``nms_pre`` per level, decode, clip, NMS.

    Top-k, decoding, clipping and the size filter run batched. NMS runs per image *and per FPN
    level*, as MMDetection's RPN does (the level is the group id of a class-aware NMS, one call per
    image); the ``max_per_img`` best survivors of all levels are then kept. NMS is greedy and
    sequential, and ``torchvision.ops.nms`` finishes on the host, so each call waits for the
    device once — nothing else here does: every image has the same number of candidates
    (``min(nms_pre, H*W*A)`` per level), and boxes too small to keep are given score -1 instead
    of being removed (below every sigmoid score, they can suppress nothing; they sort last and are
    marked invalid).

    Args:
        logits: ``float [B, N]`` objectness logits; deltas: ``float [B, N, 4]``.
        anchors: ``float [N, 4]``; anchor_levels: ``int64 [N]``; level_sizes: anchors per level.
        image_sizes: each image's true ``(h, w)``; the boxes are clipped to it.
        coder: the RPN's box coder.
        cfg: ``train_cfg.rpn_proposal`` or ``test_cfg.rpn``.
        trim: ``R`` is the largest number of proposals an image kept instead of
            ``cfg.max_per_img`` (NMS returns its count to the host, so this costs no extra wait).
            At inference every slot goes through the box head, and the slots after the last
            image's last proposal are padding in every image: trimming them changes no
            detection. Training keeps ``R = max_per_img``, the shape the RoI sampler draws from.

    Returns:
        :class:`Proposals`.
    """
    logits, deltas = logits.detach().float(), deltas.detach().float()  # [B, N], [B, N, 4]
    b = logits.shape[0]
    _, idx = topk_per_level(logits, level_sizes, cfg.nms_pre)  # [B, K], level blocks side by side
    # Probabilities of every anchor, then the candidates' (the reference slices the same
    # tensor: see instseg_edu.models.references).
    scores = logits.sigmoid().gather(1, idx)  # [B, N] -> [B, K]
    d = deltas.gather(1, idx[..., None].expand(-1, -1, 4))  # [B, K, 4]
    sizes = image_sizes_tensor(image_sizes, logits.device)  # [B, 2] = (h, w)
    boxes = clip_boxes(coder.decode(anchors[idx], d), sizes[:, None])  # [B, K, 4]
    levels = anchor_levels[idx]  # [B, K]
    wh = boxes[..., 2:] - boxes[..., :2]  # [B, K, 2]
    big_enough = (wh > cfg.min_bbox_size).all(-1)  # [B, K]
    nms_scores = torch.where(big_enough, scores, -1.0)  # [B, K]

    keeps = [  # [n_i] indices into K per image, best first over all levels, n_i <= max_per_img
        class_aware_nms(boxes[i], nms_scores[i], levels[i], cfg.nms.iou_threshold, cfg.max_per_img)
        for i in range(b)
    ]
    r = max((k.numel() for k in keeps), default=0) if trim else cfg.max_per_img
    out_boxes = boxes.new_zeros(b, r, 4)
    out_scores = scores.new_zeros(b, r)
    out_levels = levels.new_zeros(b, r)
    out_valid = torch.zeros(b, r, dtype=torch.bool, device=boxes.device)
    for i, keep in enumerate(keeps):
        n, ok = keep.numel(), big_enough[i, keep]  # [n]
        out_boxes[i, :n] = boxes[i, keep] * ok[:, None]  # too-small boxes: zeros, invalid
        out_scores[i, :n] = scores[i, keep] * ok
        out_levels[i, :n] = levels[i, keep] * ok
        out_valid[i, :n] = ok
    out = (out_boxes, out_scores, out_levels, out_valid)  # after NMS
    return Proposals(*out, boxes, scores, levels, big_enough)
