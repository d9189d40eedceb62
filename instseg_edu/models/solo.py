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

- ``outputs = model(images)`` → :class:`SOLOOutputs`, per level ``mask_logits [B, S², 2h, 2w]`` and
  ``cate_logits [B, C, S, S]``;
- ``model.targets(outputs, batch)`` → :class:`SOLOTargets` (built by :func:`solo_target_single`,
  one call per image) and ``model.loss(outputs, batch)``;
- ``model.predict(outputs, image_sizes)`` → one :class:`~instseg_edu.structures.Detections` per
  image, with masks at each image's true size and boxes = the tight box of each mask.

Config keys are those of the original SOLO code base (``WXinlong/SOLO``, built on MMDetection 1.x):
``bbox_head`` with ``num_grids, scale_ranges, sigma, cate_down_pos, loss_ins, loss_cate`` and
``test_cfg`` with ``update_thr``. MMDetection 3.x renamed them ``mask_head``, ``pos_scale``,
``cls_down_index``, ``loss_mask``, ``loss_cls`` and ``filter_thr``; the numbers are the same.

Shape legend: ``B`` images, ``G`` ground truth objects, ``C`` classes, ``S`` grid size of a level,
``L`` levels, ``P`` positive mask channels, ``K`` candidate detections, ``h, w`` a level's mask
size, ``Hp, Wp`` the padded input size.

Taught in ``notebooks/07_solo.py``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg_edu.losses import dice_loss, global_avg_factor, sigmoid_focal_loss
from instseg_edu.models.backbone import (
    FPNConfig,
    ImageNormalize,
    ResNetConfig,
    build_backbone,
    fpn_strides,
    resnet_out_channels,
)
from instseg_edu.ops.indexing import first_k_true
from instseg_edu.ops.nms import matrix_nms, points_nms
from instseg_edu.structures import Batch, Detections

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

#: Label of a grid cell (and index of a mask channel) that no object owns.
BACKGROUND = -1
#: Objects whose mask has fewer pixels than this (in the padded input image) train no cell
#: (hard-coded ``seg_mask.sum() < 10`` in SOLO's ``solo_target_single``).
MIN_MASK_AREA = 10


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiceLossConfig:
    """``bbox_head.loss_ins``: dice loss on the masks of positive cells (Sec. 3.3, Eq. 4)."""

    loss_weight: float = 3.0

    def __post_init__(self) -> None:
        if not self.loss_weight >= 0:
            raise ValueError(f"loss_ins.loss_weight={self.loss_weight} must be >= 0")


@dataclass(frozen=True)
class FocalLossConfig:
    """``bbox_head.loss_cate``: sigmoid focal loss on every grid cell (Sec. 3.3)."""

    gamma: float = 2.0
    alpha: float = 0.25
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        if not self.gamma >= 0:
            raise ValueError(f"gamma={self.gamma} must be >= 0")
        if not self.loss_weight >= 0:
            raise ValueError(f"loss_cate.loss_weight={self.loss_weight} must be >= 0")


