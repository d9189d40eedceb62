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
``train_cfg.assigner`` and ``test_cfg``; the config classes and presets are in
:mod:`instseg_edu.models.configs.retinanet` (importable from here too).

Shape legend (:mod:`instseg_edu.structures`): ``B`` images, ``N`` anchors of all levels, ``A``
anchors per cell, ``C`` classes, ``G`` ground truths (padded), ``K`` candidates or detections,
``H, W`` a level's height and width, ``h, w`` an image's true size.

Taught in the RetinaNet walkthrough in ``notebooks/``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from instseg_edu.losses import (
    FocalLossConfig,
    L1LossConfig,
    global_avg_factor,
)
from instseg_edu.models import dense_heads
from instseg_edu.models.backbone import ImageNormalize, build_backbone
from instseg_edu.models.configs.retinanet import (
    RETINANET_R18_CPU,
    RETINANET_R18_CPU_DEMO,
    RETINANET_R18_SMALL,
    RETINANET_R50_FPN,
    RETINANET_R50_FPN_SCRATCH,
    RetinaHeadConfig,
    RetinaNetConfig,
    RetinaTestConfig,
    RetinaTrainConfig,
)
from instseg_edu.models.dense_heads import to_B_HWA_K
from instseg_edu.ops.anchors import AnchorGeneratorConfig
from instseg_edu.ops.assign import (
    NEGATIVE,
    Assignment,
    MaxIoUAssignerConfig,
    max_iou_assign_padded,
)
from instseg_edu.ops.boxes import clip_boxes
from instseg_edu.ops.coder import DeltaXYWHBBoxCoder
from instseg_edu.ops.indexing import first_k_true
from instseg_edu.ops.nms import class_aware_nms
from instseg_edu.structures import Batch, Detections, image_sizes_tensor, pad_targets

