"""Mask R-CNN: a two-stage detector that also paints a mask inside every box.

The story (He et al., "Mask R-CNN", ICCV 2017, building on Ren et al., "Faster R-CNN", NeurIPS 2015,
and Lin et al., "Feature Pyramid Networks", CVPR 2017):

1. **Backbone + FPN** turn the image into five feature maps P2-P6 (strides 4, 8, 16, 32, 64).
2. **Region Proposal Network** (Faster R-CNN Sec. 3.1). A 3x3 conv then two 1x1 convs predict, for
   each of the ``A = 3`` anchors (``scales=(8,)``, ratios 0.5/1/2) at every location of every level,
   an objectness logit and four box deltas. Training: anchors are assigned with MaxIoU (0.7 / 0.3,
   low-quality matches rescued at 0.3), 256 anchors per image are sampled (at most half positive),
   binary cross-entropy on objectness + L1 on deltas, both divided by the number of sampled anchors.
3. **Proposals**: per image and level keep the ``nms_pre`` highest-scoring anchors, decode them,
   clip to the image, drop boxes with a side ``<= min_bbox_size``, NMS at 0.7 (run separately per
   FPN level, as MMDetection does: its ``batched_nms`` takes the level as the group id), keep the
   best ``max_per_img`` of the image (2000/1000 in training, 1000/1000 at test time).
4. **RoI stage** (Mask R-CNN Sec. 3). During training the ground-truth boxes are added to the
   proposals, which are assigned at 0.5 / 0.5 (no low-quality matches) and sampled (512 per image,
   a quarter positive). Each RoI reads a 7x7 (box) or 14x14 (mask) grid with RoIAlign from one FPN
   level chosen by its size (FPN Eq. 1, see :func:`map_rois_to_levels`). The box head (two fc
   layers of 1024) scores ``C + 1`` classes (column ``C`` is background) and regresses
   class-specific deltas; the mask head (four 3x3 convs, a 2x deconv) predicts one 28x28 mask per
   class, and only the ground-truth class's mask is trained (per-pixel BCE), decoupling masks from
   classification. A positive RoI of a box-only object (``Target.has_mask`` False) trains the
   box head and the RPN like any other, but not the mask head.
5. **Predict**: softmax scores, class-specific decoding, ``score_thr`` 0.05, per-class NMS 0.5,
   100 detections per image, then the mask head runs on the kept boxes and the 28x28 masks are
   pasted into the image with one batched separable bilinear resampling (:func:`paste_masks`).

Everything that is trained on is public so that notebooks and explorers show exactly it:
``model.targets(outputs, batch)`` returns the RPN assignment and sampled anchors, the proposals
before and after NMS, the sampled RoIs with their labels and the mask targets. Walkthrough:
``notebooks/06_mask_rcnn.py``.

Shape legend: ``B`` images, ``N`` anchors (all levels), ``A`` anchors per location, ``G`` ground
truth, ``K`` proposals kept before NMS, ``P`` proposals per image after NMS, ``R`` sampled RoIs,
``C`` classes, ``F`` FPN channels, ``M`` mask size (28), ``L`` FPN levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg_edu.losses import global_avg_factor
from instseg_edu.models.backbone import (
    FPNConfig,
    ImageNormalize,
    ResNetConfig,
    build_backbone,
    fpn_strides,
    resnet_out_channels,
)
from instseg_edu.models.roi_heads import (
    BoxHead,
    MaskHead,
    map_rois_to_levels,
    mask_targets,
    multiscale_roi_align,
    paste_masks,
)
from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.ops.assign import Assignment, max_iou_assign_padded
from instseg_edu.ops.boxes import clip_boxes
from instseg_edu.ops.coder import DeltaXYWHBBoxCoder
from instseg_edu.ops.indexing import first_k_true
from instseg_edu.ops.nms import class_aware_nms
from instseg_edu.ops.sampling import random_sample_batched
from instseg_edu.structures import Batch, Detections, image_sizes_tensor, pad_targets

# --------------------------------------------------------------------------------------------------
# Configuration (key names follow MMDetection's configs/_base_/models/mask_rcnn_r50_fpn.py)
# --------------------------------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class AnchorConfig:
    """``rpn_head.anchor_generator``: anchor side = ``stride * scale`` with ``h / w = ratio``."""

    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    scales: tuple[float, ...] = (8.0,)
    center_offset: float = 0.0

    def __post_init__(self):
        _check(
            len(self.strides) > 0 and all(s > 0 for s in self.strides),
            f"anchor_generator.strides={self.strides} must be positive",
        )
        _check(
            all(a < b for a, b in zip(self.strides, self.strides[1:])),
            f"anchor_generator.strides={self.strides} must increase",
        )
        _check(
            len(self.ratios) > 0 and all(r > 0 for r in self.ratios),
            f"anchor_generator.ratios={self.ratios} must be > 0",
        )
        _check(
            len(self.scales) > 0 and all(s > 0 for s in self.scales),
            f"anchor_generator.scales={self.scales} must be > 0",
        )
        _check(
            0.0 <= self.center_offset < 1.0,
            f"anchor_generator.center_offset={self.center_offset} must be in [0, 1)",
        )


@dataclass(frozen=True)
class AssignerConfig:
    """``MaxIoUAssigner`` thresholds (see :func:`instseg_edu.ops.assign.max_iou_assign`)."""

    pos_iou_thr: float = 0.7
    neg_iou_thr: float = 0.3
    min_pos_iou: float = 0.3
    match_low_quality: bool = True
    ignore_iof_thr: float = -1.0

    def __post_init__(self):
        _check(0.0 <= self.pos_iou_thr <= 1.0, f"pos_iou_thr={self.pos_iou_thr} must be in [0, 1]")
        _check(0.0 <= self.neg_iou_thr <= 1.0, f"neg_iou_thr={self.neg_iou_thr} must be in [0, 1]")
        _check(
            self.neg_iou_thr <= self.pos_iou_thr,
            f"neg_iou_thr={self.neg_iou_thr} must be <= pos_iou_thr={self.pos_iou_thr}",
        )
        _check(0.0 <= self.min_pos_iou <= 1.0, f"min_pos_iou={self.min_pos_iou} must be in [0, 1]")


@dataclass(frozen=True)
class SamplerConfig:
    """``RandomSampler``: ``num`` samples per image, at most ``num * pos_fraction`` positive."""

    num: int = 256
    pos_fraction: float = 0.5
    neg_pos_ub: int = -1
    add_gt_as_proposals: bool = False

    def __post_init__(self):
        _check(self.num > 0, f"sampler.num={self.num} must be > 0")
        _check(
            0.0 < self.pos_fraction <= 1.0,
            f"sampler.pos_fraction={self.pos_fraction} must be in (0, 1]",
        )


@dataclass(frozen=True)
class ProposalConfig:
    """``train_cfg.rpn_proposal`` / ``test_cfg.rpn``: turning RPN outputs into proposals."""

    nms_pre: int = 1000
    max_per_img: int = 1000
    nms_iou_threshold: float = 0.7  # mmdet: nms=dict(type="nms", iou_threshold=0.7)
    min_bbox_size: float = 0.0

    def __post_init__(self):
        _check(self.nms_pre > 0, f"rpn nms_pre={self.nms_pre} must be > 0")
        _check(self.max_per_img > 0, f"rpn max_per_img={self.max_per_img} must be > 0")
        _check(
            0.0 < self.nms_iou_threshold <= 1.0,
            f"rpn nms_iou_threshold={self.nms_iou_threshold} must be in (0, 1]",
        )
        _check(self.min_bbox_size >= 0, f"rpn min_bbox_size={self.min_bbox_size} must be >= 0")


@dataclass(frozen=True)
class RPNHeadConfig:
    """``rpn_head``: one 3x3 conv of ``feat_channels`` then 1x1 objectness / delta convs."""

    feat_channels: int = 256
    anchor_generator: AnchorConfig = field(default_factory=AnchorConfig)
    target_means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)

    def __post_init__(self):
        _check(self.feat_channels > 0, f"rpn_head.feat_channels={self.feat_channels} must be > 0")
        _check(
            len(self.target_stds) == 4 and all(s > 0 for s in self.target_stds),
            f"rpn_head.target_stds={self.target_stds} must be 4 positive numbers",
        )


@dataclass(frozen=True)
class RoIHeadConfig:
    """``roi_head``: RoIAlign extractors, ``Shared2FCBBoxHead`` and ``FCNMaskHead``."""

    featmap_strides: tuple[int, ...] = (4, 8, 16, 32)  # P2-P5; P6 feeds only the RPN
    finest_scale: float = 56.0
    bbox_roi_size: int = 7
    mask_roi_size: int = 14
    sampling_ratio: int = 0  # 0 = adaptive ceil(roi_size / output_size), as mmdet
    aligned: bool = True
    fc_out_channels: int = 1024
    target_means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2)
    num_convs: int = 4
    conv_out_channels: int = 256

    def __post_init__(self):
        _check(len(self.featmap_strides) > 0, "roi_head.featmap_strides must not be empty")
        _check(self.finest_scale > 0, f"roi_head.finest_scale={self.finest_scale} must be > 0")
        _check(self.bbox_roi_size > 0, f"roi_head.bbox_roi_size={self.bbox_roi_size} must be > 0")
        _check(self.mask_roi_size > 0, f"roi_head.mask_roi_size={self.mask_roi_size} must be > 0")
        _check(
            self.sampling_ratio >= 0, f"roi_head.sampling_ratio={self.sampling_ratio} must be >= 0"
        )
        _check(
            self.fc_out_channels > 0, f"roi_head.fc_out_channels={self.fc_out_channels} must be > 0"
        )
        _check(
            len(self.target_stds) == 4 and all(s > 0 for s in self.target_stds),
            f"roi_head.target_stds={self.target_stds} must be 4 positive numbers",
        )
        _check(self.num_convs >= 0, f"roi_head.num_convs={self.num_convs} must be >= 0")
        _check(
            self.conv_out_channels > 0,
            f"roi_head.conv_out_channels={self.conv_out_channels} must be > 0",
        )


@dataclass(frozen=True)
class RCNNTrainConfig:
    """``train_cfg.rcnn``: RoI assignment, sampling and the mask target size."""

    assigner: AssignerConfig = field(
        default_factory=lambda: AssignerConfig(0.5, 0.5, 0.5, match_low_quality=False)
    )
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(512, 0.25, add_gt_as_proposals=True)
    )
    mask_size: int = 28

    def __post_init__(self):
        _check(self.mask_size > 0, f"rcnn.mask_size={self.mask_size} must be > 0")


@dataclass(frozen=True)
class RCNNTestConfig:
    """``test_cfg.rcnn``: post-processing of the box and mask heads."""

    score_thr: float = 0.05
    nms_iou_threshold: float = 0.5
    max_per_img: int = 100
    mask_thr_binary: float = 0.5

    def __post_init__(self):
        _check(0.0 <= self.score_thr < 1.0, f"rcnn.score_thr={self.score_thr} must be in [0, 1)")
        _check(
            0.0 < self.nms_iou_threshold <= 1.0,
            f"rcnn.nms_iou_threshold={self.nms_iou_threshold} must be in (0, 1]",
        )
        _check(self.max_per_img > 0, f"rcnn.max_per_img={self.max_per_img} must be > 0")
        _check(
            0.0 <= self.mask_thr_binary <= 1.0,
            f"rcnn.mask_thr_binary={self.mask_thr_binary} must be in [0, 1]",
        )


@dataclass(frozen=True)
class TrainCfg:
    """``train_cfg``: RPN assigner/sampler, training proposals, RoI assigner/sampler."""

    rpn_assigner: AssignerConfig = field(default_factory=AssignerConfig)
    rpn_sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rpn_proposal: ProposalConfig = field(
        default_factory=lambda: ProposalConfig(nms_pre=2000, max_per_img=1000)
    )
    rcnn: RCNNTrainConfig = field(default_factory=RCNNTrainConfig)


@dataclass(frozen=True)
class TestCfg:
    """``test_cfg``: test-time proposals and detection post-processing."""

    __test__ = False  # not a pytest test class despite the name

    rpn: ProposalConfig = field(default_factory=ProposalConfig)
    rcnn: RCNNTestConfig = field(default_factory=RCNNTestConfig)


def _resnet50() -> ResNetConfig:
    # Random initialisation (nothing is downloaded), so BatchNorm must train: no frozen stages.
    return ResNetConfig(depth=50, frozen_stages=-1, norm_eval=False)


def _fpn_p2_p6(in_channels=(256, 512, 1024, 2048), out_channels=256) -> FPNConfig:
    # Mask R-CNN's FPN: P2-P5 from C2-C5, P6 by max-pooling P5 (add_extra_convs=False).
    return FPNConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        num_outs=5,
        start_level=0,
        add_extra_convs=False,
    )


@dataclass(frozen=True)
class MaskRCNNConfig:
    """All of Mask R-CNN's settings; defaults are MMDetection's ``mask_rcnn_r50_fpn``.

    ``num_classes`` counts foreground classes only (labels ``0..C-1``; the box head adds the
    background column ``C``). Change a nested value with ``dataclasses.replace``.
    """

    num_classes: int = 80
    backbone: ResNetConfig = field(default_factory=_resnet50)
    neck: FPNConfig = field(default_factory=_fpn_p2_p6)
    rpn_head: RPNHeadConfig = field(default_factory=RPNHeadConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)
    train_cfg: TrainCfg = field(default_factory=TrainCfg)
    test_cfg: TestCfg = field(default_factory=TestCfg)

    def __post_init__(self):
        _check(self.num_classes >= 1, f"num_classes={self.num_classes} must be >= 1")
        channels = resnet_out_channels(self.backbone)
        _check(
            tuple(self.neck.in_channels) == channels,
            f"neck.in_channels={self.neck.in_channels} must equal the backbone's output channels "
            f"{channels} (ResNet-{self.backbone.depth})",
        )
        strides = tuple(fpn_strides(self.backbone, self.neck))
        anchor_strides = tuple(self.rpn_head.anchor_generator.strides)
        _check(
            anchor_strides == strides,
            f"rpn_head.anchor_generator.strides={anchor_strides} must equal the FPN strides "
            f"{strides}",
        )
        roi_strides = tuple(self.roi_head.featmap_strides)
        _check(
            roi_strides == strides[: len(roi_strides)],
            f"roi_head.featmap_strides={roi_strides} must be the first FPN strides {strides}",
        )
        # The mask head upsamples its RoI grid once by 2 (one stride-2 deconv): a 14x14 RoI
        # predicts 28x28 masks, a 7x7 one 14x14. The targets must have the predicted size.
        mask_out = 2 * self.roi_head.mask_roi_size
        _check(
            self.train_cfg.rcnn.mask_size == mask_out,
            f"train_cfg.rcnn.mask_size={self.train_cfg.rcnn.mask_size} must be 2 x "
            f"roi_head.mask_roi_size={self.roi_head.mask_roi_size} = {mask_out} (the mask head's "
            "2x deconv output)",
        )

    def with_num_classes(self, num_classes: int) -> MaskRCNNConfig:
        """The same config for another dataset: ``cfg.with_num_classes(len(dataset.classes))``."""
        return replace(self, num_classes=num_classes)


MASK_RCNN_R50_FPN = MaskRCNNConfig()
"""MMDetection's ``mask_rcnn_r50_fpn`` (random init; 80 classes: ``replace`` ``num_classes``)."""