@dataclass(frozen=True)
class SOLOHeadConfig:
    """``bbox_head``: the category and mask branches and their targets.

    Attributes:
        num_classes: foreground classes ``C`` (sigmoids, no background class).
        in_channels: channels of the FPN levels.
        stacked_convs: 3×3 conv + GroupNorm + ReLU layers in each branch (paper: 7).
        feat_channels: their width (SOLO code: ``seg_feat_channels=256``).
        strides: nominal stride of each level after :func:`split_feats`; a predicted mask needs
            more than ``stride`` pixels (at the stride-4 mask resolution) to be kept at test time.
        scale_ranges: ``(lo, hi)`` per level; an object of scale ``sqrt(w·h)`` in ``[lo, hi]``
            (inclusive) is trained on that level. Overlapping ranges: some objects train two levels.
        sigma: the centre region is ``sigma`` times the object's box, centred on its mask's centre
            of mass (Sec. 3.3.1; MMDetection 3.x: ``pos_scale``).
        num_grids: ``S`` per level.
        cate_down_pos: index of the category conv before which the features are resized to
            ``S × S`` (MMDetection 3.x: ``cls_down_index``).
        norm_num_groups: GroupNorm groups (``norm_cfg=dict(type='GN', num_groups=32)``).
        prior_prob: both output layers start at ``sigmoid(bias) = prior_prob``.
    """

    num_classes: int = 80
    in_channels: int = 256
    stacked_convs: int = 7
    feat_channels: int = 256
    strides: tuple[int, ...] = (8, 8, 16, 32, 32)
    scale_ranges: tuple[tuple[float, float], ...] = (
        (1, 96),
        (48, 192),
        (96, 384),
        (192, 768),
        (384, 2048),
    )
    sigma: float = 0.2
    num_grids: tuple[int, ...] = (40, 36, 24, 16, 12)
    cate_down_pos: int = 0
    norm_num_groups: int = 32
    prior_prob: float = 0.01
    loss_ins: DiceLossConfig = field(default_factory=DiceLossConfig)
    loss_cate: FocalLossConfig = field(default_factory=FocalLossConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        object.__setattr__(self, "num_grids", tuple(int(s) for s in self.num_grids))
        object.__setattr__(self, "scale_ranges", tuple(tuple(r) for r in self.scale_ranges))
        for name in ("num_classes", "in_channels", "feat_channels", "stacked_convs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.cate_down_pos < self.stacked_convs:
            raise ValueError(
                f"cate_down_pos={self.cate_down_pos} must be in 0..stacked_convs-1="
                f"{self.stacked_convs - 1}"
            )
        if self.norm_num_groups < 1 or self.feat_channels % self.norm_num_groups:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide "
                f"feat_channels={self.feat_channels}"
            )
        if not self.strides or any(s < 1 for s in self.strides):
            raise ValueError(f"strides={self.strides} must be a non-empty tuple of ints >= 1")
        if len(self.num_grids) != len(self.strides):
            raise ValueError(
                f"num_grids={self.num_grids} needs one grid size per level: "
                f"len(num_grids)={len(self.num_grids)} != len(strides)={len(self.strides)}"
            )
        if any(s < 1 for s in self.num_grids):
            raise ValueError(f"num_grids={self.num_grids} must all be >= 1")
        if len(self.scale_ranges) != len(self.strides):
            raise ValueError(
                f"scale_ranges has {len(self.scale_ranges)} entries but there are "
                f"len(strides)={len(self.strides)} levels"
            )
        for lo_hi in self.scale_ranges:
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"scale_ranges entry {lo_hi} must be a pair 0 <= lo <= hi")
        if not 0.0 < self.sigma <= 1.0:
            raise ValueError(f"sigma={self.sigma} must be in (0, 1]")
        if not 0.0 < self.prior_prob < 1.0:
            raise ValueError(f"prior_prob={self.prior_prob} must be in (0, 1)")


@dataclass(frozen=True)
class SOLOTestConfig:
    """``test_cfg`` (Sec. 3.4 and SOLOv2 Sec. 3.3).

    Attributes:
        nms_pre: keep the ``nms_pre`` best candidates before Matrix NMS.
        score_thr: a (cell, class) is a candidate when its peak-picked score is above this.
        mask_thr: a mask pixel is foreground when its probability is above this.
        update_thr: drop detections whose score after Matrix NMS is below this
            (MMDetection 3.x: ``filter_thr``).
        kernel: Matrix NMS decay, ``"gaussian"`` or ``"linear"``.
        sigma: the gaussian kernel's ``sigma``.
        max_per_img: detections kept per image.
    """

    nms_pre: int = 500
    score_thr: float = 0.1
    mask_thr: float = 0.5
    update_thr: float = 0.05
    kernel: str = "gaussian"
    sigma: float = 2.0
    max_per_img: int = 100

    def __post_init__(self) -> None:
        if self.nms_pre < 1:
            raise ValueError(f"nms_pre={self.nms_pre} must be >= 1")
        for name in ("score_thr", "mask_thr", "update_thr"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.kernel not in ("gaussian", "linear"):
            raise ValueError(f"kernel={self.kernel!r} must be 'gaussian' or 'linear'")
        if not self.sigma > 0:
            raise ValueError(f"sigma={self.sigma} must be > 0")
        if self.max_per_img < 1:
            raise ValueError(f"max_per_img={self.max_per_img} must be >= 1")


def split_strides(fpn: tuple[int, ...]) -> tuple[int, ...]:
    """Strides after :func:`split_feats`: ``(4, 8, 16, 32, 64) → (8, 8, 16, 32, 32)``."""
    return (2 * fpn[0], *fpn[1:-1], fpn[-2])


def _p2_p6(in_channels=(256, 512, 1024, 2048), out_channels: int = 256) -> FPNConfig:
    return FPNConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        start_level=0,
        num_outs=5,
        add_extra_convs=False,
    )


