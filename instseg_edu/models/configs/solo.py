"""SOLO's configuration: the original SOLO code base's ``solo_r50_fpn_8gpu_1x`` as frozen
dataclasses, and the presets.

Keys are those of ``WXinlong/SOLO`` (built on MMDetection 1.x): ``bbox_head`` with
``num_grids, scale_ranges, sigma, cate_down_pos, loss_ins, loss_cate`` and ``test_cfg`` with
``update_thr``. MMDetection 3.x renamed them ``mask_head``, ``pos_scale``, ``cls_down_index``,
``loss_mask``, ``loss_cls`` and ``filter_thr``; the numbers are the same. The loss configs are the
shared ones of :mod:`instseg_edu.losses`; the model is in :mod:`instseg_edu.models.solo`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from instseg_edu.config import ClassesInBBoxHead, check, check_at_least, check_in_range
from instseg_edu.losses import DiceLossConfig, FocalLossConfig
from instseg_edu.models.backbone import (
    FPNConfig,
    ResNetConfig,
    check_backbone_and_heads,
    fpn_p2_p6,
)


@dataclass(frozen=True)
class SOLOHeadConfig:
    """``bbox_head``: the category and mask branches and their targets.

    Attributes:
        num_classes: foreground classes ``C`` (sigmoids, no background class).
        in_channels: channels of the FPN levels.
        stacked_convs: 3×3 conv + GroupNorm + ReLU layers in each branch (paper: 7).
        feat_channels: their width (SOLO code: ``seg_feat_channels=256``).
        strides: nominal stride of each level after ``split_feats``; a predicted mask needs
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
        loss_ins: the dice loss on the masks of positive cells (Sec. 3.3, Eq. 4; weight 3).
        loss_cate: the focal loss on every grid cell (Sec. 3.3).
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
    loss_ins: DiceLossConfig = DiceLossConfig(loss_weight=3.0)
    loss_cate: FocalLossConfig = FocalLossConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        object.__setattr__(self, "num_grids", tuple(int(s) for s in self.num_grids))
        object.__setattr__(self, "scale_ranges", tuple(tuple(r) for r in self.scale_ranges))
        check_at_least(self, 1, "num_classes", "in_channels", "feat_channels", "stacked_convs")
        check(
            0 <= self.cate_down_pos < self.stacked_convs,
            f"cate_down_pos={self.cate_down_pos} must be in 0..stacked_convs-1="
            f"{self.stacked_convs - 1}",
        )
        check(
            self.norm_num_groups >= 1 and self.feat_channels % self.norm_num_groups == 0,
            f"norm_num_groups={self.norm_num_groups} must divide "
            f"feat_channels={self.feat_channels}",
        )
        levels = len(self.strides)
        check(
            levels > 0 and min(self.strides) >= 1,
            f"strides={self.strides} must be a non-empty tuple of ints >= 1",
        )
        check(
            len(self.num_grids) == levels and min(self.num_grids) >= 1,
            f"num_grids={self.num_grids} needs one grid size >= 1 per level "
            f"(len(strides)={levels})",
        )
        check(
            len(self.scale_ranges) == levels,
            f"scale_ranges has {len(self.scale_ranges)} entries but there are "
            f"len(strides)={levels} levels",
        )
        for lo_hi in self.scale_ranges:
            check(
                len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1],
                f"scale_ranges entry {lo_hi} must be a pair 0 <= lo <= hi",
            )
        check_in_range(self, "sigma", 0, 1, lo_open=True)
        check_in_range(self, "prior_prob", 0, 1, lo_open=True, hi_open=True)


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
        check_at_least(self, 1, "nms_pre", "max_per_img")
        for name in ("score_thr", "mask_thr", "update_thr"):
            check_in_range(self, name, 0, 1, hi_open=True)
        check(
            self.kernel in ("gaussian", "linear"),
            f"kernel={self.kernel!r} must be 'gaussian' or 'linear'",
        )
        check(self.sigma > 0, f"sigma={self.sigma} must be > 0")


def split_strides(fpn: tuple[int, ...]) -> tuple[int, ...]:
    """Strides after ``split_feats``: ``(4, 8, 16, 32, 64) → (8, 8, 16, 32, 32)``."""
    return (2 * fpn[0], *fpn[1:-1], fpn[-2])


