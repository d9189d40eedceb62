"""How the CPU tier's recipes were chosen: train a variant for a fixed wall-clock budget, score
it on the shapes validation split.

Each run builds the variant, times a few training steps of it on this machine, sets ``max_steps``
so that training fills ``--seconds`` (the cosine schedule then ends on time), trains on the
recipe's in-memory 128 px shapes split and evaluates box and mask AP on its 200 validation images.
One line of JSON per run is appended to ``--json``. Variants are named changes to
``MASK_RCNN_R18_CPU``, its recipe or the built model (see :class:`Variant` and :data:`VARIANTS`;
the model changes stand in for heads no preset describes, such as GroupNorm in the FPN); a variant
with ``ema_decay`` is also scored with averaged weights. The tables in ``benchmarks/RESULTS.md``
("CPU recipe") list what they gave. The preset changed between rounds, so a variant today is a
change to today's preset: the rows before the fifth round ran with the classification loss
weighed 1 (``loss_cls_1`` gives that back), those before the sixth trained on the standard
split, 3-10 shapes per image (``standard_train``), and those before the seventh sampled 64 RoIs
per image (``rois_64``; ``narrow_r32`` is today's preset), and those before the tenth trained the
box head at the full learning rate (``box_head_lr_1``). Run one at a time on a quiet machine:
the budget is wall-clock time, so a busy machine trains fewer steps (``--steps`` fixes the steps
instead). The ``retinanet_*`` variants change RetinaNet's CPU recipe (``RETINANET_R18_CPU``)
the same way, and score boxes only; the ``solo_*`` and ``yolact_*`` variants change SOLO's and
YOLACT's (``SOLO_R18_CPU``, ``YOLACT_R18_CPU``), with ``--backbone-from`` a trained Mask R-CNN's
checkpoint to start their backbone from, as notebooks 07 and 08 do. A recipe with
``pretrain_seconds`` (RetinaNet's, Mask R-CNN's and YOLACT's) first pretrains the ResNet on
object crops for that long, inside ``--seconds``, unless ``--backbone-from`` gives it a trained
one (``--pretrain-seconds`` sets another time, 0 none; the ``*no_pretrain`` and ``*_pretrain``
variants take it away or add it).

    python benchmarks/cpu_recipe.py current rois_64 --seconds 300 --json runs/cpu_recipe.jsonl
    python benchmarks/cpu_recipe.py retinanet_current retinanet_no_group_norm --seconds 270
    python benchmarks/cpu_recipe.py yolact_current yolact_full_width --seconds 270 \
        --backbone-from runs/demo/last.pt
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from instseg_edu.engine.checkpoint import describe_backbone_load, load_backbone
from instseg_edu.engine.pretrain import pretrain_backbone
from instseg_edu.engine.train import cpu_has_native_bf16
from instseg_edu.models import build_model
from instseg_edu.models.backbone import FPN, resnet_out_channels
from instseg_edu.models.configs.solo import SOLOHeadConfig
from instseg_edu.recipes import FAMILIES, measure_step_seconds, recipe

# ------------------------------------------------------------------------------- the variants


def _roi_sampler(cfg, num: int, pos_fraction: float):
    rcnn = cfg.train_cfg.rcnn
    rcnn = dataclasses.replace(
        rcnn, sampler=dataclasses.replace(rcnn.sampler, num=num, pos_fraction=pos_fraction)
    )
    return dataclasses.replace(cfg, train_cfg=dataclasses.replace(cfg.train_cfg, rcnn=rcnn))


def _width(cfg, base_channels: int):
    backbone = dataclasses.replace(cfg.backbone, base_channels=base_channels)
    neck = dataclasses.replace(cfg.neck, in_channels=resnet_out_channels(backbone))
    return dataclasses.replace(cfg, backbone=backbone, neck=neck)


def _heads(cfg, fc_out_channels: int | None = None, num_convs: int | None = None):
    roi_head = cfg.roi_head
    if fc_out_channels is not None:
        roi_head = dataclasses.replace(roi_head, fc_out_channels=fc_out_channels)
    if num_convs is not None:
        roi_head = dataclasses.replace(roi_head, num_convs=num_convs)
    return dataclasses.replace(cfg, roi_head=roi_head)


def _rpn_scale(cfg, scale: float):
    anchors = dataclasses.replace(cfg.rpn_head.anchor_generator, scales=(scale,))
    head = dataclasses.replace(cfg.rpn_head, anchor_generator=anchors)
    return dataclasses.replace(cfg, rpn_head=head)


def _finest_scale(cfg, value: float):
    return dataclasses.replace(cfg, roi_head=dataclasses.replace(cfg.roi_head, finest_scale=value))


def _three_stages(cfg):
    backbone = dataclasses.replace(cfg.backbone, num_stages=3, out_indices=(0, 1, 2))
    neck = dataclasses.replace(cfg.neck, in_channels=resnet_out_channels(backbone))
    return dataclasses.replace(cfg, backbone=backbone, neck=neck)


def _pos_fraction(cfg, fraction: float):
    return _roi_sampler(cfg, cfg.train_cfg.rcnn.sampler.num, fraction)


def _train_shapes(r, shapes_per_image: tuple[int, int]):
    return dataclasses.replace(r, train_shapes_per_image=shapes_per_image)


def _box_head_lr(r, mult: float):
    return dataclasses.replace(r, lr_mult={**(r.lr_mult or {}), "bbox_head": mult})


def _loss_cls_weight(cfg, weight: float):
    loss_cls = dataclasses.replace(cfg.roi_head.loss_cls, loss_weight=weight)
    return dataclasses.replace(cfg, roi_head=dataclasses.replace(cfg.roi_head, loss_cls=loss_cls))


# ---- changes to the built model, for heads the presets do not describe (third round)


def _group_norm_after(convs: nn.Module, groups: int) -> nn.Sequential:
    layers = []
    for mod in convs if isinstance(convs, nn.Sequential) else [convs]:
        layers.append(mod)
        if isinstance(mod, nn.Conv2d):
            layers.append(nn.GroupNorm(groups, mod.out_channels))
    return nn.Sequential(*layers)


def gn_fpn_and_mask_head(model, groups: int = 32):
    """GroupNorm after every FPN conv (lateral and 3x3) and every mask-head conv, as in
    MMDetection's ``gn-all`` configs (He et al., *Rethinking ImageNet Pre-training*, 2019)."""
    fpn = next(m for m in model.modules() if isinstance(m, FPN))
    for convs in (fpn.lateral_convs, fpn.fpn_convs):
        for i, conv in enumerate(convs):
            convs[i] = _group_norm_after(conv, groups)
    model.mask_head.convs = _group_norm_after(model.mask_head.convs, groups)
    return model


