from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

from instseg_edu.engine.checkpoint import (
    CheckpointError,
    config_from_dict,
    config_to_dict,
    load_checkpoint,
    load_model,
    save_checkpoint,
)


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "step": 7, "cfg": {"lr": 0.1},
             "rng": [3, [1, 2, 3], None], "name": "retinanet"}  # fmt: skip
    path = save_checkpoint(tmp_path / "sub" / "last.pt", state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["step"] == 7 and loaded["cfg"] == {"lr": 0.1} and loaded["name"] == "retinanet"
    assert os.listdir(tmp_path / "sub") == ["last.pt"]  # no temporary files left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1})
    with pytest.raises(Exception):  # noqa: B017  lambdas cannot be pickled
        save_checkpoint(path, {"step": 2, "bad": lambda: None})
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    # Truncated: a valid checkpoint cut in half.
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.zeros(1000)})
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.pt")


class _Custom:
    pass


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    torch.save({"obj": _Custom()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "unsafe.pt")


@dataclass(frozen=True)
class _Inner:
    depth: int = 50
    out_indices: tuple[int, ...] = (0, 1, 2, 3)


@dataclass(frozen=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    maybe: _Inner | None = None
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    ranges: tuple[tuple[int, int], ...] = ((0, 64), (32, 128))
    size: tuple[int, int] | None = None
    name: str = "x"


def test_config_round_trip_nested_dataclasses_and_tuples():
    cfg = _Outer(inner=_Inner(18, (1, 2)), maybe=_Inner(34), ranges=((1, 2),), size=(3, 4))
    d = config_to_dict(cfg)
    assert d["inner"] == {"depth": 18, "out_indices": [1, 2]}  # JSON-ready lists
    again = config_from_dict(_Outer, d)
    assert again == cfg
    assert isinstance(again.ranges[0], tuple) and isinstance(again.size, tuple)
    assert config_from_dict(_Outer, {"name": "y"}) == _Outer(name="y")  # defaults fill in


def test_config_from_dict_survives_a_checkpoint(tmp_path):
    cfg = _Outer(maybe=_Inner(101))
    path = save_checkpoint(tmp_path / "c.pt", {"config": config_to_dict(cfg)})
    assert config_from_dict(_Outer, load_checkpoint(path)["config"]) == cfg


def test_config_from_dict_unknown_key():
    with pytest.raises(ValueError, match="no field"):
        config_from_dict(_Outer, {"inner": {"depht": 3}})


@dataclass(frozen=True)
class _Renamed:
    former_fields = {"old_depth": "inner.depth", "label": "name"}

    inner: _Inner = field(default_factory=_Inner)
    name: str = "x"


def test_config_from_dict_reads_former_field_names():
    old = {"old_depth": 50, "label": "y", "inner": {"out_indices": [3]}}
    assert config_from_dict(_Renamed, old) == _Renamed(inner=_Inner(50, (3,)), name="y")
    assert old == {"old_depth": 50, "label": "y", "inner": {"out_indices": [3]}}  # untouched
    with pytest.raises(ValueError, match="'label' and its new name 'name'"):
        config_from_dict(_Renamed, {"label": "y", "name": "z"})


def _tiny_retinanet_checkpoint(tmp_path, **meta_changes):
    """A RetinaNet of the smoke recipe for 3 classes, saved as ``instseg-edu train`` saves it."""
    from instseg_edu.models.retinanet import build_retinanet
    from instseg_edu.recipes import recipe

    torch.manual_seed(0)
    cfg = recipe("retinanet", "smoke").model_config(3)
    model = build_retinanet(cfg)
    meta = {"model": "retinanet", "preset": "RETINANET_R18_CPU_DEMO",
            "model_config": config_to_dict(cfg), "classes": ["a", "b", "c"],
            "label_to_cat_id": [1, 2, 5], "image_size": 64, **meta_changes}  # fmt: skip
    path = save_checkpoint(tmp_path / "last.pt", {"model": model.state_dict(), "meta": meta})
    return path, model


def test_load_model_rebuilds_the_saved_model(tmp_path):
    path, model = _tiny_retinanet_checkpoint(tmp_path)
    rebuilt, meta = load_model(path)
    assert type(rebuilt) is type(model) and rebuilt.cfg == model.cfg
    assert not rebuilt.training  # ready to predict
    assert meta["classes"] == ["a", "b", "c"] and meta["label_to_cat_id"] == [1, 2, 5]
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    images = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images).cls_logits, model(images).cls_logits)


def test_load_model_names_what_is_wrong(tmp_path):
    save_checkpoint(tmp_path / "weights.pt", {"model": {}})
    with pytest.raises(CheckpointError, match="weights.pt has no model description"):
        load_model(tmp_path / "weights.pt")
    path, _ = _tiny_retinanet_checkpoint(tmp_path, model="detr")
    with pytest.raises(CheckpointError, match="no model description"):
        load_model(path)
    path, model = _tiny_retinanet_checkpoint(tmp_path)
    meta = load_checkpoint(path)["meta"]
    newer = {**meta, "model_config": {**meta["model_config"], "future_knob": 1}}
    save_checkpoint(path, {"model": model.state_dict(), "meta": newer})
    with pytest.raises(CheckpointError, match="cannot rebuild its retinanet model.*future_knob"):
        load_model(path)
    fewer_classes = {**meta, "model_config": {**meta["model_config"], "num_classes": 2}}
    save_checkpoint(path, {"model": model.state_dict(), "meta": fewer_classes})
    with pytest.raises(CheckpointError, match="cannot rebuild its retinanet model"):
        load_model(path)


