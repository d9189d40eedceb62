"""YOLACT's configuration: MMDetection's ``configs/yolact/yolact_r50_1x8_coco.py`` as frozen
dataclasses, and the presets.

``bbox_head`` is MMDetection's ``YOLACTHead`` (anchors, box coder, cross-entropy and smooth-L1
losses), ``mask_head`` its ``YOLACTProtonet`` (with the optional semantic segmentation loss),
``train_cfg`` the assigner and OHEM ratio, ``test_cfg`` Fast NMS and the mask threshold. The
shared pieces are those of :mod:`instseg_edu.config`; the model is in
:mod:`instseg_edu.models.yolact`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from instseg_edu.config import ClassesInBBoxHead, check, check_at_least, check_in_range
from instseg_edu.losses import CrossEntropyLossConfig, SmoothL1LossConfig
from instseg_edu.models.backbone import FPNConfig, ResNetConfig, check_backbone_and_heads
from instseg_edu.ops.anchors import AnchorGeneratorConfig
from instseg_edu.ops.assign import MaxIoUAssignerConfig
from instseg_edu.ops.coder import DeltaXYWHBBoxCoder


@dataclass(frozen=True)
class YOLACTHeadConfig:
    """``bbox_head`` (``YOLACTHead``): the prediction head of Sec. 3.2 and its losses.

    Attributes:
        num_classes: foreground classes ``C``; the head predicts ``C + 1`` logits, background last.
        in_channels: channels of the FPN levels.
        feat_channels: width of the shared 3×3 conv(s).
        num_head_convs: shared 3×3 conv + ReLU layers before the three outputs (paper: 1).
        num_protos: ``P``, mask coefficients per anchor (= prototypes; paper: 32).
        anchor_generator: 3 ratios × 1 scale, ``3 · stride`` wide, centred in the cell.
        bbox_coder: deltas normalised by ``(0.1, 0.1, 0.2, 0.2)`` (SSD's variances).
        loss_cls: softmax cross-entropy (weight 1); loss_bbox: smooth L1 (``beta`` 1, weight 1.5).
    """

    former_fields = {
        "loss_cls_weight": "loss_cls.loss_weight",
        "loss_bbox_weight": "loss_bbox.loss_weight",
        "smoothl1_beta": "loss_bbox.beta",
    }

    num_classes: int = 80
    in_channels: int = 256
    feat_channels: int = 256
    num_head_convs: int = 1
    num_protos: int = 32
    anchor_generator: AnchorGeneratorConfig = AnchorGeneratorConfig(
        octave_base_scale=3.0, scales_per_octave=1, center_offset=0.5
    )
    bbox_coder: DeltaXYWHBBoxCoder = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2))
    loss_cls: CrossEntropyLossConfig = CrossEntropyLossConfig()
    loss_bbox: SmoothL1LossConfig = SmoothL1LossConfig(beta=1.0, loss_weight=1.5)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "num_classes", "in_channels", "feat_channels", "num_protos")
        check_at_least(self, 0, "num_head_convs")


@dataclass(frozen=True)
class YOLACTProtonetConfig:
    """``mask_head`` (``YOLACTProtonet``): the prototype branch of Sec. 3.1 and the mask loss.

    The layers are MMDetection's two parallel tuples: a kernel size ``k > 0`` is a ``k×k`` conv to
    ``proto_channels[i]`` channels followed by ReLU; ``k < 0`` is a bilinear upsample by ``-k``
    (its channel entry is ``None``). Default: three 3×3 convs, ×2 upsample, a 3×3 conv and a 1×1
    conv to ``num_protos`` — stride 8 (P3) becomes stride 4.

    Attributes:
        in_channels: channels of P3.
        proto_channels, proto_kernel_sizes: the layers, see above; the last conv must output
            ``num_protos`` channels.
        include_last_relu: ReLU on the prototypes (paper: unbounded positive prototypes work best,
            Sec. 3.1).
        num_protos: ``P``.
        max_masks_to_train: positives per image whose masks are trained (a random subset).
        loss_mask_weight: 6.125 (MMDetection).
        with_seg_branch: add the semantic segmentation auxiliary loss on P3 (Sec. 5).
        loss_segm: its sigmoid cross-entropy (weight 1).
    """

    former_fields = {"loss_segm_weight": "loss_segm.loss_weight"}

    in_channels: int = 256
    proto_channels: tuple[int | None, ...] = (256, 256, 256, None, 256, 32)
    proto_kernel_sizes: tuple[int, ...] = (3, 3, 3, -2, 3, 1)
    include_last_relu: bool = True
    num_protos: int = 32
    max_masks_to_train: int = 100
    loss_mask_weight: float = 6.125
    with_seg_branch: bool = False
    loss_segm: CrossEntropyLossConfig = CrossEntropyLossConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "proto_channels", tuple(self.proto_channels))
        object.__setattr__(self, "proto_kernel_sizes", tuple(self.proto_kernel_sizes))
        check_at_least(self, 1, "in_channels", "num_protos", "max_masks_to_train")
        check_at_least(self, 0, "loss_mask_weight")
        chans, kernels = self.proto_channels, self.proto_kernel_sizes
        check(
            len(chans) == len(kernels) and len(kernels) > 0,
            f"proto_channels={chans} and proto_kernel_sizes={kernels} must be non-empty and of "
            "the same length",
        )
        for c, k in zip(chans, kernels):
            check(
                k != 0 and (k < 0 or (c is not None and c >= 1)) and (k > 0 or c is None),
                f"proto_kernel_sizes={kernels} with proto_channels={chans}: each entry must be a "
                "conv (k > 0, channels >= 1) or an upsample (k < 0, channels None)",
            )
        convs = [c for c, k in zip(chans, kernels) if k > 0]
        check(
            len(convs) > 0 and convs[-1] == self.num_protos,
            f"proto_channels={chans}: the last conv must output num_protos={self.num_protos}",
        )

    @property
    def upsample_factor(self) -> int:
        """How much finer the prototypes are than P3 (2 by default)."""
        return math.prod(-k for k in self.proto_kernel_sizes if k < 0)


@dataclass(frozen=True)
class YOLACTTrainConfig:
    """``train_cfg``: MaxIoU assignment and OHEM.

    Attributes:
        assigner: ``pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0``, one best anchor per ground
            truth (``gt_max_assign_all=False``, as MMDetection's YOLACT).
        neg_pos_ratio: OHEM keeps ``neg_pos_ratio`` hardest negatives per positive (3, SSD).
    """

    assigner: MaxIoUAssignerConfig = MaxIoUAssignerConfig(gt_max_assign_all=False)
    neg_pos_ratio: int = 3

    def __post_init__(self) -> None:
        check_at_least(self, 0, "neg_pos_ratio")


@dataclass(frozen=True)
class YOLACTTestConfig:
    """``test_cfg``.

    Attributes:
        nms_pre: per level, keep the ``nms_pre`` anchors with the best foreground score.
        score_thr: drop scores not above this (0.05).
        iou_thr: Fast NMS IoU threshold (0.5).
        top_k: Fast NMS considers the ``top_k`` best boxes per class (200).
        max_per_img: detections kept per image (100).
        mask_thr: binarisation threshold of the upsampled mask probabilities (0.5).
    """

    nms_pre: int = 1000
    score_thr: float = 0.05
    iou_thr: float = 0.5
    top_k: int = 200
    max_per_img: int = 100
    mask_thr: float = 0.5

    def __post_init__(self) -> None:
        check_at_least(self, 1, "nms_pre", "top_k", "max_per_img")
        check_in_range(self, "score_thr", 0, 1, hi_open=True)
        check_in_range(self, "iou_thr", 0, 1, lo_open=True)
        check_in_range(self, "mask_thr", 0, 1, lo_open=True, hi_open=True)


@dataclass(frozen=True)
class YOLACTConfig(ClassesInBBoxHead):
    """The whole model. Defaults are MMDetection's ``yolact_r50_1x8_coco`` (80 classes).

    Cross-checks (``ValueError`` naming the field): anchor ``strides`` equal the FPN output strides,
    ``bbox_head.in_channels`` and ``mask_head.in_channels`` equal ``neck.out_channels``, and
    ``bbox_head.num_protos`` equals ``mask_head.num_protos``.
    """

    backbone: ResNetConfig = ResNetConfig(
        depth=50, frozen_stages=-1, norm_eval=False, zero_init_residual=False
    )
    neck: FPNConfig = FPNConfig()
    bbox_head: YOLACTHeadConfig = YOLACTHeadConfig()
    mask_head: YOLACTProtonetConfig = YOLACTProtonetConfig()
    train_cfg: YOLACTTrainConfig = YOLACTTrainConfig()
    test_cfg: YOLACTTestConfig = YOLACTTestConfig()

    def __post_init__(self) -> None:
        head, protonet = self.bbox_head, self.mask_head
        strides = check_backbone_and_heads(
            self.backbone,
            self.neck,
            head.anchor_generator.strides,
            bbox_head=head.in_channels,
            mask_head=protonet.in_channels,
        )
        check(
            head.num_protos == protonet.num_protos,
            f"bbox_head.num_protos={head.num_protos} must equal "
            f"mask_head.num_protos={protonet.num_protos}",
        )
        factor = protonet.upsample_factor
        check(
            strides[0] % factor == 0,
            f"proto_kernel_sizes={self.mask_head.proto_kernel_sizes} upsample P3 (stride "
            f"{strides[0]}) by {factor}, which must divide it",
        )

    @property
    def proto_stride(self) -> int:
        """Input pixels per prototype pixel (8 / 2 = 4 by default)."""
        return int(self.bbox_head.anchor_generator.strides[0]) // self.mask_head.upsample_factor


#: MMDetection's ``yolact_r50_1x8_coco`` (without the ImageNet weights; set
#: ``backbone.pretrained="ResNet50_Weights.IMAGENET1K_V1"`` for them), with the semantic
#: segmentation branch on as there.
YOLACT_R50_FPN = YOLACTConfig(mask_head=YOLACTProtonetConfig(with_seg_branch=True))

#: A small YOLACT for CPUs: ResNet-18, 64-channel FPN, head and protonet, 16 prototypes, two
#: protonet convs before the upsample. Same anchors, assigner, OHEM, losses and test procedure.
YOLACT_R18_SMALL = YOLACTConfig(
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False),
    neck=FPNConfig(in_channels=(64, 128, 256, 512), out_channels=64, start_level=1, num_outs=5),
    bbox_head=YOLACTHeadConfig(in_channels=64, feat_channels=64, num_protos=16),
    mask_head=YOLACTProtonetConfig(
        in_channels=64,
        proto_channels=(64, 64, None, 64, 16),
        proto_kernel_sizes=(3, 3, -2, 3, 1),
        num_protos=16,
    ),
)

#: The CPU tier's YOLACT (notebook 08 and ``instseg-edu demo --model yolact`` without a GPU):
#: :data:`YOLACT_R18_SMALL` on the half-width ResNet-18 of
#: :data:`~instseg_edu.models.configs.mask_rcnn.MASK_RCNN_R18_CPU` (``base_channels=32``), so
#: that its ResNet can start from the Mask R-CNN that notebook 06 trained
#: (:func:`~instseg_edu.engine.checkpoint.load_backbone`; its P3–P7 FPN keeps random weights).
#: A step costs about half as much; in 4.5 minutes on two CPU cores from random weights, 1631
#: steps instead of 790, and the prototypes stayed alive: mask AP50 0.121 instead of 0.048; from
#: a trained Mask R-CNN's ResNet, scored at 192 px: 0.33-0.36 (``benchmarks/RESULTS.md``,
#: thirteenth round). With the semantic segmentation loss on P3 (Sec. 5, on in MMDetection's
#: config as in :data:`YOLACT_R50_FPN`): a per-pixel class for every shape teaches P3 what the
#: anchors' classifier must tell apart. In 4.5 minutes from notebook 06's ResNet, box / mask AP50
#: 0.59 / 0.50 -> 0.63 / 0.55 and the medium shapes' boxes 50 % -> 55 % right
#: (``benchmarks/RESULTS.md``, twenty-ninth round).
YOLACT_R18_CPU = YOLACTConfig(
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False, base_channels=32),
    neck=FPNConfig(in_channels=(32, 64, 128, 256), out_channels=64, start_level=1, num_outs=5),
    bbox_head=YOLACT_R18_SMALL.bbox_head,
    mask_head=replace(YOLACT_R18_SMALL.mask_head, with_seg_branch=True),
)