@dataclass(frozen=True)
class SOLOConfig:
    """The whole model; defaults are SOLO's ``solo_r50_fpn_8gpu_1x`` (COCO, 80 classes).

    Cross-checks (``ValueError`` naming the field): ``neck.in_channels`` must be the ResNet's
    output channels, ``bbox_head.in_channels`` must equal ``neck.out_channels``, the neck must give
    at least 3 levels, and ``bbox_head.strides`` must be the strides of the FPN levels after
    :func:`split_feats` (one per ``neck.num_outs``).
    """

    backbone: ResNetConfig = field(default_factory=ResNetConfig)
    neck: FPNConfig = field(default_factory=_p2_p6)
    bbox_head: SOLOHeadConfig = field(default_factory=SOLOHeadConfig)
    test_cfg: SOLOTestConfig = field(default_factory=SOLOTestConfig)

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
        if self.neck.num_outs < 3:
            raise ValueError(f"neck.num_outs={self.neck.num_outs} must be >= 3 for split_feats")
        expected = split_strides(fpn_strides(self.backbone, self.neck))
        if self.bbox_head.strides != expected:
            raise ValueError(
                f"bbox_head.strides={self.bbox_head.strides} must be the strides {expected} of "
                f"the neck.num_outs={self.neck.num_outs} FPN levels after split_feats"
            )

    def with_num_classes(self, num_classes: int) -> SOLOConfig:
        """The same config for another dataset: ``cfg.with_num_classes(len(dataset.classes))``."""
        return replace(self, bbox_head=replace(self.bbox_head, num_classes=num_classes))


#: SOLO R50-FPN as in ``solo_r50_fpn_8gpu_1x`` with ``pretrained=None``; set
#: ``backbone.pretrained="ResNet50_Weights.IMAGENET1K_V1"`` for its ImageNet start
#: (``frozen_stages=1, norm_eval=True`` assume such weights).
SOLO_R50_FPN = SOLOConfig()

#: SOLO R50-FPN from random weights: nothing frozen, BatchNorm statistics updated.
SOLO_R50_FPN_SCRATCH = SOLOConfig(
    backbone=ResNetConfig(depth=50, frozen_stages=-1, norm_eval=False)
)

#: A SOLO that trains on a CPU: ResNet-18, 64-channel FPN and head, 3 stacked convs, grids
#: (12, 10, 8, 6, 4) — 360 mask channels instead of 3872. Same scale ranges, centre region, losses
#: and test procedure as the full model.
SOLO_R18_SMALL = SOLOConfig(
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False),
    neck=_p2_p6(in_channels=(64, 128, 256, 512), out_channels=64),
    bbox_head=SOLOHeadConfig(
        in_channels=64, feat_channels=64, stacked_convs=3, num_grids=(12, 10, 8, 6, 4)
    ),
)


# --------------------------------------------------------------------------------------------------
# Outputs and targets
# --------------------------------------------------------------------------------------------------


class SOLOOutputs(NamedTuple):
    """What ``SOLO.forward`` returns, one entry per level.

    Attributes:
        mask_logits: list of ``float [B, S², h, w]``; channel ``i · S + j`` is the mask of the
            object centred in grid cell ``(i, j)``; ``(h, w)`` is twice the level's feature size
            (mask strides 4, 4, 8, 16, 16 for the default levels).
        cate_logits: list of ``float [B, C, S, S]`` category logits of every grid cell.
        input_size: ``(Hp, Wp)`` of the (padded) input images; masks are predicted over it.
    """

    mask_logits: list[Tensor]
    cate_logits: list[Tensor]
    input_size: tuple[int, int]


class SOLOImageTargets(NamedTuple):
    """What :func:`solo_target_single` assigns in one image.

    Attributes:
        cate_labels: per level ``int64 [S, S]``: the class of the object owning each cell,
            :data:`BACKGROUND` (-1) elsewhere.
        gt_inds: per level ``int64 [S²]``: for mask channel ``i · S + j``, the index (into the
            image's ground truth) of the object whose mask it learns, or -1.
        centers: ``float64 [G, 2]`` ``(y, x)`` centre of mass of each mask in input pixels
            (pixel ``(r, c)`` counts at ``(r, c)``, as ``scipy.ndimage.center_of_mass``).
        levels: ``bool [G, L]``: object trained on level ``l`` (scale in range and mask area
            ``>= MIN_MASK_AREA``).
        cells: ``int64 [L, G, 4]`` ``(top, down, left, right)`` inclusive cell ranges of each
            object's positive cells on each level, ``-1`` where ``levels`` is False.
    """

    cate_labels: list[Tensor]
    gt_inds: list[Tensor]
    centers: Tensor
    levels: Tensor
    cells: Tensor