class ConvFCBoxHead(nn.Module):
    """MMDetection's ``ConvFCBBoxHead`` with ``num_shared_convs`` 3x3 convs (+ GroupNorm + ReLU)
    before one shared fc (``Shared4Conv1FCBBoxHead`` for 4)."""

    def __init__(self, channels, roi_size, num_convs, fc_out_channels, num_classes, groups=32):
        super().__init__()
        layers = []
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            layers += [conv, nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(channels * roi_size * roi_size, fc_out_channels)
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, 4 * num_classes)
        _init_box_fcs(self.fc, self.fc_cls, self.fc_reg)

    def forward(self, x):
        x = F.relu(self.fc(self.convs(x).flatten(1)))
        return self.fc_cls(x), self.fc_reg(x)


class PooledConvClsHead(nn.Module):
    """Classification from convs and global average + max pooling (translation invariant, for
    rotated shapes); box regression from the flattened RoI through one 256-wide fc."""

    def __init__(self, channels, roi_size, num_convs, num_classes, reg_fc=256):
        super().__init__()
        layers = []
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, channels, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(channels * roi_size * roi_size, reg_fc)
        self.fc_cls = nn.Linear(2 * channels, num_classes + 1)
        self.fc_reg = nn.Linear(reg_fc, 4 * num_classes)
        _init_box_fcs(self.fc, self.fc_cls, self.fc_reg)

    def forward(self, x):
        c = self.convs(x)
        pooled = torch.cat([c.mean((2, 3)), c.amax((2, 3))], 1)  # [R, 2F]
        return self.fc_cls(pooled), self.fc_reg(F.relu(self.fc(x.flatten(1))))


def _init_box_fcs(fc, fc_cls, fc_reg):  # as BoxHead: Xavier hidden fc, small-normal outputs
    nn.init.xavier_uniform_(fc.weight)
    nn.init.normal_(fc_cls.weight, std=0.01)
    nn.init.normal_(fc_reg.weight, std=0.001)
    for layer in (fc, fc_cls, fc_reg):
        nn.init.zeros_(layer.bias)


def _box_head(model, head_class, *args):
    channels = model.cfg.neck.out_channels
    roi = model.cfg.roi_head.bbox_roi_size
    model.bbox_head = head_class(channels, roi, *args, model.num_classes)
    return model


class ClassAgnosticDeltas(nn.Module):
    """The box head's ``fc_reg`` with one set of deltas for every class (MMDetection's
    ``reg_class_agnostic=True``): ``[R, fc] -> [R, 4C]``, the 4 columns repeated C times, so the
    loss and decoding of class-specific deltas work unchanged and every positive trains them."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc, self.num_classes = nn.Linear(in_features, 4), num_classes
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(x).repeat(1, self.num_classes)  # [R, 4C]


class ClassAgnosticMaskLogits(nn.Module):
    """The mask head's ``conv_logits`` with one mask for every class (MMDetection's
    ``class_agnostic=True``): one 1x1 conv whose output and weight rows are seen C times."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv, self.num_classes = nn.Conv2d(in_channels, 1, 1), num_classes
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    @property
    def weight(self):  # [C, F', 1, 1]: MaskHead reads each RoI's class row
        return self.conv.weight.expand(self.num_classes, -1, -1, -1)

    @property
    def bias(self):  # [C]
        return self.conv.bias.expand(self.num_classes)

    def forward(self, x):
        return self.conv(x).expand(-1, self.num_classes, -1, -1)  # [R, C, T, T]