MASK_RCNN_R18_SMALL = MaskRCNNConfig(
    num_classes=80,
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False),
    neck=_fpn_p2_p6(in_channels=(64, 128, 256, 512), out_channels=64),
    rpn_head=RPNHeadConfig(feat_channels=64),
    roi_head=RoIHeadConfig(fc_out_channels=256, conv_out_channels=64, sampling_ratio=2),
    train_cfg=TrainCfg(
        rpn_sampler=SamplerConfig(128, 0.5),
        rpn_proposal=ProposalConfig(nms_pre=300, max_per_img=150),
        rcnn=RCNNTrainConfig(
            AssignerConfig(0.5, 0.5, 0.5, match_low_quality=False),
            SamplerConfig(64, 0.25, add_gt_as_proposals=True),
        ),
    ),
    test_cfg=TestCfg(
        rpn=ProposalConfig(nms_pre=300, max_per_img=150), rcnn=RCNNTestConfig(max_per_img=50)
    ),
)
"""CPU-fast variant for tests, notebooks' smoke mode and quick experiments: ResNet-18, 64-channel
FPN and heads, fewer sampled anchors / RoIs and proposals."""

MASK_RCNN_R18_CPU = MaskRCNNConfig(
    num_classes=80,
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False),
    neck=_fpn_p2_p6(in_channels=(64, 128, 256, 512), out_channels=64),
    rpn_head=RPNHeadConfig(feat_channels=64),
    roi_head=RoIHeadConfig(
        fc_out_channels=1024, conv_out_channels=64, sampling_ratio=2, mask_roi_size=7
    ),
    train_cfg=TrainCfg(
        rpn_sampler=SamplerConfig(128, 0.5),
        rpn_proposal=ProposalConfig(nms_pre=300, max_per_img=150),
        rcnn=RCNNTrainConfig(
            AssignerConfig(0.5, 0.5, 0.5, match_low_quality=False),
            SamplerConfig(32, 0.5, add_gt_as_proposals=True),
            mask_size=14,
        ),
    ),
    test_cfg=TestCfg(
        rpn=ProposalConfig(nms_pre=300, max_per_img=150), rcnn=RCNNTestConfig(max_per_img=50)
    ),
)
"""The CPU tier's Mask R-CNN (``instseg-edu demo`` and notebook 06 without a GPU, 128 px images).
ResNet-18 with a 64-channel FPN and heads, as :data:`MASK_RCNN_R18_SMALL`, changed where a few CPU
minutes are spent: mask RoIs of 7x7 predicting 14x14 masks (a quarter of the mask head's work; a
shape at 128 px is rarely larger than 60 px, so 14x14 still has about one mask pixel per 4 image
pixels), 32 sampled RoIs per image with up to half positive (the shapes images hold a few objects,
so 512 RoIs at a quarter positive would be mostly background), and 1024-wide box-head layers as in
the full model (an fc layer is cheap next to the convolutions)."""


