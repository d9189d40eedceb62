"""RetinaNet's configuration: MMDetection's ``configs/_base_/models/retinanet_r50_fpn.py`` as
frozen dataclasses, and the presets.

``backbone`` and ``neck`` (:mod:`instseg_edu.models.backbone`), ``bbox_head`` (the head's sizes
and :class:`~instseg_edu.ops.anchors.AnchorGeneratorConfig`,
:class:`~instseg_edu.ops.coder.DeltaXYWHBBoxCoder`, the focal and L1 loss configs of
:mod:`instseg_edu.losses`), ``train_cfg.assigner``
(:class:`~instseg_edu.ops.assign.MaxIoUAssignerConfig`) and ``test_cfg`` (with
:class:`~instseg_edu.ops.nms.NMSConfig`). The model is in :mod:`instseg_edu.models.retinanet`.
"""

from __future__ import annotations

from dataclasses import dataclass

from instseg_edu.config import ClassesInBBoxHead, check, check_at_least, check_in_range
from instseg_edu.losses import FocalLossConfig, L1LossConfig
from instseg_edu.models.backbone import FPNConfig, ResNetConfig, check_backbone_and_heads
from instseg_edu.ops.anchors import AnchorGeneratorConfig
from instseg_edu.ops.assign import MaxIoUAssignerConfig
from instseg_edu.ops.coder import DeltaXYWHBBoxCoder
from instseg_edu.ops.nms import NMSConfig


@dataclass(frozen=True)
class RetinaHeadConfig:
    """``bbox_head``: the two subnets and what they are trained with.

    Attributes:
        num_classes: foreground classes ``C`` (no background class: sigmoids, Sec. 4).
        in_channels: channels of the FPN levels.
        stacked_convs: 3×3 conv + ReLU layers in each branch (paper: 4).
        feat_channels: their width (paper: 256).
        prior_prob: the foreground probability ``π`` every anchor starts with (paper: 0.01).
        norm_num_groups: ``None`` (the paper: conv + ReLU), or GroupNorm with this many groups
            after each stacked conv (MMDetection's ``norm_cfg=dict(type='GN', num_groups=...)``;
            Wu & He 2018). From random weights it lets the head learn faster: the CPU preset
            uses it.
        anchor_generator: 3 ratios × 3 octave scales per cell (Sec. 4, "Anchors").
        bbox_coder: normalisation of the deltas (RetinaNet: none).
        loss_cls: the focal loss (Sec. 3.2); loss_bbox: L1 on the deltas of positive anchors.
    """

    num_classes: int = 80
    in_channels: int = 256
    stacked_convs: int = 4
    feat_channels: int = 256
    prior_prob: float = 0.01
    norm_num_groups: int | None = None
    anchor_generator: AnchorGeneratorConfig = AnchorGeneratorConfig()
    bbox_coder: DeltaXYWHBBoxCoder = DeltaXYWHBBoxCoder()
    loss_cls: FocalLossConfig = FocalLossConfig()
    loss_bbox: L1LossConfig = L1LossConfig()

    def __post_init__(self) -> None:
        check_at_least(self, 1, "num_classes", "in_channels", "feat_channels")
        check_at_least(self, 0, "stacked_convs")
        check_in_range(self, "prior_prob", 0, 1, lo_open=True, hi_open=True)
        groups = self.norm_num_groups
        check(
            groups is None
            or (isinstance(groups, int) and groups >= 1 and self.feat_channels % groups == 0),
            f"norm_num_groups={groups!r} must be None or divide feat_channels={self.feat_channels}",
        )


@dataclass(frozen=True)
class RetinaTrainConfig:
    """``train_cfg``; RetinaNet trains on every anchor (no sampler) and keeps padding anchors out
    (MMDetection's ``allowed_border=-1``: only the image's valid flags count)."""

    assigner: MaxIoUAssignerConfig = MaxIoUAssignerConfig()


@dataclass(frozen=True)
class RetinaTestConfig:
    """``test_cfg``.

    Attributes:
        nms_pre: per level, keep the ``nms_pre`` best (anchor, class) scores (``-1``: all).
        min_bbox_size: drop decoded boxes whose width or height is not above this.
        score_thr: drop (anchor, class) scores not above this.
        nms: class-aware NMS (MMDetection ``nms=dict(iou_threshold=0.5)``).
        max_per_img: detections kept per image after NMS.
    """

    former_fields = {"nms_iou_threshold": "nms.iou_threshold"}

    nms_pre: int = 1000
    min_bbox_size: float = 0.0
    score_thr: float = 0.05
    nms: NMSConfig = NMSConfig()
    max_per_img: int = 100

    def __post_init__(self) -> None:
        if self.nms_pre != -1:
            check_at_least(self, 1, "nms_pre")
        check_in_range(self, "score_thr", 0, 1, hi_open=True)
        check_at_least(self, 1, "max_per_img")
        check_at_least(self, 0, "min_bbox_size")


