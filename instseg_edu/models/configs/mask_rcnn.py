"""Mask R-CNN's configuration: MMDetection's ``configs/_base_/models/mask_rcnn_r50_fpn.py`` as
frozen dataclasses, and the presets.

``rpn_head`` (anchors, box coder, losses), ``roi_head`` (RoIAlign extractors,
``Shared2FCBBoxHead`` and ``FCNMaskHead`` in one flat config), ``train_cfg`` (``rpn`` assigner and
sampler, ``rpn_proposal``, ``rcnn`` assigner, sampler and ``mask_size``) and ``test_cfg`` (``rpn``
proposals, ``rcnn`` post-processing), composed from the shared pieces of
:mod:`instseg_edu.config`. ``num_classes`` sits at the top (MMDetection repeats it in the box and
mask heads). The model is in :mod:`instseg_edu.models.mask_rcnn`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from instseg_edu.config import check, check_at_least, check_in_range
from instseg_edu.losses import CrossEntropyLossConfig, L1LossConfig
from instseg_edu.models.backbone import (
    FPNConfig,
    ResNetConfig,
    check_backbone_and_heads,
    fpn_p2_p6,
)
from instseg_edu.ops.anchors import AnchorGeneratorConfig
from instseg_edu.ops.assign import MaxIoUAssignerConfig
from instseg_edu.ops.coder import DeltaXYWHBBoxCoder
from instseg_edu.ops.nms import NMSConfig
from instseg_edu.ops.sampling import SamplerConfig

_COORD_CODER = ("target_means", "target_stds")  # keys that moved into bbox_coder


def _rpn_anchors() -> AnchorGeneratorConfig:
    # One scale of 8 strides per level, three ratios: 32..512 px anchors on P2-P6.
    return AnchorGeneratorConfig(strides=(4, 8, 16, 32, 64), scales=(8.0,))


@dataclass(frozen=True)
class RPNHeadConfig:
    """``rpn_head``: one 3x3 conv of ``feat_channels``, then 1x1 objectness and delta convs.

    Attributes:
        feat_channels: width of the shared 3x3 conv.
        anchor_generator: ``A = 3`` anchors per cell (``scales=(8,)``, ratios 0.5/1/2).
        bbox_coder: the deltas' normalisation (none for the RPN).
        loss_cls: binary cross-entropy on the objectness; loss_bbox: L1 on the deltas.
    """

    former_fields = {k: f"bbox_coder.{k}" for k in _COORD_CODER}

    feat_channels: int = 256
    anchor_generator: AnchorGeneratorConfig = _rpn_anchors()
    bbox_coder: DeltaXYWHBBoxCoder = DeltaXYWHBBoxCoder()
    loss_cls: CrossEntropyLossConfig = CrossEntropyLossConfig()
    loss_bbox: L1LossConfig = L1LossConfig()

    def __post_init__(self) -> None:
        check_at_least(self, 1, "feat_channels")


@dataclass(frozen=True)
class ProposalConfig:
    """``train_cfg.rpn_proposal`` / ``test_cfg.rpn``: turning RPN outputs into proposals.

    Attributes:
        nms_pre: candidates kept per image and level before NMS.
        max_per_img: proposals kept per image after NMS (``R``).
        nms: the NMS run per image and level (IoU 0.7).
        min_bbox_size: drop decoded boxes whose width or height is not above this.
    """

    former_fields = {"nms_iou_threshold": "nms.iou_threshold"}

    nms_pre: int = 1000
    max_per_img: int = 1000
    nms: NMSConfig = NMSConfig(iou_threshold=0.7)
    min_bbox_size: float = 0.0

    def __post_init__(self) -> None:
        check_at_least(self, 1, "nms_pre", "max_per_img")
        check_at_least(self, 0, "min_bbox_size")


@dataclass(frozen=True)
class RoIHeadConfig:
    """``roi_head``: RoIAlign extractors, ``Shared2FCBBoxHead`` and ``FCNMaskHead``.

    Attributes:
        featmap_strides: the FPN levels RoIs are read from (P2-P5; P6 feeds only the RPN).
        finest_scale: FPN Eq. 1's ``k0`` scale, 56 (a 224-pixel RoI goes to P4).
        bbox_roi_size, mask_roi_size: RoIAlign output sizes (7 and 14).
        sampling_ratio: RoIAlign samples per bin side (0: adaptive, as MMDetection).
        aligned: RoIAlign's half-pixel correction.
        fc_out_channels: width of the box head's two fc layers.
        bbox_coder: class-specific deltas normalised by ``(0.1, 0.1, 0.2, 0.2)``.
        num_convs, conv_out_channels: the mask head's 3x3 convs.
        loss_cls: softmax cross-entropy over ``C + 1``; loss_bbox: L1 on the deltas;
            loss_mask: per-pixel binary cross-entropy.
    """

    former_fields = {k: f"bbox_coder.{k}" for k in _COORD_CODER}

    featmap_strides: tuple[int, ...] = (4, 8, 16, 32)
    finest_scale: float = 56.0
    bbox_roi_size: int = 7
    mask_roi_size: int = 14
    sampling_ratio: int = 0
    aligned: bool = True
    fc_out_channels: int = 1024
    bbox_coder: DeltaXYWHBBoxCoder = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2))
    num_convs: int = 4
    conv_out_channels: int = 256
    loss_cls: CrossEntropyLossConfig = CrossEntropyLossConfig()
    loss_bbox: L1LossConfig = L1LossConfig()
    loss_mask: CrossEntropyLossConfig = CrossEntropyLossConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "featmap_strides", tuple(self.featmap_strides))
        check(len(self.featmap_strides) > 0, "roi_head.featmap_strides must not be empty")
        check(self.finest_scale > 0, f"finest_scale={self.finest_scale} must be > 0")
        check_at_least(
            self, 1, "bbox_roi_size", "mask_roi_size", "fc_out_channels", "conv_out_channels"
        )
        check_at_least(self, 0, "sampling_ratio", "num_convs")


@dataclass(frozen=True)
class RPNTrainConfig:
    """``train_cfg.rpn``: MaxIoU 0.7 / 0.3 with low-quality matches at 0.3, 256 anchors per image
    of which at most half positive (Faster R-CNN Sec. 3.1.2-3.1.3)."""

    assigner: MaxIoUAssignerConfig = MaxIoUAssignerConfig(0.7, 0.3, min_pos_iou=0.3)
    sampler: SamplerConfig = SamplerConfig()


@dataclass(frozen=True)
class RCNNTrainConfig:
    """``train_cfg.rcnn``: RoI assignment (0.5 / 0.5, no low-quality matches), sampling (512
    RoIs, a quarter positive, ground truth added as proposals) and the mask target size ``T``."""

    assigner: MaxIoUAssignerConfig = MaxIoUAssignerConfig(0.5, 0.5, 0.5, match_low_quality=False)
    sampler: SamplerConfig = SamplerConfig(512, 0.25, add_gt_as_proposals=True)
    mask_size: int = 28

    def __post_init__(self) -> None:
        check_at_least(self, 1, "mask_size")


@dataclass(frozen=True)
class RCNNTestConfig:
    """``test_cfg.rcnn``: post-processing of the box and mask heads.

    Attributes:
        score_thr: drop (RoI, class) scores not above this.
        nms: per-class NMS (IoU 0.5).
        max_per_img: detections kept per image.
        mask_thr_binary: a pasted mask pixel is foreground at or above this probability.
    """

    former_fields = {"nms_iou_threshold": "nms.iou_threshold"}

    score_thr: float = 0.05
    nms: NMSConfig = NMSConfig()
    max_per_img: int = 100
    mask_thr_binary: float = 0.5

    def __post_init__(self) -> None:
        check_in_range(self, "score_thr", 0, 1, hi_open=True)
        check_at_least(self, 1, "max_per_img")
        check_in_range(self, "mask_thr_binary", 0, 1)


@dataclass(frozen=True)
class TrainCfg:
    """``train_cfg``: RPN assigner and sampler, training proposals, RoI assigner and sampler."""

    former_fields = {"rpn_assigner": "rpn.assigner", "rpn_sampler": "rpn.sampler"}

    rpn: RPNTrainConfig = RPNTrainConfig()
    rpn_proposal: ProposalConfig = ProposalConfig(nms_pre=2000, max_per_img=1000)
    rcnn: RCNNTrainConfig = RCNNTrainConfig()


@dataclass(frozen=True)
class TestCfg:
    """``test_cfg``: test-time proposals and detection post-processing."""

    __test__ = False  # not a pytest test class despite the name

    rpn: ProposalConfig = ProposalConfig()
    rcnn: RCNNTestConfig = RCNNTestConfig()


def _resnet50() -> ResNetConfig:
    # Random initialisation (nothing is downloaded), so BatchNorm must train: no frozen stages.
    return ResNetConfig(depth=50, frozen_stages=-1, norm_eval=False)


@dataclass(frozen=True)
class MaskRCNNConfig:
    """All of Mask R-CNN's settings; defaults are MMDetection's ``mask_rcnn_r50_fpn``.

    ``num_classes`` counts foreground classes only (labels ``0..C-1``; the box head adds the
    background column ``C``). Cross-checks (``ValueError`` naming the field): ``neck.in_channels``
    must be the ResNet's output channels, the RPN's anchor strides the FPN strides,
    ``roi_head.featmap_strides`` the first of them, and ``train_cfg.rcnn.mask_size`` twice
    ``roi_head.mask_roi_size``.
    """

    num_classes: int = 80
    backbone: ResNetConfig = _resnet50()
    neck: FPNConfig = fpn_p2_p6()
    rpn_head: RPNHeadConfig = RPNHeadConfig()
    roi_head: RoIHeadConfig = RoIHeadConfig()
    train_cfg: TrainCfg = TrainCfg()
    test_cfg: TestCfg = TestCfg()

    def __post_init__(self) -> None:
        check_at_least(self, 1, "num_classes")
        strides = check_backbone_and_heads(
            self.backbone, self.neck, self.rpn_head.anchor_generator.strides
        )
        roi_strides = self.roi_head.featmap_strides
        check(
            roi_strides == strides[: len(roi_strides)],
            f"roi_head.featmap_strides={roi_strides} must be the first FPN strides {strides}",
        )
        # The mask head upsamples its RoI grid once by 2 (one stride-2 deconv): a 14x14 RoI
        # predicts 28x28 masks, a 7x7 one 14x14. The targets must have the predicted size.
        mask_out = 2 * self.roi_head.mask_roi_size
        check(
            self.train_cfg.rcnn.mask_size == mask_out,
            f"train_cfg.rcnn.mask_size={self.train_cfg.rcnn.mask_size} must be 2 x "
            f"roi_head.mask_roi_size={self.roi_head.mask_roi_size} = {mask_out} (the mask head's "
            "2x deconv output)",
        )

    def with_num_classes(self, num_classes: int) -> MaskRCNNConfig:
        """The same config for another dataset: ``cfg.with_num_classes(len(dataset.classes))``."""
        return replace(self, num_classes=num_classes)


MASK_RCNN_R50_FPN = MaskRCNNConfig()
"""MMDetection's ``mask_rcnn_r50_fpn`` (random init; 80 classes: ``with_num_classes``)."""