def class_agnostic_heads(model):
    """One box regressor and one mask for every class: each positive RoI trains them, not only
    the 1/C that share its class."""
    fc_reg, conv = model.bbox_head.fc_reg, model.mask_head.conv_logits
    model.bbox_head.fc_reg = ClassAgnosticDeltas(fc_reg.in_features, model.num_classes)
    model.mask_head.conv_logits = ClassAgnosticMaskLogits(conv.in_channels, model.num_classes)
    return model


class SharedConvBoxHead(nn.Module):
    """The box head reading the mask head's convs: ``box_head(mask_head.convs(x))``. The mask
    loss teaches those convs where a shape's pixels are from the first steps, whatever its
    colour; the classifier then reads a silhouette instead of colours (both heads share one RoI
    size, here 7x7)."""

    def __init__(self, mask_convs: nn.Module, box_head: nn.Module):
        super().__init__()
        self.box_head = box_head
        self.mask_convs = [mask_convs]  # a plain list: the module stays the mask head's own

    def forward(self, x):
        return self.box_head(self.mask_convs[0](x))


def shared_mask_convs(model):
    """The box head on the mask head's convs (see :class:`SharedConvBoxHead`)."""
    r = model.cfg.roi_head
    assert r.bbox_roi_size == r.mask_roi_size, "the two heads must read one RoI size"
    assert r.conv_out_channels == model.cfg.neck.out_channels
    model.bbox_head = SharedConvBoxHead(model.mask_head.convs, model.bbox_head)
    return model