@dataclass(frozen=True)
class RetinaNetConfig(ClassesInBBoxHead):
    """The whole detector. Defaults are MMDetection's ``retinanet_r50_fpn`` (COCO, 80 classes).

    Cross-checks (``ValueError`` naming the field): the anchor ``strides`` must be the strides of
    the FPN outputs (one per ``neck.num_outs``), ``bbox_head.in_channels`` must equal
    ``neck.out_channels``, and ``neck.in_channels`` must be the ResNet's output channels.
    """

    backbone: ResNetConfig = ResNetConfig()
    neck: FPNConfig = FPNConfig()
    bbox_head: RetinaHeadConfig = RetinaHeadConfig()
    train_cfg: RetinaTrainConfig = RetinaTrainConfig()
    test_cfg: RetinaTestConfig = RetinaTestConfig()

    def __post_init__(self) -> None:
        head = self.bbox_head
        check_backbone_and_heads(
            self.backbone, self.neck, head.anchor_generator.strides, bbox_head=head.in_channels
        )


#: MMDetection's ``retinanet_r50_fpn_1x_coco`` with ``pretrained=None``. Set
#: ``backbone.pretrained="ResNet50_Weights.IMAGENET1K_V1"`` for its ImageNet start (MMDetection's
#: ``torchvision://resnet50``); ``frozen_stages=1, norm_eval=True`` assume such weights.
RETINANET_R50_FPN = RetinaNetConfig()

#: RetinaNet R50-FPN trained from random weights: nothing frozen, BatchNorm statistics updated
#: (what torchvision's ``retinanet_resnet50_fpn`` does without weights).
RETINANET_R50_FPN_SCRATCH = RetinaNetConfig(
    backbone=ResNetConfig(depth=50, frozen_stages=-1, norm_eval=False)
)

#: A small RetinaNet that trains on a CPU in minutes: ResNet-18, 64-channel FPN and head, two
#: stacked convs per branch, from scratch. Same anchors, assigner and losses as the full model.
RETINANET_R18_SMALL = RetinaNetConfig(
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False),
    neck=FPNConfig(in_channels=(64, 128, 256, 512), out_channels=64, start_level=1, num_outs=5),
    bbox_head=RetinaHeadConfig(in_channels=64, feat_channels=64, stacked_convs=2),
)


#: The CPU demo's model (``instseg-edu demo`` without a GPU, 128 px images), tuned for what a few
#: CPU minutes can learn. Three ResNet-18 stages (no ``layer4``: 3.3 M instead of 11.8 M
#: parameters, a third less time per step at the same AP); P3-P4 from C3-C4 and two extra levels
#: P5-P6 by stride-2 convs. Smaller anchors: half the shapes at 128 px are under 32 px, below the
#: 32 px base anchor of stride 8 with ``octave_base_scale=4``; with ``2`` the anchors start at
#: 16 px and 81 % of the validation boxes (58 % before) have an anchor of IoU >= 0.5.
RETINANET_R18_CPU_DEMO = RetinaNetConfig(
    backbone=ResNetConfig(
        depth=18, num_stages=3, out_indices=(0, 1, 2), frozen_stages=-1, norm_eval=False
    ),
    neck=FPNConfig(in_channels=(64, 128, 256), out_channels=64, start_level=1, num_outs=4),
    bbox_head=RetinaHeadConfig(
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        anchor_generator=AnchorGeneratorConfig(octave_base_scale=2.0, strides=(8, 16, 32, 64)),
    ),
)

#: The CPU tier's RetinaNet (``instseg-edu demo --model retinanet`` and notebook 04 without a GPU,
#: 128 px images), the successor of :data:`RETINANET_R18_CPU_DEMO`, chosen by training variants
#: for the same 4.5 minutes on two CPU cores (``benchmarks/RESULTS.md``, "RetinaNet's CPU
#: recipe"):
#:
#: - GroupNorm after each of the head's stacked convs (``norm_num_groups=16``; MMDetection's
#:   ``norm_cfg=dict(type='GN')``). From random weights the head's features are otherwise left
#:   at whatever scale training drives them to; normalised, the same minutes gave box AP50
#:   0.31 instead of 0.23;
#: - the ResNet-18 of :data:`~instseg_edu.models.configs.mask_rcnn.MASK_RCNN_R18_CPU`: half width
#:   (``base_channels=32``), all four stages, P3-P5 from C3-C5 and one extra level P6: a step
#:   costs a quarter less than the three full-width stages', at the same AP per step;
#: - two stacked convs of 64 channels (four learned less in the same minutes), the small anchors
#:   of :data:`RETINANET_R18_CPU_DEMO` (``octave_base_scale=2``, from 16 px at stride 8).
RETINANET_R18_CPU = RetinaNetConfig(
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False, base_channels=32),
    neck=FPNConfig(in_channels=(32, 64, 128, 256), out_channels=64, start_level=1, num_outs=4),
    bbox_head=RetinaHeadConfig(
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        norm_num_groups=16,
        anchor_generator=AnchorGeneratorConfig(octave_base_scale=2.0, strides=(8, 16, 32, 64)),
    ),
)