MASK_RCNN_R18_SMALL = MaskRCNNConfig(
    num_classes=80,
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False),
    neck=fpn_p2_p6(in_channels=(64, 128, 256, 512), out_channels=64),
    rpn_head=RPNHeadConfig(feat_channels=64),
    roi_head=RoIHeadConfig(fc_out_channels=256, conv_out_channels=64, sampling_ratio=2),
    train_cfg=TrainCfg(
        rpn=RPNTrainConfig(sampler=SamplerConfig(128, 0.5)),
        rpn_proposal=ProposalConfig(nms_pre=300, max_per_img=150),
        rcnn=RCNNTrainConfig(
            MaxIoUAssignerConfig(0.5, 0.5, 0.5, match_low_quality=False),
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
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False, base_channels=32),
    neck=fpn_p2_p6(in_channels=(32, 64, 128, 256), out_channels=64),
    rpn_head=RPNHeadConfig(feat_channels=64),
    roi_head=RoIHeadConfig(
        fc_out_channels=1024,
        conv_out_channels=64,
        sampling_ratio=2,
        mask_roi_size=7,
        loss_cls=CrossEntropyLossConfig(loss_weight=4.0),
    ),
    train_cfg=TrainCfg(
        rpn=RPNTrainConfig(sampler=SamplerConfig(128, 0.5)),
        rpn_proposal=ProposalConfig(nms_pre=300, max_per_img=150),
        rcnn=RCNNTrainConfig(
            MaxIoUAssignerConfig(0.5, 0.5, 0.5, match_low_quality=False),
            SamplerConfig(32, 0.5, add_gt_as_proposals=True),
            mask_size=14,
        ),
    ),
    test_cfg=TestCfg(
        rpn=ProposalConfig(nms_pre=300, max_per_img=150), rcnn=RCNNTestConfig(max_per_img=50)
    ),
)
"""The CPU tier's Mask R-CNN (``instseg-edu demo`` and notebook 06 without a GPU, 128 px images).
Chosen by training variants for the same five minutes on two CPU cores and scoring them on the
shapes validation split (``benchmarks/RESULTS.md``, "CPU recipe"):

- a ResNet-18 of half width (``base_channels=32``: a quarter of the convolution work) with a
  64-channel FPN and heads: more steps in the same minutes, and at least as good per step;
- 32 sampled RoIs per image with up to half positive. From scratch the classifier is what
  learns slowest (class-agnostic box AP50 was twice the class-aware one). On the standard images
  (3-10 shapes) 64 RoIs taught it more than 32 (box AP50 0.19 -> 0.30 at equal time). On the
  denser training images the recipe now uses (10-20 shapes), 32 RoIs still give every object
  about one positive RoI. The step then costs 0.37 s instead of 0.82 s, so five minutes see
  twice as many images, and the model learns from the images it sees: the demo's box / mask
  AP50 went from 0.24-0.29 / 0.17-0.20 to 0.36-0.40 / 0.32-0.36 (seeds 0, 1, 2);
- mask RoIs of 7x7 predicting 14x14 masks (a quarter of the mask head's work; a shape at 128 px
  is rarely larger than 60 px, so 14x14 still has about one mask pixel per 4 image pixels), and
  1024-wide box-head layers and four mask convs as in the full model;
- the box head's classification loss weighed 4 (``loss_cls.loss_weight``, MMDetection's key):
  from scratch the classifier learns nothing for its first ~400 steps while the masks already
  improve; weighed up, the backbone and FPN, which AdamW steps by the sum of all five losses'
  gradients, get more of the classifier's share. A small gain: the 420-step demo's box AP50 went
  from 0.195 / 0.205 / 0.165 to 0.219 / 0.208 / 0.180 (seeds 0 / 1 / 2), mask AP50 from 0.160 /
  0.158 / 0.134 to 0.174 / 0.165 / 0.143; AP over 0.5:0.95 stayed where it was.

Tried and not kept (each no better at equal time): smaller RPN anchors (16 px at P2), FPN level
mapping scaled to the image (``finest_scale=14``), three backbone stages, batches of 4 or 2,
256-wide fc layers, 512-wide fc layers with two mask convs (a fifth cheaper per step, as good per
minute, worse masks per step), GroupNorm in the FPN and heads, an EMA of the weights, half the
learning rate, a convolutional classifier with global pooling, no colour jitter, up to three
quarters of the sampled RoIs positive, box deltas and masks shared by all classes, a box head
reading the mask head's convs, a per-pixel classifier on P2 as an extra loss (HTC's semantic
branch). What did help, in the recipe rather than the model: training images with 10-20 shapes
instead of 3-10 (``Recipe.train_shapes_per_image``), more objects to learn from in each step;
and the box head learning at a fifth of the rate of the rest (``Recipe.lr_mult``): under AdamW
its 3136-input fc layer moves its outputs about five times as far per step as a 576-input conv
does. And the recipe scores the model on the validation images resized from 128 to 192 px
(``Recipe.test_size``): shown larger than in training, the smallest shapes are found and named
more often."""