def _backbone_donor(tmp_path):
    from instseg_edu.models import build_model
    from instseg_edu.models.mask_rcnn import MASK_RCNN_R18_CPU

    torch.manual_seed(0)
    donor = build_model("mask_rcnn", MASK_RCNN_R18_CPU.with_num_classes(3))
    path = save_checkpoint(tmp_path / "mask_rcnn.pt", {"model": donor.state_dict()})
    return path, donor.state_dict()


def test_load_backbone_copies_the_resnet_and_the_same_fpn_but_no_head(tmp_path):
    from instseg_edu.engine.checkpoint import load_backbone
    from instseg_edu.models import build_model
    from instseg_edu.models.solo import SOLO_R18_CPU
    from instseg_edu.models.yolact import YOLACT_R18_CPU

    path, donor = _backbone_donor(tmp_path)
    torch.manual_seed(1)
    solo = build_model("solo", SOLO_R18_CPU.with_num_classes(3))  # the same P2-P6 FPN
    before = {k: v.clone() for k, v in solo.state_dict().items()}
    loaded = load_backbone(solo, path)
    assert loaded == [k for k in before if k.startswith("backbone.")]
    assert any(k.startswith("backbone.fpn.") for k in loaded)
    for key, value in solo.state_dict().items():
        expected = donor[key] if key.startswith("backbone.") else before[key]
        assert torch.equal(value, expected), key
    yolact = build_model("yolact", YOLACT_R18_CPU.with_num_classes(3))  # P3-P7: another neck
    before = {k: v.clone() for k, v in yolact.state_dict().items()}
    loaded = load_backbone(yolact, path)
    assert loaded == [k for k in before if k.startswith("backbone.resnet.")]
    for key, value in yolact.state_dict().items():
        expected = donor[key] if key.startswith("backbone.resnet.") else before[key]
        assert torch.equal(value, expected), key


def test_load_backbone_names_what_does_not_fit(tmp_path):
    from instseg_edu.engine.checkpoint import load_backbone
    from instseg_edu.models import build_model
    from instseg_edu.models.solo import SOLO_R18_SMALL

    path, _ = _backbone_donor(tmp_path)
    full_width = build_model("solo", SOLO_R18_SMALL.with_num_classes(3))  # 64 stem channels
    before = {k: v.clone() for k, v in full_width.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"mask_rcnn.pt'.*its ResNet is not this model's "
                       r"\(backbone\.resnet\.conv1\.weight: \(32, 3, 7, 7\) in the checkpoint, "
                       r"\(64, 3, 7, 7\) here\)"):  # fmt: skip
        load_backbone(full_width, path)
    assert all(torch.equal(v, before[k]) for k, v in full_width.state_dict().items())
    save_checkpoint(tmp_path / "meta_only.pt", {"meta": {}})
    with pytest.raises(CheckpointError, match="meta_only.pt' holds no model weights"):
        load_backbone(full_width, tmp_path / "meta_only.pt")
    with pytest.raises(FileNotFoundError):
        load_backbone(full_width, tmp_path / "missing.pt")


def test_load_backbone_freeze_keeps_what_it_loaded_and_trains_only_the_rest(tmp_path):
    """``freeze=True``: the loaded ResNet (BatchNorm statistics too) and the loaded FPN do not
    change in a training step, even after ``model.train()``; the heads do. YOLACT's FPN, not
    loaded, still learns."""
    from instseg_edu.engine.checkpoint import describe_backbone_load, load_backbone
    from instseg_edu.engine.train import TrainConfig, train
    from instseg_edu.models import build_model
    from instseg_edu.models.solo import SOLO_R18_CPU
    from instseg_edu.models.yolact import YOLACT_R18_CPU
    from instseg_edu.recipes import shapes_batch

    path, donor = _backbone_donor(tmp_path)
    solo = build_model("solo", SOLO_R18_CPU.with_num_classes(7))  # the shapes' seven classes
    loaded = load_backbone(solo, path, freeze=True)
    assert {n for n, p in solo.named_parameters() if not p.requires_grad} == {
        n for n, _ in solo.named_parameters() if n.startswith("backbone.")
    }
    heads = {k: v.clone() for k, v in solo.state_dict().items() if not k.startswith("backbone.")}
    batch = shapes_batch(2, 64)
    cfg = TrainConfig(max_steps=2, lr=1e-2, optimizer="adamw", warmup_steps=0, device="cpu",
                      progress=False)  # fmt: skip
    train(solo.train(), [batch, batch], cfg)
    for key, value in solo.state_dict().items():
        if key.startswith("backbone."):  # weights and running statistics as loaded
            assert torch.equal(value, donor[key]), key
    assert any(not torch.equal(solo.state_dict()[k], v) for k, v in heads.items())
    assert not any(m.training for m in solo.backbone.resnet.modules())
    line = describe_backbone_load(loaded, path, frozen=True)
    assert line.endswith(f"from {path}, frozen (only the heads learn); the heads start from "
                         "random weights")  # fmt: skip

    yolact = build_model("yolact", YOLACT_R18_CPU.with_num_classes(3))
    load_backbone(yolact, path, freeze=True)
    assert not any(p.requires_grad for p in yolact.backbone.resnet.parameters())
    assert all(p.requires_grad for p in yolact.backbone.fpn.parameters())
