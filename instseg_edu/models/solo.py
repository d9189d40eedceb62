"""SOLO: instance segmentation by *location* (Wang et al., 2020, "SOLO: Segmenting Objects by
Locations", ECCV), the vanilla head of MMDetection's ``SOLOHead``.

No boxes, no anchors, no RoIs. SOLO's idea (Sec. 3.1): two instances in an image differ either by
where their centre is or by their size. So

1. **Locations.** Divide the image into an ``S × S`` grid. The cell that holds an object's centre
   is responsible for it: it predicts the object's class (the *category branch*, ``C`` sigmoid
   logits per cell, Sec. 3.2) and its mask, which lives in channel ``k = i · S + j`` of the *mask
   branch* for cell ``(i, j)`` (``S²`` output channels per level, Sec. 3.2).
2. **Sizes.** The FPN levels split the objects by size, ``sqrt(w · h)`` within a per-level
   ``scale_ranges`` entry (Sec. 3.2, Tab. 3 "FPN"); the ranges overlap, so an object near a border
   is trained on two levels. Grids shrink with the level, ``num_grids = (40, 36, 24, 16, 12)``.
3. **Centre region.** Not only the centre cell is positive: every cell that overlaps the box of
   ``sigma`` times the object's size, centred on the mask's centre of mass, is — at most the centre
   cell and its 8 neighbours (Sec. 3.3.1, "center region", ``sigma = 0.2``).
4. **CoordConv.** The mask branch must know *where* it is to paint "the object at cell (i, j)", but
   convolutions are translation invariant; two extra input channels holding the normalised ``x``
   and ``y`` in ``[-1, 1]`` give it that (Sec. 3.2, "CoordConv", Liu et al. 2018).
5. **Losses** (Sec. 3.3, Eq. 3–4): focal loss on every grid cell of every level, divided by the
   number of positive cells + 1; dice loss on the mask channels of positive cells only, times 3.
6. **Inference** (Sec. 3.4): keep category scores above ``score_thr`` after a 2×2 peak picking
   (:func:`~instseg_edu.ops.nms.points_nms`), threshold their masks at ``mask_thr``, rescore by the
   mean probability inside the mask ("maskness"), then Matrix NMS (from SOLOv2, Wang et al. 2020,
   Sec. 3.3; :func:`~instseg_edu.ops.nms.matrix_nms`) decays overlapping masks' scores.

**Box-only objects** (an annotation without a segmentation, ``Target.has_mask`` False) keep
their category target: they are placed on the grid by their box's centre and size, and only their
mask channels are left out of the dice loss (see :func:`solo_target_single` for why this and not
SOLO's own skip).

The FPN is Mask R-CNN's P2–P6 (strides 4..64). ``split_feats`` makes the finest level coarser and
the coarsest finer — P2 is halved to stride 8, P6 is resized to P5's size — because the S² mask
channels at stride 4 would be too expensive, and a 12×12 grid does not need stride 64. The mask
branch upsamples its features ×2, so masks are at strides (4, 4, 8, 16, 16); the nominal
``strides`` of the levels are (8, 8, 16, 32, 32).

The three public stages (see :mod:`instseg_edu.models`):

- ``outputs = model(images)`` → :class:`SOLOOutputs`, per level ``mask_logits [B, S², H, W]`` and
  ``cate_logits [B, C, S, S]``;
- ``model.targets(outputs, batch)`` → :class:`SOLOTargets` (built by :func:`solo_target_single`,
  one call per image) and ``model.loss(outputs, batch)``;
- ``model.predict(outputs, image_sizes)`` → one :class:`~instseg_edu.structures.Detections` per
  image, with masks at each image's true size and boxes = the tight box of each mask.

Config keys are those of the original SOLO code base (``WXinlong/SOLO``, built on MMDetection 1.x);
the classes and presets are in :mod:`instseg_edu.models.configs.solo` (importable from here too).

The grid assignment of one image (centre region, scale ranges) is
:func:`~instseg_edu.ops.grid_assign.solo_target_single`, re-exported here; this module batches it.

Shape legend: ``B`` images, ``G`` ground truth objects, ``C`` classes, ``S`` grid size of a level,
``L`` levels, ``N`` grid cells of all levels, ``M`` trained (positive) mask channels, ``K``
candidates or detections, ``F`` feature channels, ``H, W`` a level's feature or mask size,
``Hp, Wp`` the padded input size, ``h, w`` an image's true size.

Taught in ``notebooks/07_solo.py``.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg_edu.losses import (
    DiceLossConfig,
    FocalLossConfig,
    dice_loss,
    global_avg_factor,
)
from instseg_edu.models.backbone import ImageNormalize, build_backbone
from instseg_edu.models.configs.solo import (
    SOLO_R18_CPU,
    SOLO_R18_SMALL,
    SOLO_R50_FPN,
    SOLO_R50_FPN_SCRATCH,
    SOLOConfig,
    SOLOHeadConfig,
    SOLOTestConfig,
    split_strides,
)
from instseg_edu.models.dense_heads import conv3x3_norm_relu
from instseg_edu.ops.grid_assign import (
    MIN_MASK_AREA,
    SOLOImageTargets,
    center_region,
    solo_target_single,
)
from instseg_edu.ops.indexing import first_k_true
from instseg_edu.ops.masks import center_of_mass, masks_to_boxes, resize_masks
from instseg_edu.ops.nms import matrix_nms, points_nms
from instseg_edu.structures import BACKGROUND, Batch, Detections

__all__ = [
    "BACKGROUND",
    "MIN_MASK_AREA",
    "DiceLossConfig",
    "FocalLossConfig",
    "SOLOHeadConfig",
    "SOLOTestConfig",
    "SOLOConfig",
    "SOLO_R50_FPN",
    "SOLO_R50_FPN_SCRATCH",
    "SOLO_R18_SMALL",
    "SOLO_R18_CPU",
    "SOLOOutputs",
    "SOLOImageTargets",
    "SOLOTargets",
    "SOLOHead",
    "SOLO",
    "build_solo",
    "split_feats",
    "split_strides",
    "coord_features",
    "center_of_mass",
    "resize_masks",
    "masks_to_boxes",
    "center_region",
    "solo_target_single",
]

# --------------------------------------------------------------------------------------------------
# Outputs and targets
# --------------------------------------------------------------------------------------------------


class SOLOOutputs(NamedTuple):
    """What ``SOLO.forward`` returns, one entry per level.

    Attributes:
        mask_logits: list of ``float [B, S², H, W]``; channel ``i · S + j`` is the mask of the
            object centred in grid cell ``(i, j)``; ``(H, W)`` is twice the level's feature size
            (mask strides 4, 4, 8, 16, 16 for the default levels).
        cate_logits: list of ``float [B, C, S, S]`` category logits of every grid cell.
        input_size: ``(Hp, Wp)`` of the (padded) input images; masks are predicted over it.
    """

    mask_logits: list[Tensor]
    cate_logits: list[Tensor]
    input_size: tuple[int, int]


class SOLOTargets(NamedTuple):
    """What the loss trains on, per level, for a batch.

    Attributes:
        cate_labels: ``int64 [B, S, S]`` per level, -1 for background cells.
        ins_ind: ``bool [B, S²]`` per level: mask channels that are trained (positive cells of
            objects with a mask; a box-only object's cells have a category target only).
        gt_index: ``int64 [B, S²]`` per level: the object behind each positive channel (a row of
            its image's ground truth), ``NO_GT`` (-1) elsewhere.
        ins_masks: ``float [M_l, H, W]`` per level: the target mask of each positive channel, in
            the order of ``ins_ind.nonzero()`` (image, then channel): the same order as
            ``mask_logits[l].flatten(0, 1)[ins_ind[l].flatten()]``.
        num_pos: ``int64 []`` positive cells (category targets) in the whole batch, all levels;
            the number of trained mask channels when every object has a mask.
        per_image: the :class:`SOLOImageTargets` of each image (centres, cell ranges).
        pos_inds: ``int64 [M_l]`` per level: the positive channels as rows of
            ``mask_logits[l].flatten(0, 1)`` (``b · S² + channel``), ascending — the same as
            ``ins_ind[l].flatten().nonzero()[:, 0]``, found without a host synchronisation.
    """

    cate_labels: list[Tensor]
    ins_ind: list[Tensor]
    gt_index: list[Tensor]
    ins_masks: list[Tensor]
    num_pos: Tensor
    per_image: list[SOLOImageTargets]
    pos_inds: list[Tensor]

    @property
    def gt_inds(self) -> list[Tensor]:
        """The former name of ``gt_index`` (read-only)."""
        return self.gt_index


# --------------------------------------------------------------------------------------------------
# Pieces: split_feats, CoordConv, centre of mass, mask resizing, target building
# --------------------------------------------------------------------------------------------------


def split_feats(feats: tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
    """Resize the FPN levels for SOLO: the first is halved, the last takes the size of the one
    before it; the others are unchanged (bilinear, as in SOLO's ``split_feats``).

    With P2–P6 of a 160×224 input — ``40×56, 20×28, 10×14, 5×7, 3×4`` — this gives
    ``20×28, 20×28, 10×14, 5×7, 5×7``: strides 8, 8, 16, 32, 32.

    Args:
        feats: ``L >= 3`` maps ``[B, F, H_l, W_l]``, finest first.

    Returns:
        a tuple of ``L`` maps ``[B, F, H_l, W_l]``.
    """
    if len(feats) < 3:
        raise ValueError(f"split_feats needs at least 3 levels, got {len(feats)}")
    first = F.interpolate(feats[0], scale_factor=0.5, mode="bilinear", align_corners=False)
    last = F.interpolate(feats[-1], size=feats[-2].shape[-2:], mode="bilinear", align_corners=False)
    return (first, *feats[1:-1], last)


def coord_features(x: Tensor) -> Tensor:
    """CoordConv's two extra channels for a feature map (Sec. 3.2; Liu et al. 2018).

    Channel 0 is ``x`` and channel 1 is ``y``, each running linearly from -1 (left / top) to 1
    (right / bottom): for ``W = 3`` a row of channel 0 is ``[-1, 0, 1]``.

    Args:
        x: ``[B, F, H, W]`` (only its shape, dtype and device are used).

    Returns:
        ``[B, 2, H, W]``.
    """
    b, _, h, w = x.shape
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)  # [W]
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)  # [H]
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each
    return torch.stack([xx, yy])[None].expand(b, 2, h, w)  # [B, 2, H, W]


# --------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------


def _conv_gn_relu(in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    block = nn.Sequential(*conv3x3_norm_relu(in_ch, out_ch, groups))  # GN follows: no conv bias
    nn.init.normal_(block[0].weight, std=0.01)
    return block


class SOLOHead(nn.Module):
    """The mask and category branches (Sec. 3.2, Fig. 3), convolutions shared by all levels.

    ``forward(feats)``: ``L`` maps ``[B, in_channels, H_l, W_l]`` (after :func:`split_feats`) →
    ``mask_logits`` list of ``[B, S_l², 2H_l, 2W_l]`` and ``cate_logits`` list of
    ``[B, C, S_l, S_l]``. Only the last 1×1 conv of the mask branch is per level (its width is
    ``S_l²``).
    """

    def __init__(self, cfg: SOLOHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, groups = cfg.feat_channels, cfg.norm_num_groups
        # Mask branch: CoordConv input (+2 channels).
        self.ins_convs = nn.ModuleList(
            _conv_gn_relu(cfg.in_channels + 2 if i == 0 else ch, ch, groups)
            for i in range(cfg.stacked_convs)
        )
        self.cate_convs = nn.ModuleList(
            _conv_gn_relu(cfg.in_channels if i == 0 else ch, ch, groups)
            for i in range(cfg.stacked_convs)
        )
        self.solo_ins_list = nn.ModuleList(nn.Conv2d(ch, s * s, 1) for s in cfg.num_grids)
        self.solo_cate = nn.Conv2d(ch, cfg.num_classes, 3, padding=1)
        # Every mask pixel and every cell start at probability prior_prob: at the start the loss is
        # not dominated by thousands of confident false positives (as RetinaNet, Sec. 3.3 there).
        bias = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        for conv in [*self.solo_ins_list, self.solo_cate]:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, bias)

    def forward_single(self, x: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """One level: ``[B, F, H, W]`` → ``([B, S², 2H, 2W], [B, C, S, S])``."""
        s = self.cfg.num_grids[level]
        ins = torch.cat([x, coord_features(x)], dim=1)  # [B, F+2, H, W]
        for conv in self.ins_convs:
            ins = conv(ins)  # [B, ch, H, W]
        ins = F.interpolate(ins, scale_factor=2, mode="bilinear", align_corners=False)  # 2H, 2W
        mask_logits = self.solo_ins_list[level](ins)  # [B, S², 2H, 2W]

        cate = x
        for i, conv in enumerate(self.cate_convs):
            if i == self.cfg.cate_down_pos:  # from the feature map to the S × S grid
                cate = F.interpolate(cate, size=(s, s), mode="bilinear", align_corners=False)
            cate = conv(cate)  # [B, ch, S, S]
        return mask_logits, self.solo_cate(cate)  # [B, C, S, S]

    def forward(self, feats: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor]]:
        if len(feats) != len(self.cfg.num_grids):
            raise ValueError(
                f"got {len(feats)} feature levels but num_grids={self.cfg.num_grids} has "
                f"{len(self.cfg.num_grids)}"
            )
        outs = [self.forward_single(f, level) for level, f in enumerate(feats)]
        return [m for m, _ in outs], [c for _, c in outs]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class SOLO(nn.Module):
    """SOLO with the three public stages ``forward``, ``targets``/``loss`` and ``predict``.

    Images are ``float32 [B, 3, Hp, Wp]`` in ``[0, 1]``, sides multiples of 32 (a
    :class:`~instseg_edu.structures.Batch`'s ``images``); the model normalises them itself.
    """

    def __init__(self, cfg: SOLOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.bbox_head.num_classes
        self.backbone = build_backbone(cfg.backbone, cfg.neck)
        self.bbox_head = SOLOHead(cfg.bbox_head)
        self.normalize = ImageNormalize()

    # ---- stage 1: forward ------------------------------------------------------------------------

    def features(self, images: Tensor) -> tuple[Tensor, ...]:
        """Normalise, backbone + FPN (P2–P6), :func:`split_feats`: the head's ``L`` inputs."""
        x = self.normalize(images)
        return split_feats(self.backbone(x))

    def forward(self, images: Tensor) -> SOLOOutputs:
        """Run backbone, FPN, ``split_feats`` and the head.

        Args:
            images: ``float [B, 3, Hp, Wp]`` in ``[0, 1]``.

        Returns:
            :class:`SOLOOutputs`.
        """
        mask_logits, cate_logits = self.bbox_head(self.features(images))
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return SOLOOutputs(mask_logits, cate_logits, size)

    # ---- stage 2: targets and loss ---------------------------------------------------------------

    def targets(self, outputs: SOLOOutputs, batch: Batch) -> SOLOTargets:
        """Build the category and mask targets of every image (:func:`solo_target_single`).

        The assignment loops over images (each has its own objects; inside one image the work is
        vectorised over objects and grid cells). Collecting the positive channels and their mask
        targets is batched over images, with **one** host synchronisation in all: the number of
        positive channels of each level, read once with ``.tolist()``. It is the size of the
        mask-loss tensors, so the host must know it; everything else stays on the device, where a
        boolean-mask index (``x[ind]``) would make the host wait for the GPU at every level.
        The same targets image by image, with boolean masks:
        :func:`~instseg_edu.models.references.solo_targets_reference`.
        """
        head = self.cfg.bbox_head
        device = outputs.cate_logits[0].device
        mask_sizes = [tuple(m.shape[-2:]) for m in outputs.mask_logits]
        masks = [t.masks.to(device) for t in batch.targets]  # [G_b, Hp, Wp] per image
        if len({tuple(m.shape[-2:]) for m in masks}) > 1:
            raise ValueError(
                "batch.targets[i].masks must all be [G_i, Hp, Wp], padded like the images "
                f"(collate does it); got {[tuple(m.shape) for m in masks]}"
            )
        has_mask = [t.has_mask.to(device) for t in batch.targets]  # [G_b] per image
        per_image = [
            solo_target_single(
                t.boxes.to(device),
                t.labels.to(device),
                m,
                num_grids=head.num_grids,
                scale_ranges=head.scale_ranges,
                sigma=head.sigma,
                has_mask=hm,
            )
            for t, m, hm in zip(batch.targets, masks, has_mask)
        ]
        # Every object of the batch in one tensor: object k of image b is row offsets[b] + k.
        gt_masks = torch.cat(masks)  # [ΣG, Hp, Wp]
        gt_has_mask = torch.cat(has_mask)  # [ΣG]
        offsets = list(itertools.accumulate((m.shape[0] for m in masks[:-1]), initial=0))  # B ints

        # Per level, the images stacked: cate_labels [B, S, S], gt_index [B, S²].
        levels = range(len(mask_sizes))
        cate_labels = [torch.stack([p.cate_labels[lv] for p in per_image]) for lv in levels]
        gt_index = [torch.stack([p.gt_index[lv] for p in per_image]) for lv in levels]
        # Row of gt_masks behind each channel (background channels: -1 + offset, never used).
        rows = [torch.stack([i + off for i, off in zip(inds, offsets)]) for inds in gt_index]
        owned = [inds >= 0 for inds in gt_index]  # [B, S²] cells with a category target
        ins_ind = owned  # [B, S²] mask channels trained: owned by an object that has a mask
        if gt_has_mask.numel() > 0:
            ins_ind = [o & gt_has_mask[r.clamp(min=0)] for o, r in zip(owned, rows)]
        pos_per_level = torch.stack([ind.sum() for ind in ins_ind])  # [L]
        counts = pos_per_level.tolist()  # the one host synchronisation: L ints

        pos_inds, ins_masks = [], []
        for rows_l, ind, count, size in zip(rows, ins_ind, counts, mask_sizes):
            # The positive channels, image-major, as ``ind.flatten().nonzero()`` would list them,
            # with a size the host already knows (`count`): no wait for the device.
            pos = first_k_true(ind.flatten(), count)  # [B*S²] -> [M_l]
            pos_inds.append(pos)
            if count == 0:
                ins_masks.append(torch.zeros(0, *size, device=device))  # [0, H, W]
                continue
            owners = rows_l.flatten()[pos]  # [B*S²] -> [M_l]
            resized = resize_masks(gt_masks, size)  # [ΣG, H, W]: each object resized once
            ins_masks.append(resized[owners])  # [ΣG, H, W] -> [M_l, H, W]
        # Category positives: every owned cell, box-only objects' included.
        num_pos = torch.stack([o.sum() for o in owned]).sum()
        return SOLOTargets(cate_labels, ins_ind, gt_index, ins_masks, num_pos, per_image, pos_inds)

    def loss(self, outputs: SOLOOutputs, batch: Batch) -> dict[str, Tensor]:
        """Dice loss on positive mask channels + focal loss on all grid cells (Sec. 3.3).

        One host synchronisation per call, in :meth:`targets`.

        Returns:
            ``loss_ins``: ``loss_weight`` (3) × the mean dice loss over every trained mask
            channel of the batch (positive cells of objects with a mask; 0, still attached to the
            graph, when there is none); ``loss_cate``: focal loss summed over every cell, class
            and level, divided by ``num_pos + 1`` (positive cells of the whole batch);
            ``num_pos``: positive cells per image (mean, detached).
        """
        t = self.targets(outputs, batch)
        head = self.cfg.bbox_head
        dice, unused = [], []
        for logits, pos, target in zip(outputs.mask_logits, t.pos_inds, t.ins_masks):
            if pos.shape[0] > 0:  # a shape: known on the host without waiting
                pred = logits.flatten(0, 1)[pos]  # [B, S², H, W] -> [B*S², H, W] -> [M_l, H, W]
                dice.append(dice_loss(pred.float().sigmoid(), target))  # [M_l]
            else:
                unused.append(logits.float().sum())
        # The mean over the batch's (every process's) trained channels: positive cells of objects
        # with a mask. Counted from shapes (no host wait), and on every process, even one with
        # none, because the count is summed over processes.
        num_masks = global_avg_factor(sum(pos.shape[0] for pos in t.pos_inds))
        loss_ins = torch.cat(dice).sum() / num_masks if dice else 0.0
        # A level without positives has its own mask convolution: add it times 0 (the value is
        # unchanged: x + 0.0 == x) so that the backward pass still reaches its parameters, as
        # DistributedDataParallel (find_unused_parameters=False) needs on every process.
        if unused:
            loss_ins = loss_ins + sum(unused) * 0.0

        classes = torch.arange(self.num_classes, device=t.num_pos.device)  # [C]
        logits = torch.cat(
            [
                c.float().permute(0, 2, 3, 1).reshape(-1, self.num_classes)
                for c in outputs.cate_logits
            ]
        )  # [B*S²] of every level -> [ΣB*S², C]
        labels = torch.cat([c.reshape(-1) for c in t.cate_labels])  # [ΣB*S²]
        onehot = (labels[:, None] == classes).to(logits.dtype)  # [ΣB*S², C]; -1 matches nothing
        # The focal loss over every cell, class and level, times its loss_weight.
        loss_cate = head.loss_cate(
            logits, onehot, avg_factor=global_avg_factor(t.num_pos, offset=1)
        )
        return {
            "loss_ins": head.loss_ins.loss_weight * loss_ins,
            "loss_cate": loss_cate,
            "num_pos": (t.num_pos.float() / len(batch)).detach(),
        }

    # ---- stage 3: predict ------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, outputs: SOLOOutputs, image_sizes: list[tuple[int, int]]) -> list[Detections]:
        """Turn head outputs into masks (Sec. 3.4; SOLO's ``get_seg_single``).

        1. Category probabilities → :func:`~instseg_edu.ops.nms.points_nms` (2×2 peaks); every
           (cell, class) above ``score_thr`` is a candidate with mask channel ``i · S + j``.
        2. Its mask probabilities at the finest mask resolution (stride 4); pixels above
           ``mask_thr`` form the binary mask; masks with ``<= stride`` pixels are dropped.
        3. Score ×= maskness (mean probability inside the binary mask); keep the ``nms_pre`` best.
        4. Matrix NMS decays the scores; keep those ``>= update_thr``, the best ``max_per_img``.
        5. Upsample the probabilities to the padded input size, crop to the image's true size,
           threshold at ``mask_thr``; the box is the mask's tight box.

        SOLO upsamples all ``ΣS²`` mask channels to stride 4 first; we upsample only the
        candidates' channels — the same numbers (bilinear resizing is per channel), far less memory.

        Two host synchronisations per call, whatever the batch size: the number of candidates of
        each image and level (it sizes the mask tensors) and the number of detections of each image
        (it sizes the output), each read once for the whole batch. Between them every step has a
        size the host already knows: candidates that a boolean index would remove are kept at
        score ``-inf`` instead, where they change nothing (see the comments in the code). The
        same steps one image at a time with boolean indexing:
        :func:`~instseg_edu.models.references.solo_predict_reference`.

        Args:
            outputs: from ``forward``.
            image_sizes: each image's true ``(h, w)`` inside the padded batch.

        Returns:
            One :class:`Detections` per image: ``masks bool [K, h, w]``, ``boxes float32 [K, 4]``
            (tight boxes, xyxy on pixel edges), ``scores`` sorted descending, ``labels``.
        """
        head, test = self.cfg.bbox_head, self.cfg.test_cfg
        c = self.num_classes
        mask_size0 = tuple(outputs.mask_logits[0].shape[-2:])  # stride 4 for the default levels
        grids = head.num_grids
        starts = [0, *itertools.accumulate(s * s for s in grids)]  # first row of each level
        # points NMS, then [B, C, S, S] -> [B, S, S, C] -> [B, S², C]; rows of all levels: [B, N, C]
        cate = torch.cat(
            [
                points_nms(x.float().sigmoid()).permute(0, 2, 3, 1).reshape(x.shape[0], -1, c)
                for x in outputs.cate_logits
            ],
            dim=1,
        )
        device = cate.device
        row_stride = torch.cat(
            [torch.full((s * s,), float(st), device=device) for s, st in zip(grids, head.strides)]
        )  # [N]

        # Candidates (row, class) above score_thr, counted per image and level: the host needs
        # these counts (they size the mask tensors), the first of two host synchronisations.
        keep = cate > test.score_thr  # [B, N, C]
        per_level = torch.stack(
            [keep[:, lo:hi].sum(dim=(1, 2)) for lo, hi in itertools.pairwise(starts)], dim=1
        )  # [B, L]
        level_counts = per_level.tolist()  # B lists of L ints

        # Steps 1-4 for every image without waiting for the device: each image's best
        # max_per_img candidates (labels, scores, mask probabilities) and how many of them are
        # detections (num_dets, read once for the whole batch below).
        num_dets = torch.zeros(len(image_sizes), dtype=torch.long, device=device)  # [B]
        best = []  # per image: (labels, scores, probs), best first
        for b in range(len(image_sizes)):
            n_level = level_counts[b]  # L ints
            # Flat indices row · C + class of the candidates, ascending as ``keep[b].nonzero()``
            # lists them, with a size the host already knows: no wait for the device.
            cand = first_k_true(keep[b].flatten(), sum(n_level))  # [N*C] -> [K]
            rows, labels = cand // c, cand % c  # [K] each
            scores = cate[b].flatten()[cand]  # [N*C] -> [K]
            probs = _candidate_probs(outputs.mask_logits, b, rows, starts, n_level, mask_size0)
            masks = probs > test.mask_thr  # [K, H0, W0]
            area = masks.sum(dim=(1, 2)).float()  # [K]
            maskness = (probs * masks).sum(dim=(1, 2)) / area.clamp(min=1)  # [K]
            scores = scores * maskness
            # A mask needs more pixels than its level's stride (SOLO's ``sum_masks > strides``).
            # The others stay, at score -inf: they sort after every valid candidate, and Matrix NMS
            # decays a mask only by higher-scored ones, so the valid masks' scores are unchanged.
            # Static size instead of removing them with a boolean index: no host sync on the GPU.
            valid = area > row_stride[rows]  # [K]
            scores = torch.where(valid, scores, -torch.inf)
            top = scores.argsort(descending=True, stable=True)[: test.nms_pre]  # [K'] best first
            decayed = matrix_nms(
                masks[top], labels[top], scores[top], kernel=test.kernel, sigma=test.sigma
            )  # [K']
            ok = valid[top] & (decayed >= test.update_thr)  # [K']
            # The same trick: the kept ones first, by decayed score, the others at -inf after them.
            order = torch.where(ok, decayed, -torch.inf).argsort(descending=True, stable=True)
            order = order[: test.max_per_img]  # [K''] positions in `top`, kept ones first
            final = top[order]  # [K''] candidates
            best.append((labels[final], decayed[order], probs[final]))  # [K''], [K''], [K'', ...]
            num_dets[b] = ok.sum().clamp(max=test.max_per_img)

        # Step 5, once the host knows how many detections each image has (the second and last
        # host synchronisation): masks at the image's true size, and their tight boxes.
        results = []
        for (h, w), n, (labels, scores, probs) in zip(image_sizes, num_dets.tolist(), best):
            if n == 0:
                results.append(Detections.empty(device, mask_size=(h, w)))
                continue
            labels, scores, probs = labels[:n], scores[:n], probs[:n]  # [n], [n], [n, H0, W0]
            full = F.interpolate(
                probs[None], size=outputs.input_size, mode="bilinear", align_corners=False
            )[0]  # [n, Hp, Wp]
            final = full[:, :h, :w] > test.mask_thr  # [n, h, w]
            results.append(Detections(masks_to_boxes(final), scores, labels, final))
        return results


def _candidate_probs(
    mask_logits: list[Tensor],
    b: int,
    rows: Tensor,
    starts: list[int],
    level_counts: list[int],
    size: tuple[int, int],
) -> Tensor:
    """Mask probabilities of image ``b``'s candidate rows (concatenated over levels, ascending;
    ``level_counts[l]`` of them on level ``l``), each level's channels resized bilinearly to
    ``size``: ``float [K, *size]``."""
    parts, first = [], 0
    for level, (logits, k) in enumerate(zip(mask_logits, level_counts)):
        # Rows ascend, so level l's candidates are the next k: a slice, not a boolean index.
        channels = rows[first : first + k] - starts[level]  # [k_l] mask channels of this level
        first += k
        p = logits[b, channels].float().sigmoid()  # [S², H_l, W_l] -> [k_l, H_l, W_l]
        if p.shape[-2:] != size:
            if p.shape[0] == 0:
                p = p.new_zeros(0, *size)
            else:
                p = F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)[0]
        parts.append(p)  # [k_l, *size]
    return torch.cat(parts)  # [K, *size]


def build_solo(cfg: SOLOConfig = SOLO_R50_FPN) -> SOLO:
    """Build a :class:`SOLO` from its config (a preset or your own)."""
    return SOLO(cfg)
