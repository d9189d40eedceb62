"""RetinaNet: a one-stage detector made competitive by the focal loss (Lin et al., 2017,
"Focal Loss for Dense Object Detection").

The whole detector in four ideas:

1. **Features.** A ResNet + FPN gives five maps P3–P7 (strides 8..128), 256 channels each
   (Sec. 4, "Feature Pyramid Network Backbone").
2. **Anchors.** Every cell of every level carries ``A = 9`` anchors: 3 aspect ratios × 3 scales
   ``4 · 2**(i/3)`` times the stride, i.e. 32–50 pixels on P3 up to 512–813 on P7 (Sec. 4,
   "Anchors"). A 512² image has ``(64² + 32² + 16² + 8² + 4²) · 9 = 49 104`` of them.
3. **Head.** Two small fully convolutional subnets, shared by all levels: a classification branch
   predicting ``A · C`` sigmoid logits per cell and a box branch predicting ``A · 4`` deltas
   (Sec. 4, "Classification Subnet", "Box Regression Subnet"). Each is ``stacked_convs`` 3×3
   convs + ReLU with unshared weights between the two branches.
4. **Training.** Each anchor is assigned by IoU (≥ 0.5 positive, < 0.4 background, in between
   ignored; :mod:`instseg_edu.ops.assign`); the classification loss is the focal loss summed over
   *all* non-ignored anchors and classes and divided by the number of positives (Sec. 3.3); the box
   loss is an L1 loss on the encoded deltas (:mod:`instseg_edu.ops.coder`) of the positives.
   The classification bias starts at ``-log((1 - π) / π)`` with ``π = 0.01``, so every anchor
   begins by predicting "background, 99 %" — without this the ~50k easy negatives swamp the first
   iterations (Sec. 3.3, "Initialization").

The three public stages (see :mod:`instseg_edu.models`):

- ``outputs = model(images)`` → :class:`RetinaNetOutputs`, the head's logits and deltas of every
  anchor of every level, concatenated in the anchor order ``(level, row, column, anchor)`` of
  :meth:`instseg_edu.ops.anchors.AnchorGenerator.grid_anchors`;
- ``model.targets(outputs, batch)`` → :class:`RetinaNetTargets`, and ``model.loss(outputs, batch)``,
  both batched over the whole batch (one assignment call, no per-image loop, no host sync);
- ``model.predict(outputs, image_sizes)`` → one :class:`~instseg_edu.structures.Detections` per
  image (top ``nms_pre`` per level above ``score_thr``, decode, class-aware NMS, ``max_per_img``).

Config keys follow MMDetection's ``configs/_base_/models/retinanet_r50_fpn.py``: ``backbone``,
``neck``, ``bbox_head`` (with ``anchor_generator``, ``bbox_coder``, ``loss_cls``, ``loss_bbox``),
``train_cfg.assigner`` and ``test_cfg``.

Shape legend: ``B`` images, ``N`` anchors of all levels, ``A`` anchors per cell, ``C`` classes,
``K`` candidate detections, ``H, W`` a level's height and width.

Taught in the RetinaNet walkthrough in ``notebooks/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from instseg_edu.losses import global_avg_factor, l1_loss, sigmoid_focal_loss
from instseg_edu.models.backbone import (
    FPNConfig,
    ImageNormalize,
    ResNetConfig,
    build_backbone,
    fpn_strides,
    resnet_out_channels,
)
from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.ops.assign import Assignment, max_iou_assign_padded
from instseg_edu.ops.boxes import clip_boxes
from instseg_edu.ops.coder import DeltaXYWHBBoxCoder
from instseg_edu.ops.indexing import first_k_true
from instseg_edu.ops.nms import class_aware_nms
from instseg_edu.structures import Batch, Detections, image_sizes_tensor, pad_targets

__all__ = [
    "AnchorGeneratorConfig",
    "BBoxCoderConfig",
    "FocalLossConfig",
    "L1LossConfig",
    "MaxIoUAssignerConfig",
    "RetinaHeadConfig",
    "RetinaTrainConfig",
    "RetinaTestConfig",
    "RetinaNetConfig",
    "RETINANET_R50_FPN",
    "RETINANET_R50_FPN_SCRATCH",
    "RETINANET_R18_SMALL",
    "RETINANET_R18_CPU_DEMO",
    "RetinaHead",
    "RetinaNet",
    "RetinaNetOutputs",
    "RetinaNetTargets",
    "build_retinanet",
    "to_B_HWA_K",
]


# --------------------------------------------------------------------------------------------------
# Configuration (MMDetection key names)
# --------------------------------------------------------------------------------------------------


def _tuple_of_positive(name: str, values) -> tuple:
    values = tuple(values)
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"{name}={values} must be a non-empty sequence of finite values > 0")
    return values


@dataclass(frozen=True)
class AnchorGeneratorConfig:
    """``bbox_head.anchor_generator``: 3 ratios × 3 octave scales per cell (Sec. 4, "Anchors").

    ``ratios`` are ``h / w``; scales are ``octave_base_scale · 2**(i / scales_per_octave)`` times
    the stride; ``center_offset`` is the anchor centre as a fraction of the stride (0: the cell's
    top-left corner, MMDetection 3.x).
    """

    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    center_offset: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", _tuple_of_positive("ratios", self.ratios))
        object.__setattr__(self, "strides", _tuple_of_positive("strides", self.strides))
        if not self.octave_base_scale > 0:
            raise ValueError(f"octave_base_scale={self.octave_base_scale} must be > 0")
        if int(self.scales_per_octave) != self.scales_per_octave or self.scales_per_octave < 1:
            raise ValueError(f"scales_per_octave={self.scales_per_octave} must be an integer >= 1")
        if not 0.0 <= self.center_offset <= 1.0:
            raise ValueError(f"center_offset={self.center_offset} must be in [0, 1]")

    @property
    def num_base_anchors(self) -> int:
        """``A``: anchors per feature-map cell."""
        return len(self.ratios) * int(self.scales_per_octave)

    def build(self) -> AnchorGenerator:
        """The :class:`~instseg_edu.ops.anchors.AnchorGenerator` these settings describe."""
        return AnchorGenerator(
            strides=self.strides,
            ratios=self.ratios,
            octave_base_scale=self.octave_base_scale,
            scales_per_octave=self.scales_per_octave,
            center_offset=self.center_offset,
        )


@dataclass(frozen=True)
class BBoxCoderConfig:
    """``bbox_head.bbox_coder``: normalisation of the deltas (RetinaNet: none)."""

    target_means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_means", tuple(self.target_means))
        if len(self.target_means) != 4:
            raise ValueError(f"target_means={self.target_means} must have 4 values")
        object.__setattr__(self, "target_stds", _tuple_of_positive("target_stds", self.target_stds))
        if len(self.target_stds) != 4:
            raise ValueError(f"target_stds={self.target_stds} must have 4 values")


@dataclass(frozen=True)
class FocalLossConfig:
    """``bbox_head.loss_cls``: sigmoid focal loss (Sec. 3.2); ``alpha`` weighs positives."""

    alpha: float = 0.25
    gamma: float = 2.0
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        if not self.gamma >= 0:
            raise ValueError(f"gamma={self.gamma} must be >= 0")
        if not self.loss_weight >= 0:
            raise ValueError(f"loss_weight={self.loss_weight} must be >= 0")


@dataclass(frozen=True)
class L1LossConfig:
    """``bbox_head.loss_bbox``: L1 on the encoded deltas of positive anchors."""

    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.loss_weight >= 0:
            raise ValueError(f"loss_weight={self.loss_weight} must be >= 0")


@dataclass(frozen=True)
class RetinaHeadConfig:
    """``bbox_head``: the two subnets and what they are trained with.

    Attributes:
        num_classes: foreground classes ``C`` (no background class: sigmoids, Sec. 4).
        in_channels: channels of the FPN levels.
        stacked_convs: 3×3 conv + ReLU layers in each branch (paper: 4).
        feat_channels: their width (paper: 256).
        prior_prob: the foreground probability ``π`` every anchor starts with (paper: 0.01).
    """

    num_classes: int = 80
    in_channels: int = 256
    stacked_convs: int = 4
    feat_channels: int = 256
    prior_prob: float = 0.01
    anchor_generator: AnchorGeneratorConfig = field(default_factory=AnchorGeneratorConfig)
    bbox_coder: BBoxCoderConfig = field(default_factory=BBoxCoderConfig)
    loss_cls: FocalLossConfig = field(default_factory=FocalLossConfig)
    loss_bbox: L1LossConfig = field(default_factory=L1LossConfig)

    def __post_init__(self) -> None:
        for name in ("num_classes", "in_channels", "feat_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.stacked_convs < 0:
            raise ValueError(f"stacked_convs={self.stacked_convs} must be >= 0")
        if not 0.0 < self.prior_prob < 1.0:
            raise ValueError(f"prior_prob={self.prior_prob} must be in (0, 1)")


@dataclass(frozen=True)
class MaxIoUAssignerConfig:
    """``train_cfg.assigner``: see :func:`instseg_edu.ops.assign.max_iou_assign`."""

    pos_iou_thr: float = 0.5
    neg_iou_thr: float | tuple[float, float] = 0.4
    min_pos_iou: float = 0.0
    match_low_quality: bool = True
    gt_max_assign_all: bool = True
    ignore_iof_thr: float = -1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.pos_iou_thr <= 1.0:
            raise ValueError(f"pos_iou_thr={self.pos_iou_thr} must be in [0, 1]")
        neg = self.neg_iou_thr
        if isinstance(neg, (tuple, list)):
            object.__setattr__(self, "neg_iou_thr", tuple(neg))
            if len(neg) != 2 or not 0.0 <= neg[0] <= neg[1] <= self.pos_iou_thr:
                raise ValueError(
                    f"neg_iou_thr={tuple(neg)} must be a pair 0 <= lo <= hi <= "
                    f"pos_iou_thr={self.pos_iou_thr}"
                )
        elif not 0.0 <= neg <= self.pos_iou_thr:
            raise ValueError(f"neg_iou_thr={neg} must be in [0, pos_iou_thr={self.pos_iou_thr}]")
        if not 0.0 <= self.min_pos_iou <= 1.0:
            raise ValueError(f"min_pos_iou={self.min_pos_iou} must be in [0, 1]")


@dataclass(frozen=True)
class RetinaTrainConfig:
    """``train_cfg``; RetinaNet trains on every anchor (no sampler) and keeps padding anchors out
    (MMDetection's ``allowed_border=-1``: only the image's valid flags count)."""

    assigner: MaxIoUAssignerConfig = field(default_factory=MaxIoUAssignerConfig)


@dataclass(frozen=True)
class RetinaTestConfig:
    """``test_cfg``.

    Attributes:
        nms_pre: per level, keep the ``nms_pre`` best (anchor, class) scores (``-1``: all).
        min_bbox_size: drop decoded boxes whose width or height is not above this.
        score_thr: drop (anchor, class) scores not above this.
        nms_iou_threshold: class-aware NMS IoU (MMDetection ``nms=dict(iou_threshold=0.5)``).
        max_per_img: detections kept per image after NMS.
    """

    nms_pre: int = 1000
    min_bbox_size: float = 0.0
    score_thr: float = 0.05
    nms_iou_threshold: float = 0.5
    max_per_img: int = 100

    def __post_init__(self) -> None:
        if self.nms_pre != -1 and self.nms_pre < 1:
            raise ValueError(f"nms_pre={self.nms_pre} must be >= 1 or -1 (all)")
        if not 0.0 <= self.score_thr < 1.0:
            raise ValueError(f"score_thr={self.score_thr} must be in [0, 1)")
        if not 0.0 < self.nms_iou_threshold <= 1.0:
            raise ValueError(f"nms_iou_threshold={self.nms_iou_threshold} must be in (0, 1]")
        if self.max_per_img < 1:
            raise ValueError(f"max_per_img={self.max_per_img} must be >= 1")
        if self.min_bbox_size < 0:
            raise ValueError(f"min_bbox_size={self.min_bbox_size} must be >= 0")


@dataclass(frozen=True)
class RetinaNetConfig:
    """The whole detector. Defaults are MMDetection's ``retinanet_r50_fpn`` (COCO, 80 classes).

    Cross-checks (``ValueError`` naming the field): the anchor ``strides`` must be the strides of
    the FPN outputs (one per ``neck.num_outs``), ``bbox_head.in_channels`` must equal
    ``neck.out_channels``, and ``neck.in_channels`` must be the ResNet's output channels.
    """

    backbone: ResNetConfig = field(default_factory=ResNetConfig)
    neck: FPNConfig = field(default_factory=FPNConfig)
    bbox_head: RetinaHeadConfig = field(default_factory=RetinaHeadConfig)
    train_cfg: RetinaTrainConfig = field(default_factory=RetinaTrainConfig)
    test_cfg: RetinaTestConfig = field(default_factory=RetinaTestConfig)

    def __post_init__(self) -> None:
        channels = resnet_out_channels(self.backbone)
        if tuple(self.neck.in_channels) != channels:
            raise ValueError(
                f"neck.in_channels={self.neck.in_channels} must equal the ResNet-"
                f"{self.backbone.depth} output channels {channels}"
            )
        if self.bbox_head.in_channels != self.neck.out_channels:
            raise ValueError(
                f"bbox_head.in_channels={self.bbox_head.in_channels} must equal "
                f"neck.out_channels={self.neck.out_channels}"
            )
        strides = tuple(self.bbox_head.anchor_generator.strides)
        expected = fpn_strides(self.backbone, self.neck)
        if len(strides) != self.neck.num_outs or strides != expected:
            raise ValueError(
                f"anchor_generator.strides={strides} must be the strides {expected} of the "
                f"neck.num_outs={self.neck.num_outs} FPN levels"
            )

    def with_num_classes(self, num_classes: int) -> RetinaNetConfig:
        """The same config for another dataset: ``cfg.with_num_classes(len(dataset.classes))``."""
        return replace(self, bbox_head=replace(self.bbox_head, num_classes=num_classes))


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


# --------------------------------------------------------------------------------------------------
# Outputs and targets
# --------------------------------------------------------------------------------------------------


class RetinaNetOutputs(NamedTuple):
    """What ``RetinaNet.forward`` returns.

    Attributes:
        cls_logits: ``float [B, N, C]`` classification logits (sigmoid → probability per class).
        bbox_deltas: ``float [B, N, 4]`` encoded box deltas ``(dx, dy, dw, dh)`` per anchor.
        featmap_sizes: ``(H, W)`` of each FPN level; with the anchor generator it fixes the anchors.
    """

    cls_logits: Tensor
    bbox_deltas: Tensor
    featmap_sizes: tuple[tuple[int, int], ...]


class RetinaNetTargets(NamedTuple):
    """What the loss trains on, for every anchor of every image.

    Attributes:
        labels: ``int64 [B, N]`` class of the assigned ground truth, ``-1`` for background and
            ignored anchors (the classification target is the one-hot of this, all-zero for -1).
        label_weights: ``float [B, N]``: 1 for positives and negatives, 0 for ignored anchors (IoU
            in [0.4, 0.5), inside an ignore region, or in the batch padding).
        bbox_targets: ``float [B, N, 4]`` encoded deltas from anchor to its ground truth; 0 where
            not positive.
        bbox_weights: ``float [B, N]``: 1 for positives, else 0.
        assignment: the :class:`~instseg_edu.ops.assign.Assignment` behind it, fields ``[B, N]``.
        num_pos: ``float [B]`` positive anchors per image.
    """

    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    bbox_weights: Tensor
    assignment: Assignment
    num_pos: Tensor


def to_B_HWA_K(x: Tensor, k: int) -> Tensor:
    """``[B, A*K, H, W]`` head map → ``[B, H*W*A, K]``, rows in (row, column, anchor) order.

    Channel ``a * K + k`` holds value ``k`` of anchor ``a``, as in MMDetection and detectron2
    (``permute_to_N_HWA_K``), which is what makes row ``(i * W + j) * A + a`` of the result line up
    with the anchor generator's row for anchor ``a`` of cell ``(i, j)``.
    """
    b, _, h, w = x.shape
    x = x.permute(0, 2, 3, 1)  # [B, H, W, A*K] (free for channels_last tensors)
    return x.reshape(b, -1, k)  # [B, H*W*A, K]


# --------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------


class RetinaHead(nn.Module):
    """The classification and box subnets (Sec. 4, Fig. 3 (c) and (d)), shared by all levels.

    ``forward(features)``: a tuple of ``[B, in_channels, H_l, W_l]`` maps → two lists, per level,
    ``cls [B, A*C, H_l, W_l]`` and ``reg [B, A*4, H_l, W_l]``.
    """

    def __init__(self, cfg: RetinaHeadConfig) -> None:
        super().__init__()
        a = cfg.anchor_generator.num_base_anchors
        self.num_classes = cfg.num_classes

        def branch() -> nn.Sequential:
            layers: list[nn.Module] = []
            for i in range(cfg.stacked_convs):
                in_ch = cfg.in_channels if i == 0 else cfg.feat_channels
                layers += [nn.Conv2d(in_ch, cfg.feat_channels, 3, padding=1), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        # Two branches with their own weights: what makes an object and where its edges are differ.
        self.cls_convs = branch()
        self.reg_convs = branch()
        last = cfg.feat_channels if cfg.stacked_convs > 0 else cfg.in_channels
        self.retina_cls = nn.Conv2d(last, a * cfg.num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(last, a * 4, 3, padding=1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # sigmoid(b) = π: every anchor starts as "background with probability 1 - π" (Sec. 3.3).
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - cfg.prior_prob) / cfg.prior_prob))

    def forward(self, features: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor]]:
        cls = [self.retina_cls(self.cls_convs(f)) for f in features]  # [B, A*C, H_l, W_l] each
        reg = [self.retina_reg(self.reg_convs(f)) for f in features]  # [B, A*4, H_l, W_l] each
        return cls, reg


# --------------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------------


class RetinaNet(nn.Module):
    """RetinaNet with the three public stages ``forward``, ``targets``/``loss`` and ``predict``.

    Images are ``float32 [B, 3, H, W]`` in ``[0, 1]`` (a :class:`~instseg_edu.structures.Batch`'s
    ``images``); the model normalises them with the ImageNet mean and std itself.
    """

    _CACHE_SIZE = 16  # anchor sets / valid flags kept per (sizes, device); evaluation sizes vary

    def __init__(self, cfg: RetinaNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        head = cfg.bbox_head
        self.num_classes = head.num_classes
        self.backbone = build_backbone(cfg.backbone, cfg.neck)
        self.bbox_head = RetinaHead(head)
        self.anchor_generator = head.anchor_generator.build()
        self.bbox_coder = DeltaXYWHBBoxCoder(
            head.bbox_coder.target_means, head.bbox_coder.target_stds
        )
        self.normalize = ImageNormalize()
        self._anchor_cache: dict[tuple, Tensor] = {}
        self._valid_cache: dict[tuple, Tensor] = {}

    # ---- stage 1: forward ------------------------------------------------------------------------

    def forward(self, images: Tensor) -> RetinaNetOutputs:
        """Run backbone, FPN and head.

        Args:
            images: ``float [B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            :class:`RetinaNetOutputs` with ``N = Σ_l H_l · W_l · A`` anchors.
        """
        x = self.normalize(images)
        features = self.backbone(x)  # P3..P7: [B, 256, H/8, W/8] ... [B, 256, H/128, W/128]
        cls, reg = self.bbox_head(features)
        featmap_sizes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features)
        cls_logits = torch.cat([to_B_HWA_K(c, self.num_classes) for c in cls], dim=1)  # [B, N, C]
        bbox_deltas = torch.cat([to_B_HWA_K(r, 4) for r in reg], dim=1)  # [B, N, 4]
        return RetinaNetOutputs(cls_logits, bbox_deltas, featmap_sizes)

    # ---- anchors ---------------------------------------------------------------------------------

    def level_sizes(self, featmap_sizes) -> list[int]:
        """Anchors per level, ``H_l · W_l · A``: how to split the ``N`` axis into levels."""
        a = self.anchor_generator.num_base_anchors
        return [h * w * a_l for (h, w), a_l in zip(featmap_sizes, a)]

    @staticmethod
    def _remember(cache: dict, key, make):
        if key not in cache:
            if len(cache) >= RetinaNet._CACHE_SIZE:
                cache.pop(next(iter(cache)))  # forget the oldest
            cache[key] = make()
        return cache[key]

    def anchors(self, featmap_sizes, device: torch.device | str) -> Tensor:
        """All anchors, ``float32 [N, 4]`` xyxy pixels, levels concatenated (cached per sizes)."""
        key = (tuple(map(tuple, featmap_sizes)), str(torch.device(device)))
        return self._remember(
            self._anchor_cache,
            key,
            lambda: torch.cat(self.anchor_generator.grid_anchors(key[0], device), dim=0),
        )

    def anchor_valid(self, featmap_sizes, image_sizes, device: torch.device | str) -> Tensor:
        """``bool [B, N]``: anchors whose cell lies inside each image's true size (not padding).

        Flags are computed once per distinct image size and cached; a batch of equal sizes costs
        one ``stack`` of cached tensors.
        """
        sizes = tuple(map(tuple, featmap_sizes))
        dev = str(torch.device(device))
        per_image = []
        for h, w in image_sizes:
            hw = (int(h), int(w))
            flags = self._remember(
                self._valid_cache,
                (sizes, hw, dev),
                lambda hw=hw: torch.cat(self.anchor_generator.valid_flags(sizes, hw, device)),
            )
            per_image.append(flags)  # [N]
        return torch.stack(per_image, dim=0)  # [B, N]

    # ---- stage 2: targets and loss ---------------------------------------------------------------

    def targets(self, outputs: RetinaNetOutputs, batch: Batch) -> RetinaNetTargets:
        """Assign every anchor of every image and encode its regression target.

        One :func:`~instseg_edu.ops.assign.max_iou_assign_batched` call for the whole batch (ground
        truth padded to the batch's largest ``G``); anchors in an image's padding are ignored.
        Sizes come from Python ints, never from tensor values: no ``.item()``, no boolean indexing,
        so this code itself never waits for the GPU.
        """
        device = outputs.cls_logits.device
        anchors = self.anchors(outputs.featmap_sizes, device)  # [N, 4]
        valid = self.anchor_valid(outputs.featmap_sizes, batch.image_sizes, device)  # [B, N]
        gt = pad_targets(batch.targets, device)  # boxes [B, G, 4], labels/valid [B, G]
        assignment = max_iou_assign_padded(anchors, gt, self.cfg.train_cfg.assigner, valid)
        pos = assignment.gt_inds > 0  # [B, N]
        b, n = pos.shape
        anchors_b = anchors.expand(b, n, 4)  # [B, N, 4]
        if gt.boxes.shape[1] > 0:
            gt_index = (assignment.gt_inds - 1).clamp(min=0)  # [B, N], 0 where not positive
            matched = torch.gather(gt.boxes, 1, gt_index[..., None].expand(b, n, 4))  # [B, N, 4]
            # Non-positives get their own anchor as "target": finite deltas, never used (weight 0).
            matched = torch.where(pos[..., None], matched, anchors_b)
        else:
            matched = anchors_b
        deltas = self.bbox_coder.encode(anchors_b, matched)  # [B, N, 4]
        bbox_targets = torch.where(pos[..., None], deltas, torch.zeros_like(deltas))
        bbox_weights = pos.to(torch.float32)  # [B, N]
        return RetinaNetTargets(
            labels=assignment.labels,
            label_weights=(assignment.gt_inds >= 0).to(torch.float32),
            bbox_targets=bbox_targets,
            bbox_weights=bbox_weights,
            assignment=assignment,
            num_pos=bbox_weights.sum(dim=1),
        )

    def loss(self, outputs: RetinaNetOutputs, batch: Batch) -> dict[str, Tensor]:
        """Focal loss + L1 box loss, both normalised by the batch's positives (Sec. 3.3).

        Returns:
            ``loss_cls``: focal loss summed over every non-ignored anchor and class of the batch,
            divided by ``max(total positives, 1)``; ``loss_bbox``: L1 on the four deltas of
            positive anchors, same divisor; ``num_pos``: positives per image (mean, detached).
            An image without ground truth contributes only background terms.
        """
        t = self.targets(outputs, batch)
        head = self.cfg.bbox_head
        logits = outputs.cls_logits.float()  # [B, N, C]; float even under bf16 autocast
        classes = torch.arange(self.num_classes, device=logits.device)  # [C]
        # One-hot without F.one_hot (it checks its input's range on the host); -1 matches nothing.
        onehot = (t.labels[..., None] == classes).to(logits.dtype)  # [B, N, C]
        # Positives of the whole batch (of every process under DDP), 0-d: no host synchronisation.
        num_pos = global_avg_factor(t.num_pos.sum(), clamp_min=1.0)
        loss_cls = sigmoid_focal_loss(
            logits,
            onehot,
            alpha=head.loss_cls.alpha,
            gamma=head.loss_cls.gamma,
            reduction="sum",
            weight=t.label_weights[..., None],  # [B, N, 1]: ignored anchors contribute nothing
            avg_factor=num_pos,
        )
        loss_bbox = l1_loss(
            outputs.bbox_deltas.float(),
            t.bbox_targets,
            reduction="sum",
            weight=t.bbox_weights[..., None],  # [B, N, 1]: positives only
            avg_factor=num_pos,
        )
        return {
            "loss_cls": head.loss_cls.loss_weight * loss_cls,
            "loss_bbox": head.loss_bbox.loss_weight * loss_bbox,
            "num_pos": t.num_pos.mean().detach(),
        }

    # ---- stage 3: predict ------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self, outputs: RetinaNetOutputs, image_sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """Turn head outputs into detections, MMDetection's ``test_cfg`` procedure.

        1. Per level and image, keep the ``nms_pre`` highest sigmoid scores over all
           (anchor, class) pairs — one anchor can yield several classes — and only those above
           ``score_thr``.
        2. Decode their anchors' deltas, clip to the image's true ``(h, w)``; drop boxes not larger
           than ``min_bbox_size``.
        3. Class-aware NMS at ``nms_iou_threshold`` over all levels; keep ``max_per_img``.

        Batched over images and levels; the same steps per image and per level:
        :func:`~instseg_edu.models.references.retinanet_predict_reference`.

        Args:
            outputs: from ``forward``.
            image_sizes: each image's true ``(h, w)`` inside the padded batch.

        Returns:
            One :class:`Detections` per image: ``boxes float32 [K, 4]`` xyxy in input pixels,
            ``scores float32 [K]`` sorted descending, ``labels int64 [K]``, ``K <= max_per_img``.
        """
        test = self.cfg.test_cfg
        c = self.num_classes
        device = outputs.cls_logits.device
        anchors = self.anchors(outputs.featmap_sizes, device)  # [N, 4]
        scores = outputs.cls_logits.float().sigmoid()  # [B, N, C]
        b = scores.shape[0]

        # 1. top nms_pre per level (batched): flat index i = anchor * C + class
        top_scores, top_index = [], []
        start = 0
        for n_level in self.level_sizes(outputs.featmap_sizes):
            level = scores[:, start : start + n_level].reshape(b, n_level * c)  # [B, n_l*C]
            k = n_level * c if test.nms_pre == -1 else min(test.nms_pre, n_level * c)
            s, i = level.topk(k, dim=1)  # [B, k] each, sorted
            top_scores.append(s)
            top_index.append(i + start * c)  # index into the flattened [N*C]
            start += n_level
        cand_scores = torch.cat(top_scores, dim=1)  # [B, K]
        flat = torch.cat(top_index, dim=1)  # [B, K]
        anchor_index, labels = flat // c, flat % c  # [B, K] each

        # 2. decode the candidates' boxes
        deltas = outputs.bbox_deltas.float()
        cand_deltas = torch.gather(deltas, 1, anchor_index[..., None].expand(-1, -1, 4))  # [B,K,4]
        boxes = self.bbox_coder.decode(anchors[anchor_index], cand_deltas)  # [B, K, 4]

        sizes = image_sizes_tensor(image_sizes, device)  # [B, 2] = (h, w)
        boxes = clip_boxes(boxes, sizes[:, None])  # [B, K, 4], each image to its true size
        wh = boxes[..., 2:] - boxes[..., :2]  # [B, K, 2]
        keep = (cand_scores > test.score_thr) & (wh > test.min_bbox_size).all(dim=-1)  # [B, K]

        # 3. per image: thresholds leave a different number of candidates in each image. One
        # host read gives every image's count; first_k_true picks its candidates, in order.
        counts = keep.sum(1).tolist()  # B ints
        results = []
        for i, n in enumerate(counts):
            idx = first_k_true(keep[i], n)  # [n] this image's candidates
            img_boxes, img_scores, img_labels = boxes[i, idx], cand_scores[i, idx], labels[i, idx]
            kept = class_aware_nms(  # [K] by descending score, K <= max_per_img
                img_boxes, img_scores, img_labels, test.nms_iou_threshold, test.max_per_img
            )
            results.append(Detections(img_boxes[kept], img_scores[kept], img_labels[kept]))
        return results


def build_retinanet(cfg: RetinaNetConfig = RETINANET_R50_FPN) -> RetinaNet:
    """Build a :class:`RetinaNet` from its config (a preset or your own)."""
    return RetinaNet(cfg)


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