class SOLOTargets(NamedTuple):
    """What the loss trains on, per level, for a batch.

    Attributes:
        cate_labels: ``int64 [B, S, S]`` per level, -1 for background cells.
        ins_ind: ``bool [B, S²]`` per level: mask channels that are trained (positive cells of
            objects with a mask; a box-only object's cells have a category target only).
        gt_inds: ``int64 [B, S²]`` per level: the object behind each positive channel, else -1.
        ins_masks: ``float [P_l, h, w]`` per level: the target mask of each positive channel, in
            the order of ``ins_ind.nonzero()`` (image, then channel): the same order as
            ``mask_logits[l].flatten(0, 1)[ins_ind[l].flatten()]``.
        num_pos: ``int64 []`` positive cells (category targets) in the whole batch, all levels;
            the number of trained mask channels when every object has a mask.
        per_image: the :class:`SOLOImageTargets` of each image (centres, cell ranges).
        pos_inds: ``int64 [P_l]`` per level: the positive channels as rows of
            ``mask_logits[l].flatten(0, 1)`` (``b · S² + channel``), ascending — the same as
            ``ins_ind[l].flatten().nonzero()[:, 0]``, found without a host synchronisation.
    """

    cate_labels: list[Tensor]
    ins_ind: list[Tensor]
    gt_inds: list[Tensor]
    ins_masks: list[Tensor]
    num_pos: Tensor
    per_image: list[SOLOImageTargets]
    pos_inds: list[Tensor]


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
        a tuple of ``L`` maps ``[B, F, h_l, w_l]``.
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