class SemanticBranch(nn.Module):
    """A per-pixel classifier on P2 (HTC's semantic branch, Chen et al. 2019, Sec. 3.3, as a
    small stand-in): two 3x3 convs and a 1x1 conv to ``C + 1`` logits at stride 4, trained with
    cross-entropy against the ground-truth masks' classes (background ``C``; a later object is
    on top where masks overlap). Every pixel of every object tells the backbone and FPN which
    shape it belongs to in every step, where the box head learns only from 32 RoIs per image."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.logits = nn.Conv2d(channels, num_classes + 1, 1)

    def forward(self, p2):
        return self.logits(self.convs(p2))


def semantic_targets(batch, num_classes: int, size: tuple[int, int], stride: int):
    """``int64 [B, h, w]``: the class of each stride-``stride`` cell's centre pixel."""
    rows = []
    for t in batch.targets:
        m = t.masks[:, stride // 2 :: stride, stride // 2 :: stride][:, : size[0], : size[1]]
        label = torch.full(m.shape[-2:], num_classes, dtype=torch.long)
        if len(m):  # the last object whose mask covers the cell
            order = torch.arange(1, len(m) + 1).view(-1, 1, 1)
            top = (m.long() * order).amax(0)  # [h, w], 0 = none
            label = torch.where(top > 0, t.labels[(top - 1).clamp(min=0)], label)
        rows.append(label)
    return torch.stack(rows)


def with_semantic_branch(weight: float):
    def change(model):
        model.semantic_head = SemanticBranch(model.cfg.neck.out_channels, model.num_classes)
        loss = model.loss

        def loss_with_semantic(outputs, batch):
            losses = loss(outputs, batch)
            p2 = outputs.features[0]
            logits = model.semantic_head(p2)
            target = semantic_targets(batch, model.num_classes, p2.shape[-2:], 4)
            losses["loss_semantic"] = weight * F.cross_entropy(logits, target.to(p2.device))
            return losses

        model.loss = loss_with_semantic
        return model

    return change


class Variant(NamedTuple):
    """Changes to today's preset and recipe: ``config`` (model config -> config), ``recipe``
    (recipe -> recipe), ``model`` (built model -> model, for heads no preset describes),
    and ``ema_decay`` (also score an exponential moving average of the weights); ``family``: whose
    CPU recipe they change (Mask R-CNN's, or the family their name starts with)."""

    config: Callable = lambda c: c
    recipe: Callable = lambda r: r
    model: Callable = lambda m: m
    ema_decay: float | None = None
    family: str = "mask_rcnn"


def _bbox_head(cfg, **changes):
    return dataclasses.replace(cfg, bbox_head=dataclasses.replace(cfg.bbox_head, **changes))


#: name -> its changes, applied to today's preset.
VARIANTS: dict[str, Variant] = {
    "current": Variant(),
    # Before this recipe: a full-width ResNet-18 and 32 RoIs per image.
    "full_width_r32": Variant(lambda c: _roi_sampler(_width(c, 64), 32, 0.5)),
    "narrow_r32": Variant(lambda c: _roi_sampler(c, 32, 0.5)),
    "narrow_r128": Variant(lambda c: _roi_sampler(c, 128, 0.5)),
    "rpn_anchors_16px": Variant(lambda c: _rpn_scale(c, 4.0)),
    "finest_scale_14": Variant(lambda c: _finest_scale(c, 14.0)),
    "three_stages": Variant(_three_stages),
    "batch_4": Variant(recipe=lambda r: dataclasses.replace(r, batch_size=4)),
    "lr_4e-3": Variant(recipe=lambda r: dataclasses.replace(r, lr=4e-3)),
    # Cheaper heads: the box head's two 1024-wide fc layers were 40 % of a step's FLOPs and the
    # mask head's four convs 19 %.
    "fc256": Variant(lambda c: _heads(c, fc_out_channels=256)),
    "fc256_mask2": Variant(lambda c: _heads(c, fc_out_channels=256, num_convs=2)),
    "fc256_mask2_nojitter": Variant(
        lambda c: _heads(c, fc_out_channels=256, num_convs=2),
        lambda r: dataclasses.replace(r, color_jitter=False),
    ),
    "fc256_mask2_nojitter_lr3e-3": Variant(
        lambda c: _heads(c, fc_out_channels=256, num_convs=2),
        lambda r: dataclasses.replace(r, color_jitter=False, lr=3e-3),
    ),
    # MMDetection's step schedule (x0.1 at 8/12 and 11/12 of the run) keeps the full rate longer.
    "step_schedule": Variant(recipe=lambda r: dataclasses.replace(r, schedule="step")),
    "fc256_mask2_nojitter_b16_lr3e-3": Variant(
        lambda c: _heads(c, fc_out_channels=256, num_convs=2),
        lambda r: dataclasses.replace(r, color_jitter=False, lr=3e-3, batch_size=16),
    ),
    # Third round: learn more per step (normalisation, averaged weights, the classifier's input).
    "gn_fpn_mask": Variant(model=gn_fpn_and_mask_head),
    "gn_fpn_mask_2conv1fc": Variant(
        model=lambda m: _box_head(gn_fpn_and_mask_head(m), ConvFCBoxHead, 2, 1024)
    ),
    "gn_fpn_mask_ema": Variant(model=gn_fpn_and_mask_head, ema_decay=0.99),
    "lr_1e-3": Variant(recipe=lambda r: dataclasses.replace(r, lr=1e-3)),
    "pooled_conv_cls": Variant(model=lambda m: _box_head(m, PooledConvClsHead, 2)),
    "no_jitter": Variant(recipe=lambda r: dataclasses.replace(r, color_jitter=False)),
    "pos_fraction_0.75": Variant(lambda c: _pos_fraction(c, 0.75)),
    # Fourth round: box deltas and masks shared by all classes (from scratch, the class-specific
    # ones each learn from a seventh of the positives).
    "class_agnostic": Variant(model=class_agnostic_heads),
    # The classifier's loss weight (the preset's is 4 since this round; it was 1): under Adam the
    # heads' own steps keep their size, but the shared backbone and FPN get a larger share of
    # class-telling gradient.
    "loss_cls_1": Variant(lambda c: _loss_cls_weight(c, 1.0)),
    "loss_cls_8": Variant(lambda c: _loss_cls_weight(c, 8.0)),
    # Sixth round: the classifier reads the mask head's convs (the masks learn from the start,
    # the classes only after ~400 steps).
    "shared_mask_convs": Variant(model=shared_mask_convs),
    # ... and more objects to look at per step: 10-20 shapes per training image instead of 3-10
    # (the recipe's since this round; "standard_train" gives the standard split back).
    "dense_train_10_20": Variant(recipe=lambda r: _train_shapes(r, (10, 20))),
    "standard_train": Variant(recipe=lambda r: _train_shapes(r, (3, 10))),
    "dense_train_15_30": Variant(recipe=lambda r: _train_shapes(r, (15, 30))),
    # Seventh round: more optimiser steps in the same minutes (with "batch_4" above). The crop
    # classifier (shape_classifier.py) learns as much per step from 64 crops as from 256, and a
    # step of 8 images gives the box head 256 positive RoIs. Not kept: the detector follows the
    # images it has seen, not its steps.
    "batch_2": Variant(recipe=lambda r: dataclasses.replace(r, batch_size=2)),
    # Fewer RoIs per image did help: the preset samples 32 since this round ("narrow_r32" is now
    # the same as "current"). On the dense images 32 still give every object about one positive
    # RoI, and a step costs half as much.
    "rois_64": Variant(lambda c: _roi_sampler(c, 64, 0.5)),
    "rois_16": Variant(lambda c: _roi_sampler(c, 16, 0.5)),  # not kept: no better than 32
    # Eighth round: lighter RoI heads, a step about 20 % cheaper (two mask-head convs and
    # 512-wide box-head fc layers, each about 10 %), run for proportionally more steps (--steps
    # 960 against 800): as good per minute, worse masks per step. Not kept.
    # Tenth round: a per-pixel classifier on P2 as an extra loss (HTC's semantic branch): the
    # same box / mask AP50 at 800 steps (0.408 / 0.376 against 0.408 / 0.380). Not kept.
    "semantic_1": Variant(model=with_semantic_branch(1.0)),
    # Tenth round: the box head's learning rate apart from the rest (TrainConfig.lr_mult); 0.2
    # was kept (the recipe's lr_mult), so "current" is box_head_lr_0.2 since.
    **{
        f"box_head_lr_{m:g}": Variant(recipe=lambda r, m=m: _box_head_lr(r, m))
        for m in (0.05, 0.2, 0.5, 1.0, 5.0)
    },
    # The same reasoning for the backbone's widest convs (layer4: 1152 and 2304 inputs).
    "layer4_lr_0.3": Variant(
        recipe=lambda r: dataclasses.replace(r, lr_mult={**r.lr_mult, "resnet.layer4": 0.3})
    ),
    "lr_3e-3": Variant(recipe=lambda r: dataclasses.replace(r, lr=3e-3)),  # all of it: worse
    "fc512_mask_convs_2": Variant(lambda c: _heads(c, fc_out_channels=512, num_convs=2)),
    # Eleventh round: the same 128 px images resized up, for training and scoring alike (not
    # kept: a larger step costs more than it gives), or for scoring only (test_{size}).
    **{
        f"{kind}_{size}": Variant(
            recipe=lambda r, kind=kind, size=size: dataclasses.replace(
                r, train_size=size if kind == "input" else None, test_size=size
            )
        )
        for kind in ("input", "test")
        for size in (128, 160, 192)
    },
    # RetinaNet's CPU recipe (twelfth round): each variant undoes one of today's choices
    # (RETINANET_R18_CPU, trained on 10-20 shapes per image, lr 2e-3, scored at 192 px).
    "retinanet_current": Variant(family="retinanet"),
    "retinanet_no_group_norm": Variant(
        lambda c: _bbox_head(c, norm_num_groups=None), family="retinanet"
    ),
    "retinanet_standard_train": Variant(
        recipe=lambda r: _train_shapes(r, (3, 10)), family="retinanet"
    ),
    "retinanet_three_full_width_stages": Variant(  # the backbone of RETINANET_R18_CPU_DEMO
        lambda c: _three_stages(_width(c, 64)), family="retinanet"
    ),
    "retinanet_stacked_convs_4": Variant(
        lambda c: _bbox_head(c, stacked_convs=4), family="retinanet"
    ),
    "retinanet_lr_1e-3": Variant(
        recipe=lambda r: dataclasses.replace(r, lr=1e-3), family="retinanet"
    ),
    "retinanet_test_128": Variant(
        recipe=lambda r: dataclasses.replace(r, test_size=None), family="retinanet"
    ),
    # SOLO's and YOLACT's CPU recipes (thirteenth round; notebooks 07 and 08 run them with
    # --backbone-from notebook 06's Mask R-CNN): each variant undoes one of today's choices
    # (SOLO_R18_CPU / YOLACT_R18_CPU: Mask R-CNN's half-width ResNet-18, lr 2e-3; YOLACT scored
    # at 192 px). The "_dense_train" ones try Mask R-CNN's images with 10-20 shapes (not kept).
    **{
        f"{family}_{name}": Variant(config, recipe_change, family=family)
        for family in ("solo", "yolact")
        for name, config, recipe_change in (
            ("current", lambda c: c, lambda r: r),
            ("full_width", lambda c: _width(c, 64), lambda r: r),  # the R18_SMALL presets
            ("lr_1e-3", lambda c: c, lambda r: dataclasses.replace(r, lr=1e-3)),
            ("dense_train", lambda c: c, lambda r: _train_shapes(r, (10, 20))),
            ("test_size_128", lambda c: c, lambda r: dataclasses.replace(r, test_size=None)),
            ("test_size_192", lambda c: c, lambda r: dataclasses.replace(r, test_size=192)),
        )
    },
    # Fourteenth round: a minute of pretraining the ResNet on object crops, inside the same
    # minutes. Kept for Mask R-CNN, RetinaNet and YOLACT (their recipes' pretrain_seconds; YOLACT
    # skips it when it starts from a trained backbone): these undo it. SOLO gained nothing from
    # it: solo_pretrain adds it.
    "no_pretrain": Variant(recipe=lambda r: dataclasses.replace(r, pretrain_seconds=None)),
    "retinanet_no_pretrain": Variant(
        recipe=lambda r: dataclasses.replace(r, pretrain_seconds=None), family="retinanet"
    ),
    "yolact_no_pretrain": Variant(
        recipe=lambda r: dataclasses.replace(r, pretrain_seconds=None), family="yolact"
    ),
    "solo_pretrain": Variant(
        recipe=lambda r: dataclasses.replace(r, pretrain_seconds=60.0), family="solo"
    ),
    # Sixteenth round: scale jitter for RetinaNet (Recipe.ratio_range: each training image
    # resized by a ratio from the range, then cut to at most 128 px). Not kept: box AP50 the same
    # within its spread, APm higher, wrong-class boxes on the medium shapes no fewer.
    **{
        f"retinanet_scale_jitter_{low}_{high}": Variant(
            recipe=lambda r, rr=(low, high): dataclasses.replace(r, ratio_range=rr),
            family="retinanet",
        )
        for low, high in ((0.75, 1.5), (1.0, 2.0))
    },
    # Eighteenth round: the same for Mask R-CNN, whose medium shapes score lowest at 192 px. Not
    # kept: at 540 steps (0.75, 1.5) gave 0.519 / 0.494 box / mask AP50 against 0.514 / 0.498,
    # (1.0, 2.0) 0.471 / 0.431; APm +0.02-0.05.
    **{
        f"mask_rcnn_scale_jitter_{low}_{high}": Variant(
            recipe=lambda r, rr=(low, high): dataclasses.replace(r, ratio_range=rr),
        )
        for low, high in ((0.75, 1.5), (1.0, 2.0))
    },
    # The same round: the focal loss weighed 2, and at gamma 1 / alpha 0.5 (+0.02 and +0.045 box
    # AP50 over two seeds, each run as many steps as its minutes held). The seventeenth round ran
    # gamma 1 for the same 2400 steps as the recipe (--steps): 0.521 against 0.513, no gain.
    "retinanet_focal_weight_2": Variant(
        lambda c: _bbox_head(
            c, loss_cls=dataclasses.replace(c.bbox_head.loss_cls, loss_weight=2.0)
        ),
        family="retinanet",
    ),
    "retinanet_focal_gamma_1": Variant(
        lambda c: _bbox_head(
            c, loss_cls=dataclasses.replace(c.bbox_head.loss_cls, gamma=1.0, alpha=0.5)
        ),
        family="retinanet",
    ),
    # Seventeenth round: RetinaNet names a shape right less often than the crop classifier it
    # starts from (70 % after its minute); two minutes of that pretraining instead of one, inside
    # the same budget: 79 % of the crops named right, then 1540 steps instead of about 2000, box
    # AP50 0.453 against 0.476. Not kept.
    "retinanet_pretrain_120": Variant(
        recipe=lambda r: dataclasses.replace(r, pretrain_seconds=120.0), family="retinanet"
    ),
    # SOLO's category branch learns slowest of its parts (loss_cate 0.53 -> 0.37 in the
    # thirteenth round): since this round SOLO_R18_CPU's focal loss is at gamma 1 / alpha 0.5
    # (mask AP50 +0.03 over two seeds at 1200 steps); this variant gives it the paper's back.
    "solo_cate_focal_paper": Variant(
        lambda c: _bbox_head(
            c, loss_cate=dataclasses.replace(c.bbox_head.loss_cate, gamma=2.0, alpha=0.25)
        ),
        family="solo",
    ),
    # Nineteenth round: notebooks 07 and 08 start SOLO (ResNet and FPN) and YOLACT (ResNet) from
    # notebook 06's trained Mask R-CNN. Frozen (Recipe.freeze_backbone), a loaded part needs no
    # backward pass and no update: cheaper steps, so the same minutes hold more of them for the
    # heads. Kept for SOLO then (box / mask AP50 +0.03 over two seeds, 1000 training images;
    # fine-tuning again since the thirtieth round): "solo_frozen" freezes the loaded backbone,
    # "solo_frozen_resnet" the ResNet only. YOLACT's ResNet feeds an FPN that starts from random
    # weights: frozen it lost 0.1 mask AP50 ("yolact_freeze_backbone"). With only the heads
    # learning, a higher rate: lr 4e-3 instead of 2e-3, +0.02 box and mask AP50 over two seeds
    # (0.331 / 0.280 -> 0.337 / 0.300, 0.315 / 0.275 -> 0.348 / 0.299). Kept, also fine-tuning;
    # this variant gives the rate before back.
    "solo_lr_2e-3": Variant(recipe=lambda r: dataclasses.replace(r, lr=2e-3), family="solo"),
    "solo_frozen": Variant(
        recipe=lambda r: dataclasses.replace(r, freeze_backbone=True), family="solo"
    ),
    "solo_frozen_resnet": Variant(
        lambda c: dataclasses.replace(
            c, backbone=dataclasses.replace(c.backbone, frozen_stages=4, norm_eval=True)
        ),
        recipe=lambda r: dataclasses.replace(r, freeze_backbone=False),
        family="solo",
    ),
    # YOLACT's first stages only (the stem and stage 1, or stages 1-2: the costly high-resolution
    # ones), BatchNorm statistics kept (MMDetection's frozen_stages with norm_eval). Stages 1-2:
    # 0.462 / 0.370 box / mask AP50 against 0.515 / 0.410 in 1.2 times the steps; not kept.
    **{
        f"yolact_frozen_stages_{k}": Variant(
            lambda c, k=k: dataclasses.replace(
                c, backbone=dataclasses.replace(c.backbone, frozen_stages=k, norm_eval=True)
            ),
            family="yolact",
        )
        for k in (1, 2)
    },
    "yolact_freeze_backbone": Variant(
        recipe=lambda r: dataclasses.replace(r, freeze_backbone=True), family="yolact"
    ),
    # Twenty-ninth round: YOLACT named about half of the medium shapes right (wrong-class boxes:
    # circle/ellipse, rectangle/triangle, star/cross). Kept: the paper's semantic segmentation
    # loss on P3 (Sec. 5; YOLACT_R18_CPU's with_seg_branch), and 3000 training images instead of
    # 1000 (every CPU recipe's num_train since the thirtieth round: YOLACT's training loss_cls had
    # fallen to 0.23 after 27 passes over 1000 images). These undo them, or draw 8000 images. Not
    # kept: a second shared head conv, the class loss weighed 2 (RESULTS, twenty-ninth round).
    "yolact_no_seg_branch": Variant(
        lambda c: dataclasses.replace(
            c, mask_head=dataclasses.replace(c.mask_head, with_seg_branch=False)
        ),
        family="yolact",
    ),
    **{
        # Mask R-CNN's variants came first and carry no family prefix
        f"{'' if family == 'mask_rcnn' else family + '_'}num_train_{n}": Variant(
            recipe=lambda r, n=n: dataclasses.replace(r, num_train=n), family=family
        )
        for family in FAMILIES
        for n in (1000, 8000)
    },
    # Thirtieth round: SOLO named about half of its medium shapes right. The paper's scale ranges
    # are for images of about 800 px; at 128 px they train every shape on the two finest levels
    # (grids 12 and 10). SOLO_R18_CPU's, a third as large, send the larger shapes to the coarser
    # grids, as the paper does at its size; with the loaded backbone learning again (the recipe
    # since this round) box / mask AP50 0.48 / 0.46 -> 0.55 / 0.51, frozen 0.45 / 0.41 -> 0.42 /
    # 0.37 (seed 0). These give the paper's ranges back, fine-tuned or frozen (the recipe before).
    **{
        f"solo{frozen}_paper_scale_ranges": Variant(
            lambda c: _bbox_head(c, scale_ranges=SOLOHeadConfig().scale_ranges),
            recipe=lambda r, frozen=frozen: dataclasses.replace(r, freeze_backbone=bool(frozen)),
            family="solo",
        )
        for frozen in ("", "_frozen")
    },
    "yolact_head_convs_2": Variant(lambda c: _bbox_head(c, num_head_convs=2), family="yolact"),
    "yolact_loss_cls_2": Variant(
        lambda c: _bbox_head(
            c, loss_cls=dataclasses.replace(c.bbox_head.loss_cls, loss_weight=2.0)
        ),
        family="yolact",
    ),
}


class EMA:
    """A callback keeping ``ema`` = an exponential moving average of the model's weights and
    buffers, with the usual warm-up ``decay_t = min(decay, (1 + t) / (10 + t))``."""

    def __init__(self, model, decay: float):
        self.decay, self.updates = decay, 0
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def on_step(self, state):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, now in zip(self.ema.state_dict().values(), state.model.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(now.detach(), alpha=1 - d)
            else:
                avg.copy_(now)


def build(variant: Variant, r, num_classes: int = 7):
    """The variant's freshly initialised model."""
    return variant.model(build_model(r.family, variant.config(r.model_config(num_classes))))


def run(
    name: str,
    seconds: float,
    data: str,
    loading_overhead: float = 1.08,
    seed: int = 0,
    steps: int | None = None,
    backbone_from: str | None = None,
    pretrain_seconds: float | None = None,
    bf16: bool | None = None,
    **sizes,
) -> dict:
    """Train variant ``name`` for about ``seconds`` (or exactly ``steps`` steps) and score it;
    returns the JSON record. ``seed`` sets the initial weights and the data order;
    ``backbone_from``: a checkpoint whose backbone the model starts from
    (:func:`~instseg_edu.engine.checkpoint.load_backbone`), which replaces the recipe's
    pretraining; ``pretrain_seconds``: the pretraining on object crops instead of the recipe's
    (0: none; it counts in ``seconds``);
    ``bf16``: train under bf16 autocast on a CPU with bf16 instructions
    (:attr:`~instseg_edu.engine.train.TrainConfig.cpu_amp`; float32 elsewhere), ``False``: in
    float32, ``None``: as the recipe does (:attr:`~instseg_edu.recipes.Recipe.cpu_amp`);
    ``sizes`` (``num_train``, ``num_val``, ``image_size``) shrink the data for a smoke run."""
    from instseg_edu.engine.train import make_loader, train

    variant = VARIANTS[name]
    r = variant.recipe(dataclasses.replace(recipe(variant.family, "cpu"), **sizes))
    if pretrain_seconds is not None:
        r = dataclasses.replace(r, pretrain_seconds=pretrain_seconds or None)
    elif backbone_from is not None:  # a trained backbone replaces the pretraining, as in the demo
        r = dataclasses.replace(r, pretrain_seconds=None)
    precision = {"cpu_amp": r.cpu_amp if bf16 is None else bf16}
    trains_bf16 = precision["cpu_amp"] and cpu_has_native_bf16()  # asked for, and possible
    train_set, val_set = r.shapes_datasets(data)
    # + drawing and augmenting batches
    if steps is None:
        torch.manual_seed(1)
        timed = build(variant, r)
        if backbone_from is not None:  # as it will train: frozen with a freeze_backbone recipe
            load_backbone(timed, backbone_from, freeze=r.freeze_backbone)
        step_s = measure_step_seconds(r, 5, "cpu", model=timed, **precision) * loading_overhead
        steps = max(1, int((seconds - (r.pretrain_seconds or 0)) / step_s))
    torch.manual_seed(seed)
    model = build(variant, r)
    if backbone_from is not None:  # transfer learning: the donor's ResNet (and same-neck FPN)
        loaded = load_backbone(model, backbone_from, freeze=r.freeze_backbone)
        print(describe_backbone_load(loaded, backbone_from, frozen=r.freeze_backbone))
    pretraining = None
    if r.pretrain_seconds:  # the ResNet as a classifier of object crops first
        pretraining = pretrain_backbone(model, train_set, r.pretrain_seconds, val_set,
                                        device="cpu", seed=seed)  # fmt: skip
        print(pretraining.describe())
    ema = EMA(model, variant.ema_decay) if variant.ema_decay else None
    loader = make_loader(train_set, r.batch_size, shuffle=True, seed=seed,
                         drop_last=len(train_set) > r.batch_size)  # fmt: skip
    start = time.perf_counter()
    history = train(
        model,
        loader,
        r.train_config(max_steps=steps, device="cpu", progress=False, seed=seed, **precision),
        callbacks=[ema] if ema else [],
    )
    train_s = time.perf_counter() - start
    record = {"variant": name, "family": r.family, "seed": seed, "steps": steps,
              "bf16": trains_bf16,
              "batch_size": r.batch_size, "train_s": round(train_s, 1),
              "backbone_from": backbone_from, "pretrain_s": r.pretrain_seconds,
              "crop_accuracy": pretraining and round(pretraining.accuracy, 3)}  # fmt: skip
    for prefix, scored in [("", model)] + ([("ema_", ema.ema)] if ema else []):
        record.update(_scores(scored, r, val_set, prefix))
    record["last_loss"] = round(history.steps[-1]["loss"], 3)
    for key in ("loss_cls", "acc", "loss_mask"):  # the mean of each 100 steps
        values = [s[key] for s in history.steps if key in s]
        record[f"{key}_per_100"] = [
            round(sum(values[i : i + 100]) / len(values[i : i + 100]), 3)
            for i in range(0, len(values), 100)
        ]
    record["threads"] = torch.get_num_threads()
    return record


def _scores(model, r, val_set, prefix: str = "") -> dict:
    """Box (and mask) AP50 and AP at the recipe's test size, then as the notebooks' galleries
    score it: each of ``Recipe.test_sizes`` for its own boxes (one size: that pass alone), the
    merge's AP and, at its best box F1, the share of drawn boxes that are right and of shapes
    found, for all, small and medium shapes. One prediction pass per test size; every key starts
    with ``prefix``."""
    from instseg_edu.data.coco import CocoDataset
    from instseg_edu.data.transforms import eval_transforms
    from instseg_edu.engine.analysis import match_coco, score_sweep
    from instseg_edu.engine.evaluate import predict_at_sizes

    at_sizes = [val_set] + [  # the same images at each further test size
        CocoDataset(val_set.ann_file, val_set.images_dir, eval_transforms(size))
        for size in r.merge_test_sizes
    ]
    merged, image_ids, per_size = predict_at_sizes(
        model, at_sizes, r.size_cuts, val_set.label_to_cat_id, "cpu", batch_size=8
    )
    kinds = ("bbox",) if r.family == "retinanet" else ("bbox", "segm")  # RetinaNet: boxes only
    record = {}
    for name, results in (("", per_size[0]), ("merged_", merged)):
        matches = {t: match_coco(val_set.coco, results, t, image_ids=image_ids) for t in kinds}
        for kind, key in zip(kinds, ("box", "mask")):
            for ap in ("AP50", "AP"):
                record[f"{prefix}{name}{key}_{ap}"] = round(matches[kind].stats[ap], 3)
    thr, _, _, f1 = score_sweep(matches["bbox"]).best_f1()  # the merge's
    thr = thr if f1 > 0 else 0.3  # nothing right yet (a smoke run)
    record[f"{prefix}merged_best_f1_thr"] = round(thr, 3)
    for area in ("all", "small", "medium"):
        right, found = score_sweep(matches["bbox"], area=area).at(thr)
        record[f"{prefix}merged_{area}_right_found"] = [round(right, 3), round(found, 3)]
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--seconds", type=float, default=300.0, help="training budget per run")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps instead (steps in proportion to "
                        "each variant's measured speed: the timing noise of a busy hour stays "
                        "out of the step counts)")  # fmt: skip
    parser.add_argument("--data", default="data/shapes/128px-1000-200", help="shapes root")
    parser.add_argument("--num-train", type=int, default=None, help="(smoke runs) fewer images")
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    parser.add_argument("--json", default=None, help="append one JSON line per run here")
    parser.add_argument("--backbone-from", default=None, metavar="CHECKPOINT",
                        help="start each model's backbone from this checkpoint's (e.g. the Mask "
                        "R-CNN demo's last.pt, as notebooks 07 and 08 start from notebook "
                        "06's)")  # fmt: skip
    parser.add_argument("--pretrain-seconds", type=float, default=None,
                        help="pretrain the ResNet on object crops this long (default: the "
                        "recipe's; 0: none)")  # fmt: skip
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", default=None,
                           help="bf16 autocast on a CPU with bf16 instructions (the cpu "
                           "recipes' default: Recipe.cpu_amp)")  # fmt: skip
    precision.add_argument("--fp32", dest="bf16", action="store_false",
                           help="float32, also on a CPU with bf16 instructions")  # fmt: skip
    parser.set_defaults(bf16=None)  # neither: as the recipe
    args = parser.parse_args(argv)
    sizes = {key: getattr(args, key) for key in ("num_train", "num_val", "image_size")}
    sizes = {key: value for key, value in sizes.items() if value is not None}
    for name in args.variants:
        record = run(name, args.seconds, args.data, seed=args.seed, steps=args.steps,
                     backbone_from=args.backbone_from, pretrain_seconds=args.pretrain_seconds,
                     bf16=args.bf16, **sizes)  # fmt: skip
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
