"""The benchmark scripts run end to end at toy sizes, so they work when a GPU is there to run them
for real. Each runs in a subprocess from a temporary directory (their data folders are relative)
and must print its comparison; the numbers themselves are not checked here (toy sizes, a busy CPU),
except where they are exact: batched assignment equals the loop, and host-sync counts.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(tmp_path, script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_assign_batched_equals_the_loop(tmp_path):
    out = run(tmp_path, "assign.py", "--batch", "2", "--image-size", "128", "--num-gt", "4",
              "--repeats", "1", "--warmup", "0")  # fmt: skip
    assert "batched == loop: yes" in out
    assert re.search(r"torchvision box_iou \+ Matcher\s+[\d.]+\s+[\d.]+x", out), out


def test_roi_reference_against_torchvision(tmp_path):
    out = run(tmp_path, "roi.py", "--rois", "8", "--channels", "4", "--size", "16",
              "--repeats", "1", "--train-images", "2", "--train-rois", "6",
              "--train-channels", "3", "--train-size", "8")  # fmt: skip
    for op in ("RoIAlign 7x7, sampling_ratio=2", "RoIAlign 7x7, adaptive", "RoIPool 7x7",
               "forward", "forward + backward"):  # fmt: skip
        assert re.search("^" + re.escape(op) + r"\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M), out


def test_cpu_recipe_variants_build_and_one_trains_and_scores(tmp_path):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import cpu_recipe

    from instseg_edu.recipes import recipe

    images = torch.rand(1, 3, 64, 64)
    for name, variant in cpu_recipe.VARIANTS.items():
        r = variant.recipe(recipe(variant.family, "cpu"))
        model = cpu_recipe.build(variant, r)  # each one is consistent
        outputs = model(images)
        if variant.family != "mask_rcnn":
            assert name.startswith(variant.family + "_"), name
            assert type(model).__name__.lower() == variant.family, name  # RetinaNet, SOLO, YOLACT
            continue
        rois = torch.tensor([[0.0, 4.0, 4.0, 40.0, 30.0]])
        cls, deltas = model.box_forward(outputs.features, rois)
        assert cls.shape == (1, 8) and deltas.shape == (1, 28), name
    no_gn = cpu_recipe.VARIANTS["retinanet_no_group_norm"]
    head = no_gn.config(recipe("retinanet", "cpu").model_config(7)).bbox_head
    assert head.norm_num_groups is None
    log = tmp_path / "runs.jsonl"
    # The standard-split variant trains on 3-10 shapes per image (the recipe's own split has
    # 10-20); both score on the standard validation split.
    # Mask R-CNN's recipe pretrains the ResNet on object crops first: here for half a second.
    out = run(tmp_path, "cpu_recipe.py", "standard_train", "--seconds", "1", "--data",
              str(tmp_path / "shapes"), "--num-train", "4", "--num-val", "2", "--image-size", "64",
              "--json", str(log), "--pretrain-seconds", "0.5")  # fmt: skip
    record = json.loads(log.read_text())
    assert record["variant"] == "standard_train" and record["steps"] >= 1, out
    assert record["pretrain_s"] == 0.5 and 0 <= record["crop_accuracy"] <= 1
    assert "pretrained the ResNet as a classifier of" in out
    assert record["seed"] == 0
    assert 0 <= record["box_AP50"] <= 1 and 0 <= record["mask_AP50"] <= 1
    assert "ema_box_AP50" not in record
    assert len(record["loss_cls_per_100"]) == len(record["acc_per_100"]) >= 1
    names = sorted(p.name for p in (tmp_path / "shapes").glob("*.json"))
    assert names == ["train.json", "val.json"], names
    # A RetinaNet variant: the same run, boxes only.
    out = run(tmp_path, "cpu_recipe.py", "retinanet_test_128", "--steps", "1", "--data",
              str(tmp_path / "shapes"), "--num-train", "4", "--num-val", "2", "--image-size", "64",
              "--json", str(log), "--pretrain-seconds", "0")  # fmt: skip
    record = json.loads(log.read_text().splitlines()[-1])
    assert (record["variant"], record["family"], record["steps"]) == (
        "retinanet_test_128", "retinanet", 1)  # fmt: skip
    assert record["pretrain_s"] is None and record["crop_accuracy"] is None
    assert 0 <= record["box_AP50"] <= 1 and "mask_AP50" not in record, out
    # A YOLACT variant started from a Mask R-CNN's backbone (as notebook 08 does): its ResNet.
    from instseg_edu.engine.checkpoint import save_checkpoint

    donor = recipe("mask_rcnn", "cpu").build_model(7)
    save_checkpoint(tmp_path / "donor.pt", {"model": donor.state_dict()})
    out = run(tmp_path, "cpu_recipe.py", "yolact_current", "--steps", "1", "--data",
              str(tmp_path / "shapes"), "--num-train", "4", "--num-val", "2", "--image-size", "64",
              "--json", str(log), "--backbone-from", str(tmp_path / "donor.pt"))  # fmt: skip
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["variant"] == "yolact_current", out
    assert record["backbone_from"] == str(tmp_path / "donor.pt")
    assert "backbone: ResNet (" in out and 0 <= record["mask_AP50"] <= 1, out
    # YOLACT's recipe merges two test sizes: the merge's AP and its gallery figures by size.
    assert 0 <= record["merged_mask_AP50"] <= 1, out
    for area in ("all", "small", "medium"):
        right, found = record[f"merged_{area}_right_found"]
        assert (math.isnan(right) or 0 <= right <= 1) and 0 <= found <= 1, record  # nan: none drawn


def test_eval_sizes_prints_each_size_and_the_merge(tmp_path):
    from instseg_edu.engine.checkpoint import config_to_dict, save_checkpoint
    from instseg_edu.recipes import recipe

    cfg = recipe("mask_rcnn", "cpu").model_config(7)
    torch.manual_seed(0)
    model = recipe("mask_rcnn", "cpu").build_model(7)
    meta = {"model": "mask_rcnn", "model_config": config_to_dict(cfg)}
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "meta": meta})
    out = run(tmp_path, "eval_sizes.py", "m.pt", "--smoke", "--sizes", "96", "64", "--cuts",
              "16", "--json", "scales.json")  # fmt: skip
    assert "predicted 4 images at 96 px" in out and "predicted 4 images at 64 px" in out
    assert "96:0-16+64:16-inf segm" in out
    records = json.loads((tmp_path / "scales.json").read_text())["records"]
    assert [r["name"] for r in records] == ["at 96 px", "at 64 px", "96:0-16+64:16-inf"]
    assert set(records[2]["bbox"]["medium"]) == {"precision", "recall"}


def test_cpu_recipe_shared_mask_convs_feed_the_box_head():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import cpu_recipe

    from instseg_edu.recipes import recipe

    torch.manual_seed(0)
    model = cpu_recipe.build(cpu_recipe.VARIANTS["shared_mask_convs"], recipe("mask_rcnn", "cpu"))
    assert model.bbox_head.mask_convs[0] is model.mask_head.convs
    # registered once, under the mask head: the optimiser steps each weight once
    names = [name for name, _ in model.named_parameters() if ".convs." in name]
    assert names and all(name.startswith("mask_head.") for name in names)
    outputs = model(torch.rand(1, 3, 64, 64))
    rois = torch.tensor([[0.0, 4.0, 4.0, 40.0, 30.0]])
    features = model._roi_features(outputs.features, rois, 7)
    cls, deltas = model.box_forward(outputs.features, rois)
    expected = model.bbox_head.box_head(model.mask_head.convs(features))
    torch.testing.assert_close(cls, expected[0])
    torch.testing.assert_close(deltas, expected[1])
    cls.sum().backward()  # the classifier's gradient reaches the mask head's convs
    assert model.mask_head.convs[0].weight.grad.abs().sum() > 0


def test_shape_classifier_learns_from_crops_and_records_its_curve(tmp_path):
    log = tmp_path / "shape_classifier.jsonl"
    out = run(tmp_path, "shape_classifier.py", "--data", str(tmp_path / "shapes"), "--num-train",
              "6", "--num-val", "3", "--crop", "16", "--steps", "4", "--batch", "8", "--lr",
              "1e-3", "--min-size", "8", "--eval-every", "2", "--json", str(log))  # fmt: skip
    record = json.loads(log.read_text())
    assert record["train_crops"] >= 10 and record["val_crops"] >= 3, out
    assert record["batch"] == 8 and record["lr"] == 1e-3
    assert [point["step"] for point in record["curve"]] == [2, 4]
    assert [point["crops_seen"] for point in record["curve"]] == [16, 32]
    assert all(0 <= point["val_acc"] <= 1 for point in record["curve"])


def test_cpu_recipe_class_agnostic_heads_share_deltas_and_masks_across_classes():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import cpu_recipe

    from instseg_edu.recipes import recipe

    torch.manual_seed(0)
    model = cpu_recipe.build(cpu_recipe.VARIANTS["class_agnostic"], recipe("mask_rcnn", "cpu"))
    outputs = model(torch.rand(1, 3, 64, 64))
    rois = torch.tensor([[0.0, 4.0, 4.0, 40.0, 30.0], [0.0, 10.0, 12.0, 60.0, 50.0]])
    _, deltas = model.box_forward(outputs.features, rois)  # [2, 4C]
    per_class = deltas.view(2, 7, 4)
    torch.testing.assert_close(per_class, per_class[:, :1].expand(2, 7, 4))
    masks = model.mask_forward(outputs.features, rois)  # [2, C, T, T]
    torch.testing.assert_close(masks, masks[:, :1].expand_as(masks))
    # the inference path (each RoI's own class row) gives the same mask as the training path
    labels = torch.tensor([3, 6])
    picked = model.mask_forward(outputs.features, rois, labels)  # [2, T, T]
    torch.testing.assert_close(picked, masks[:, 0], rtol=1e-4, atol=1e-5)
    # every class's loss term trains the one shared regressor and mask
    (per_class[:, 5].sum() + masks[:, 2].sum()).backward()
    assert model.bbox_head.fc_reg.fc.weight.grad.abs().sum() > 0
    assert model.mask_head.conv_logits.conv.weight.grad.abs().sum() > 0


def test_cpu_recipe_ema_averages_the_weights():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import cpu_recipe

    model = torch.nn.Linear(2, 1)
    start = model.weight.detach().clone()
    ema = cpu_recipe.EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    state = type("State", (), {"model": model})()
    ema.on_step(state)  # first update, in warm-up: decay min(0.5, 2 / 11)
    torch.testing.assert_close(ema.ema.weight, start * 2 / 11 + 9 / 11)
    after_one = ema.ema.weight.clone()
    ema.on_step(state)  # second: min(0.5, 3 / 12) = 0.25
    torch.testing.assert_close(ema.ema.weight, after_one * 0.25 + 0.75)
    assert not ema.ema.weight.requires_grad


def test_host_syncs_ours_against_torchvision(tmp_path):
    out = run(tmp_path, "host_syncs.py", "--smoke", "--families", "retinanet", "yolact")
    rows = {
        (family, side): (int(train), int(infer))
        for family, side, train, infer in re.findall(
            r"^(\w+)\s+2 (ours|torchvision)\s+(\d+)\s+(\d+)$", out, re.M
        )
    }
    assert rows[("retinanet", "ours")] == (0, 3), out  # counts, then NMS per image
    assert rows[("yolact", "ours")][0] == 0, out
    assert rows[("retinanet", "torchvision")][0] > 0, out
    assert "ratio" in out


def test_train_throughput_side_by_side(tmp_path):
    out = run(tmp_path, "train_throughput.py", "--smoke", "--families", "retinanet",
              "--json", "tp.json")  # fmt: skip
    for side in ("ours", "torchvision"):
        assert re.search(rf"retinanet {side}\s+fp32 train\s+[\d.]+ img/s\s+infer\s+[\d.]+", out)
    assert re.search(r"ratio ours/torchvision: train [\d.]+x \([\d.]+-[\d.]+\)\s+infer", out), out
    # Equal work: thresholds at 0, both sides return max_per_img detections per image (the
    # smoke run's cap on it; the preset keeps 100).
    n = _gpu_check().SMOKE_MAX_PER_IMG
    assert f"detections per image, both sides (equal work, max_per_img {n})" in out, out
    result = json.loads((tmp_path / "tp.json").read_text())["retinanet"]
    (run_,) = result["runs"]
    for side in ("ours", "torchvision"):
        assert len(run_["repeats"][side]) == 2  # --smoke: two alternations
        work = [[w["detections"] for w in r["work"]] for r in run_["repeats"][side]]
        assert work == [[[n, n], [n]]] * 2
    assert set(result["ratios"]) == {"train", "infer", "latency_speedup"}


def test_train_throughput_mask_rcnn_box_heads_see_equal_rois(tmp_path):
    out = run(tmp_path, "train_throughput.py", "--smoke", "--families", "mask_rcnn",
              "--json", "tp.json")  # fmt: skip
    result = json.loads((tmp_path / "tp.json").read_text())["mask_rcnn"]
    k = result["rpn_max_per_img"]
    assert 0 < k <= 150  # the small preset's test-time proposals, then the fewest of either RPN
    assert f"RPN capped at {k} proposals per image): batches [{2 * k}], batch-1 {k}" in out, out
    # training: the same RPN proposals on both sides (the small preset's), RoIs per head printed
    assert result["rpn_training_proposals"] == [300, 150]
    line = r"RoIs per training step, box head / mask head: ours \d+ / \d+, torchvision \d+ / \d+"
    assert re.search(line + r" \(RPN on both sides: 300 per level", out), out
    for side in ("ours", "torchvision"):  # at most 64 sampled RoIs per image, some positive
        for r in result["runs"][0]["repeats"][side]:
            rois = r["train_rois_per_step"]
            assert 0 < rois["mask"] <= rois["box"] <= 2 * 64, rois
    for side in ("ours", "torchvision"):
        for r in result["runs"][0]["repeats"][side]:
            # the smoke run's cap on detections (the preset keeps 50)
            n = _gpu_check().SMOKE_MAX_PER_IMG
            assert r["work"] == [{"detections": [n, n], "box_head_rois": 2 * k},
                                 {"detections": [n], "box_head_rois": k}]  # fmt: skip


class _FakeSide:
    """Stands in for ``train_throughput.Side``: returns ``counts`` detections per image."""

    def __init__(self, counts, log):
        self.counts, self.calls, self.log = counts, [], log

    def train_step(self, batch, precision):
        self.calls.append(("train", batch))
        self.log.append(self)

    def infer(self, batch, precision):
        self.calls.append(("infer", batch))
        return batch

    def restore_buffers(self):
        self.calls.append(("restore", None))

    def reset_rois(self):
        self.rois = {"box": 0, "mask": 0}

    def work(self, outputs):
        return {"detections": [self.counts] * len(outputs)}


def _side_by_side(counts_ours, counts_peer, repeats=3):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import torch
    from train_throughput import measure_side_by_side

    log = []  # which side trained, in order
    sides = {"ours": _FakeSide(counts_ours, log), "torchvision": _FakeSide(counts_peer, log)}
    batches, batch1 = [["a", "b"], ["c", "d"]], ["a"]
    result = measure_side_by_side(
        sides, batches, batch1, "fp32", warmup=1, repeats=repeats, steps=2,
        device=torch.device("cpu"),
    )  # fmt: skip
    return sides, result, log


def test_measure_side_by_side_alternates_and_counts_detections():
    sides, result, log = _side_by_side(100, 100)
    ours, peer = sides["ours"], sides["torchvision"]
    # warm-up of each, then repeats 0 (ours first), 1 (torchvision first), 2 (ours first)
    assert log == [ours, peer] + [ours] * 2 + [peer] * 4 + [ours] * 4 + [peer] * 2
    for side in sides.values():  # warm-up (train, restore, infer, batch-1), then 3 x 7 calls
        assert len(side.calls) == 4 + 3 * 7
        assert side.calls[4:9] == [("train", ["a", "b"]), ("train", ["c", "d"]), ("restore", None),
                                   ("infer", ["a", "b"]), ("infer", ["c", "d"])]  # fmt: skip
    assert [w["detections"] for w in result["work"]] == [[100, 100], [100, 100], [100]]
    assert len(result["repeats"]["ours"]) == len(result["repeats"]["torchvision"]) == 3
    assert set(result["ratios"]) == set(result["ratio_ranges"]) == {
        "train", "infer", "latency_speedup"
    }  # fmt: skip
    for key, (lo, hi) in result["ratio_ranges"].items():
        assert lo <= result["ratios"][key] <= hi


def test_measure_side_by_side_refuses_unequal_work():
    with pytest.raises(RuntimeError, match=r"unequal work in repeat 0: ours .*100.* torchvision"):
        _side_by_side(100, 37)


def test_time_to_ap_evaluates_both_sides_with_pycocotools(tmp_path):
    out = run(tmp_path, "time_to_ap.py", "--smoke", "--family", "mask_rcnn", "--json", "tta.json")
    for kind in ("bbox", "segm"):
        assert re.search(rf"final {kind} AP: ours [\d.]+\s+torchvision [\d.]+\s+ratio ", out), out
    curves = json.loads((tmp_path / "tta.json").read_text())["curves"]
    assert set(curves) == {"ours", "torchvision"}
    assert all(point["segm"] >= 0 for side in curves.values() for point in side)


def test_time_to_ap_cpu_protocol_interleaves_the_same_small_models(tmp_path):
    out = run(tmp_path, "time_to_ap.py", "--device", "cpu", "--smoke", "--family", "retinanet",
              "--json", "tta.json")  # fmt: skip
    assert "cpu protocol: retinanet RETINANET_R18_CPU against torchvision's" in out
    assert re.search(r"final bbox AP: ours [\d.]+\s+torchvision [\d.]+\s+ratio ", out), out
    assert re.search(r"ours above torchvision at every evaluation point \(bbox AP\): (yes|no)", out)
    report = json.loads((tmp_path / "tta.json").read_text())
    assert report["args"]["protocol"] == "cpu" and report["args"]["in_memory"]
    curves = report["curves"]
    assert len(curves["ours"]) == len(curves["torchvision"]) >= 1
    # The sides take turns: the first round trains torchvision, then ours.
    sides = [s["side"] for s in report["slices"]]
    assert sides[:2] == ["torchvision", "ours"], sides
    assert len(report["summary"]["points"]) == len(curves["ours"])


@pytest.mark.parametrize(("native", "flag", "expected"), [
    (True, None, "bf16"),  # as the cpu recipe trains (Recipe.cpu_amp)
    (True, "--cpu-fp32", "fp32"),
    (False, None, "fp32"),  # emulated bf16 would be slower
    (False, "--cpu-bf16", "fp32"),
])  # fmt: skip
def test_time_to_ap_cpu_precision_follows_the_recipe_on_both_sides(monkeypatch, native, flag,
                                                                   expected):  # fmt: skip
    sys.path.insert(0, str(BENCHMARKS))
    import time_to_ap

    monkeypatch.setattr(time_to_ap, "cpu_has_native_bf16", lambda: native)
    args = time_to_ap.parse_args(["--device", "cpu", *([flag] if flag else [])])
    assert (args.precision, args.tv_precision) == (expected, expected)


@pytest.mark.parametrize("family, tv_default", [("retinanet", "fp32"), ("mask_rcnn", "bf16")])
def test_time_to_ap_gpu_runs_torchvision_in_its_fastest_precision(family, tv_default):
    # Measured on an H200 (benchmarks/RESULTS.md, "First GPU check"); parsing needs no GPU.
    sys.path.insert(0, str(BENCHMARKS))
    import time_to_ap

    args = time_to_ap.parse_args(["--device", "cuda", "--family", family])
    assert (args.precision, args.tv_precision) == ("bf16", tv_default)
    args = time_to_ap.parse_args(["--device", "cuda", "--family", family, "--tv-precision", "bf16"])
    assert args.tv_precision == "bf16"


def test_torchvision_like_mirrors_our_cpu_models():
    sys.path.insert(0, str(BENCHMARKS))
    import time_to_ap

    from instseg_edu.recipes import recipe

    for family in ("retinanet", "mask_rcnn"):
        cfg = recipe(family, "cpu").model_config(7)
        tv = time_to_ap.torchvision_like(family, cfg, 128)
        # torchvision's ResNet-18 body, stopping after the last stage the FPN reads
        assert type(tv.backbone.body).__name__ == "IntermediateLayerGetter"
        assert tv.backbone.out_channels == cfg.neck.out_channels
        tv.eval()
        with torch.no_grad():
            feats = tv.backbone(torch.zeros(1, 3, 128, 128))
        assert len(feats) == cfg.neck.num_outs
        strides = [128 // f.shape[-1] for f in feats.values()]
        if family == "retinanet":
            assert tv.backbone.body.conv1.out_channels == 32  # the same half-width ResNet-18
            assert strides == list(cfg.bbox_head.anchor_generator.strides)
            for tower in (tv.head.classification_head.conv, tv.head.regression_head.conv):
                assert len(tower) == cfg.bbox_head.stacked_convs
                norms = [m for m in tower.modules() if isinstance(m, torch.nn.GroupNorm)]
                assert [m.num_groups for m in norms] == [16] * cfg.bbox_head.stacked_convs
            sizes = tv.anchor_generator.sizes
            assert sizes[0][0] == cfg.bbox_head.anchor_generator.octave_base_scale * 8
        else:
            assert strides == list(cfg.rpn_head.anchor_generator.strides)
            heads = tv.roi_heads
            assert heads.fg_bg_sampler.batch_size_per_image == cfg.train_cfg.rcnn.sampler.num == 32
            assert tv.backbone.body.conv1.out_channels == 32  # the same half-width ResNet-18
            assert heads.fg_bg_sampler.positive_fraction == 0.5
            assert heads.mask_roi_pool.output_size == (7, 7)
            assert heads.box_head.fc6.out_features == 1024
            logits = heads.mask_predictor(torch.zeros(2, 64, 7, 7))
            assert logits.shape == (2, 8, 14, 14)  # 14x14 masks, as ours; class 0 is background
            assert tv.loss_weights["loss_classifier"] == cfg.roi_head.loss_cls.loss_weight == 4.0
            # Each lr_mult key names the same heads on both sides, so both train one recipe.
            ours = recipe(family, "cpu").build_model(7)
            for key, tv_keys in time_to_ap.TORCHVISION_KEYS.items():
                mine = {n.split(".")[0] for n, _ in ours.named_parameters() if key in n}
                assert mine == {key}
                for tv_key in tv_keys:
                    assert any(n.startswith(tv_key + ".") for n, _ in tv.named_parameters())
        # the loss weights name every loss torchvision's training step returns
        tv.train()
        box = torch.tensor([[20.0, 30.0, 70.0, 90.0]])
        target = {"boxes": box, "labels": torch.tensor([1]),
                  "masks": torch.zeros(1, 128, 128, dtype=torch.uint8)}  # fmt: skip
        target["masks"][0, 30:90, 20:70] = 1
        losses = tv([torch.rand(3, 128, 128)], [target])
        assert set(losses) == set(tv.loss_weights), family


# ------------------------------------------------------------------------------- the GPU check
def _gpu_check():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import gpu_check

    return gpu_check


@pytest.mark.timeout(3000)
def test_gpu_check_smoke_records_every_part_and_figure(tmp_path):
    # About a minute of CPU time (one thread per process); on a busy machine, more wall time.
    gpu_check = _gpu_check()
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=2900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    parts = report["parts"]
    assert list(parts) == ["install", *gpu_check.DEFAULT_PARTS]
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert 0 < part["wall_s"] <= part["budget_s"]
        assert f"| {name} | {part['budget_s']} s |" in md
    env = report["environment"]
    assert env["torch"] and env["torchvision"] and env["date"] and env["device"]
    assert "driver" in env

    # install: the package from the temporary folder, every import there
    install = parts["install"]
    assert not any(v.startswith("missing") for v in install["imports"].values())
    assert "instseg_gpu_check_" in install["instseg_edu_from"]

    # tests: every gpu-marked test collected (skipped without CUDA)
    # (a decorated test, or one parameter of a test given the gpu mark through pytest.param)
    marked = sum(
        len(re.findall(r"^@pytest\.mark\.gpu$|marks=pytest\.mark\.gpu\b", p.read_text(), re.M))
        for p in Path(__file__).parent.rglob("test_*.py")
    )
    tests = parts["tests"]
    assert tests["collected"] == marked > 0 and tests["skipped"] == marked
    for case in tests["cases"]:
        assert f"`{case['name']}`" in md

    # throughput: every family, every figure; equal work where torchvision has a peer
    families = parts["throughput"]["families"]
    assert list(families) == ["retinanet", "mask_rcnn", "solo", "yolact"]
    for family, entry in families.items():
        sides = ["ours", "torchvision"] if family in ("retinanet", "mask_rcnn") else ["ours"]
        assert [s for s in ("ours", "torchvision") if s in entry] == sides
        for side in sides:
            b = entry[side]
            for key in ("train_img_s", "infer_img_s", "latency_ms", "detections_per_batch"):
                assert b[key] > 0, (family, side, key)
            assert "peak_gib" in b
            assert f"| {family} | {side} | {b['train_img_s']:.1f}" in md
            # ours: the network's part of the batch-1 latency
            assert (b["forward_ms"] > 0) if side == "ours" else (b["forward_ms"] is None)
        if len(sides) == 2:
            assert set(entry["ratios"]) == {"train", "infer", "latency_speedup"}
            assert entry["equal_work"], entry

    # time to AP: both curves, evaluated more than once, and the summary
    tta = parts["time_to_ap"]
    assert tta["family"] == "retinanet"
    assert all(len(tta["curves"][side]) >= 1 for side in ("ours", "torchvision"))
    assert set(tta["summary"]["bbox"]) >= {"ours_at_half", "torchvision_final", "ours_final"}
    assert "### Time to AP: retinanet" in md

    # notebook 04: its training steps, the dashboard's own time and the A/B timing
    nb = parts["notebook"]
    assert nb["INSTSEG_SMOKE"] == "1" and nb["INSTSEG_TRAIN_STEPS"] == "2"
    assert nb["train_steps"] == 2
    assert nb["train_s"] > 0 and nb["dashboard_s"] > 0 and nb["redraws"] >= 1
    assert nb["ab_with_s"] > 0 and nb["ab_without_s"] > 0
    assert nb["self_share"] is not None and nb["ab_share"] is not None
    # one timed run per arm and repeat, after an untimed one of each
    assert len(nb["ab_without_runs_s"]) == len(nb["ab_with_runs_s"]) == nb["ab_repeats"]
    assert nb["ab_with_s"] == pytest.approx(sum(nb["ab_with_runs_s"]))
    assert nb["train_data_s"] >= 0 and nb["ab_with_data_s"] >= 0 and nb["ab_without_data_s"] >= 0
    assert "Waiting for the loader's batches" in md
    slowest = nb["slowest_cells"]
    assert slowest and all(c["seconds"] >= 0 and c["source"] for c in slowest)
    assert [c["seconds"] for c in slowest] == sorted((c["seconds"] for c in slowest), reverse=True)
    assert "### Notebook 04" in md and "Its slowest cells:" in md

    # every target, measured
    names = [t["name"] for t in report["targets"]]
    assert names == [
        "gpu tests",
        "RetinaNet train img/s",
        "RetinaNet inference img/s",
        "RetinaNet batch-1 latency",
        "Mask R-CNN train img/s",
        "Mask R-CNN inference img/s",
        "Mask R-CNN batch-1 latency",
        "RetinaNet time to AP",
        "dashboard overhead",
    ]
    for t in report["targets"]:
        assert t["value"] is not None and t["met"] in (True, False), t
        assert f"| {t['name']} | {t['target']} | {t['value']} |" in md
    assert report["targets"][0]["met"] is False  # skipped is not passed


def test_gpu_check_targets_from_figures():
    gpu_check = _gpu_check()

    def family(train, infer, latency):
        return {"ours": {"latency_ms": latency}, "ratios": {"train": train, "infer": infer}}

    parts = {
        "tests": {"status": "ok", "collected": 7, "passed": 7, "failed": 0, "skipped": 0},
        "throughput": {
            "families": {
                "retinanet": family(1.5, 1.49, 12.0),
                "mask_rcnn": family(2.5, 2.0, 25.1),
            }
        },
        "time_to_ap": {"summary": {"bbox": {"ours_at_half": 0.30, "torchvision_final": 0.31}}},
        "notebook": {"ab_share": 0.05},
    }
    met = {t["name"]: (t["value"], t["met"]) for t in gpu_check.targets(parts)}
    assert met == {
        "gpu tests": ("7/7 passed, 0 failed, 0 skipped", True),
        "RetinaNet train img/s": ("1.50×", True),
        "RetinaNet inference img/s": ("1.49×", False),
        "RetinaNet batch-1 latency": ("12.0 ms", True),
        "Mask R-CNN train img/s": ("2.50×", True),
        "Mask R-CNN inference img/s": ("2.00×", True),
        "Mask R-CNN batch-1 latency": ("25.1 ms", False),
        "RetinaNet time to AP": ("ours 0.300, torchvision 0.310", False),
        "dashboard overhead": ("5.0%", True),
    }
    # A part that did not finish: its targets are there, not measured; failed tests are not met.
    parts["tests"].update(passed=6, failed=1)
    parts["throughput"] = {"families": {"retinanet": {}}}
    parts["notebook"] = {"status": "timed out"}
    met = {t["name"]: t["met"] for t in gpu_check.targets(parts)}
    assert met["gpu tests"] is False
    assert met["RetinaNet train img/s"] is None and met["Mask R-CNN batch-1 latency"] is None
    assert met["dashboard overhead"] is None


def test_gpu_check_time_to_ap_summary_and_dashboard_shares():
    gpu_check = _gpu_check()
    curve = lambda *aps: [  # noqa: E731
        {"minutes": 0.5 * (i + 1) + 0.01, "step": 10 * (i + 1), "bbox": ap}
        for i, ap in enumerate(aps)
    ]
    s = gpu_check.summarise_time_to_ap(
        {"ours": curve(0.1, 0.25, 0.3, 0.4), "torchvision": curve(0.05, 0.1, 0.2, 0.22)}, 2.0
    )["summary"]["bbox"]
    assert s["ours_at_half"] == 0.25 and s["ours_at_half_minutes"] == 1.01
    assert s["torchvision_final"] == 0.22 and s["ours_final"] == 0.4
    assert s["ours_reached_torchvision_final_after_min"] == 1.01

    shares = gpu_check.dashboard_shares(
        {
            "train_s": 20.0,
            "dashboard_s": 0.5,
            "ab_with_s": 10.0,
            "ab_without_s": 9.6,
            "ab_steps": 50,
            "ab_repeats": 2,
        }  # fmt: skip
    )
    assert shares["self_share"] == pytest.approx(0.025)
    assert shares["ab_share"] == pytest.approx(0.04)
    assert shares["step_ms_with"] == pytest.approx(100.0)
    assert shares["step_ms_without"] == pytest.approx(96.0)


def test_gpu_check_reads_junit(tmp_path):
    gpu_check = _gpu_check()
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3">'
        '<testcase classname="tests.a" name="t1" time="0.5"/>'
        '<testcase classname="tests.a" name="t2" time="1.0">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.b" name="t3" time="0"><skipped message="needs CUDA"/>'
        "</testcase></testsuite></testsuites>"
    )
    got = gpu_check.junit_counts(xml)
    assert (got["collected"], got["passed"], got["failed"], got["skipped"]) == (3, 1, 1, 1)
    assert got["cases"][1] == {
        "name": "tests.a::t2", "outcome": "failed", "time_s": 1.0, "msg": "assert 1 == 2"
    }  # fmt: skip
    assert gpu_check.junit_counts(tmp_path / "missing.xml")["collected"] == 0


def test_gpu_check_part_time_limit_kills_the_process_group(tmp_path):
    gpu_check = _gpu_check()
    log, pid_file = tmp_path / "part.log", tmp_path / "grandchild.pid"
    # The part starts a grandchild (as a data loader or a notebook kernel would) and hangs.
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
        "time.sleep(60)"
    )
    status, rc = gpu_check.run_logged([sys.executable, "-c", code], dict(os.environ), 3.0, log)
    assert (status, rc) == ("timed out", None)
    assert "started" in log.read_text() and "killed after 3.0 s" in log.read_text()
    grandchild = Path(f"/proc/{pid_file.read_text()}/status")
    for _ in range(50):  # SIGKILL is delivered at once; reaping may take a moment
        if not grandchild.exists() or "zombie" in grandchild.read_text():
            break
        time.sleep(0.1)
    assert not grandchild.exists() or "zombie" in grandchild.read_text()

    assert gpu_check.run_logged([sys.executable, "-c", "raise SystemExit(3)"], None, 30, log) == (
        "failed",
        3,
    )


def test_gpu_check_lists_the_wheels_not_carried(tmp_path):
    gpu_check = _gpu_check()
    listed = [line.split("#")[0].strip() for line in gpu_check.WHEEL_LIST.read_text().splitlines()]
    listed = [line for line in listed if line]
    assert "pycocotools==2.0.11" in listed and len(listed) == len({n.lower() for n in listed})
    # Wheel file names spell the project name with underscores (PEP 427).
    files = [
        tmp_path / f"{line.replace('==', '-').replace('-', '_', line.count('-'))}-py3-none-any.whl"
        for line in listed
    ]
    assert gpu_check.wheels_not_carried(files) == []
    assert gpu_check.wheels_not_carried(files[1:]) == [listed[0]]
    older = tmp_path / "pycocotools-2.0.10-cp312-abi3-manylinux_2_17_x86_64.whl"
    rest = [f for f in files if not f.name.startswith("pycocotools")]
    assert gpu_check.wheels_not_carried([older, *rest]) == ["pycocotools==2.0.11"]


def test_gpu_check_fits_one_ten_minute_command():
    # A GPU loan: 15 minutes, its start included, one command at most 10. The parts took about
    # 8.1 minutes on an H200; their limits leave a minute of the command to spare.
    gpu_check = _gpu_check()
    budget = gpu_check.BUDGET_S
    assert sum(budget[p] for p in ("install", *gpu_check.DEFAULT_PARTS)) <= 9 * 60
    assert budget["install"] + budget["mask_rcnn"] <= 8 * 60
    # Time to AP trains each of its two sides for its minutes, and evaluates besides.
    assert budget["time_to_ap"] > 2 * 60 * gpu_check.TIME_TO_AP["minutes"]


def test_gpu_check_install_lays_the_package_out_when_pip_cannot_build_it(tmp_path, monkeypatch):
    """A machine whose setuptools cannot build pyproject.toml still gets the package importable:
    its folders are copied where pip would have put them."""
    gpu_check = _gpu_check()
    real = gpu_check.run_logged

    def pip_fails_on_the_source(cmd, env, timeout_s, log, cwd=None):
        if "--no-build-isolation" in cmd:
            return "failed", 1
        return real(cmd, env, timeout_s, log, cwd or gpu_check.ROOT)

    monkeypatch.setattr(gpu_check, "run_logged", pip_fails_on_the_source)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    result = gpu_check.install(tmp_path / "no_wheels", tmp_path, env, 60, smoke=True)
    assert result["status"] == "ok", result
    assert "copied" in result["note"]
    site = tmp_path / "site"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    assert result["instseg_edu_from"] == str(site / "instseg_edu" / "__init__.py")
    # Imported from the laid-out folder, away from the checkout:
    code = "import instseg_edu.widgets as w; print(w.__file__)"
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert run.stdout.strip() == str(site / "instseg_edu" / "widgets" / "__init__.py"), run.stderr


def test_gpu_check_slowest_cells_from_nbclient_timing():
    import nbformat

    gpu_check = _gpu_check()
    nb = nbformat.v4.new_notebook()
    timings = [("2026-12-04T16:00:00.000000Z", "2026-12-04T16:00:01.500000Z"),
               ("2026-12-04T16:00:02.000000Z", "2026-12-04T16:00:12.250000Z"), None]  # fmt: skip
    for i, timing in enumerate(timings):
        cell = nbformat.v4.new_code_cell(f"\n# cell {i}\nx = {i}")
        if timing:
            cell.metadata["execution"] = {
                "iopub.execute_input": timing[0],
                "shell.execute_reply": timing[1],
            }
        nb.cells.append(cell)
    nb.cells.append(nbformat.v4.new_markdown_cell("text"))
    assert gpu_check.slowest_cells(nb) == [
        {"cell": 1, "seconds": 10.25, "source": "# cell 1"},
        {"cell": 0, "seconds": 1.5, "source": "# cell 0"},
    ]


def test_time_to_ap_schedule_follows_the_clock():
    """The rate is constant after the warm-up unless --schedule says otherwise; a cosine follows
    the clock: after half the minutes of training the rate is half of it, whatever the steps."""
    sys.path.insert(0, str(BENCHMARKS))
    import time_to_ap

    model = torch.nn.Conv2d(3, 4, 1)
    args = time_to_ap.parse_args(["--device", "cpu", "--minutes", "4", "--warmup-steps", "10"])
    side = time_to_ap.SideRun("ours", model, "retinanet", args, None, torch.device("cpu"))
    assert side.lr_factor() == pytest.approx(0.1)  # the first step of ten warm-up steps
    side.step, side.trained = 10, 120.0
    assert side.lr_factor() == 1.0
    args = time_to_ap.parse_args(["--device", "cpu", "--minutes", "4", "--warmup-steps", "10",
                                  "--schedule", "cosine"])  # fmt: skip
    side = time_to_ap.SideRun("ours", model, "retinanet", args, None, torch.device("cpu"))
    assert side.lr_factor() == pytest.approx(0.1)
    side.step = 10
    assert side.lr_factor() == pytest.approx(1.0)
    side.trained = 120.0  # two of the four minutes
    assert side.lr_factor() == pytest.approx(0.5)
    side.trained = 180.0
    assert side.lr_factor() == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    side.trained = 300.0  # past the end: the last rate
    assert side.lr_factor() == pytest.approx(0.0)