#: The former name of the box coder's config: the coder is its own config.
BBoxCoderConfig = DeltaXYWHBBoxCoder

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
    "RETINANET_R18_CPU",
    "RETINANET_R18_CPU_DEMO",
    "RetinaHead",
    "RetinaNet",
    "RetinaNetOutputs",
    "RetinaNetTargets",
    "build_retinanet",
    "to_B_HWA_K",
]


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
        labels: ``int64 [B, N]`` class of the assigned ground truth, ``BACKGROUND`` (-1) for
            negative and ignored anchors (the classification target is the one-hot of this,
            all-zero for -1).
        label_weights: ``float [B, N]``: 1 for positives and negatives, 0 for ignored anchors (IoU
            in [0.4, 0.5), inside an ignore region, or in the batch padding).
        bbox_targets: ``float [B, N, 4]`` encoded deltas from anchor to its ground truth; 0 where
            not positive.
        bbox_weights: ``float [B, N]``: 1 for positives, else 0.
        assignment: the :class:`~instseg_edu.ops.assign.Assignment` behind it, fields ``[B, N]``;
            its ``gt_index`` is each anchor's ground truth (``NO_GT`` where not positive).
        num_pos: ``float [B]`` positive anchors per image.
    """

    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    bbox_weights: Tensor
    assignment: Assignment
    num_pos: Tensor


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
                layers += dense_heads.conv3x3_norm_relu(
                    in_ch, cfg.feat_channels, cfg.norm_num_groups
                )
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
                if m.bias is not None:
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

    Images are ``float32 [B, 3, Hp, Wp]`` in ``[0, 1]`` (a :class:`~instseg_edu.structures.Batch`'s
    ``images``); the model normalises them with the ImageNet mean and std itself.
    """

    def __init__(self, cfg: RetinaNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        head = cfg.bbox_head
        self.num_classes = head.num_classes
        self.backbone = build_backbone(cfg.backbone, cfg.neck)
        self.bbox_head = RetinaHead(head)
        self.anchor_generator = head.anchor_generator.build()
        self.bbox_coder = head.bbox_coder
        self.normalize = ImageNormalize()
        self._anchor_cache: dict[tuple, Tensor] = {}  # see instseg_edu.models.dense_heads

    # ---- stage 1: forward ------------------------------------------------------------------------

    def forward(self, images: Tensor) -> RetinaNetOutputs:
        """Run backbone, FPN and head.

        Args:
            images: ``float [B, 3, Hp, Wp]`` in ``[0, 1]``.

        Returns:
            :class:`RetinaNetOutputs` with ``N = Σ_l H_l · W_l · A`` anchors.
        """
        x = self.normalize(images)
        features = self.backbone(x)  # P3..P7: [B, 256, Hp/8, Wp/8] ... [B, 256, Hp/128, Wp/128]
        cls, reg = self.bbox_head(features)
        featmap_sizes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features)
        cls_logits = torch.cat([to_B_HWA_K(c, self.num_classes) for c in cls], dim=1)  # [B, N, C]
        bbox_deltas = torch.cat([to_B_HWA_K(r, 4) for r in reg], dim=1)  # [B, N, 4]
        return RetinaNetOutputs(cls_logits, bbox_deltas, featmap_sizes)

    # ---- anchors (instseg_edu.models.dense_heads) ----------------------------------------------

    def level_sizes(self, featmap_sizes) -> list[int]:
        """Anchors per level, ``H_l · W_l · A``: how to split the ``N`` axis into levels.

        Example: a 512² input has P3..P7 of 64², 32², 16², 8², 4² cells and ``A = 9``:
        ``[36864, 9216, 2304, 576, 144]``, ``N = 49 104``.
        """
        return dense_heads.level_sizes(self.anchor_generator, featmap_sizes)

    def anchors(self, featmap_sizes, device: torch.device | str) -> Tensor:
        """All anchors, ``float32 [N, 4]`` xyxy pixels, levels concatenated in the order of the
        head's outputs (:func:`~instseg_edu.models.dense_heads.all_anchors`; built once per
        feature-map sizes and device)."""
        return dense_heads.all_anchors(
            self.anchor_generator, featmap_sizes, device, self._anchor_cache
        )

    def anchor_valid(self, featmap_sizes, image_sizes, device: torch.device | str) -> Tensor:
        """``bool [B, N]``: anchors whose cell starts inside each image's true size, not in the
        batch's padding (:meth:`~instseg_edu.ops.anchors.AnchorGenerator.valid_flags`; built once
        per image size)."""
        return dense_heads.anchor_valid(
            self.anchor_generator, featmap_sizes, image_sizes, device, self._anchor_cache
        )

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
        pos = assignment.gt_index >= 0  # [B, N]
        bbox_targets = dense_heads.encode_matched(
            self.bbox_coder, anchors, gt.boxes, assignment.gt_index, pos
        )  # [B, N, 4]: deltas of positives, zeros elsewhere
        bbox_weights = pos.to(torch.float32)  # [B, N]
        trained = pos | (assignment.reason == NEGATIVE)  # [B, N]: not ignored
        return RetinaNetTargets(
            labels=assignment.labels,
            label_weights=trained.to(torch.float32),
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
        loss_cls = head.loss_cls(  # the focal loss, times its loss_weight
            logits,
            onehot,
            weight=t.label_weights[..., None],  # [B, N, 1]: ignored anchors contribute nothing
            avg_factor=num_pos,
        )
        loss_bbox = head.loss_bbox(  # L1
            outputs.bbox_deltas.float(),
            t.bbox_targets,
            weight=t.bbox_weights[..., None],  # [B, N, 1]: positives only
            avg_factor=num_pos,
        )
        return {
            "loss_cls": loss_cls,
            "loss_bbox": loss_bbox,
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
        3. Class-aware NMS at ``nms.iou_threshold`` over all levels; keep ``max_per_img``.

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

        # 1. top nms_pre per level (batched) of the (anchor, class) pairs: index anchor * C + class
        cand_scores, flat = dense_heads.topk_per_level(
            scores.reshape(b, -1),  # [B, N*C]
            [n * c for n in self.level_sizes(outputs.featmap_sizes)],
            test.nms_pre,
        )  # [B, K] each, each level's best first
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
                img_boxes, img_scores, img_labels, test.nms.iou_threshold, test.max_per_img
            )
            results.append(Detections(img_boxes[kept], img_scores[kept], img_labels[kept]))
        return results


def build_retinanet(cfg: RetinaNetConfig = RETINANET_R50_FPN) -> RetinaNet:
    """Build a :class:`RetinaNet` from its config (a preset or your own)."""
    return RetinaNet(cfg)
