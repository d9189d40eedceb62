"""The public names the design promises stay importable, and renamed ones keep their former name.

``DESIGN_NAMES`` are the names of the design's "Core ops" section and the model entry points;
``FORMER_NAMES`` map each name that moved or was renamed by the shared configuration vocabulary to
where it is now (the former name must be the very same object).
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

DESIGN_NAMES = {
    "instseg_edu": ["Batch", "Detections", "Target"],
    "instseg_edu.ops.boxes": [
        "box_iou",
        "box_iof",
        "box_xyxy_to_cxcywh",
        "box_cxcywh_to_xyxy",
        "clip_boxes",
    ],
    "instseg_edu.ops.anchors": ["AnchorGenerator"],
    "instseg_edu.ops.assign": [
        "max_iou_assign",
        "Assignment",
        "NEGATIVE",
        "IGNORED",
        "POSITIVE",
        "LOW_QUALITY_POSITIVE",
    ],
    "instseg_edu.ops.coder": ["DeltaXYWHBBoxCoder"],
    "instseg_edu.ops.sampling": ["random_sample"],
    "instseg_edu.losses": ["sigmoid_focal_loss", "dice_loss", "smooth_l1_loss", "l1_loss"],
    "instseg_edu.ops.roi": [
        "roi_pool_reference",
        "roi_align_reference",
        "roi_pool_cells",
        "roi_align_sampling_points",
    ],
    "instseg_edu.ops.nms": ["fast_nms", "matrix_nms", "points_nms", "mask_nms"],
    "instseg_edu.data.shapes": ["make_shapes_dataset"],
    "instseg_edu.data.coco": ["CocoDataset"],
    "instseg_edu.engine.evaluate": ["evaluate_coco", "detections_to_coco"],
    "instseg_edu.models.retinanet": ["build_retinanet", "RETINANET_R50_FPN", "RetinaNetConfig"],
    "instseg_edu.models.mask_rcnn": ["build_mask_rcnn", "MASK_RCNN_R50_FPN", "MaskRCNNConfig"],
    "instseg_edu.models.solo": ["build_solo", "SOLO_R50_FPN", "SOLOConfig"],
    "instseg_edu.models.yolact": ["build_yolact", "YOLACT_R50_FPN", "YOLACTConfig"],
}

# former place -> (name there, where it lives now)
FORMER_NAMES = {
    ("instseg_edu.models.retinanet", "AnchorGeneratorConfig"): "instseg_edu.ops.anchors",
    ("instseg_edu.models.retinanet", "MaxIoUAssignerConfig"): "instseg_edu.ops.assign",
    ("instseg_edu.models.retinanet", "FocalLossConfig"): "instseg_edu.losses",
    ("instseg_edu.models.retinanet", "L1LossConfig"): "instseg_edu.losses",
    ("instseg_edu.models.retinanet", "to_B_HWA_K"): "instseg_edu.models.dense_heads",
    (
        "instseg_edu.models.retinanet",
        "RETINANET_R18_CPU_DEMO",
    ): "instseg_edu.models.configs.retinanet",
    ("instseg_edu.models.retinanet", "RETINANET_R18_CPU"): "instseg_edu.models.configs.retinanet",
    ("instseg_edu.models.solo", "SOLO_R18_CPU"): "instseg_edu.models.configs.solo",
    ("instseg_edu.models.yolact", "YOLACT_R18_CPU"): "instseg_edu.models.configs.yolact",
    ("instseg_edu.models.mask_rcnn", "SamplerConfig"): "instseg_edu.ops.sampling",
    ("instseg_edu.models.mask_rcnn", "ProposalConfig"): "instseg_edu.models.configs.mask_rcnn",
    ("instseg_edu.models.mask_rcnn", "RPNHead"): "instseg_edu.models.rpn",
    ("instseg_edu.models.mask_rcnn", "Proposals"): "instseg_edu.models.rpn",
    ("instseg_edu.models.mask_rcnn", "RPNTargets"): "instseg_edu.models.rpn",
    ("instseg_edu.models.solo", "FocalLossConfig"): "instseg_edu.losses",
    ("instseg_edu.models.solo", "DiceLossConfig"): "instseg_edu.losses",
    ("instseg_edu.models.solo", "BACKGROUND"): "instseg_edu.structures",
    ("instseg_edu.models.solo", "MIN_MASK_AREA"): "instseg_edu.ops.grid_assign",
    ("instseg_edu.models.solo", "SOLOImageTargets"): "instseg_edu.ops.grid_assign",
    ("instseg_edu.models.solo", "center_region"): "instseg_edu.ops.grid_assign",
    ("instseg_edu.models.solo", "solo_target_single"): "instseg_edu.ops.grid_assign",
    ("instseg_edu.models.solo", "center_of_mass"): "instseg_edu.ops.masks",
    ("instseg_edu.models.solo", "resize_masks"): "instseg_edu.ops.masks",
    ("instseg_edu.models.solo", "masks_to_boxes"): "instseg_edu.ops.masks",
    ("instseg_edu.models.solo", "split_strides"): "instseg_edu.models.configs.solo",
    ("instseg_edu.models.yolact", "crop_masks"): "instseg_edu.ops.masks",
    ("instseg_edu.models.yolact", "ohem_negatives"): "instseg_edu.ops.sampling",
    ("instseg_edu.models.yolact", "YOLACTHeadConfig"): "instseg_edu.models.configs.yolact",
}

# renamed: (module, former name) -> the object's name now
ALIASES = {
    ("instseg_edu.models.retinanet", "BBoxCoderConfig"):
        ("instseg_edu.ops.coder", "DeltaXYWHBBoxCoder"),
    ("instseg_edu.models.mask_rcnn", "AnchorConfig"):
        ("instseg_edu.ops.anchors", "AnchorGeneratorConfig"),
    ("instseg_edu.models.mask_rcnn", "AssignerConfig"):
        ("instseg_edu.ops.assign", "MaxIoUAssignerConfig"),
}  # fmt: skip


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, ns in DESIGN_NAMES.items() for n in ns])
def test_design_name_is_importable(module, name):
    assert getattr(importlib.import_module(module), name) is not None


@pytest.mark.parametrize(("former", "module"), FORMER_NAMES.items())
def test_moved_name_is_the_same_object_at_its_former_place(former, module):
    old_module, name = former
    old = getattr(importlib.import_module(old_module), name)
    assert old is getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("former", "now"), ALIASES.items())
def test_renamed_config_keeps_its_former_name(former, now):
    old = getattr(importlib.import_module(former[0]), former[1])
    assert old is getattr(importlib.import_module(now[0]), now[1])


def test_design_signatures():
    from instseg_edu.ops.anchors import AnchorGenerator
    from instseg_edu.ops.assign import max_iou_assign
    from instseg_edu.ops.coder import DeltaXYWHBBoxCoder
    from instseg_edu.ops.sampling import random_sample

    gen = inspect.signature(AnchorGenerator)
    assert list(gen.parameters) == [
        "strides", "ratios", "octave_base_scale", "scales_per_octave", "scales", "base_sizes",
        "center_offset", "legacy",
    ]  # fmt: skip
    assign = inspect.signature(max_iou_assign).parameters
    for key in ("pos_iou_thr", "neg_iou_thr", "min_pos_iou", "match_low_quality",
                "gt_max_assign_all", "ignore_iof_thr", "gt_boxes_ignore"):  # fmt: skip
        assert assign[key].kind is inspect.Parameter.KEYWORD_ONLY, key
    assert list(inspect.signature(random_sample).parameters) == [
        "assignment", "num", "pos_fraction", "neg_pos_ub", "generator",
    ]  # fmt: skip
    assert list(inspect.signature(DeltaXYWHBBoxCoder.decode).parameters) == [
        "self", "boxes", "deltas", "max_shape", "wh_ratio_clip",
    ]  # fmt: skip


def test_read_only_aliases_of_renamed_fields():
    """``gt_inds`` (former name of ``gt_index``), ``pad_shape`` (of ``input_size``) and
    ``valid_flags(pad_shape=...)`` (of ``image_size``) still read."""
    from instseg_edu.models.mask_rcnn import MaskRCNNOutputs
    from instseg_edu.ops.anchors import AnchorGenerator
    from instseg_edu.ops.assign import IGNORED, NEGATIVE, POSITIVE, Assignment

    a = Assignment(
        gt_index=torch.tensor([1, -1, -1]),
        max_iou=torch.zeros(3),
        labels=torch.tensor([4, -1, -1]),
        reason=torch.tensor([POSITIVE, NEGATIVE, IGNORED], dtype=torch.uint8),
    )
    assert a.gt_inds.tolist() == [2, 0, -1]  # MMDetection: 1-based, 0 negative, -1 ignored
    assert torch.equal(Assignment.from_gt_inds(a.gt_inds, *a[1:]).gt_index, a.gt_index)
    out = MaskRCNNOutputs((), torch.zeros(1, 0), torch.zeros(1, 0, 4), torch.zeros(0, 4),
                          torch.zeros(0, dtype=torch.long), (64, 96))  # fmt: skip
    assert out.pad_shape == out.input_size == (64, 96)
    gen = AnchorGenerator(strides=(16,), ratios=(1.0,), scales=(2.0,))
    by_new = gen.valid_flags([(4, 6)], image_size=(40, 64))
    by_old = gen.valid_flags([(4, 6)], pad_shape=(40, 64))
    assert torch.equal(by_new[0], by_old[0]) and int(by_new[0].sum()) == 3 * 4