def center_of_mass(masks: Tensor) -> Tensor:
    """Centre of mass ``(y, x)`` of each binary mask, in float64 pixel indices.

    The mean row and mean column of the mask's pixels — ``scipy.ndimage.center_of_mass`` without
    scipy. Example: a mask with pixels at rows 2..4 and columns 10..11 has centre ``(3.0, 10.5)``.
    An empty mask gives ``(0, 0)``.

    Args:
        masks: ``bool [G, H, W]``.

    Returns:
        ``float64 [G, 2]``.
    """
    g, h, w = masks.shape
    m = masks.to(torch.float64)
    area = m.sum(dim=(1, 2)).clamp(min=1)  # [G]
    rows = torch.arange(h, device=masks.device, dtype=torch.float64)  # [H]
    cols = torch.arange(w, device=masks.device, dtype=torch.float64)  # [W]
    cy = (m.sum(dim=2) * rows).sum(dim=1) / area  # [G]: row profile [G, H] · row index
    cx = (m.sum(dim=1) * cols).sum(dim=1) / area  # [G]: column profile [G, W] · column index
    return torch.stack([cy, cx], dim=1)  # [G, 2]


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize binary masks bilinearly and round: ``bool [G, H, W] → float {0, 1} [G, h, w]``.

    SOLO resizes each ground-truth mask with ``mmcv.imrescale`` (bilinear on a ``uint8`` mask,
    rounded back to 0/1) by ``1 / output_stride``; for a padded input whose sides are multiples of
    32 that is exactly the level's mask size, which we resize to directly.
    """
    if masks.shape[0] == 0:
        return masks.new_zeros(0, *size, dtype=torch.float32)
    m = F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return (m[:, 0] >= 0.5).float()  # [G, h, w]


def center_region(centers: Tensor, boxes: Tensor, sigma: float) -> Tensor:
    """SOLO's centre region of each object (Sec. 3.3.1, "center region"): its box scaled by
    ``sigma`` around the centre of mass of its mask.

    Example: centre ``(y, x) = (23.5, 23.5)``, box ``(8, 8, 40, 40)``, ``sigma = 0.2``: the region
    is ``23.5 ± 0.2 · 32 / 2 = 23.5 ± 3.2``, i.e. ``(20.3, 20.3, 26.7, 26.7)``.

    Args:
        centers: ``float64 [G, 2]`` ``(y, x)`` in pixel-index coordinates (:func:`center_of_mass`).
        boxes: ``float [G, 4]`` xyxy pixels; only their widths and heights are used.
        sigma: the region's size as a fraction of the box (SOLO: 0.2).

    Returns:
        ``float64 [G, 4]`` ``(x1, y1, x2, y2)`` in the centres' coordinates.
    """
    wh = (boxes[:, 2:] - boxes[:, :2]).to(torch.float64)  # [G, 2] (w, h)
    half = 0.5 * wh * sigma  # [G, 2]
    cxy = centers[:, [1, 0]]  # [G, 2] (x, y)
    return torch.cat([cxy - half, cxy + half], dim=1)  # [G, 4]


def _grid_index(pos: Tensor, extent: float, num_grid: int) -> Tensor:
    """Grid cell of a pixel coordinate: SOLO's ``int((pos / extent) // (1. / num_grid))``.

    ``torch.div(..., rounding_mode="floor")`` on float64 is Python's float ``//`` (same algorithm),
    so a centre that lies exactly on a cell border lands in the same cell as in SOLO.
    """
    return torch.div(pos / extent, 1.0 / num_grid, rounding_mode="floor").long()


def solo_target_single(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    *,
    num_grids: tuple[int, ...],
    scale_ranges: tuple[tuple[float, float], ...],
    sigma: float,
    has_mask: Tensor | None = None,
) -> SOLOImageTargets:
    """SOLO's target assignment for one image (Sec. 3.3.1; ``SOLOHead.solo_target_single``).

    For each level ``(lo, hi), S`` and each object with ``lo <= sqrt(w · h) <= hi`` whose mask has
    at least :data:`MIN_MASK_AREA` pixels:

    1. ``(cy, cx)`` = centre of mass of its mask; the centre cell is
       ``(cy / Hp // (1 / S), cx / Wp // (1 / S))``.
    2. The centre region (:func:`center_region`) is ``cy ± sigma · h / 2``,
       ``cx ± sigma · w / 2`` (``h, w`` of its box); the cells it touches, clipped to the grid
       and to the centre cell ± 1, are positive.
    3. Those cells get the object's class; their mask channels ``i · S + j`` learn its mask.

    Worked example: a 64×64 padded image, ``S = 4`` (16-pixel cells), a box ``(8, 8, 40, 40)``
    with a full mask: centre of mass ``(23.5, 23.5)`` → cell ``(1, 1)``; with ``sigma = 0.2`` the
    region is ``23.5 ± 3.2`` → rows and columns ``20.3 // 16 = 1 .. 26.7 // 16 = 1``: one cell,
    channel ``1 · 4 + 1 = 5``.

    When two objects claim the same cell, the later one (higher index) wins, as in SOLO's loop.
    The computation is vectorised over objects and cells (a ``[G, S, S]`` coverage tensor per
    level); callers loop over images only. The loop itself, object by object and cell by cell:
    :func:`~instseg_edu.models.references.solo_target_single_reference`.

    A **box-only** object (``has_mask`` False) is placed by its box: its centre is the box's
    centre in the same pixel-index convention, ``((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5)`` —
    exactly the centre of mass of a mask filling the box — and its box area stands in for the
    mask area. Its cells get its class like any other; :meth:`SOLO.targets` leaves their mask
    channels out of the dice loss. (SOLO and MMDetection's ``SOLOHead`` skip an object whose mask
    is empty, which would train its cells as *background*: the category branch would learn to
    ignore the object. A mask channel is shared by every object centred in its cell, in every
    image, so it still learns from the objects that have masks.)

    Args:
        gt_boxes: ``float [G, 4]`` xyxy pixels.
        gt_labels: ``int64 [G]`` classes ``0..C-1``.
        gt_masks: ``bool [G, Hp, Wp]`` masks over the padded input; ``(Hp, Wp)`` is the extent the
            grid divides (SOLO: 4 × the finest mask size, i.e. the padded image).
        num_grids, scale_ranges, sigma: as in :class:`SOLOHeadConfig`.
        has_mask: ``bool [G]``, False for box-only objects (default: all True).

    Returns:
        :class:`SOLOImageTargets`.
    """
    device = gt_labels.device
    g = gt_labels.shape[0]
    num_levels = len(num_grids)
    hp, wp = gt_masks.shape[-2:]
    boxes = gt_boxes.to(device=device, dtype=torch.float64)
    w = boxes[:, 2] - boxes[:, 0]  # [G]
    h = boxes[:, 3] - boxes[:, 1]  # [G]
    scale = torch.sqrt(w * h)  # [G]
    big_enough = gt_masks.flatten(1).sum(dim=1) >= MIN_MASK_AREA  # [G]
    centers = center_of_mass(gt_masks)  # [G, 2] (y, x)
    if has_mask is not None:  # box-only objects: the box's centre and area stand in
        has_mask = has_mask.to(device)
        box_centers = torch.stack(
            [(boxes[:, 1] + boxes[:, 3]) / 2 - 0.5, (boxes[:, 0] + boxes[:, 2]) / 2 - 0.5], dim=1
        )  # [G, 2] (y, x)
        centers = torch.where(has_mask[:, None], centers, box_centers)
        big_enough = torch.where(has_mask, big_enough, w * h >= MIN_MASK_AREA)
    cy, cx = centers[:, 0], centers[:, 1]
    region = center_region(centers, boxes, sigma)  # [G, 4] (x1, y1, x2, y2)
    order = torch.arange(g, device=device)  # [G]

    cate_labels, gt_inds, levels, cells = [], [], [], []
    for num_grid, (lo, hi) in zip(num_grids, scale_ranges):
        hit = (scale >= lo) & (scale <= hi) & big_enough  # [G]
        coord_h = _grid_index(cy, hp, num_grid)  # [G] centre cell row
        coord_w = _grid_index(cx, wp, num_grid)  # [G] centre cell column
        # cells the centre region touches, clipped to the grid and to the centre cell ± 1
        top = torch.maximum(_grid_index(region[:, 1], hp, num_grid).clamp(min=0), coord_h - 1)
        down = torch.minimum(_grid_index(region[:, 3], hp, num_grid).clamp(max=num_grid - 1),
                             coord_h + 1)  # fmt: skip
        left = torch.maximum(_grid_index(region[:, 0], wp, num_grid).clamp(min=0), coord_w - 1)
        right = torch.minimum(_grid_index(region[:, 2], wp, num_grid).clamp(max=num_grid - 1),
                              coord_w + 1)  # fmt: skip
        ranges = torch.stack([top, down, left, right], dim=1)  # [G, 4]
        cells.append(torch.where(hit[:, None], ranges, torch.full_like(ranges, -1)))
        levels.append(hit)

        grid = torch.arange(num_grid, device=device)  # [S]
        in_rows = (grid >= top[:, None]) & (grid <= down[:, None])  # [G, S]
        in_cols = (grid >= left[:, None]) & (grid <= right[:, None])  # [G, S]
        cover = in_rows[:, :, None] & in_cols[:, None, :] & hit[:, None, None]  # [G, S, S]
        # Owner of a cell = the last object covering it (SOLO writes objects in order).
        owner = torch.where(cover, order[:, None, None], -1)  # [G, S, S]
        owner = owner.amax(dim=0) if g > 0 else owner.new_full((num_grid, num_grid), -1)  # [S, S]
        labels = gt_labels[owner.clamp(min=0)] if g > 0 else owner  # [S, S]
        cate_labels.append(torch.where(owner >= 0, labels, BACKGROUND))
        gt_inds.append(owner.reshape(-1))  # [S*S], row i*S + j is cell (i, j)

    return SOLOImageTargets(
        cate_labels=cate_labels,
        gt_inds=gt_inds,
        centers=centers,
        levels=torch.stack(levels, dim=1) if num_levels else torch.zeros(g, 0, dtype=torch.bool),
        cells=torch.stack(cells, dim=0),  # [L, G, 4]
    )


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight box of each mask, xyxy on pixel edges (COCO's convention): a mask covering columns
    3..5 and rows 1..2 gives ``(3, 1, 6, 3)``. Empty masks give ``(0, 0, 0, 0)``.

    Args:
        masks: ``bool [K, H, W]``.

    Returns:
        ``float32 [K, 4]``.
    """
    k, h, w = masks.shape
    rows = masks.any(dim=2)  # [K, H]
    cols = masks.any(dim=1)  # [K, W]
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ys, h).amin(dim=1) if h else ys.new_zeros(k)
    y2 = torch.where(rows, ys + 1, 0).amax(dim=1) if h else ys.new_zeros(k)
    x1 = torch.where(cols, xs, w).amin(dim=1) if w else xs.new_zeros(k)
    x2 = torch.where(cols, xs + 1, 0).amax(dim=1) if w else xs.new_zeros(k)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()  # [K, 4]
    return torch.where(rows.any(dim=1)[:, None], boxes, torch.zeros_like(boxes))


# --------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------


def _conv_gn_relu(in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)  # GN follows: no bias needed
    nn.init.normal_(conv.weight, std=0.01)
    return nn.Sequential(conv, nn.GroupNorm(groups, out_ch), nn.ReLU(inplace=True))


class SOLOHead(nn.Module):
    """The mask and category branches (Sec. 3.2, Fig. 3), convolutions shared by all levels.

    ``forward(feats)``: ``L`` maps ``[B, in_channels, h_l, w_l]`` (after :func:`split_feats`) →
    ``mask_logits`` list of ``[B, S_l², 2h_l, 2w_l]`` and ``cate_logits`` list of
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
        """One level: ``[B, F, h, w]`` → ``([B, S², 2h, 2w], [B, C, S, S])``."""
        s = self.cfg.num_grids[level]
        ins = torch.cat([x, coord_features(x)], dim=1)  # [B, F+2, h, w]
        for conv in self.ins_convs:
            ins = conv(ins)  # [B, ch, h, w]
        ins = F.interpolate(ins, scale_factor=2, mode="bilinear", align_corners=False)  # 2h, 2w
        mask_logits = self.solo_ins_list[level](ins)  # [B, S², 2h, 2w]

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

        # Per level, the images stacked: cate_labels [B, S, S], gt_inds [B, S²].
        levels = range(len(mask_sizes))
        cate_labels = [torch.stack([p.cate_labels[lv] for p in per_image]) for lv in levels]
        gt_inds = [torch.stack([p.gt_inds[lv] for p in per_image]) for lv in levels]
        # Row of gt_masks behind each channel (background channels: -1 + offset, never used).
        rows = [torch.stack([i + off for i, off in zip(inds, offsets)]) for inds in gt_inds]
        owned = [inds >= 0 for inds in gt_inds]  # [B, S²] cells with a category target
        ins_ind = owned  # [B, S²] mask channels trained: owned by an object that has a mask
        if gt_has_mask.numel() > 0:
            ins_ind = [o & gt_has_mask[r.clamp(min=0)] for o, r in zip(owned, rows)]
        pos_per_level = torch.stack([ind.sum() for ind in ins_ind])  # [L]
        counts = pos_per_level.tolist()  # the one host synchronisation: L ints

        pos_inds, ins_masks = [], []
        for rows_l, ind, count, size in zip(rows, ins_ind, counts, mask_sizes):
            # The positive channels, image-major, as ``ind.flatten().nonzero()`` would list them,
            # with a size the host already knows (`count`): no wait for the device.
            pos = first_k_true(ind.flatten(), count)  # [B*S²] -> [P_l]
            pos_inds.append(pos)
            if count == 0:
                ins_masks.append(torch.zeros(0, *size, device=device))  # [0, h, w]
                continue
            owners = rows_l.flatten()[pos]  # [B*S²] -> [P_l]
            resized = resize_masks(gt_masks, size)  # [ΣG, h, w]: each object resized once
            ins_masks.append(resized[owners])  # [ΣG, h, w] -> [P_l, h, w]
        # Category positives: every owned cell, box-only objects' included.
        num_pos = torch.stack([o.sum() for o in owned]).sum()
        return SOLOTargets(cate_labels, ins_ind, gt_inds, ins_masks, num_pos, per_image, pos_inds)

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
                pred = logits.flatten(0, 1)[pos]  # [B, S², h, w] -> [B*S², h, w] -> [P_l, h, w]
                dice.append(dice_loss(pred.float().sigmoid(), target))  # [P_l]
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
        loss_cate = sigmoid_focal_loss(
            logits,
            onehot,
            alpha=head.loss_cate.alpha,
            gamma=head.loss_cate.gamma,
            reduction="sum",
            avg_factor=global_avg_factor(t.num_pos, offset=1),
        )
        return {
            "loss_ins": head.loss_ins.loss_weight * loss_ins,
            "loss_cate": head.loss_cate.loss_weight * loss_cate,
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
            masks = probs > test.mask_thr  # [K, h0, w0]
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
            labels, scores, probs = labels[:n], scores[:n], probs[:n]  # [n], [n], [n, h0, w0]
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
        p = logits[b, channels].float().sigmoid()  # [S², h_l, w_l] -> [k_l, h_l, w_l]
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