@dataclass(frozen=True)
class SOLOConfig(ClassesInBBoxHead):
    """The whole model; defaults are SOLO's ``solo_r50_fpn_8gpu_1x`` (COCO, 80 classes).

    Cross-checks (``ValueError`` naming the field): ``neck.in_channels`` must be the ResNet's
    output channels, ``bbox_head.in_channels`` must equal ``neck.out_channels``, the neck must give
    at least 3 levels, and ``bbox_head.strides`` must be the strides of the FPN levels after
    ``split_feats`` (one per ``neck.num_outs``).
    """

    backbone: ResNetConfig = ResNetConfig()
    neck: FPNConfig = fpn_p2_p6()
    bbox_head: SOLOHeadConfig = SOLOHeadConfig()
    test_cfg: SOLOTestConfig = SOLOTestConfig()

    def __post_init__(self) -> None:
        fpn = check_backbone_and_heads(
            self.backbone, self.neck, bbox_head=self.bbox_head.in_channels
        )
        check(
            self.neck.num_outs >= 3,
            f"neck.num_outs={self.neck.num_outs} must be >= 3 for split_feats",
        )
        expected = split_strides(fpn)
        check(
            self.bbox_head.strides == expected,
            f"bbox_head.strides={self.bbox_head.strides} must be the strides {expected} of "
            f"the neck.num_outs={self.neck.num_outs} FPN levels after split_feats",
        )


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
    neck=fpn_p2_p6(in_channels=(64, 128, 256, 512), out_channels=64),
    bbox_head=SOLOHeadConfig(
        in_channels=64, feat_channels=64, stacked_convs=3, num_grids=(12, 10, 8, 6, 4)
    ),
)

#: The CPU tier's SOLO (notebook 07 and ``instseg-edu demo --model solo`` without a GPU):
#: :data:`SOLO_R18_SMALL` on the half-width ResNet-18 of
#: :data:`~instseg_edu.models.configs.mask_rcnn.MASK_RCNN_R18_CPU` (``base_channels=32``) with
#: the same P2–P6 FPN, so that its whole backbone can start from the Mask R-CNN that notebook 06
#: trained (:func:`~instseg_edu.engine.checkpoint.load_backbone`). From random weights, 4.5
#: minutes on two CPU cores: 1172 steps instead of 698, mask AP50 0.057 instead of 0.042; from
#: a trained Mask R-CNN's backbone: 0.14-0.21 (``benchmarks/RESULTS.md``, thirteenth round).
#: Its category branch, the part that learns slowest in those minutes, takes the focal loss at
#: ``gamma=1, alpha=0.5`` instead of the paper's 2 and 0.25: less of its gradient goes to the
#: easy cells, more to the positives. For the same 1200 steps from the same backbone, mask AP50
#: 0.253 / 0.257 instead of 0.222 / 0.221 over two seeds (``benchmarks/RESULTS.md``, seventeenth
#: round). Its scale ranges are the paper's a third as large, fitted to 128 px images: the paper's
#: are for images of about 800 px and at 128 px would train every shape on the two finest levels
#: (grids 12 and 10), the larger shapes with the small ones. A third as large, the larger shapes
#: go to the coarser grids, as in the paper. With the loaded backbone learning again, box / mask
#: AP50 0.48 / 0.46 -> 0.55 / 0.51 (seed 0; seed 1: 0.54 / 0.50), the medium shapes' boxes 56 %
#: -> 60 % right (``benchmarks/RESULTS.md``, thirtieth round). With the loaded backbone frozen
#: they lost 0.03.
SOLO_R18_CPU = SOLOConfig(
    backbone=ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False, base_channels=32),
    neck=fpn_p2_p6(in_channels=(32, 64, 128, 256), out_channels=64),
    bbox_head=replace(
        SOLO_R18_SMALL.bbox_head,
        loss_cate=FocalLossConfig(alpha=0.5, gamma=1.0),
        scale_ranges=((1, 32), (16, 64), (32, 128), (64, 256), (128, 512)),
    ),
)
