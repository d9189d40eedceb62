"""Tiers and recipes: which tier runs (environment and device), every family's recipe builds,
the notebook variant and its step override, where notebooks save their models, timing."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from instseg_edu import recipes
from instseg_edu.data.shapes import SHAPES_PER_IMAGE
from instseg_edu.engine.train import TrainConfig
from instseg_edu.recipes import (
    FAMILIES,
    NOTEBOOK_SMOKE_IMAGE_SIZE,
    RECIPES,
    SMOKE_ENV,
    STEPS_ENV,
    TIER_ENV,
    TIERS,
    Recipe,
    describe_tier,
    fit_to_minutes,
    measure_step_seconds,
    notebook_checkpoint,
    notebook_data_dir,
    notebook_recipe,
    recipe,
    save_notebook_model,
    select_tier,
    shapes_batch,
    slow_step_warning,
)


@pytest.fixture
def env(monkeypatch):
    """A clean environment: no tier variables, and CUDA as the test says."""
    for name in (TIER_ENV, SMOKE_ENV, STEPS_ENV):
        monkeypatch.delenv(name, raising=False)

    def set_cuda(available: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

    set_cuda(False)
    return monkeypatch, set_cuda


# ---- select_tier ---------------------------------------------------------------------------------


def test_tier_follows_the_device_without_variables(env):
    _, set_cuda = env
    assert select_tier() == "cpu"
    set_cuda(True)
    assert select_tier() == "gpu"


def test_smoke_variable_selects_smoke_on_any_device(env):
    monkeypatch, set_cuda = env
    monkeypatch.setenv(SMOKE_ENV, "1")
    assert select_tier() == "smoke"
    set_cuda(True)
    assert select_tier() == "smoke"
    monkeypatch.setenv(SMOKE_ENV, "0")  # only "1" means smoke
    assert select_tier() == "gpu"


@pytest.mark.parametrize("tier", TIERS, ids=lambda t: f"tier_{t}")  # an id "gpu" means CUDA-only
def test_tier_variable_wins_over_smoke_and_device(env, tier):
    monkeypatch, set_cuda = env
    monkeypatch.setenv(SMOKE_ENV, "1")
    monkeypatch.setenv(TIER_ENV, tier)
    set_cuda(tier != "gpu")  # the device would say otherwise
    assert select_tier() == tier


@pytest.mark.parametrize("value", ["GPU", "laptop", ""])
def test_unknown_tier_is_a_clear_error(env, value):
    monkeypatch, _ = env
    monkeypatch.setenv(TIER_ENV, value)
    with pytest.raises(ValueError, match=f"{TIER_ENV}={value!r} must be one of smoke, cpu, gpu"):
        select_tier()


# ---- recipes -------------------------------------------------------------------------------------


def test_every_family_has_every_tier():
    assert set(RECIPES) == {(f, t) for f in FAMILIES for t in TIERS}
    for (family, tier), r in RECIPES.items():
        assert (r.family, r.tier) == (family, tier)
        assert recipe(family, tier) is r


def test_cpu_tier_is_small_and_in_memory_and_gpu_tier_is_full_size():
    for family in FAMILIES:
        cpu, gpu, smoke = (recipe(family, t) for t in ("cpu", "gpu", "smoke"))
        assert cpu.image_size == 128 and cpu.in_memory and cpu.loader_workers == 0
        assert "R18" in cpu.model and "R50" in gpu.model
        assert gpu.image_size == 512
        # smoke takes the CPU tier's model and optimiser, at toy sizes
        assert (smoke.model, smoke.optimizer, smoke.lr) == (cpu.model, cpu.optimizer, cpu.lr)
        assert smoke.max_steps <= 3 and smoke.num_train <= 8 and smoke.image_size <= 64
    mask_rcnn = recipe("mask_rcnn", "cpu")
    assert (mask_rcnn.model, mask_rcnn.optimizer, mask_rcnn.lr) == (
        "MASK_RCNN_R18_CPU",
        "adamw",
        2e-3,
    )
    assert (mask_rcnn.max_steps, mask_rcnn.batch_size, mask_rcnn.color_jitter) == (540, 8, True)
    assert mask_rcnn.train_shapes_per_image == (10, 20)
    retinanet = recipe("retinanet", "cpu")
    assert (retinanet.model, retinanet.max_steps, retinanet.lr) == ("RETINANET_R18_CPU", 1800, 2e-3)
    # a minute of pretraining on object crops first: RetinaNet, Mask R-CNN and YOLACT (which
    # skips it when it starts from notebook 06's backbone; SOLO gained nothing from it); half a
    # second in the smoke tier, to run the code
    pretrain = {f: (recipe(f, "cpu").pretrain_seconds, recipe(f, "smoke").pretrain_seconds,
                    recipe(f, "gpu").pretrain_seconds) for f in FAMILIES}  # fmt: skip
    assert pretrain == {"retinanet": (60.0, 0.5, None), "mask_rcnn": (60.0, 0.5, None),
                        "solo": (None, None, None), "yolact": (60.0, 0.5, None)}  # fmt: skip
    assert (retinanet.image_size, retinanet.test_side, retinanet.train_shapes_per_image) == (
        128,
        192,
        (10, 20),
    )
    solo, yolact = recipe("solo", "cpu"), recipe("yolact", "cpu")
    assert (solo.model, solo.max_steps, solo.lr) == ("SOLO_R18_CPU", 1350, 4e-3)
    # from notebook 06's backbone both fine-tune it (RESULTS.md, thirtieth round)
    assert not solo.freeze_backbone and not yolact.freeze_backbone
    # SOLO's scale ranges a third of the paper's, fitted to 128 px images
    assert solo.model_config(7).bbox_head.scale_ranges[:3] == ((1, 32), (16, 64), (32, 128))
    assert solo.test_side == 128  # its grids were fitted at 128 px
    # its category branch's focal loss at gamma 1, alpha 0.5 (RESULTS.md, seventeenth round); the
    # full model keeps the paper's
    from instseg_edu.losses import FocalLossConfig
    from instseg_edu.models.solo import SOLO_R50_FPN

    assert solo.model_config(7).bbox_head.loss_cate == FocalLossConfig(alpha=0.5, gamma=1.0)
    assert SOLO_R50_FPN.bbox_head.loss_cate == FocalLossConfig(alpha=0.25, gamma=2.0)
    assert (yolact.model, yolact.max_steps, yolact.lr) == ("YOLACT_R18_CPU", 1170, 2e-3)
    # 3000 training images for every family, not 1000, and YOLACT's semantic segmentation loss
    # (RESULTS.md, twenty-ninth and thirtieth rounds)
    assert {recipe(family, "cpu").num_train for family in FAMILIES} == {3000}
    assert yolact.model_config(7).mask_head.with_seg_branch
    assert recipe("yolact", "smoke").num_train == 8  # the smoke tier stays seconds long
    # the protonet at a fifth of the rate (its last ReLU died at the full one): the key names
    # the protonet's parameters and nothing else
    assert yolact.lr_mult == {"mask_head": 0.2}
    model = yolact.build_model(7)
    named = {n for n, _ in model.named_parameters() if "mask_head" in n}
    assert named == {f"mask_head.{n}" for n, _ in model.mask_head.named_parameters()} != set()
    assert yolact.test_side == 192


def test_solo_and_yolact_cpu_presets_share_the_mask_rcnn_cpu_resnet():
    """Notebooks 07 and 08 start their backbone from notebook 06's Mask R-CNN: the ResNets must
    be one network (and SOLO's FPN, P2-P6, Mask R-CNN's)."""
    mask_rcnn = recipe("mask_rcnn", "cpu").model_config(7)
    solo, yolact = (recipe(f, "cpu").model_config(7) for f in ("solo", "yolact"))
    assert solo.backbone == yolact.backbone == mask_rcnn.backbone
    assert solo.neck == mask_rcnn.neck and yolact.neck != mask_rcnn.neck


def test_load_notebook_backbone_says_what_it_loaded_or_why_not(tmp_path):
    from instseg_edu.engine.checkpoint import save_checkpoint

    solo = recipe("solo", "smoke").build_model(7)
    line = recipes.load_notebook_backbone(solo, "mask_rcnn", "smoke", root=tmp_path)
    donor_path = tmp_path / "notebooks" / "smoke" / "mask_rcnn.pt"
    assert line == (f"backbone: random weights ({donor_path} not found: run the mask_rcnn "
                    "notebook in this tier first to start from its trained backbone)")  # fmt: skip
    torch.manual_seed(3)
    donor = recipe("mask_rcnn", "smoke").build_model(7)
    save_checkpoint(donor_path, {"model": donor.state_dict()})
    line = recipes.load_notebook_backbone(solo, "mask_rcnn", "smoke", root=tmp_path)
    assert line.startswith("backbone: ResNet (") and " and FPN (" in line
    assert line.endswith(f"from {donor_path}; the heads start from random weights")
    assert torch.equal(solo.backbone.resnet.conv1.weight, donor.backbone.resnet.conv1.weight)
    yolact = recipe("yolact", "smoke").build_model(7)
    line = recipes.load_notebook_backbone(yolact, "mask_rcnn", "smoke", root=tmp_path)
    assert line.endswith("; the FPN (built over other levels) and the heads start from random "
                         "weights")  # fmt: skip
    retinanet = recipe("retinanet", "smoke").build_model(7)  # four stages, but no P2: same ResNet
    assert "ResNet (" in recipes.load_notebook_backbone(retinanet, "mask_rcnn", "smoke", tmp_path)
    other = recipe("solo", "smoke").override(model="SOLO_R18_SMALL").build_model(7)
    line = recipes.load_notebook_backbone(other, "mask_rcnn", "smoke", root=tmp_path)
    assert line.startswith("backbone: random weights (")
    assert "its ResNet is not this model's" in line


def test_unknown_family_or_tier_names_the_choices():
    with pytest.raises(ValueError, match="family='fcos' must be one of retinanet, mask_rcnn"):
        recipe("fcos", "cpu")
    with pytest.raises(ValueError, match="tier='tpu' must be one of smoke, cpu, gpu"):
        recipe("solo", "tpu")
    with pytest.raises(ValueError, match="max_steps=0"):
        dataclasses.replace(recipe("solo", "cpu"), max_steps=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_recipe_builds_its_model_and_train_config(family):
    for tier in TIERS:
        r = recipe(family, tier)
        cfg = r.model_config(7)
        assert type(cfg).__name__.lower().startswith(family.replace("_", ""))
        tc = r.train_config(device="cpu", seed=3)
        assert isinstance(tc, TrainConfig)
        assert (tc.max_steps, tc.lr, tc.optimizer, tc.seed) == (r.max_steps, r.lr, r.optimizer, 3)
        assert tc.warmup_steps == min(r.warmup_steps, r.max_steps)
        assert r.train_config(max_steps=1).warmup_steps == 1  # warm-up fits a shortened run
        assert r.train_config(max_steps=1, warmup_steps=0).warmup_steps == 0
    model = recipe(family, "smoke").build_model(7)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert r.as_dict()["family"] == family


def test_notebook_recipe_draws_bigger_smoke_images_and_reads_the_steps_variable(env):
    monkeypatch, _ = env
    smoke = notebook_recipe("yolact", "smoke")
    assert smoke.image_size == NOTEBOOK_SMOKE_IMAGE_SIZE == 128
    assert dataclasses.replace(smoke, image_size=64) == recipe("yolact", "smoke")
    assert notebook_recipe("yolact", "cpu") == recipe("yolact", "cpu")
    monkeypatch.setenv(STEPS_ENV, "60")
    assert notebook_recipe("retinanet", "smoke").max_steps == 60
    cpu = recipe("retinanet", "cpu")
    assert notebook_recipe("retinanet", "cpu").expected_minutes == pytest.approx(
        1.0 + (cpu.expected_minutes - 1.0) * 60 / cpu.max_steps  # the pretraining's minute stays
    )
    assert notebook_recipe("retinanet", "gpu").max_steps == 60
    assert notebook_recipe("retinanet", "cpu", minutes=4.5).max_steps == 60  # the variable wins
    for bad in ("0", "-3", "ten", "2.5"):
        monkeypatch.setenv(STEPS_ENV, bad)
        with pytest.raises(ValueError, match=f"{STEPS_ENV}={bad!r} must be a positive integer"):
            notebook_recipe("retinanet", "cpu")


def test_notebook_recipe_gives_the_pretraining_up_for_a_saved_backbone(env, tmp_path):
    """Notebook 08's ``BACKBONE_FROM="mask_rcnn"``: once notebook 06 has saved its model in this
    tier, YOLACT's backbone starts from it and the recipe's minute of pretraining goes; before,
    or in another tier, or with ``backbone_from=None``, the recipe is unchanged."""
    cpu = recipe("yolact", "cpu")
    assert notebook_recipe("yolact", "cpu", backbone_from="mask_rcnn", root=tmp_path) == cpu
    saved = tmp_path / "notebooks" / "cpu" / "mask_rcnn.pt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")  # only its presence is read here; load_notebook_backbone reads it
    given_up = notebook_recipe("yolact", "cpu", backbone_from="mask_rcnn", root=tmp_path)
    assert given_up == cpu.override(pretrain_seconds=None)
    assert given_up.expected_minutes == pytest.approx(3.5)  # the same steps, without the minute
    assert notebook_recipe("yolact", "cpu", root=tmp_path) == cpu
    # the smoke tier's half second goes only for a smoke-tier checkpoint
    smoke = notebook_recipe("yolact", "smoke", backbone_from="mask_rcnn", root=tmp_path)
    assert smoke.pretrain_seconds == 0.5
    with pytest.raises(ValueError, match="family='maskrcnn' must be one of"):
        notebook_recipe("yolact", "cpu", backbone_from="maskrcnn", root=tmp_path)


def test_notebook_recipe_times_a_frozen_backbone_as_it_will_train(env, tmp_path, monkeypatch):
    """A recipe that keeps a loaded backbone frozen (``freeze_backbone``; SOLO's cpu recipe did
    until the thirtieth round) has notebook 07's steps timed frozen once notebook 06 has saved its
    model, unfrozen before; a recipe that does not freeze (YOLACT's) is timed unfrozen either
    way."""
    timed = []

    def measure(r, *args, frozen_backbone=False, **kwargs):
        timed.append((r.family, frozen_backbone))
        return 0.1

    monkeypatch.setattr(recipes, "measure_step_seconds", measure)
    # no recipe of today freezes; this test gives SOLO's cpu recipe the frozen backbone back
    assert not any(r.freeze_backbone for r in RECIPES.values())
    frozen = dataclasses.replace(recipe("solo", "cpu"), freeze_backbone=True)
    monkeypatch.setitem(RECIPES, ("solo", "cpu"), frozen)
    notebook_recipe("solo", "cpu", minutes=4.5, backbone_from="mask_rcnn", root=tmp_path)
    saved = tmp_path / "notebooks" / "cpu" / "mask_rcnn.pt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")
    for family in ("solo", "yolact"):
        notebook_recipe(family, "cpu", minutes=4.5, backbone_from="mask_rcnn", root=tmp_path)
    notebook_recipe("solo", "cpu", minutes=4.5, root=tmp_path)  # BACKBONE_FROM = None
    assert timed == [("solo", False), ("solo", True), ("yolact", False), ("solo", False)]
    fast = recipe("solo", "cpu").override(freeze_backbone=False)
    assert fast.expected_minutes is None  # the time per step was measured frozen


def test_override_keeps_the_expected_time_true():
    r = recipe("mask_rcnn", "cpu")
    assert (r.max_steps, r.expected_minutes, r.pretrain_seconds) == (540, 4.0, 60.0)
    shorter = r.override(max_steps=135, num_val=50)
    assert (shorter.max_steps, shorter.num_val) == (135, 50)
    # 1 min of pretraining + 3 min of steps: a quarter of the steps takes 1 + 0.75 min
    assert shorter.expected_minutes == pytest.approx(1.75)
    assert r.override(max_steps=1080).expected_minutes == pytest.approx(7.0)  # 1 + 2 x 3
    assert r.override(pretrain_seconds=None).expected_minutes == pytest.approx(3.0)
    assert r.override(pretrain_seconds=30.0).expected_minutes == pytest.approx(3.5)
    for change in ({"batch_size": 4}, {"image_size": 256}, {"model": "MASK_RCNN_R18_SMALL"},
                   {"train_shapes_per_image": (3, 10)}):  # fmt: skip
        assert r.override(**change).expected_minutes is None, change
    assert r.override(max_steps=10, expected_minutes=2.0).expected_minutes == 2.0  # given: kept
    assert recipe("solo", "gpu").override(max_steps=10).expected_minutes is None  # not measured


def test_notebook_recipe_with_minutes_fits_the_steps_to_this_machine(env, monkeypatch):
    monkeypatch.setattr(recipes, "measure_step_seconds", lambda r, *args, **kwargs: 0.25)
    cpu = recipe("mask_rcnn", "cpu")
    fitted = notebook_recipe("mask_rcnn", "cpu", minutes=4.5)
    # 4.5 min: 60 s of pretraining, then 210 s of training: at most 210 / (0.6 x 0.25) steps
    assert fitted == fit_to_minutes(cpu, 4.5, 0.25) and fitted.max_steps == 1400
    assert fitted.max_minutes == 3.5 and fitted.train_config().max_seconds == 210
    smoke = notebook_recipe("mask_rcnn", "smoke", minutes=4.5)  # seconds anyway: not fitted
    assert smoke.max_steps == recipe("mask_rcnn", "smoke").max_steps


def test_notebook_train_minutes_limit_only_the_cpu_tier_s_own_steps(env):
    monkeypatch, _ = env
    assert [recipes.notebook_train_minutes(t) for t in TIERS] == [None, 4.5, None]
    monkeypatch.setenv(STEPS_ENV, "60")  # steps given: trained as given, without a limit
    assert recipes.notebook_train_minutes("cpu") is None


def test_fit_to_minutes_trains_for_the_minutes_with_the_steps_that_fit_as_a_bound():
    r = recipe("mask_rcnn", "cpu").override(pretrain_seconds=None)
    fitted = fit_to_minutes(r, 4.5, 0.3)
    assert fitted.max_steps == 1500  # 270 s / (0.6 x 0.3 s): more than fit; the clock ends it
    assert fitted.max_minutes == 4.5 and fitted.expected_minutes is None  # this machine's time
    changed = ("max_steps", "max_minutes", "expected_minutes")
    assert dataclasses.replace(fitted, **{k: getattr(r, k) for k in changed}) == r
    cfg = fitted.train_config()
    assert (cfg.max_steps, cfg.max_seconds, cfg.warmup_steps) == (1500, 270.0, r.warmup_steps)
    assert r.train_config().max_seconds is None  # the recipe itself trains its steps
    assert fit_to_minutes(r, 4.5, 0.3, margin=1.3).max_steps == 692  # 270 / (1.3 x 0.3) = 692.3
    assert fit_to_minutes(r, 0.001, 0.37).max_steps == 1  # never zero steps
    for args, name in (((0.0, 0.37), "minutes"), ((4.5, -1.0), "seconds_per_step"),
                       ((4.5, 0.3, 0.0), "margin")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            fit_to_minutes(r, *args)


def test_fit_to_minutes_counts_the_pretraining_in_the_minutes():
    r = recipe("mask_rcnn", "cpu")  # 60 s of pretraining
    fitted = fit_to_minutes(r, 4.5, 0.3)
    assert fitted.max_minutes == 3.5 and fitted.pretrain_seconds == 60.0
    assert fitted.max_steps == 1166  # 210 s / (0.6 x 0.3 s) = 1166.7
    with pytest.raises(ValueError, match=r"minutes=1.0 leaves no time to train after the "
                       r"pretraining's 60 s \(pretrain_seconds\)"):  # fmt: skip
        fit_to_minutes(r, 1.0, 0.3)


def test_notebook_checkpoint_path():
    assert notebook_checkpoint("mask_rcnn", "cpu") == Path("runs/notebooks/cpu/mask_rcnn.pt")
    assert notebook_checkpoint("solo", "gpu", root="/tmp/x") == Path("/tmp/x/notebooks/gpu/solo.pt")
    with pytest.raises(ValueError, match="family"):
        notebook_checkpoint("detr", "cpu")


def test_save_notebook_model_round_trips(tmp_path):
    """What a notebook saves rebuilds the same model from its own config (a changed knob
    included) with ``load_model``, and names the recipe, classes and history that notebook 09
    reads."""
    from types import SimpleNamespace

    from instseg_edu.engine.checkpoint import load_checkpoint, load_model
    from instseg_edu.engine.train import History
    from instseg_edu.models.mask_rcnn import build_mask_rcnn

    r = recipe("mask_rcnn", "smoke")
    cfg = r.model_config(7)
    cfg = dataclasses.replace(cfg, roi_head=dataclasses.replace(cfg.roi_head, num_convs=2))
    model = build_mask_rcnn(cfg)
    data = SimpleNamespace(classes=("a",) * 7, label_to_cat_id=list(range(1, 8)))
    path = save_notebook_model(model, r, History(config={"lr": 0.5}), data, root=tmp_path)
    assert path == tmp_path / "notebooks" / "smoke" / "mask_rcnn.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["recipe"] == r.as_dict() and ckpt["history"]["config"] == {"lr": 0.5}
    meta = ckpt["meta"]
    assert (meta["model"], meta["preset"], meta["image_size"]) == ("mask_rcnn", r.model, 64)
    assert meta["classes"] == ["a"] * 7 and meta["label_to_cat_id"] == list(range(1, 8))
    rebuilt, _ = load_model(path)
    assert rebuilt.cfg.roi_head.num_convs == 2
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_in_memory_recipe_opens_its_shapes_splits_once(tmp_path):
    r = dataclasses.replace(recipe("mask_rcnn", "smoke"), num_train=3, num_val=2)
    train_set, val_set = r.shapes_datasets(tmp_path / "shapes")
    assert (len(train_set), len(val_set)) == (3, 2)
    assert train_set.classes == val_set.classes and len(train_set.classes) == 7
    image, target = train_set[0]
    assert image.shape == (3, r.image_size, r.image_size)
    assert target.masks.shape[-2:] == (r.image_size, r.image_size)
    on_disk = dataclasses.replace(r, in_memory=False)
    train_disk, _ = on_disk.shapes_datasets(tmp_path / "shapes")
    assert type(train_disk).__name__ == "CocoDataset"


def test_train_and_test_sizes_resize_the_drawn_images_for_the_network(tmp_path):
    """``train_size`` / ``test_size`` are the pipelines' resize: the splits are drawn at
    ``image_size`` (the same files) and reach the network at those sides; unset, at
    ``image_size``. The cpu Mask R-CNN is scored at 192 px; no smoke recipe resizes."""
    r = dataclasses.replace(recipe("mask_rcnn", "smoke"), num_train=2, num_val=2, train_size=96,
                            test_size=128)  # fmt: skip
    assert (r.image_size, r.train_side, r.test_side) == (64, 96, 128)
    plain = dataclasses.replace(r, train_size=None, test_size=None)
    assert plain.train_side == plain.test_side == 64
    train_set, val_set = r.shapes_datasets(tmp_path / "shapes")
    assert train_set.coco.dataset["images"][0]["width"] == 64  # drawn at 64 px
    for (image, target), size in ((train_set[0], 96), (val_set[1], 128)):
        assert image.shape == (3, size, size) and target.masks.shape[-2:] == (size, size)
    assert shapes_batch(2, 64, resize_to=96).images.shape[-2:] == (96, 96)
    for name in ("train_size", "test_size"):
        for bad in (0, 96.0, "96"):
            with pytest.raises(ValueError, match=name):
                dataclasses.replace(r, **{name: bad})
    cpu = recipe("mask_rcnn", "cpu")
    assert (cpu.train_side, cpu.test_side) == (128, 192)
    assert cpu.override(train_size=160).expected_minutes is None  # another step's cost
    assert cpu.override(test_size=160).expected_minutes == cpu.expected_minutes
    for family in FAMILIES:
        assert recipe(family, "smoke").train_size is recipe(family, "smoke").test_size is None


def test_the_cpu_mask_rcnn_trains_on_denser_images_and_scores_on_the_standard_split(tmp_path):
    for family in ("mask_rcnn", "retinanet"):  # the CPU tier's two-stage and one-stage detectors
        dense = recipe(family, "cpu")
        assert dense.train_shapes_per_image == (10, 20)
        assert dense.train_split == "train-10-20-shapes"
    for family in FAMILIES:
        for tier in ("cpu", "gpu"):
            r = recipe(family, tier)
            if (family, tier) not in (("mask_rcnn", "cpu"), ("retinanet", "cpu")):
                assert r.train_shapes_per_image == SHAPES_PER_IMAGE and r.train_split == "train"
    r = dataclasses.replace(recipe("mask_rcnn", "smoke"), num_train=4, num_val=3, image_size=128)
    train_set, val_set = r.shapes_datasets(tmp_path / "shapes")
    assert sorted(p.name for p in (tmp_path / "shapes").glob("*.json")) == [
        "train-10-20-shapes.json", "val.json"]  # fmt: skip
    assert train_set.coco.dataset["info"]["params"]["shapes_per_image"] == [10, 20]
    assert "shapes_per_image" not in val_set.coco.dataset["info"]["params"]
    per_image = len(train_set.coco.dataset["annotations"]) / len(train_set)
    assert per_image >= 8, per_image  # 10-20 painted, a few hidden by those in front
    assert len(train_set[0][1]) == len(train_set.coco.getAnnIds(imgIds=train_set.image_ids[0]))


def test_train_shapes_per_image_is_checked_and_read_back_from_a_list():
    r = recipe("mask_rcnn", "cpu")
    again = Recipe(**{**r.as_dict(), "train_shapes_per_image": [10, 20]})  # as a checkpoint has it
    assert again == r and again.train_shapes_per_image == (10, 20)
    for bad in [(0, 4), (6, 5), (3,), (3.0, 10), "3-10"]:
        with pytest.raises(ValueError, match="train_shapes_per_image"):
            dataclasses.replace(r, train_shapes_per_image=bad)
    # another density is another step: its time is no longer known
    assert r.override(train_shapes_per_image=(3, 10)).expected_minutes is None


def test_ratio_range_adds_the_scale_jitter_to_the_training_images_only(tmp_path):
    """``ratio_range`` puts :class:`RandomResizeCrop` into the training pipeline (not into
    validation), is read back from a checkpoint's list, and is checked; no recipe uses it."""
    r = dataclasses.replace(recipe("retinanet", "smoke"), num_train=2, num_val=2,
                            ratio_range=[2.0, 2.0])  # fmt: skip
    assert r.ratio_range == (2.0, 2.0)
    train_set, val_set = r.shapes_datasets(tmp_path / "shapes")
    assert "RandomResizeCrop(size=64, ratio_range=(2.0, 2.0))" in repr(train_set.transforms)
    assert "RandomResizeCrop" not in repr(val_set.dataset.transforms)
    image, target = train_set[0]
    assert image.shape == (3, 64, 64) and target.masks.shape[-2:] == (64, 64)
    for bad in [(0.0, 1.0), (2.0, 1.0), (1.0,)]:
        with pytest.raises(ValueError, match="ratio_range"):
            dataclasses.replace(r, ratio_range=bad)
    assert all(recipe(f, t).ratio_range is None for f in FAMILIES for t in ("smoke", "cpu", "gpu"))


# ---- timing --------------------------------------------------------------------------------------


def test_shapes_batch_has_tight_boxes_around_its_masks():
    dense = shapes_batch(2, 128, seed=1, shapes_per_image=(15, 15))
    standard = shapes_batch(2, 128, seed=1)
    assert sum(len(t) for t in dense.targets) > sum(len(t) for t in standard.targets)
    batch = shapes_batch(2, 64, seed=1)
    assert batch.images.shape == (2, 3, 64, 64)
    for t in batch.targets:
        assert len(t) > 0 and t.labels.max() < 7
        for box, mask in zip(t.boxes, t.masks):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert box.tolist() == [float(v) for v in expected]


def test_measure_step_seconds_and_describe_tier(env):
    monkeypatch, _ = env
    r = recipe("retinanet", "smoke")
    torch.manual_seed(5)
    seconds = measure_step_seconds(r, steps=1)
    assert 0 < seconds < 60
    assert torch.equal(torch.rand(3), torch.manual_seed(5) and torch.rand(3))  # seeds untouched

    # The median step: one step slowed by another program (5 s here) does not count.
    clock = iter([10.0, 10.5, 15.5, 16.0])  # the start, then the end of each of three steps
    real_time = recipes.time
    monkeypatch.setattr(recipes, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert measure_step_seconds(r, steps=3) == 0.5
    monkeypatch.setattr(recipes, "time", real_time)

    monkeypatch.setattr(recipes, "measure_step_seconds", lambda r, *args, **kwargs: 0.6)
    cpu = recipe("mask_rcnn", "cpu")
    line = describe_tier("cpu", cpu)
    assert line.startswith("tier 'cpu' (no CUDA device): MASK_RCNN_R18_CPU")
    assert "0.60 s per step measured here" in line
    # with PLAN_MARGIN, and the pretraining's minute
    assert f"about {cpu.max_steps * 0.6 * 1.3 / 60 + 1:.1f} min" in line
    assert "540 steps, after 60 s of pretraining its ResNet on object crops;" in line
    assert "(about 4.0 min on two CPU cores)" in line
    # Fewer steps: both times are for the steps run (1 min + 3.0 min x 270 / 540 steps).
    line = describe_tier("cpu", cpu.override(max_steps=270))
    assert "270 steps" in line and f"about {270 * 0.6 * 1.3 / 60 + 1:.1f} min" in line
    assert "(about 2.5 min on two CPU cores)" in line
    # Without the pretraining: 3.0 min x 30 / 540 = 10 s
    no_pretraining = cpu.override(pretrain_seconds=None, max_steps=30)
    assert "(about 10 s on two CPU cores)" in describe_tier("cpu", no_pretraining)
    # A time budget: said so, not timed again.
    line = describe_tier("cpu", fit_to_minutes(cpu, 4.5, 0.6))
    planned = ("583 steps at most, after 60 s of pretraining its ResNet on object crops: "
               "training ends at 3.5 min, its learning rate following the clock")  # fmt: skip
    assert line.endswith(planned), line
    # Another batch size: the time measured for the recipe's own no longer applies.
    assert "on two CPU cores" not in describe_tier("cpu", cpu.override(batch_size=2))

    monkeypatch.setenv(SMOKE_ENV, "1")
    line = describe_tier("smoke", notebook_recipe("solo", "smoke"))
    assert line.startswith(f"tier 'smoke' ({SMOKE_ENV}=1)") and "seconds" in line
    monkeypatch.setenv(TIER_ENV, "cpu")
    assert "trains no model" in describe_tier("cpu")
    assert f"({TIER_ENV}=cpu)" in describe_tier("cpu", cpu, measure=False)


def test_notebook_data_dir_is_kept_when_named_and_removed_with_the_kernel_when_not(tmp_path):
    assert notebook_data_dir(tmp_path / "shapes") == tmp_path / "shapes"
    assert notebook_data_dir("data/shapes") == Path("data/shapes")
    # A kernel's temporary folder: still there while it runs, gone once the process has exited.
    code = (
        "from instseg_edu.recipes import notebook_data_dir\n"
        "root = notebook_data_dir(None)\n"
        "(root / 'train').mkdir(); (root / 'train' / 'x.png').write_bytes(b'x')\n"
        "assert root.name.startswith('instseg_shapes_') and root.is_dir()\n"
        "print(root)\n"
    )
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    root = Path(proc.stdout.strip())
    assert root.parent == tmp_path and not root.exists()


@pytest.mark.parametrize("native_bf16", [True, False])
def test_cpu_recipes_train_in_bf16_where_the_cpu_has_it_and_say_so(monkeypatch, native_bf16):
    import instseg_edu.engine.train as engine_train

    monkeypatch.setattr(engine_train, "cpu_has_native_bf16", lambda: native_bf16)
    for family in FAMILIES:
        cpu = recipe(family, "cpu")
        assert cpu.cpu_amp and cpu.train_config().cpu_amp  # train() decides by the CPU
        assert recipe(family, "smoke").cpu_amp  # the same code path, in seconds
        assert not recipe(family, "gpu").cpu_amp  # CUDA's bf16 is TrainConfig.amp's
        line = describe_tier("cpu", cpu, measure=False)
        said = f": {cpu.model} in bf16 (this CPU has bf16 instructions), {cpu.num_train} images"
        said = said in line
        assert said == native_bf16, line
        assert "bf16" not in describe_tier("cpu", cpu.override(cpu_amp=False), measure=False)


def test_slow_step_warning_when_a_step_takes_far_longer_than_where_the_recipe_was_timed():
    r = recipe("mask_rcnn", "cpu")  # 4.0 min: 60 s of pretraining, then 540 steps
    there = (240 - 60) / 540 / recipes.PLAN_MARGIN  # 0.256 s: a timed step on that machine
    assert slow_step_warning(r, 0.3) is None  # this machine's float32 step: fine
    assert slow_step_warning(r, 3 * there) is None  # at most three times: fine
    line = slow_step_warning(r, 4.98)  # sharing two cores with a test run
    assert line == ("warning: a step takes 19 times as long here as on the machine this recipe "
                    "was timed on (4.98 s against about 0.26 s): the same minutes hold that many "
                    "times fewer steps, and the model will learn much less; is another program "
                    "using the CPU?")  # fmt: skip
    assert slow_step_warning(r.override(expected_minutes=None), 4.98) is None  # not measured