# --------------------------------------------------------------------------------------------------
# What each stage returns
# --------------------------------------------------------------------------------------------------


class MaskRCNNOutputs(NamedTuple):
    """``model(images)``: backbone features and raw RPN outputs (the RoI stage needs proposals).

    Attributes:
        features: ``L`` FPN maps ``[B, F, H_l, W_l]`` (P2-P6).
        rpn_logits: ``[B, N]`` objectness logits, levels concatenated, each level in (row, column,
            anchor) order — the order of ``anchors``.
        rpn_deltas: ``[B, N, 4]`` encoded ``(dx, dy, dw, dh)`` per anchor.
        anchors: ``[N, 4]`` xyxy pixels, shared by the batch.
        anchor_levels: ``[N]`` int64 FPN level index (0 = P2) of each anchor.
        pad_shape: ``(Hp, Wp)`` of the padded input.
    """

    features: tuple[Tensor, ...]
    rpn_logits: Tensor
    rpn_deltas: Tensor
    anchors: Tensor
    anchor_levels: Tensor
    pad_shape: tuple[int, int]


class RPNTargets(NamedTuple):
    """What the RPN is trained on (Faster R-CNN Sec. 3.1.2).

    Attributes:
        anchor_valid: ``[B, N]`` bool, the anchor's cell starts inside the image (not in the
            padding; see :meth:`AnchorGenerator.valid_flags`).
        assignment: :class:`Assignment` with ``[B, N]`` fields (MaxIoU 0.7 / 0.3 / 0.3).
        pos_mask, neg_mask: ``[B, N]`` bool, the sampled positive and negative anchors.
        labels: ``[B, N]`` float, 1 for positive anchors, 0 elsewhere.
        bbox_targets: ``[B, N, 4]`` encoded deltas to the matched box (zeros where not positive).
        num_samples: scalar tensor, sampled anchors in the batch (the loss's ``avg_factor``).
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
        boxes: ``[B, P, 4]`` xyxy, ``P = max_per_img``, sorted by score within each image.
        scores: ``[B, P]`` sigmoid objectness.
        levels: ``[B, P]`` FPN level the proposal came from.
        valid: ``[B, P]`` bool; False for padding when fewer than ``P`` survive.
        pre_nms_boxes: ``[B, K, 4]`` the top ``nms_pre`` per level, decoded and clipped.
        pre_nms_scores: ``[B, K]``; pre_nms_levels: ``[B, K]``.
        pre_nms_valid: ``[B, K]`` bool, False where the box is not larger than ``min_bbox_size``.
    """

    boxes: Tensor
    scores: Tensor
    levels: Tensor
    valid: Tensor
    pre_nms_boxes: Tensor
    pre_nms_scores: Tensor
    pre_nms_levels: Tensor
    pre_nms_valid: Tensor


