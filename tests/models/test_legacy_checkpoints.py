"""Checkpoints and config dicts written before the shared configuration vocabulary still load.

``data/legacy/`` was written by the code of commit ``a57be31`` (before the family configs were
rebuilt from shared pieces):

- ``legacy_<family>.pt``: a checkpoint as ``instseg-edu train`` writes it (``meta.model``,
  ``meta.model_config`` with that code's key names, the model's state dict — stored in float16 to
  keep the files small — and a sample of the model's forward outputs on the image
  :func:`_image` in ``test_outputs``). Every config value differs from the defaults, so a key that
  is read wrongly changes the rebuilt config or the outputs.
- ``legacy_presets.json``: ``config_to_dict`` of every preset of the four family modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instseg_edu import cli
from instseg_edu.engine.checkpoint import config_from_dict, load_checkpoint, load_model

DATA = Path(__file__).with_name("data") / "legacy"
FAMILIES = ("retinanet", "mask_rcnn", "solo", "yolact")


def _image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _outputs(family: str, model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outs = model(_image())
    if family == "solo":
        return {"mask_logits_0": outs.mask_logits[0], "cate_logits_0": outs.cate_logits[0]}
    found = {
        k: v
        for k, v in outs._asdict().items()
        if isinstance(v, torch.Tensor) and k not in ("anchors", "anchor_levels")
    }
    if family == "mask_rcnn":
        found["features_0"] = outs.features[0]
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_old_checkpoint_rebuilds_the_same_model(family):
    path = DATA / f"legacy_{family}.pt"
    model, meta = load_model(path)
    expected = load_checkpoint(path)["test_outputs"]
    got = _outputs(family, model)
    assert set(got) == set(expected)
    for name, sample in expected.items():
        values = got[name].flatten()[:: max(1, got[name].numel() // 256)]
        torch.testing.assert_close(values, sample, rtol=1e-4, atol=1e-5, msg=name)
    assert meta["model"] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_old_preset_dicts_rebuild_today_s_presets(family):
    presets = json.loads((DATA / "legacy_presets.json").read_text())
    module = cli._family_module(family)
    config_cls = getattr(module, cli.FAMILIES[family][2])
    names = [k.split(".", 1)[1] for k in presets if k.startswith(family + ".")]
    assert names, family
    for name in names:
        rebuilt = config_from_dict(config_cls, presets[f"{family}.{name}"])
        assert rebuilt == getattr(module, name), name


def _expected_configs():
    """The legacy checkpoints' configs written with today's classes: every renamed key must land
    in its new place (a loss weight, unlike the outputs above, shows only here)."""
    from instseg_edu.losses import (
        CrossEntropyLossConfig,
        DiceLossConfig,
        FocalLossConfig,
        L1LossConfig,
        SmoothL1LossConfig,
    )
    from instseg_edu.models import mask_rcnn as M
    from instseg_edu.models import retinanet as R
    from instseg_edu.models import solo as S
    from instseg_edu.models import yolact as Y
    from instseg_edu.models.backbone import FPNConfig, ResNetConfig
    from instseg_edu.ops.anchors import AnchorGeneratorConfig
    from instseg_edu.ops.assign import MaxIoUAssignerConfig
    from instseg_edu.ops.coder import DeltaXYWHBBoxCoder
    from instseg_edu.ops.nms import NMSConfig
    from instseg_edu.ops.sampling import SamplerConfig

    bb = ResNetConfig(depth=18, num_stages=1, out_indices=(0,), frozen_stages=-1, norm_eval=False)
    return {
        "retinanet": R.RetinaNetConfig(
            backbone=bb,
            neck=FPNConfig(in_channels=(64,), out_channels=8, start_level=0, num_outs=3),
            bbox_head=R.RetinaHeadConfig(
                num_classes=2, in_channels=8, feat_channels=8, stacked_convs=1,
                anchor_generator=AnchorGeneratorConfig(
                    (4, 8, 16), (0.5, 1.0), octave_base_scale=3.0, scales_per_octave=2,
                    center_offset=0.5,
                ),
                bbox_coder=DeltaXYWHBBoxCoder(target_stds=(0.5, 0.5, 1.0, 1.0)),
                loss_cls=FocalLossConfig(alpha=0.3, gamma=1.5, loss_weight=2.0),
                loss_bbox=L1LossConfig(loss_weight=0.5),
            ),
            train_cfg=R.RetinaTrainConfig(MaxIoUAssignerConfig(
                0.6, (0.1, 0.45), 0.2, gt_max_assign_all=False, ignore_iof_thr=0.6
            )),
            test_cfg=R.RetinaTestConfig(300, 1.0, 0.1, NMSConfig(0.45), 20),
        ),
        "mask_rcnn": M.MaskRCNNConfig(
            num_classes=2,
            backbone=bb,
            neck=FPNConfig(in_channels=(64,), out_channels=8, start_level=0, num_outs=3,
                           add_extra_convs=False),
            rpn_head=M.RPNHeadConfig(
                feat_channels=8,
                anchor_generator=AnchorGeneratorConfig(
                    (4, 8, 16), (1.0, 2.0), scales=(4.0, 8.0), center_offset=0.5
                ),
                bbox_coder=DeltaXYWHBBoxCoder(target_stds=(1.0, 1.0, 0.5, 0.5)),
            ),
            roi_head=M.RoIHeadConfig(
                featmap_strides=(4, 8), finest_scale=40.0, bbox_roi_size=4, mask_roi_size=6,
                sampling_ratio=2, fc_out_channels=16,
                bbox_coder=DeltaXYWHBBoxCoder(target_stds=(0.2, 0.2, 0.3, 0.3)),
                num_convs=1, conv_out_channels=8,
            ),
            train_cfg=M.TrainCfg(
                rpn=M.RPNTrainConfig(
                    MaxIoUAssignerConfig(0.65, 0.25, 0.2, ignore_iof_thr=0.5),
                    SamplerConfig(64, 0.4, neg_pos_ub=3),
                ),
                rpn_proposal=M.ProposalConfig(200, 100, NMSConfig(0.6), 1.0),
                rcnn=M.RCNNTrainConfig(
                    MaxIoUAssignerConfig(0.55, 0.45, 0.45, match_low_quality=False),
                    SamplerConfig(32, 0.3, add_gt_as_proposals=True),
                    mask_size=12,
                ),
            ),
            test_cfg=M.TestCfg(
                rpn=M.ProposalConfig(150, 60, NMSConfig(0.65)),
                rcnn=M.RCNNTestConfig(0.1, NMSConfig(0.4), 30, 0.45),
            ),
        ),
        "solo": S.SOLOConfig(
            backbone=bb,
            neck=FPNConfig(in_channels=(64,), out_channels=8, start_level=0, num_outs=3,
                           add_extra_convs=False),
            bbox_head=S.SOLOHeadConfig(
                num_classes=2, in_channels=8, stacked_convs=2, feat_channels=8,
                strides=(8, 8, 8), scale_ranges=((1, 32), (16, 64), (32, 128)), sigma=0.3,
                num_grids=(8, 6, 4), cate_down_pos=1, norm_num_groups=4, prior_prob=0.02,
                loss_ins=DiceLossConfig(loss_weight=2.5),
                loss_cate=FocalLossConfig(alpha=0.3, gamma=1.5, loss_weight=1.5),
            ),
            test_cfg=S.SOLOTestConfig(100, 0.2, 0.4, 0.1, "linear", 1.5, 20),
        ),
        "yolact": Y.YOLACTConfig(
            backbone=bb,
            neck=FPNConfig(in_channels=(64,), out_channels=8, start_level=0, num_outs=3),
            bbox_head=Y.YOLACTHeadConfig(
                num_classes=2, in_channels=8, feat_channels=8, num_head_convs=1, num_protos=4,
                anchor_generator=AnchorGeneratorConfig(
                    (4, 8, 16), octave_base_scale=2.0, scales_per_octave=1, center_offset=0.5
                ),
                bbox_coder=DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2)),
                loss_cls=CrossEntropyLossConfig(loss_weight=1.2),
                loss_bbox=SmoothL1LossConfig(beta=0.5, loss_weight=1.4),
            ),
            mask_head=Y.YOLACTProtonetConfig(
                in_channels=8, proto_channels=(8, None, 4), proto_kernel_sizes=(3, -2, 1),
                num_protos=4, max_masks_to_train=30, loss_mask_weight=5.0, with_seg_branch=True,
                loss_segm=CrossEntropyLossConfig(loss_weight=0.5),
            ),
            train_cfg=Y.YOLACTTrainConfig(
                MaxIoUAssignerConfig(0.55, 0.35, 0.1, gt_max_assign_all=False), neg_pos_ratio=4
            ),
            test_cfg=Y.YOLACTTestConfig(200, 0.1, 0.45, 50, 20, 0.4),
        ),
    }  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_old_keys_land_in_their_new_places(family):
    meta = load_checkpoint(DATA / f"legacy_{family}.pt")["meta"]
    config_cls = getattr(cli._family_module(family), cli.FAMILIES[family][2])
    assert config_from_dict(config_cls, meta["model_config"]) == _expected_configs()[family]
