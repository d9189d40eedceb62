"""YOLACT: real-time instance segmentation by assembling masks from shared prototypes (Bolya et al.,
2019, "YOLACT: Real-time Instance Segmentation").

Mask R-CNN crops features per box (RoIAlign) and runs a mask head on each crop. YOLACT splits the
job into two parallel, fully convolutional tasks and one matrix product (Sec. 3):

1. **Protonet** (Sec. 3.1): a small FCN on P3 — three 3×3 convs, a 2× upsample, a 3×3 conv and a
   1×1 conv to ``P = 32`` channels, ReLU on the output — gives ``P`` *prototype masks* per image at
   a quarter of the input resolution: ``[B, P, Hp/4, Wp/4]``. They belong to no instance; they are
   image-sized "basis images" (one fires on the left part of objects, one on the background, ...).
2. **Prediction head** (Sec. 3.2, Fig. 4): RetinaNet's anchor head, shared by P3–P7, with one
   shared 3×3 conv and three outputs per anchor: ``C + 1`` class logits (softmax with a background
   column, as in SSD — not RetinaNet's sigmoids), 4 box deltas, and ``P`` **mask coefficients**
   squashed by ``tanh`` so they can *subtract* prototypes as well as add them.
3. **Assembly** (Sec. 3.3): for the detections that survive NMS, ``M = sigmoid(Prototypes · Cᵀ)``
   — one ``[P] × [P, H·W]`` product per detection, i.e. a single matrix multiplication for all of
   them (:func:`linear_combination`). Each mask is then **cropped** to its box (:func:`crop_masks`),
   upsampled to the image and thresholded at 0.5.

Anchors (Sec. 4, "Backbone Detector"): 3 ratios ``(0.5, 1, 2)`` and one scale per level,
``octave_base_scale=3`` times the stride: 24, 48, 96, 192, 384 pixels on P3..P7, centred in their
cell (``center_offset=0.5``).

Training (Sec. 3.3 and Sec. 4):

- every anchor is assigned by IoU (≥ 0.5 positive, < 0.4 background);
- ``loss_cls``: softmax cross-entropy over the positives and the **hardest negatives**, three per
  positive (OHEM, as SSD; :func:`ohem_negatives`), divided by the number of positives;
- ``loss_bbox``: smooth L1 on the encoded deltas of positives (weight 1.5);
- ``loss_mask``: binary cross-entropy between the assembled mask of each positive anchor — cropped
  with its *ground-truth* box — and that ground truth's mask downsampled to the prototype size,
  divided by the box's area so that small objects count as much as big ones (weight 6.125, the
  value MMDetection uses); at most ``max_masks_to_train = 100`` positives per image take part,
  drawn from the positives whose object has a mask (a box-only object trains its class and box,
  not a mask);
- optional ``loss_segm`` (Sec. 5, "Semantic Segmentation Loss"): a 1×1 conv on P3 predicts one
  sigmoid map per class, trained only to shape the features (unused at test time).

Inference uses **Fast NMS** (Sec. 5, "Fast NMS"; :func:`instseg_edu.ops.nms.fast_nms`): every
class at once as one triangular IoU matrix, letting already-suppressed boxes still suppress others.

The three public stages (see :mod:`instseg_edu.models`): ``model(images)`` →
:class:`YOLACTOutputs`; ``model.targets(outputs, batch)`` → :class:`YOLACTTargets` and
``model.loss(outputs, batch)``, batched over the whole batch; ``model.predict(outputs,
image_sizes)`` → one :class:`~instseg_edu.structures.Detections` (with masks) per image.

Config keys follow MMDetection's ``configs/yolact/yolact_r50_1x8_coco.py`` (``bbox_head`` =
``YOLACTHead``, ``mask_head`` = ``YOLACTProtonet``, ``train_cfg``, ``test_cfg``); the classes and
presets are in :mod:`instseg_edu.models.configs.yolact` (importable from here too). Differences on
purpose: integer strides 8..128 instead of ``550 / (69, 35, 18, 9, 5)`` (any input size, not only
550²); an image without positives keeps no OHEM negatives (original YOLACT; MMDetection keeps all
of them).

Shape legend: ``B`` images, ``N`` anchors of all levels, ``A`` anchors per cell, ``C`` classes,
``P`` prototypes, ``M`` positives whose masks are trained, ``K`` candidates or detections, ``G``
ground truths, ``Hm, Wm`` prototype height and width (input / 4), ``Hp, Wp`` padded input size,
``h, w`` an image's true size.

Taught in ``notebooks/08_yolact.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg_edu.losses import global_avg_factor
from instseg_edu.models import dense_heads
from instseg_edu.models.backbone import ImageNormalize, build_backbone
from instseg_edu.models.configs.yolact import (
    YOLACT_R18_CPU,
    YOLACT_R18_SMALL,
    YOLACT_R50_FPN,
    YOLACTConfig,
    YOLACTHeadConfig,
    YOLACTProtonetConfig,
    YOLACTTestConfig,
    YOLACTTrainConfig,
)
from instseg_edu.models.dense_heads import to_B_HWA_K
from instseg_edu.ops.assign import NEGATIVE, Assignment, max_iou_assign_padded
from instseg_edu.ops.boxes import clip_boxes
from instseg_edu.ops.masks import crop_masks
from instseg_edu.ops.nms import FastNMSResult, fast_nms_batched
from instseg_edu.ops.sampling import ohem_negatives
from instseg_edu.structures import Batch, Detections, pad_targets, softmax_labels

__all__ = [
    "YOLACTHeadConfig",
    "YOLACTProtonetConfig",
    "YOLACTTrainConfig",
    "YOLACTTestConfig",
    "YOLACTConfig",
    "YOLACT_R50_FPN",
    "YOLACT_R18_SMALL",
    "YOLACT_R18_CPU",
    "YOLACTHead",
    "Protonet",
    "YOLACT",
    "YOLACTOutputs",
    "YOLACTTargets",
    "build_yolact",
    "crop_masks",
    "linear_combination",
    "assemble_masks",
    "ohem_negatives",
]


# --------------------------------------------------------------------------------------------------
# Outputs and targets
# --------------------------------------------------------------------------------------------------


class YOLACTOutputs(NamedTuple):
    """What ``YOLACT.forward`` returns.

    Attributes:
        cls_logits: ``float [B, N, C+1]`` softmax logits, column ``C`` is background.
        bbox_deltas: ``float [B, N, 4]`` encoded box deltas per anchor.
        coeffs: ``float [B, N, P]`` mask coefficients in ``[-1, 1]`` (tanh).
        prototypes: ``float [B, P, Hm, Wm]`` prototype masks, ``>= 0`` (ReLU), ``Hm = Hp / 4``.
        featmap_sizes: ``(H, W)`` of each FPN level (fixes the anchors).
        segm_logits: ``float [B, C, Hp/8, Wp/8]`` semantic logits, or ``None`` without the branch.
    """

    cls_logits: Tensor
    bbox_deltas: Tensor
    coeffs: Tensor
    prototypes: Tensor
    featmap_sizes: tuple[tuple[int, int], ...]
    segm_logits: Tensor | None = None


class YOLACTTargets(NamedTuple):
    """What the losses train on.

    Attributes:
        labels: ``int64 [B, N]``: the class ``0..C-1`` of positives, ``BACKGROUND`` (-1) for
            every other anchor (the loss moves it to the softmax's background column ``C``;
            ``cls_weights`` says which of them are trained).
        gt_index: ``int64 [B, N]``: the matched ground truth (a row of the image's targets) for
            positives, ``NO_GT`` (-1) elsewhere.
        cls_weights: ``float [B, N]``: 1 for positives and for the OHEM-kept negatives, else 0.
        bbox_targets: ``float [B, N, 4]`` encoded deltas to the matched box; 0 where not positive.
        pos: ``bool [B, N]`` positive anchors.
        ohem_neg: ``bool [B, N]`` negatives kept by OHEM.
        num_pos: ``float [B]`` positives per image.
        mask_anchor_inds: ``int64 [B, M]`` anchors whose masks are trained, ``M = min(
            max_masks_to_train, N)``; rows beyond an image's positives are filler.
        mask_valid: ``bool [B, M]``: True for real (positive) entries of ``mask_anchor_inds``.
        mask_targets: ``float [B, M, Hm, Wm]`` the matched ground-truth masks at prototype size.
        mask_boxes: ``float [B, M, 4]`` the matched ground-truth boxes in prototype pixels (crop
            and area normaliser).
        segm_targets: ``float [B, C, Hp/8, Wp/8]`` per-class union masks at the semantic branch's
            size, or ``None``.
        assignment: the :class:`~instseg_edu.ops.assign.Assignment` behind it, fields ``[B, N]``.
        segm_weights: ``float [B, C, Hp/8, Wp/8]``, 0 where ``segm_targets`` is unknown (inside
            the box of a box-only object, in its class's channel), else 1; ``None`` without the
            branch.
    """

    labels: Tensor
    gt_index: Tensor
    cls_weights: Tensor
    bbox_targets: Tensor
    pos: Tensor
    ohem_neg: Tensor
    num_pos: Tensor
    mask_anchor_inds: Tensor
    mask_valid: Tensor
    mask_targets: Tensor
    mask_boxes: Tensor
    segm_targets: Tensor | None
    assignment: Assignment
    segm_weights: Tensor | None = None

    @property
    def gt_inds(self) -> Tensor:
        """The former name of ``gt_index`` (read-only)."""
        return self.gt_index


# --------------------------------------------------------------------------------------------------
# The small ideas: linear combination and assembly (crop: instseg_edu.ops.masks, OHEM:
# instseg_edu.ops.sampling)
# --------------------------------------------------------------------------------------------------


def linear_combination(prototypes: Tensor, coeffs: Tensor) -> Tensor:
    """Mask logits as a weighted sum of prototypes, ``Prototypes · Coeffsᵀ`` (Sec. 3.3, Eq. 1).

    ``out[k] = Σ_p coeffs[k, p] · prototypes[p]``: detection ``k`` mixes the ``P`` shared
    prototype images with its own ``P`` coefficients; ``sigmoid(out[k])`` is its mask. All
    detections at once are one matrix product ``[K, P] × [P, Hm·Wm]``.

    Args:
        prototypes: ``float [P, Hm, Wm]`` or ``[B, P, Hm, Wm]``.
        coeffs: ``float [K, P]`` or ``[B, K, P]`` (same leading batch dims as ``prototypes``).

    Returns:
        ``float [K, Hm, Wm]`` or ``[B, K, Hm, Wm]`` logits.
    """
    return torch.einsum("...phw,...kp->...khw", prototypes, coeffs.to(prototypes.dtype))


def assemble_masks(prototypes: Tensor, coeffs: Tensor, boxes: Tensor | None = None) -> Tensor:
    """Mask probabilities of a set of detections: ``crop(sigmoid(Prototypes · Coeffsᵀ), boxes)``.

    Args:
        prototypes: ``float [P, Hm, Wm]`` (or batched, see :func:`linear_combination`).
        coeffs: ``float [K, P]``.
        boxes: ``float [K, 4]`` xyxy in prototype pixels, or ``None`` for no crop.

    Returns:
        ``float [K, Hm, Wm]`` in ``[0, 1]``.
    """
    probs = linear_combination(prototypes, coeffs).sigmoid()
    return probs if boxes is None else crop_masks(probs, boxes)


# --------------------------------------------------------------------------------------------------
# Head and protonet
# --------------------------------------------------------------------------------------------------


class YOLACTHead(nn.Module):
    """The prediction head (Sec. 3.2, Fig. 4), shared by all levels.

    ``forward(features)`` → three lists, per level: ``cls [B, A*(C+1), H_l, W_l]``,
    ``reg [B, A*4, H_l, W_l]`` and ``coeff [B, A*P, H_l, W_l]`` (already ``tanh``-ed).
    """

    def __init__(self, cfg: YOLACTHeadConfig) -> None:
        super().__init__()
        a = cfg.anchor_generator.num_base_anchors
        layers: list[nn.Module] = []
        for i in range(cfg.num_head_convs):
            in_ch = cfg.in_channels if i == 0 else cfg.feat_channels
            layers += [nn.Conv2d(in_ch, cfg.feat_channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.head_convs = nn.Sequential(*layers)
        last = cfg.feat_channels if cfg.num_head_convs > 0 else cfg.in_channels
        self.conv_cls = nn.Conv2d(last, a * (cfg.num_classes + 1), 3, padding=1)
        self.conv_reg = nn.Conv2d(last, a * 4, 3, padding=1)
        self.conv_coeff = nn.Conv2d(last, a * cfg.num_protos, 3, padding=1)
        for m in self.modules():  # MMDetection: Xavier-uniform, zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: tuple[Tensor, ...]):
        cls, reg, coeff = [], [], []
        for f in features:
            x = self.head_convs(f)
            cls.append(self.conv_cls(x))  # [B, A*(C+1), H_l, W_l]
            reg.append(self.conv_reg(x))  # [B, A*4, H_l, W_l]
            coeff.append(self.conv_coeff(x).tanh())  # [B, A*P, H_l, W_l], in [-1, 1]
        return cls, reg, coeff


class Protonet(nn.Module):
    """The prototype branch (Sec. 3.1, Fig. 3): P3 ``[B, in, Hp/8, Wp/8]`` → ``[B, P, Hp/4, Wp/4]``.

    Also holds the optional semantic segmentation conv (Sec. 5): a 1×1 conv on P3 to ``C``
    channels, used only by the auxiliary loss.
    """

    def __init__(self, cfg: YOLACTProtonetConfig, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = cfg.in_channels
        n = len(cfg.proto_kernel_sizes)
        for i, (c, k) in enumerate(zip(cfg.proto_channels, cfg.proto_kernel_sizes)):
            if k < 0:
                layers.append(nn.Upsample(scale_factor=-k, mode="bilinear", align_corners=False))
                continue
            layers.append(nn.Conv2d(in_ch, c, k, padding=k // 2))
            if i < n - 1 or cfg.include_last_relu:
                layers.append(nn.ReLU(inplace=True))
            in_ch = c
        self.protonet = nn.Sequential(*layers)
        self.segm_conv = nn.Conv2d(cfg.in_channels, num_classes, 1) if cfg.with_seg_branch else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, p3: Tensor) -> tuple[Tensor, Tensor | None]:
        protos = self.protonet(p3)  # [B, P, Hm, Wm]
        segm = self.segm_conv(p3) if self.segm_conv is not None else None  # [B, C, Hp/8, Wp/8]
        return protos, segm


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class YOLACT(nn.Module):
    """YOLACT with the three public stages ``forward``, ``targets``/``loss`` and ``predict``.

    Images are ``float32 [B, 3, Hp, Wp]`` in ``[0, 1]`` with ``Hp, Wp`` multiples of 32 (a
    :class:`~instseg_edu.structures.Batch`'s ``images``); the model normalises them itself.
    """

    def __init__(self, cfg: YOLACTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        head = cfg.bbox_head
        self.num_classes = head.num_classes
        self.num_protos = head.num_protos
        self.proto_stride = cfg.proto_stride
        # The anchors (A per cell, and the coder of their deltas) and their cache.
        self.anchor_generator = head.anchor_generator.build()
        self.bbox_coder = head.bbox_coder
        self._anchor_cache: dict[tuple, Tensor] = {}  # see instseg_edu.models.dense_heads
        self.normalize = ImageNormalize()
        self.backbone = build_backbone(cfg.backbone, cfg.neck)
        self.bbox_head = YOLACTHead(head)
        self.mask_head = Protonet(cfg.mask_head, head.num_classes)

    # ---- stage 1: forward ------------------------------------------------------------------------

    def forward(self, images: Tensor) -> YOLACTOutputs:
        """Backbone + FPN, prediction head on P3–P7, protonet on P3 (Sec. 3.1-3.2, Fig. 2).

        Args:
            images: ``float [B, 3, Hp, Wp]`` in ``[0, 1]``, ``Hp, Wp`` multiples of 32.

        Returns:
            :class:`YOLACTOutputs`: per anchor ``C + 1`` class logits, 4 deltas and ``P`` mask
            coefficients (``N = Σ_l H_l · W_l · A`` anchors, levels concatenated), the
            prototypes at stride 4 and the semantic logits (or ``None``).
        """
        x = self.normalize(images)
        features = self.backbone(x)  # P3..P7: [B, 256, Hp/8, Wp/8] ... [B, 256, Hp/128, Wp/128]
        cls, reg, coeff = self.bbox_head(features)
        prototypes, segm = self.mask_head(features[0])  # [B, P, Hm, Wm], [B, C, Hp/8, Wp/8]
        c1, p = self.num_classes + 1, self.num_protos
        return YOLACTOutputs(
            cls_logits=torch.cat([to_B_HWA_K(t, c1) for t in cls], dim=1),  # [B, N, C+1]
            bbox_deltas=torch.cat([to_B_HWA_K(t, 4) for t in reg], dim=1),  # [B, N, 4]
            coeffs=torch.cat([to_B_HWA_K(t, p) for t in coeff], dim=1),  # [B, N, P]
            prototypes=prototypes,
            featmap_sizes=tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features),
            segm_logits=segm,
        )

    # ---- anchors (instseg_edu.models.dense_heads) ----------------------------------------------

    def level_sizes(self, featmap_sizes) -> list[int]:
        """Anchors per level, ``H_l · W_l · A``."""
        return dense_heads.level_sizes(self.anchor_generator, featmap_sizes)

    def anchors(self, featmap_sizes, device: torch.device | str) -> Tensor:
        """All anchors, ``float32 [N, 4]`` xyxy pixels, levels concatenated (cached)."""
        return dense_heads.all_anchors(
            self.anchor_generator, featmap_sizes, device, self._anchor_cache
        )

    def anchor_valid(self, featmap_sizes, image_sizes, device: torch.device | str) -> Tensor:
        """``bool [B, N]``: anchors whose cell lies inside each image's true size."""
        return dense_heads.anchor_valid(
            self.anchor_generator, featmap_sizes, image_sizes, device, self._anchor_cache
        )

    # ---- stage 2: targets and loss ---------------------------------------------------------------

    @torch.no_grad()
    def targets(self, outputs: YOLACTOutputs, batch: Batch) -> YOLACTTargets:
        """Assign anchors, mine hard negatives, pick the positives whose masks are trained.

        One :func:`~instseg_edu.ops.assign.max_iou_assign_batched` call for the whole batch;
        OHEM ranks the current background losses (that is why it needs ``outputs``); the mask
        subset is a random ``max_masks_to_train`` of each image's positives, chosen with
        ``topk`` on random keys (positives first) — no boolean indexing, no host sync.
        """
        device = outputs.cls_logits.device
        c = self.num_classes
        anchors = self.anchors(outputs.featmap_sizes, device)  # [N, 4]
        valid = self.anchor_valid(outputs.featmap_sizes, batch.image_sizes, device)  # [B, N]
        gt = pad_targets(batch.targets, device)  # boxes [B, G, 4], labels / valid [B, G]
        assignment = max_iou_assign_padded(anchors, gt, self.cfg.train_cfg.assigner, valid)
        gt_index = assignment.gt_index  # [B, N], NO_GT where not positive
        pos = gt_index >= 0  # [B, N]
        neg = assignment.reason == NEGATIVE  # [B, N]
        b, n = pos.shape
        g = gt.boxes.shape[1]
        num_pos = pos.sum(dim=1).to(torch.float32)  # [B]
        bbox_targets = dense_heads.encode_matched(self.bbox_coder, anchors, gt.boxes, gt_index, pos)
        index = gt_index.clamp(min=0)  # [B, N], a valid row (0) where not positive

        # OHEM: rank negatives by their background cross-entropy, logsumexp(x) - x_bg.
        logits = outputs.cls_logits.detach().float()  # [B, N, C+1]
        bg_loss = logits.logsumexp(dim=2) - logits[..., c]  # [B, N]
        ohem_neg = ohem_negatives(bg_loss, neg, num_pos, self.cfg.train_cfg.neg_pos_ratio)
        cls_weights = (pos | ohem_neg).to(torch.float32)  # [B, N]

        # Mask subset: M = min(max_masks_to_train, N) anchors per image, positives first. Only
        # positives whose object has a mask qualify: a box-only object trains no mask.
        m = min(self.cfg.mask_head.max_masks_to_train, n)
        mask_pos = pos & torch.gather(gt.has_mask, 1, index) if g > 0 else pos  # [B, N]
        keys = torch.rand(b, n, device=device) + mask_pos.to(torch.float32)  # those in [1, 2)
        mask_anchor_inds = keys.topk(m, dim=1).indices  # [B, M]
        mask_valid = torch.gather(mask_pos, 1, mask_anchor_inds)  # [B, M]
        mask_gt = torch.gather(index, 1, mask_anchor_inds)  # [B, M] ground-truth index
        hm, wm = outputs.prototypes.shape[-2:]
        s = float(self.proto_stride)
        if g > 0:
            gt_masks = self._padded_masks(
                batch, g, (hm * self.proto_stride, wm * self.proto_stride)
            )
            small = F.interpolate(gt_masks, size=(hm, wm), mode="bilinear", align_corners=False)
            small = (small > 0.5).to(torch.float32)  # [B, G, Hm, Wm]
            mask_targets = torch.gather(
                small, 1, mask_gt[:, :, None, None].expand(b, m, hm, wm)
            )  # [B, M, Hm, Wm]
            mask_boxes = torch.gather(gt.boxes, 1, mask_gt[..., None].expand(b, m, 4)) / s
        else:
            small = torch.zeros(b, 0, hm, wm, device=device)
            mask_targets = torch.zeros(b, m, hm, wm, device=device)
            mask_boxes = torch.zeros(b, m, 4, device=device)

        segm_targets = segm_weights = None
        if outputs.segm_logits is not None:
            hs, ws = outputs.segm_logits.shape[-2:]
            if g > 0:
                seg_small = F.interpolate(small, size=(hs, ws), mode="bilinear") > 0.5
                onehot = (gt.labels[..., None] == torch.arange(c, device=device)).float()  # [B,G,C]
                segm_targets = torch.einsum("bgc,bghw->bchw", onehot, seg_small.float()).clamp(
                    max=1.0
                )  # [B, C, hs, ws]: union of each class's masks
                # Inside a box-only object's box its class's channel has no known target.
                hp, wp = batch.images.shape[-2:]
                scale = torch.tensor([wp / ws, hp / hs, wp / ws, hp / hs], device=device)
                inside = crop_masks(torch.ones(b, g, hs, ws, device=device), gt.boxes / scale)
                box_only = (gt.valid & ~gt.has_mask).float()  # [B, G]
                unknown = torch.einsum("bgc,bghw->bchw", onehot * box_only[..., None], inside)
                segm_weights = (unknown == 0).float()  # [B, C, hs, ws]
            else:
                segm_targets = torch.zeros(b, c, hs, ws, device=device)

        return YOLACTTargets(
            labels=assignment.labels,  # the class of positives, BACKGROUND elsewhere
            gt_index=gt_index,
            cls_weights=cls_weights,
            bbox_targets=bbox_targets,
            pos=pos,
            ohem_neg=ohem_neg,
            num_pos=num_pos,
            mask_anchor_inds=mask_anchor_inds,
            mask_valid=mask_valid,
            mask_targets=mask_targets,
            mask_boxes=mask_boxes,
            segm_targets=segm_targets,
            assignment=assignment,
            segm_weights=segm_weights,
        )

    @staticmethod
    def _padded_masks(batch: Batch, g: int, size: tuple[int, int]) -> Tensor:
        """The batch's masks as ``float [B, G, Hp, Wp]`` (zero rows for padding objects)."""
        device = batch.images.device
        out = torch.zeros(len(batch.targets), g, *size, device=device)
        for i, t in enumerate(batch.targets):
            m = t.masks.to(device)[:, : size[0], : size[1]]  # [G_i, <=Hp, <=Wp]
            out[i, : m.shape[0], : m.shape[1], : m.shape[2]] = m.to(torch.float32)
        return out

    def loss(self, outputs: YOLACTOutputs, batch: Batch) -> dict[str, Tensor]:
        """YOLACT's losses (Sec. 3.3, Sec. 4 and Sec. 5), all from :meth:`targets`.

        Returns:
            ``loss_cls``: softmax cross-entropy over positives and OHEM negatives, ``/ num_pos``;
            ``loss_bbox``: smooth L1 over the deltas of positives, ``/ num_pos``; ``loss_mask``:
            per trained positive, ``Σ BCE(crop(M), M_gt) / area(gt box)`` in prototype pixels,
            summed and divided by the number of trained positives (positives of box-only objects
            train no mask); ``loss_segm`` when the branch is on (not inside a box-only object's
            box, in its class's channel); ``num_pos``: positives per image (mean, detached).
            ``num_pos`` divisors are the batch totals clamped to ``>= 1``.
        """
        t = self.targets(outputs, batch)
        head, mask_cfg = self.cfg.bbox_head, self.cfg.mask_head
        # Batch totals (over every process under DDP), 0-d tensors: no host sync.
        num_pos = global_avg_factor(t.num_pos.sum(), clamp_min=1.0)

        logits = outputs.cls_logits.float()  # [B, N, C+1]
        labels = softmax_labels(t.labels, self.num_classes)  # [B, N]: background is column C
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")  # [B*N]
        loss_cls = (ce * t.cls_weights.flatten()).sum() / num_pos  # ignored anchors: weight 0

        loss_bbox = head.loss_bbox(  # smooth L1, times its loss_weight
            outputs.bbox_deltas.float(),
            t.bbox_targets,
            weight=t.pos[..., None].to(torch.float32),  # [B, N, 1]
            avg_factor=num_pos,
        )

        # Masks of the trained positives: gather their coefficients, assemble, crop with the GT box.
        b, m = t.mask_anchor_inds.shape
        coeffs = torch.gather(
            outputs.coeffs, 1, t.mask_anchor_inds[..., None].expand(b, m, self.num_protos)
        )  # [B, M, P]
        mask_logits = linear_combination(outputs.prototypes.float(), coeffs)  # [B, M, Hm, Wm]
        bce = F.binary_cross_entropy_with_logits(mask_logits, t.mask_targets, reduction="none")
        bce = crop_masks(bce, t.mask_boxes)  # outside the ground-truth box: no loss
        wh = (t.mask_boxes[..., 2:] - t.mask_boxes[..., :2]).clamp(min=1.0)  # [B, M, 2]
        per_mask = bce.sum(dim=(2, 3)) / (wh[..., 0] * wh[..., 1])  # [B, M]
        valid = t.mask_valid.to(torch.float32)
        loss_mask = (per_mask * valid).sum() / global_avg_factor(valid.sum(), clamp_min=1.0)

        losses = {
            "loss_cls": head.loss_cls.loss_weight * loss_cls,
            "loss_bbox": loss_bbox,
            "loss_mask": mask_cfg.loss_mask_weight * loss_mask,
        }
        if outputs.segm_logits is not None:
            segm = outputs.segm_logits.float()  # [B, C, Hp/8, Wp/8]
            loss_segm = F.binary_cross_entropy_with_logits(
                segm, t.segm_targets, weight=t.segm_weights, reduction="sum"
            )
            pixels = global_avg_factor(segm[:, 0].numel())  # B*Hp/8*Wp/8 of the whole batch
            losses["loss_segm"] = mask_cfg.loss_segm.loss_weight * loss_segm / pixels
        losses["num_pos"] = t.num_pos.mean().detach()
        return losses

    # ---- stage 3: predict ------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self, outputs: YOLACTOutputs, image_sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """Detections with masks (Sec. 3.3 and Sec. 5; MMDetection's ``test_cfg``).

        1. Softmax; per level and image keep the ``nms_pre`` anchors with the best foreground
           score; decode their boxes and clip them to the image's true size.
        2. :func:`~instseg_edu.ops.nms.fast_nms` over the ``C`` classes (``top_k`` per class,
           ``score_thr``, ``iou_thr``, ``max_per_img``), all images at once
           (:func:`~instseg_edu.ops.nms.fast_nms_batched`).
        3. Masks of the kept detections: ``sigmoid(Prototypes · Coeffsᵀ)``, cropped with the
           *predicted* box, bilinearly upsampled to the padded input size, ``> mask_thr``, cut to
           the true ``(h, w)``.

        One host synchronisation per call, whatever the batch size: the number of detections of
        each image, read once for the whole batch after Fast NMS. The same steps per image and per
        level: :func:`~instseg_edu.models.references.yolact_predict_reference`.

        Returns:
            One :class:`Detections` per image: ``boxes [K, 4]``, ``scores [K]`` (descending),
            ``labels [K]``, ``masks bool [K, h, w]``.
        """
        test = self.cfg.test_cfg
        device = outputs.cls_logits.device
        hm, wm = outputs.prototypes.shape[-2:]
        padded = (hm * self.proto_stride, wm * self.proto_stride)
        results = []
        for i, ((h, w), (kept, coeffs)) in enumerate(
            zip(image_sizes, self.kept_detections(outputs, image_sizes))
        ):
            # 3. masks of the kept detections
            probs = assemble_masks(
                outputs.prototypes[i].float(), coeffs, kept.boxes / self.proto_stride
            )  # [n, Hm, Wm]
            if len(coeffs) > 0:
                up = F.interpolate(probs[None], size=padded, mode="bilinear", align_corners=False)
                masks = up[0, :, :h, :w] > test.mask_thr  # [n, h, w]
            else:
                masks = torch.zeros(0, h, w, dtype=torch.bool, device=device)
            results.append(Detections(kept.boxes, kept.scores, kept.labels, masks))
        return results

    @torch.no_grad()
    def kept_detections(
        self, outputs: YOLACTOutputs, image_sizes: list[tuple[int, int]]
    ) -> list[tuple[FastNMSResult, Tensor]]:
        """Steps 1 and 2 of :meth:`predict`: the detections Fast NMS keeps in each image, with
        their mask coefficients — what the prototype explorer shows.

        Returns:
            Per image ``(kept, coeffs)``: :class:`~instseg_edu.ops.nms.FastNMSResult` (``boxes
            [K, 4]`` clipped to the image, ``scores [K]`` descending, ``labels [K]``, ``indices
            [K]`` into the image's candidates) and ``coeffs float [K, P]``.
        """
        test = self.cfg.test_cfg
        c = self.num_classes
        device = outputs.cls_logits.device
        anchors = self.anchors(outputs.featmap_sizes, device)  # [N, 4]
        scores = outputs.cls_logits.float().softmax(dim=2)[..., :c]  # [B, N, C] foreground

        # 1. top nms_pre anchors per level by their best foreground score
        best = scores.amax(dim=2)  # [B, N]
        _, idx = dense_heads.topk_per_level(
            best, self.level_sizes(outputs.featmap_sizes), test.nms_pre
        )  # [B, K] anchor indices
        cand_scores = torch.gather(scores, 1, idx[..., None].expand(-1, -1, c))  # [B, K, C]
        cand_deltas = torch.gather(outputs.bbox_deltas.float(), 1, idx[..., None].expand(-1, -1, 4))
        cand_coeffs = torch.gather(
            outputs.coeffs.float(), 1, idx[..., None].expand(-1, -1, self.num_protos)
        )  # [B, K, P]
        boxes = self.bbox_coder.decode(anchors[idx], cand_deltas)  # [B, K, 4]
        # Each image clipped to its true size; only the images that have a size are predicted.
        nb = len(image_sizes)
        boxes = torch.stack([clip_boxes(bx, size) for bx, size in zip(boxes, image_sizes)])

        # 2. Fast NMS of every image at once; the number of detections of each image is the one
        # value the host must wait for (read once for the batch, not once per image).
        ranked, num_kept = fast_nms_batched(
            boxes,  # [nb, K, 4]
            cand_scores[:nb].transpose(1, 2),  # [nb, K, C] -> [nb, C, K]
            iou_threshold=test.iou_thr,
            top_k=test.top_k,
            score_threshold=test.score_thr,
            max_num=test.max_per_img,
        )
        counts = num_kept.tolist()  # the one host synchronisation: nb ints
        kept = [FastNMSResult(*(f[i, :n] for f in ranked)) for i, n in enumerate(counts)]
        return [(k, cand_coeffs[i][k.indices]) for i, k in enumerate(kept)]  # coeffs [n, P]


def build_yolact(cfg: YOLACTConfig = YOLACT_R50_FPN) -> YOLACT:
    """Build a :class:`YOLACT` from its config (a preset or your own)."""
    return YOLACT(cfg)