class RoITargets(NamedTuple):
    """Sampled RoIs and what the box head is trained on.

    Attributes:
        candidates: ``[B, G + P, 4]`` ground-truth boxes (first ``G`` columns) then proposals.
        candidate_valid: ``[B, G + P]`` bool.
        assignment: :class:`Assignment` of the candidates, ``[B, G + P]`` fields.
        pos_mask, neg_mask: ``[B, G + P]`` bool, the sampled candidates.
        rois: ``[R, 5]`` sampled RoIs ``(batch_index, x1, y1, x2, y2)``, image-major.
        labels: ``[R]`` int64 in ``0..C``; ``C`` is background.
        bbox_targets: ``[R, 4]`` deltas (stds 0.1, 0.1, 0.2, 0.2); zeros for background.
        gt_index: ``[R]`` index of the matched object in the batch's concatenated ground truth
            (image 0's objects first), ``-1`` for background.
        is_gt: ``[R]`` bool, the RoI is a ground-truth box added as a proposal.
        pos_index: ``[Npos]`` int64, the positive RoIs (``labels < C``) in order.
        mask_index: ``[Nmask]`` int64, the positive RoIs whose object has a mask, in order: the
            mask head's RoIs. Equal to ``pos_index`` unless the batch has box-only objects.
    """

    candidates: Tensor
    candidate_valid: Tensor
    assignment: Assignment
    pos_mask: Tensor
    neg_mask: Tensor
    rois: Tensor
    labels: Tensor
    bbox_targets: Tensor
    gt_index: Tensor
    is_gt: Tensor
    pos_index: Tensor
    mask_index: Tensor


class MaskTargets(NamedTuple):
    """Mask head targets: one ``M x M`` binary crop per positive RoI (Mask R-CNN Sec. 3) whose
    object has a mask (``RoITargets.mask_index``; a box-only object trains no mask).

    Attributes:
        rois: ``[Nmask, 5]`` positive RoIs; labels: ``[Nmask]`` their class; gt_index:
            ``[Nmask]``.
        masks: ``[Nmask, M, M]`` float in ``{0, 1}``.
    """

    rois: Tensor
    labels: Tensor
    gt_index: Tensor
    masks: Tensor


class MaskRCNNTargets(NamedTuple):
    rpn: RPNTargets
    proposals: Proposals
    roi: RoITargets
    mask: MaskTargets


# --------------------------------------------------------------------------------------------------
# RPN head (the RoI heads live in roi_heads.py)
# --------------------------------------------------------------------------------------------------


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared by all levels, then 1x1 convs: ``A`` logits and ``4A`` deltas."""

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
            b = x.shape[0]
            logits.append(self.rpn_cls(t).permute(0, 2, 3, 1).reshape(b, -1))  # [B, H*W*A]
            deltas.append(self.rpn_reg(t).permute(0, 2, 3, 1).reshape(b, -1, 4))  # [B, H*W*A, 4]
        return torch.cat(logits, 1), torch.cat(deltas, 1)  # [B, N], [B, N, 4]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class MaskRCNN(nn.Module):
    """Mask R-CNN with the three public stages (``forward``, ``targets``/``loss``, ``predict``)."""

    def __init__(self, cfg: MaskRCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.backbone = build_backbone(cfg.backbone, cfg.neck)
        a = cfg.rpn_head.anchor_generator
        self.anchor_generator = AnchorGenerator(
            strides=a.strides, ratios=a.ratios, scales=a.scales, center_offset=a.center_offset
        )
        num_anchors = self.anchor_generator.num_base_anchors[0]
        channels = cfg.neck.out_channels
        self.rpn_head = RPNHead(channels, cfg.rpn_head.feat_channels, num_anchors)
        r = cfg.roi_head
        self.bbox_head = BoxHead(channels, r.bbox_roi_size, r.fc_out_channels, cfg.num_classes)
        self.mask_head = MaskHead(channels, r.conv_out_channels, r.num_convs, cfg.num_classes)
        self.rpn_coder = DeltaXYWHBBoxCoder(cfg.rpn_head.target_means, cfg.rpn_head.target_stds)
        self.bbox_coder = DeltaXYWHBBoxCoder(r.target_means, r.target_stds)
        self.normalize = ImageNormalize()
        self._anchor_cache: dict = {}

    # ---- stage 1 ---------------------------------------------------------------------------------

    def anchors(self, featmap_sizes: list[tuple[int, int]], device) -> tuple[Tensor, Tensor]:
        """All anchors ``[N, 4]`` and their level ``[N]``, cached per feature-map sizes."""
        key = (tuple(featmap_sizes), str(device))
        if key not in self._anchor_cache:
            per_level = self.anchor_generator.grid_anchors(featmap_sizes, device)  # [H*W*A, 4] each
            levels = torch.cat(
                [
                    torch.full((len(a),), i, dtype=torch.long, device=device)
                    for i, a in enumerate(per_level)
                ]
            )
            self._anchor_cache[key] = (torch.cat(per_level), levels)
        return self._anchor_cache[key]

    def anchor_valid(self, featmap_sizes, image_sizes, device) -> Tensor:
        """``[B, N]`` bool: the anchor's cell starts inside its image (not in the padding)."""
        key = ("valid", tuple(featmap_sizes), tuple(map(tuple, image_sizes)), str(device))
        if key not in self._anchor_cache:
            if len(self._anchor_cache) > 64:  # many distinct image sizes: start afresh
                self._anchor_cache.clear()
            self._anchor_cache[key] = torch.stack(
                [
                    torch.cat(self.anchor_generator.valid_flags(featmap_sizes, tuple(hw), device))
                    for hw in image_sizes
                ]
            )  # [B, N]
        return self._anchor_cache[key]

    def forward(self, images: Tensor) -> MaskRCNNOutputs:
        """Backbone, FPN and RPN head.

        Args:
            images: ``float32 [B, 3, Hp, Wp]`` in ``[0, 1]`` (normalised here with ImageNet stats).
        """
        x = self.normalize(images)
        features = tuple(self.backbone(x))
        logits, deltas = self.rpn_head(features)  # [B, N], [B, N, 4]
        sizes = [tuple(f.shape[-2:]) for f in features]
        anchors, levels = self.anchors(sizes, images.device)
        return MaskRCNNOutputs(
            features,
            logits,
            deltas,
            anchors,
            levels,
            (int(images.shape[-2]), int(images.shape[-1])),
        )

    # ---- proposals ---------------------------------------------------------------------------

    @torch.no_grad()
    def proposals(
        self, outputs: MaskRCNNOutputs, image_sizes, cfg: ProposalConfig, trim: bool = False
    ) -> Proposals:
        """RPN proposals for the whole batch: top ``nms_pre`` per level, decode, clip, NMS.

        Top-k, decoding, clipping and the size filter run batched. NMS runs per image *and per FPN
        level*, as MMDetection's RPN does (the level is the group id of a class-aware NMS, one
        call per image); the ``max_per_img`` best survivors of all levels are then kept. NMS is
        greedy and sequential, and ``torchvision.ops.nms`` finishes on the host, so each call
        waits for the device once — nothing else here does: every image has the same number of
        candidates (``min(nms_pre, H*W*A)`` per level), and boxes too small to keep are given score
        -1 instead of being removed (below every sigmoid score, they can suppress nothing; they
        sort last and are marked invalid). The same steps per image and per level:
        :func:`~instseg_edu.models.references.rpn_proposals_reference`.

        ``trim``: ``P`` is the largest number of proposals an image kept instead of
        ``cfg.max_per_img`` (NMS returns its count to the host, so this costs no extra wait).
        At inference every slot goes through the box head, and the slots after the last image's
        last proposal are padding in every image: trimming them changes no detection. Training
        keeps ``P = max_per_img``, the shape the RoI sampler draws from.
        """
        logits = outputs.rpn_logits.detach().float()  # [B, N]
        deltas = outputs.rpn_deltas.detach().float()  # [B, N, 4]
        b = logits.shape[0]
        idx_parts, start = [], 0
        per_level = [
            f.shape[-2] * f.shape[-1] * a
            for f, a in zip(outputs.features, self.anchor_generator.num_base_anchors)
        ]  # H*W*A each
        for n in per_level:
            top = logits[:, start : start + n].topk(min(cfg.nms_pre, n), dim=1).indices  # [B, k_l]
            idx_parts.append(top + start)
            start += n
        idx = torch.cat(idx_parts, 1)  # [B, K], K = sum of k_l, level blocks side by side
        # Probabilities of every anchor, then the candidates' (the reference slices the same
        # tensor: see instseg_edu.models.references).
        scores = logits.sigmoid().gather(1, idx)  # [B, N] -> [B, K]
        anchors = outputs.anchors[idx]  # [B, K, 4]
        d = deltas.gather(1, idx[..., None].expand(-1, -1, 4))  # [B, K, 4]
        sizes = image_sizes_tensor(image_sizes, logits.device)  # [B, 2] = (h, w)
        boxes = clip_boxes(self.rpn_coder.decode(anchors, d), sizes[:, None])  # [B, K, 4]
        levels = outputs.anchor_levels[idx]  # [B, K]
        wh = boxes[..., 2:] - boxes[..., :2]  # [B, K, 2]
        big_enough = (wh > cfg.min_bbox_size).all(-1)  # [B, K]
        nms_scores = torch.where(big_enough, scores, -1.0)  # [B, K]

        keeps = [  # [n_i] indices into K per image, best first over all levels, n_i <= P
            class_aware_nms(
                boxes[i], nms_scores[i], levels[i], cfg.nms_iou_threshold, cfg.max_per_img
            )
            for i in range(b)
        ]
        p = max((k.numel() for k in keeps), default=0) if trim else cfg.max_per_img
        out_boxes = boxes.new_zeros(b, p, 4)
        out_scores = scores.new_zeros(b, p)
        out_levels = levels.new_zeros(b, p)
        out_valid = torch.zeros(b, p, dtype=torch.bool, device=boxes.device)
        for i, keep in enumerate(keeps):
            n, ok = keep.numel(), big_enough[i, keep]  # [n]
            out_boxes[i, :n] = boxes[i, keep] * ok[:, None]  # too-small boxes: zeros, invalid
            out_scores[i, :n] = scores[i, keep] * ok
            out_levels[i, :n] = levels[i, keep] * ok
            out_valid[i, :n] = ok
        return Proposals(
            out_boxes, out_scores, out_levels, out_valid, boxes, scores, levels, big_enough
        )

    # ---- stage 2: targets and loss -----------------------------------------------------------

    def rpn_targets(self, outputs: MaskRCNNOutputs, batch: Batch, gt=None) -> RPNTargets:
        """Assign every anchor (MaxIoU 0.7 / 0.3, low-quality matches) and sample 256 per image."""
        cfg = self.cfg.train_cfg
        device = outputs.rpn_logits.device
        gt = gt if gt is not None else _padded_targets(batch, device)
        sizes = [tuple(f.shape[-2:]) for f in outputs.features]
        valid = self.anchor_valid(sizes, batch.image_sizes, device)  # [B, N]
        assignment = max_iou_assign_padded(outputs.anchors, gt, cfg.rpn_assigner, valid)
        pos, neg = _sample(assignment, cfg.rpn_sampler)  # [B, N] each
        anchors = outputs.anchors.expand(len(batch), -1, -1)  # [B, N, 4]
        matched = _gather_gt(gt.boxes, assignment.gt_inds)  # [B, N, 4]
        matched = torch.where(pos[..., None], matched, anchors)  # encode(a, a) = 0 elsewhere
        bbox_targets = self.rpn_coder.encode(anchors, matched)  # [B, N, 4]
        num = (pos | neg).sum().clamp(min=1)
        return RPNTargets(valid, assignment, pos, neg, pos.float(), bbox_targets, num)

    def roi_targets(self, batch: Batch, proposals: Proposals, gt=None) -> RoITargets:
        """Add ground truth to the proposals, assign (0.5 / 0.5), sample 512 per image, encode."""
        cfg = self.cfg.train_cfg.rcnn
        device = proposals.boxes.device
        gt = gt if gt is not None else _padded_targets(batch, device)
        if cfg.sampler.add_gt_as_proposals:
            cands = torch.cat([gt.boxes, proposals.boxes], 1)  # [B, G+P, 4]
            cand_valid = torch.cat([gt.valid, proposals.valid], 1)  # [B, G+P]
            is_gt = torch.cat([gt.valid, torch.zeros_like(proposals.valid)], 1)
        else:
            cands, cand_valid = proposals.boxes, proposals.valid
            is_gt = torch.zeros_like(proposals.valid)
        assignment = max_iou_assign_padded(cands, gt, cfg.assigner, cand_valid)
        pos, neg = _sample(assignment, cfg.sampler)  # [B, G+P]
        # The RoI stage's one wait for the device: how many RoIs (and positives) were sampled.
        # With the counts on the host, the sampled entries are picked by first_k_true instead
        # of `nonzero` (same image-major order) and the positives likewise further down.
        sampled = pos | neg  # [B, G+P]
        gt_col = (assignment.gt_inds - 1).clamp(min=0)  # [B, G+P] column in padded gt
        with_mask = pos & gt.has_mask.gather(1, gt_col)  # [B, G+P]: box-only objects train no mask
        num_rois, num_pos, num_mask = torch.stack(
            [sampled.sum(), pos.sum(), with_mask.sum()]
        ).tolist()
        flat = first_k_true(sampled.flatten(), num_rois)  # [R] into B*(G+P)
        img, col = flat // sampled.shape[1], flat % sampled.shape[1]  # [R] each, image-major
        boxes = cands[img, col]  # [R, 4]
        is_pos = pos[img, col]  # [R]
        gt_col = gt_col[img, col]  # [R]
        labels = torch.where(is_pos, gt.labels[img, gt_col], self.num_classes)  # [R]
        matched = torch.where(is_pos[:, None], gt.boxes[img, gt_col], boxes)  # [R, 4]
        bbox_targets = self.bbox_coder.encode(boxes, matched)  # [R, 4]
        offsets = torch.cumsum(gt.valid.sum(1), 0) - gt.valid.sum(1)  # [B] first gt of image
        gt_index = torch.where(is_pos, offsets[img] + gt_col, -1)  # [R]
        rois = torch.cat([img[:, None].to(boxes.dtype), boxes], 1)  # [R, 5]
        pos_index = first_k_true(is_pos, num_pos)  # [Npos] into the R RoIs
        mask_index = first_k_true(with_mask[img, col], num_mask)  # [Nmask]
        return RoITargets(
            cands,
            cand_valid,
            assignment,
            pos,
            neg,
            rois,
            labels,
            bbox_targets,
            gt_index,
            is_gt[img, col],
            pos_index,
            mask_index,
        )

    def targets(
        self, outputs: MaskRCNNOutputs, batch: Batch, proposals: Proposals | None = None
    ) -> MaskRCNNTargets:
        """Everything the losses compare against: RPN targets, proposals, RoI and mask targets.

        ``proposals`` default to the training proposals of ``outputs`` (``train_cfg.rpn_proposal``).
        """
        gt = _padded_targets(batch, outputs.rpn_logits.device)  # [B, Gmax, ...], built once
        rpn = self.rpn_targets(outputs, batch, gt)
        if proposals is None:
            proposals = self.proposals(outputs, batch.image_sizes, self.cfg.train_cfg.rpn_proposal)
        roi = self.roi_targets(batch, proposals, gt)
        pos = roi.mask_index  # [Nmask]: positives whose object has a mask
        device = roi.rois.device
        gt_masks = _concat_masks(batch, device)  # [G_total, Hp, Wp]
        masks = mask_targets(
            gt_masks, roi.rois[pos], roi.gt_index[pos], self.cfg.train_cfg.rcnn.mask_size
        )  # [Npos, M, M]
        mask = MaskTargets(roi.rois[pos], roi.labels[pos], roi.gt_index[pos], masks)
        return MaskRCNNTargets(rpn, proposals, roi, mask)

    def box_forward(self, features, rois: Tensor) -> tuple[Tensor, Tensor]:
        """Box head on ``[R, 5]`` RoIs: ``([R, C+1] logits, [R, 4C] deltas)``."""
        r = self.cfg.roi_head
        x = multiscale_roi_align(
            features,
            rois,
            r.featmap_strides,
            r.bbox_roi_size,
            r.sampling_ratio,
            r.aligned,
            r.finest_scale,
        )  # [R, F, 7, 7]
        return self.bbox_head(x)

    def mask_forward(self, features, rois: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mask head on ``[R, 5]`` RoIs: ``[R, C, M, M]`` logits, or with ``labels`` (``int64
        [R]``) only each RoI's class: ``[R, M, M]``."""
        r = self.cfg.roi_head
        x = multiscale_roi_align(
            features,
            rois,
            r.featmap_strides,
            r.mask_roi_size,
            r.sampling_ratio,
            r.aligned,
            r.finest_scale,
        )  # [R, F, 14, 14]
        return self.mask_head(x, labels)

    def loss(self, outputs: MaskRCNNOutputs, batch: Batch) -> dict[str, Tensor]:
        """RPN, box and mask losses, with MMDetection's weights (all 1) and normalisations.

        Every divisor is a count of the whole batch: under DDP, of every process's share
        (:func:`~instseg_edu.losses.global_avg_factor`).
        """
        t = self.targets(outputs, batch)
        # RPN: BCE over sampled anchors + L1 over positive ones, both / number of sampled anchors.
        sampled = (t.rpn.pos_mask | t.rpn.neg_mask).float()  # [B, N]
        num_samples = global_avg_factor(t.rpn.num_samples)
        logits = outputs.rpn_logits.float()
        loss_rpn_cls = (
            F.binary_cross_entropy_with_logits(logits, t.rpn.labels, reduction="none") * sampled
        ).sum() / num_samples
        l1 = (outputs.rpn_deltas.float() - t.rpn.bbox_targets).abs().sum(-1)  # [B, N]
        loss_rpn_bbox = (l1 * t.rpn.pos_mask).sum() / num_samples

        # Box head: CE over all sampled RoIs; L1 on the GT class's deltas of positives / R.
        cls_logits, deltas = self.box_forward(outputs.features, t.roi.rois)
        cls_logits = cls_logits.float()
        num_rois = global_avg_factor(t.roi.labels.numel(), clamp_min=1)
        loss_cls = F.cross_entropy(cls_logits, t.roi.labels, reduction="sum") / num_rois
        pos = t.roi.pos_index  # [Npos]
        deltas = deltas.float().view(deltas.shape[0], self.num_classes, 4)  # [R, C, 4]
        pos_deltas = deltas[pos, t.roi.labels[pos]]  # [Npos, 4]
        loss_bbox = (pos_deltas - t.roi.bbox_targets[pos]).abs().sum() / num_rois

        # Mask head: per-pixel BCE of the GT class's channel, mean over positives and pixels.
        # Positives of box-only objects are not among t.mask's RoIs: no mask term for them.
        mask_logits = self.mask_forward(outputs.features, t.mask.rois).float()  # [Nmask, C, M, M]
        num_mask = t.mask.labels.shape[0]
        picked = mask_logits[
            torch.arange(num_mask, device=pos.device), t.mask.labels
        ]  # [Nmask, M, M]
        # The mean over the batch's mask positives and their M*M pixels; counted on every process,
        # even one without positives, because the count is summed over processes.
        mask_pixels = global_avg_factor(picked.numel())
        if picked.numel() > 0:
            bce = F.binary_cross_entropy_with_logits(picked, t.mask.masks, reduction="sum")
            loss_mask = bce / mask_pixels
        else:  # no positive RoI: a zero that keeps the graph connected
            loss_mask = mask_logits.sum() * 0.0
        if cls_logits.shape[0] == 0:
            loss_cls = cls_logits.sum() * 0.0
        with torch.no_grad():
            acc = (cls_logits.argmax(1) == t.roi.labels).float().mean() * 100
        return {
            "loss_rpn_cls": loss_rpn_cls,
            "loss_rpn_bbox": loss_rpn_bbox,
            "loss_cls": loss_cls,
            "loss_bbox": loss_bbox,
            "loss_mask": loss_mask,
            "num_pos": torch.full((), float(len(pos)), device=pos.device),  # a fill, no copy
            "num_rpn_pos": t.rpn.pos_mask.sum().float(),
            "acc": acc.detach() if cls_logits.shape[0] else cls_logits.new_zeros(()),
        }

    # ---- stage 3 -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, outputs: MaskRCNNOutputs, image_sizes) -> list[Detections]:
        """Boxes, scores, labels and ``bool [K, h, w]`` masks per image (Mask R-CNN Sec. 3.1)."""
        cfg = self.cfg.test_cfg.rcnn
        c = self.num_classes
        b = len(image_sizes)
        device = outputs.rpn_logits.device
        props = self.proposals(outputs, image_sizes, self.cfg.test_cfg.rpn, trim=True)
        # Every proposal slot goes through the box head, padding included (its scores are zeroed
        # below): R = B * P with P the largest count of an image, known on the host from NMS, so
        # no further host read is needed to build the RoIs.
        p = props.boxes.shape[1]
        img = torch.arange(b, device=device).repeat_interleave(p)  # [R] image of each RoI
        rois = torch.cat([img[:, None].float(), props.boxes.reshape(-1, 4)], 1)  # [R, 5]
        cls_logits, deltas = self.box_forward(outputs.features, rois)
        scores = F.softmax(cls_logits.float(), dim=1)[:, :c]  # [R, C] (background dropped)
        scores = scores * props.valid.reshape(-1, 1)  # [R, C]; padding slots score 0
        r = rois.shape[0]
        boxes = self.bbox_coder.decode(
            rois[:, None, 1:].expand(r, c, 4), deltas.float().view(r, c, 4)
        )  # [R, C, 4]
        sizes = image_sizes_tensor(image_sizes, device)  # [B, 2] = (h, w)
        boxes = clip_boxes(boxes.view(b, p * c, 4), sizes[:, None])  # [B, P*C, 4]
        scores = scores.view(b, p * c)  # [B, P*C]: row-major over (proposal, class)
        labels = torch.arange(c, device=device).repeat(p)  # [P*C] class of each column

        # Per image: candidates above score_thr, class-aware NMS, the best max_per_img. One host
        # read gives every image's candidate count; first_k_true picks them, in order.
        keep = scores > cfg.score_thr  # [B, P*C]
        counts = keep.sum(1).tolist()  # B ints
        kept = []
        for i, n in enumerate(counts):
            idx = first_k_true(keep[i], n)  # [n] candidates of image i
            order = class_aware_nms(
                boxes[i, idx], scores[i, idx], labels[idx], cfg.nms_iou_threshold, cfg.max_per_img
            )
            kept.append(idx[order])  # [K_i] best first, K_i <= max_per_img
        num_dets = [len(k) for k in kept]  # tensor sizes: known on the host
        det_img = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(num_dets)])
        det_cols = torch.cat(kept)  # [K_all] columns into P*C, grouped by image
        det_boxes = boxes[det_img, det_cols]  # [K_all, 4]
        det_scores = scores[det_img, det_cols]  # [K_all]
        det_labels = labels[det_cols]  # [K_all]

        det_rois = torch.cat([det_img[:, None].float(), det_boxes], 1)  # [K_all, 5]
        # [K_all, M, M]: each detection's own class only
        probs = self.mask_forward(outputs.features, det_rois, det_labels).float().sigmoid()

        results = []
        for i, (bx, sc, lb, pr) in enumerate(
            zip(
                det_boxes.split(num_dets),
                det_scores.split(num_dets),
                det_labels.split(num_dets),
                probs.split(num_dets),
            )
        ):
            h, w = image_sizes[i]
            masks = paste_masks(pr, bx, (h, w)) >= cfg.mask_thr_binary  # [K, h, w]
            results.append(Detections(bx, sc, lb, masks))
        return results


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _padded_targets(batch: Batch, device):
    """``pad_targets`` with at least one (invalid) column, so empty batches need no special case."""
    gt = pad_targets(batch.targets, device)
    if gt.boxes.shape[1] == 0:
        b = len(batch.targets)
        gt.boxes = torch.zeros(b, 1, 4, device=device)
        gt.labels = torch.full((b, 1), -1, dtype=torch.long, device=device)
        gt.valid = torch.zeros(b, 1, dtype=torch.bool, device=device)
        gt.has_mask = gt.valid.clone()
    return gt


def _gather_gt(gt_boxes: Tensor, gt_inds: Tensor) -> Tensor:
    """Matched box of each anchor: ``[B, G, 4]`` by 1-based ``[B, N]`` -> ``[B, N, 4]``."""
    col = (gt_inds - 1).clamp(min=0)  # [B, N]
    return gt_boxes.gather(1, col[..., None].expand(-1, -1, 4))  # [B, N, 4]


def _concat_masks(batch: Batch, device) -> Tensor:
    """The batch's ground-truth masks ``[G_total, Hp, Wp]``, image 0's objects first."""
    hp, wp = batch.images.shape[-2:]
    masks = [t.masks.to(device) for t in batch.targets if len(t) > 0]
    if not masks:
        return torch.zeros(0, hp, wp, dtype=torch.bool, device=device)
    return torch.cat(masks)


def _sample(assignment: Assignment, cfg: SamplerConfig) -> tuple[Tensor, Tensor]:
    """Random positive / negative sample of each image as ``[B, N]`` boolean masks."""
    return random_sample_batched(assignment, cfg.num, cfg.pos_fraction, cfg.neg_pos_ub)


def build_mask_rcnn(cfg: MaskRCNNConfig = MASK_RCNN_R50_FPN) -> MaskRCNN:
    """Build a :class:`MaskRCNN` from its config (no registry, no ``type=`` strings)."""
    return MaskRCNN(cfg)


__all__ = [
    "MASK_RCNN_R18_CPU",
    "MASK_RCNN_R18_SMALL",
    "MASK_RCNN_R50_FPN",
    "AnchorConfig",
    "AssignerConfig",
    "BoxHead",
    "MaskHead",
    "MaskRCNN",
    "MaskRCNNConfig",
    "MaskRCNNOutputs",
    "MaskRCNNTargets",
    "MaskTargets",
    "ProposalConfig",
    "Proposals",
    "RCNNTestConfig",
    "RCNNTrainConfig",
    "RPNHead",
    "RPNHeadConfig",
    "RPNTargets",
    "RoIHeadConfig",
    "RoITargets",
    "SamplerConfig",
    "TestCfg",
    "TrainCfg",
    "build_mask_rcnn",
    "map_rois_to_levels",
    "mask_targets",
    "multiscale_roi_align",
    "paste_masks",
]
