"""The ``instseg-edu`` command: help, clean errors for bad input, and an end-to-end smoke run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instseg_edu.cli import build_parser, main
from instseg_edu.data.shapes import make_shapes_dataset
from instseg_edu.engine.checkpoint import config_to_dict, load_checkpoint
from instseg_edu.models.retinanet import RETINANET_R18_SMALL
from instseg_edu.recipes import RECIPES, recipe


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "evaluate", "predict"):
        assert command in out


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "predict"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "--device" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "instseg_edu", "--help"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "instseg-edu" in out.stdout


def _fails_cleanly(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"instseg-edu {argv[0]}: error:")
    for fragment in fragments:
        assert fragment in err, err


def test_bad_paths_give_clean_errors(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    _fails_cleanly(["train", "--train-json", missing + ".json", "--train-images", str(tmp_path)],
                   capsys, "--train-json", "does not exist")  # fmt: skip
    (tmp_path / "a.json").write_text("{}")
    _fails_cleanly(["train", "--train-json", str(tmp_path / "a.json"), "--train-images", missing],
                   capsys, "--train-images", "image folder")  # fmt: skip
    _fails_cleanly(["train"], capsys, "--train-json is required")
    _fails_cleanly(["evaluate", "--checkpoint", missing + ".pt"], capsys, "does not exist")
    _fails_cleanly(["predict", "--checkpoint", missing + ".pt", "x.png"], capsys, "checkpoint")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _fails_cleanly(["evaluate", "--checkpoint", str(bad)], capsys, "not a readable checkpoint")
    torch.save({"model": {}}, tmp_path / "nometa.pt")
    _fails_cleanly(["evaluate", "--checkpoint", str(tmp_path / "nometa.pt")], capsys,
                   "no model description")  # fmt: skip


def test_malformed_annotations_give_clean_errors(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"images": []}')
    _fails_cleanly(["train", "--train-json", str(tmp_path / "a.json"), "--train-images",
                    str(tmp_path), "--device", "cpu"], capsys, "a.json")  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    _fails_cleanly(["evaluate", "--checkpoint", "x.pt", "--device", "cuda"], capsys, "CUDA")


def test_parser_defaults():
    args = build_parser().parse_args(["demo"])
    assert args.out == "runs/demo" and args.data == "data/shapes" and not args.smoke
    assert args.model == "mask_rcnn"  # the best masks in a few CPU minutes


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, data = root / "out", root / "data"
    rc = main(["demo", "--smoke", "--out", str(out), "--data", str(data), "--device", "cpu",
               "--no-progress"])  # fmt: skip
    return rc, out, data


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_demo_smoke_end_to_end(smoke_run, capsys):
    rc, out, _ = smoke_run
    assert rc == 0
    for name in (
        "ap.md",
        "ap.json",
        "history.json",
        "loss_curve.png",
        "predictions.png",
        "last.pt",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "ap.json").read_text())
    assert set(metrics["bbox"]) >= {"AP", "AP50", "AR100"}
    history = json.loads((out / "history.json").read_text())
    assert [s["step"] for s in history["steps"]] == [1, 2]
    assert (out / "ap.md").read_text().startswith("| metric | bbox |")


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_demo_trains_mask_rcnn_by_default_and_reports_mask_ap(smoke_run):
    rc, out, _ = smoke_run
    assert rc == 0
    meta = load_checkpoint(out / "last.pt")["meta"]
    assert meta["model"] == "mask_rcnn" and meta["preset"] == "MASK_RCNN_R18_CPU"
    assert meta["recipe"]["tier"] == "smoke" and meta["recipe"]["family"] == "mask_rcnn"
    assert set(json.loads((out / "ap.json").read_text())) == {"bbox", "segm"}
    assert (out / "ap.md").read_text().startswith("| metric | bbox | segm |")


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_demo_backbone_from_starts_solo_from_the_mask_rcnn_demo(smoke_run, tmp_path, capsys):
    """``--backbone-from``: SOLO's ResNet and (the same P2-P6) FPN from the Mask R-CNN demo's
    ``last.pt``; a file that is missing or holds another ResNet is one clean error."""
    rc, out, data = smoke_run
    assert rc == 0
    capsys.readouterr()
    args = ["demo", "--smoke", "--model", "solo", "--out", str(tmp_path / "solo"), "--data",
            str(data), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*args, "--backbone-from", str(out / "last.pt")]) == 0
    printed = capsys.readouterr().out
    assert "backbone: ResNet (" in printed
    assert " and FPN (" in printed
    # SOLO's recipe trains what it loaded again (RESULTS.md, thirtieth round)
    assert f"from {out / 'last.pt'}; the heads start" in printed and "frozen" not in printed
    # YOLACT's recipe pretrains its ResNet on object crops, unless it starts from a trained one
    yolact = [*args[:3], "yolact", "--out", str(tmp_path / "yolact"), *args[6:]]
    assert main([*yolact, "--backbone-from", str(out / "last.pt")]) == 0
    printed = capsys.readouterr().out
    assert "--backbone-from: no pretraining on object crops" in printed
    assert "backbone: ResNet (" in printed and "pretrained the ResNet" not in printed
    assert "frozen" not in printed  # YOLACT's ResNet keeps learning under its new FPN
    given = ["--backbone-from", str(out / "last.pt"), "--pretrain-seconds", "0.5"]
    assert main([*yolact, *given]) == 0
    printed = capsys.readouterr().out
    assert "no pretraining" not in printed and "pretrained the ResNet" in printed
    _fails_cleanly([*args, "--backbone-from", str(tmp_path / "none.pt")], capsys,
                   "--backbone-from", "does not exist")  # fmt: skip
    full_width = tmp_path / "full_width.pt"
    from instseg_edu.engine.checkpoint import save_checkpoint
    from instseg_edu.models.solo import SOLO_R18_SMALL, build_solo

    save_checkpoint(full_width, {"model": build_solo(SOLO_R18_SMALL).state_dict()})
    _fails_cleanly([*args, "--backbone-from", str(full_width)], capsys,
                   "--backbone-from", "its ResNet is not this model's")  # fmt: skip
    _fails_cleanly(["train", "--resume", str(out / "last.pt"), "--backbone-from",
                    str(out / "last.pt")], capsys, "--backbone-from with --resume")  # fmt: skip
    _fails_cleanly(["train", "--resume", str(out / "last.pt"), "--pretrain-seconds", "5"],
                   capsys, "--pretrain-seconds with --resume")  # fmt: skip


def test_gallery_threshold_is_the_best_f1():
    from instseg_edu.cli import _threshold_and_why
    from instseg_edu.engine.analysis import match_coco, score_sweep

    gt = {
        "images": [{"id": 1, "width": 64, "height": 64, "file_name": "1.png"}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400,
             "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 30, 20, 20], "area": 400,
             "iscrowd": 0},
        ],
    }  # fmt: skip
    dets = [  # right at 0.9, the wrong class at 0.8, the second object only at 0.2
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [30, 30, 20, 20], "score": 0.8},
        {"image_id": 1, "category_id": 1, "bbox": [30, 30, 20, 20], "score": 0.2},
    ]
    # F1 at 0.9: 2/3 (precision 1, recall 1/2); at 0.8: 1/2; at 0.2: 4/5 (2/3 and 1)
    sweep = score_sweep(match_coco(gt, dets))
    thr = sweep.best_f1()[0]
    assert thr == pytest.approx(0.2)
    assert _threshold_and_why(thr, sweep) == (thr, (
        "score >= 0.20: 67% of the boxes right, 100% of the objects found at IoU 0.5 on the "
        "validation split, its best F1 (at score >= 0.30: 50% of the boxes right, 50% of the "
        "objects found)"))  # fmt: skip
    assert sweep.describe(0.95) == "score >= 0.95: no box"
    assert sweep.describe(0.2, against=0.3).endswith(" (at score >= 0.30: 50% of the boxes right, "
                                                     "50% of the objects found)")  # fmt: skip
    assert sweep.describe(0.2, against=0.201) == sweep.describe(0.2)  # both read 0.20
    assert _threshold_and_why(0.2999, sweep)[1].endswith("its best F1")
    assert _threshold_and_why(None, sweep)[0] == 0.3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["retinanet", "solo", "yolact"])
def test_demo_smoke_of_every_family(family, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["demo", "--smoke", "--model", family, "--out", str(out), "--data",
               str(tmp_path / "data"), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    recipe = RECIPES[(family, "smoke")]
    assert printed.startswith(f"tier 'smoke' (--smoke): {recipe.model} on 8 images of 64 px")
    assert (out / "predictions.png").is_file() and (out / "last.pt").is_file()
    assert re.search(r"^gallery: score >= \d\.\d\d: ", printed, re.M), printed
    # RetinaNet's and YOLACT's recipes pretrain the ResNet on object crops first (half a second
    # here); SOLO's does not
    pretrained = "pretrained the ResNet as a classifier of " in printed
    assert pretrained == (family != "solo"), printed
    if family == "solo":  # --seed changes the training, never the standard split's images
        val_json = tmp_path / "data" / "64px-8-4" / "val.json"
        before = val_json.read_bytes()
        rc = main(["demo", "--smoke", "--model", family, "--out", str(out), "--data",
                   str(tmp_path / "data"), "--device", "cpu", "--no-progress",
                   "--seed", "3"])  # fmt: skip
        assert rc == 0 and val_json.read_bytes() == before
        assert json.loads(before)["info"]["params"]["seed"] == 0
    metrics = json.loads((out / "ap.json").read_text())
    kinds = ["bbox"] if family == "retinanet" else ["bbox", "segm"]
    assert list(metrics) == kinds
    assert (out / "ap.md").read_text().startswith("| metric | " + " | ".join(kinds) + " |")
    meta = load_checkpoint(out / "last.pt")["meta"]
    assert (meta["model"], meta["preset"]) == (family, recipe.model)


def test_demo_tier_variable_is_checked(monkeypatch, capsys):
    monkeypatch.setenv("INSTSEG_TIER", "laptop")
    _fails_cleanly(["demo", "--device", "cpu"], capsys, "INSTSEG_TIER='laptop' must be one of")


def test_demo_with_fewer_steps_expects_the_time_of_those_steps(monkeypatch, tmp_path, capsys):
    """``--steps 180`` of the 540-step cpu recipe (4.0 min on two cores, its first minute the
    pretraining): 180 steps' time and the minute, in the measured part and in the parenthesis.
    Stopped before any data is made."""
    from instseg_edu import cli, recipes

    monkeypatch.setenv("INSTSEG_TIER", "cpu")
    monkeypatch.setattr(recipes, "measure_step_seconds", lambda r, *args, **kwargs: 0.6)

    def stop(*args, **kwargs):
        raise cli.CliError("stopped before the data")

    monkeypatch.setattr(cli, "_shapes", stop)
    assert main(["demo", "--device", "cpu", "--steps", "180", "--data", str(tmp_path)]) == 2
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("tier 'cpu' (INSTSEG_TIER=cpu): MASK_RCNN_R18_CPU"), line
    assert "180 steps, after 60 s of pretraining its ResNet on object crops" in line
    assert "training takes about 3.3 min" in line  # 180 x 0.6 s x 1.3 + 1 min
    assert line.endswith("(about 2.0 min on two CPU cores)"), line  # 1 + 3.0 min x 180 / 540


def test_demo_warns_when_a_step_takes_far_longer_than_the_recipe_s(monkeypatch, tmp_path,
                                                                    capsys):  # fmt: skip
    """A demo sharing two cores with another job timed 4.98 s a step (about 0.26 s where the
    recipe was timed), trained 77 steps and learned nothing: the demo says so before training."""
    from instseg_edu import cli, recipes

    monkeypatch.setenv("INSTSEG_TIER", "cpu")
    for seconds, warned in ((4.98, True), (0.6, False)):
        monkeypatch.setattr(recipes, "measure_step_seconds", lambda r, *a, s=seconds, **k: s)

        def stop(*args, **kwargs):
            raise cli.CliError("stopped before the data")

        monkeypatch.setattr(cli, "_shapes", stop)
        assert main(["demo", "--device", "cpu", "--minutes", "5", "--data", str(tmp_path)]) == 2
        lines = capsys.readouterr().out.splitlines()
        warning = [line for line in lines if line.startswith("warning: a step takes")]
        assert bool(warning) == warned, lines
        if warned:
            assert lines.index(warning[0]) == 2  # right after the tier and the --minutes lines
            assert "19 times as long here" in warning[0]


def test_demo_minutes_trains_for_the_minutes_on_this_machine(monkeypatch, tmp_path, capsys):
    """``--minutes 3.9`` at 0.6 s per step timed here: the recipe's 60 s of pretraining, then
    174 s of training, about 174 / 0.6 = 290 steps, at most 174 / (0.6 x 0.6) = 483, told in the
    first two lines, with no time for "two CPU cores" (the time now belongs to this machine)."""
    from instseg_edu import cli, recipes

    monkeypatch.setenv("INSTSEG_TIER", "cpu")
    timed = []

    def measure(r, steps=2, device="auto", frozen_backbone=False):
        timed.append(r.max_steps)
        return 0.6

    monkeypatch.setattr(recipes, "measure_step_seconds", measure)

    def stop(*args, **kwargs):
        raise cli.CliError("stopped before the data")

    monkeypatch.setattr(cli, "_shapes", stop)
    assert main(["demo", "--device", "cpu", "--minutes", "3.9", "--data", str(tmp_path)]) == 2
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith("tier 'cpu' (INSTSEG_TIER=cpu): MASK_RCNN_R18_CPU"), first
    budget = ("batch 8, 483 steps at most, after 60 s of pretraining its ResNet on object crops: "
              "training ends at 2.9 min, its learning rate following")  # fmt: skip
    assert first.endswith(budget + " the clock"), first  # nothing about two CPU cores
    assert second == ("--minutes 3.9: the first 60 s pretrain the ResNet, then 0.60 s per step "
                      "timed here, so about 290 steps at that speed (a real step also loads its "
                      "batch, and one hour's steps differ from another's; at most 483); the "
                      "cosine schedule follows the clock and ends at 3.9 min")  # fmt: skip
    assert timed == [540]  # the recipe's step, timed once
    # The training it starts has the budget: 2.9 min after the pretraining, 483 steps as a bound.
    monkeypatch.undo()
    monkeypatch.setenv("INSTSEG_TIER", "cpu")
    monkeypatch.setattr(recipes, "measure_step_seconds", measure)
    started = []
    monkeypatch.setattr(cli, "_run_training", lambda *args, **kw: started.append(args) or 0)
    small = ["--num-train", "2", "--num-val", "2"]
    assert main(["demo", "--device", "cpu", "--minutes", "3.9", "--data", str(tmp_path), *small,
                 "--image-size", "32"]) == 0  # fmt: skip
    cfg = started[0][7]
    assert (cfg.max_steps, cfg.schedule) == (483, "cosine")
    assert cfg.max_seconds == pytest.approx(174.0) and started[0][0].pretrain_seconds == 60.0
    assert main(["demo", "--device", "cpu", "--minutes", "3.9", "--data", str(tmp_path), *small,
                 "--image-size", "32", "--pretrain-seconds", "0"]) == 0  # fmt: skip
    cfg = started[1][7]  # no pretraining: the whole 3.9 min train the detector
    assert cfg.max_seconds == pytest.approx(234.0) and started[1][0].pretrain_seconds is None
    del started[1]
    # The recipe trains on 128 px images and scores them at 192; --image-size N does both at N.
    assert main(["demo", "--device", "cpu", "--minutes", "3.9", "--data", str(tmp_path / "r"),
                 *small]) == 0  # fmt: skip
    for args, train_side, test_side in zip(started, (32, 128), (32, 192)):
        train_set, val_set = args[4], args[5]
        assert train_set[0][0].shape[-2:] == (train_side, train_side)
        assert val_set[0][0].shape[-2:] == (test_side, test_side)
        assert args[0].image_size == test_side  # the checkpoint's resize for evaluate / predict
        assert args[0].train_image_size == train_side  # what the "model:" line reports
    assert (tmp_path / "r" / "128px-2-2" / "val.json").exists()

    _fails_cleanly(["demo", "--minutes", "3", "--steps", "10"], capsys, "--steps or --minutes")
    _fails_cleanly(["demo", "--minutes", "0", "--data", str(tmp_path)], capsys, "--minutes=0.0")
    _fails_cleanly(["demo", "--minutes", "3", "--smoke"], capsys, "smoke tier")
    _fails_cleanly(
        ["demo", "--minutes", "0.9", "--data", str(tmp_path)],
        capsys,
        "--minutes: minutes=0.9 leaves no time to train after the pretraining's 60 s",
    )
    _fails_cleanly(["demo", "--pretrain-seconds", "-1", "--smoke"], capsys,
                   "--pretrain-seconds=-1 must be >= 0")  # fmt: skip


def test_train_minutes_is_a_time_budget_with_the_length_as_a_bound(monkeypatch, tmp_path, capsys):
    """``train --minutes 2``: ``max_seconds`` 120 with the default 12 epochs (or ``--steps``) as
    the bound; refused at 0, under torchrun, and on resume with another budget."""
    from instseg_edu import cli
    from instseg_edu.engine import distributed

    make_shapes_dataset(tmp_path, 4, 64, split="train")
    data = ["--train-json", str(tmp_path / "train.json"), "--train-images", str(tmp_path / "train"),
            "--device", "cpu", "--workers", "0", "--image-size", "64"]  # fmt: skip
    started = []
    monkeypatch.setattr(cli, "_run_training", lambda *args, **kw: started.append(args[7]) or 0)
    assert main(["train", *data, "--minutes", "2"]) == 0
    assert main(["train", *data, "--minutes", "0.5", "--steps", "40"]) == 0
    assert main(["train", *data]) == 0
    budgets = [(c.max_seconds, c.epochs, c.max_steps) for c in started]
    assert budgets == [(120.0, 12, None), (30.0, None, 40), (None, 12, None)]

    _fails_cleanly(["train", *data, "--minutes", "0"], capsys, "--minutes=0.0 must be > 0")
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    _fails_cleanly(["train", *data, "--minutes", "2"], capsys, "--minutes under torchrun")
    monkeypatch.undo()
    # A checkpoint trained with a 2-minute budget goes on with the rest of it, or is refused.
    model_cfg = config_to_dict(RETINANET_R18_SMALL.with_num_classes(7))
    torch.save({"meta": {"model": "retinanet", "model_config": model_cfg},
                "config": {"max_seconds": 120.0, "lr": 0.01}}, tmp_path / "last.pt")  # fmt: skip
    resume = ["train", "--resume", str(tmp_path / "last.pt"), "--minutes", "3"]
    _fails_cleanly(resume, capsys, "--minutes 3 differs from the checkpoint's time budget (--mi")
    _fails_cleanly(resume[:3], capsys, "--train-json is required")  # no --minutes: past it


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_evaluate_and_predict_from_the_demo_checkpoint(smoke_run, tmp_path, capsys):
    rc, out, data = smoke_run
    assert rc == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "last.pt"), "--device", "cpu",
                 "--out", str(tmp_path / "ev"), "--workers", "0"]) == 0  # fmt: skip
    assert "| AP |" in capsys.readouterr().out
    # Same model, same images, same evaluation: the same numbers as the demo's.
    assert json.loads((tmp_path / "ev" / "ap.json").read_text()) == json.loads(
        (out / "ap.json").read_text()
    )
    images = sorted((next(data.iterdir()) / "val").glob("*.png"))[:2]
    assert main(["predict", "--checkpoint", str(out / "last.pt"), *map(str, images), "--out",
                 str(tmp_path / "pred"), "--device", "cpu", "--score-thr", "0.0"]) == 0  # fmt: skip
    for image in images:
        assert (tmp_path / "pred" / f"{image.stem}.png").is_file()
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert all({"bbox", "score", "category_id", "file_name"} <= set(r) for r in results)


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_evaluate_at_several_test_sizes_merges_each_for_its_boxes(smoke_run, tmp_path, capsys):
    from instseg_edu.engine.checkpoint import load_checkpoint

    rc, out, _ = smoke_run
    assert rc == 0
    checkpoint = str(out / "last.pt")
    size = int(load_checkpoint(checkpoint)["meta"]["image_size"])
    common = ["evaluate", "--checkpoint", checkpoint, "--device", "cpu", "--workers", "0"]
    _fails_cleanly([*common, "--test-sizes", str(size), "48"], capsys,
                   f"--size-cuts needs 1 value(s) for --test-sizes {size} 48")  # fmt: skip
    _fails_cleanly([*common, "--test-sizes", "96", "64", "48", "--size-cuts", "20", "10"], capsys,
                   "--size-cuts [20.0, 10.0] must be positive and increasing")  # fmt: skip
    # The same size twice, split at 16 px: every box comes from one of two identical passes, so
    # the merge is the single pass and the numbers are the demo's, to the last bit.
    assert main([*common, "--test-sizes", str(size), str(size), "--size-cuts", "16", "--out",
                 str(tmp_path / "same")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"each test size for its boxes: {size} px 0-16 px, {size} px 16-inf px" in printed
    demo = json.loads((out / "ap.json").read_text())
    assert json.loads((tmp_path / "same" / "ap.json").read_text()) == demo
    # Two sizes: runs, and reports both kinds of AP for the demo's Mask R-CNN
    assert main([*common, "--test-sizes", str(size + 32), str(size), "--size-cuts", "16",
                 "--out", str(tmp_path / "two")]) == 0  # fmt: skip
    assert list(json.loads((tmp_path / "two" / "ap.json").read_text())) == ["bbox", "segm"]


@pytest.mark.slow
def test_demo_scores_and_draws_the_merge_of_its_test_sizes(tmp_path, monkeypatch, capsys):
    import dataclasses

    from instseg_edu import recipes

    key = ("mask_rcnn", "smoke")
    merged = dataclasses.replace(recipes.RECIPES[key], test_size=96, merge_test_sizes=(64,),
                                 size_cuts=(16.0,))  # fmt: skip
    monkeypatch.setitem(recipes.RECIPES, key, merged)
    out = tmp_path / "out"
    assert main(["demo", "--smoke", "--out", str(out), "--data", str(tmp_path / "data"),
                 "--device", "cpu", "--no-progress", "--score-thr", "0"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "at 96 px alone: bbox AP50" in printed
    assert "each test size for its boxes: 96 px 0-16 px, 64 px 16-inf px" in printed
    for name in ("ap.md", "ap.json", "predictions.png", "last.pt"):
        assert (out / name).is_file(), name
    assert "each test size for its boxes" in (out / "ap.md").read_text()
    demo = json.loads((out / "ap.json").read_text())
    # evaluate scores a checkpoint as its recipe did: the same merge, the same numbers
    common = ["evaluate", "--checkpoint", str(out / "last.pt"), "--device", "cpu", "--workers", "0"]
    assert main([*common, "--out", str(tmp_path / "again")]) == 0
    assert "each test size for its boxes: 96 px" in capsys.readouterr().out
    assert json.loads((tmp_path / "again" / "ap.json").read_text()) == demo
    assert main([*common, "--test-sizes", "96", "--out", str(tmp_path / "one")]) == 0
    assert "each test size" not in capsys.readouterr().out


def _keep_checkpoint_of_step(monkeypatch, step: int, copy: Path):
    """Copy the checkpoint that training writes at ``step`` to ``copy`` (later ones overwrite
    last.pt): a run interrupted there, to resume from."""
    import shutil

    from instseg_edu.engine import train as train_module

    save = train_module.save_checkpoint

    def save_and_copy(path, state):
        written = save(path, state)
        if state["step"] == step:
            shutil.copy(written, copy)
        return written

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_copy)


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_resume_continues_the_run_exactly_with_the_checkpoints_settings(
    smoke_run, tmp_path, capsys, monkeypatch
):
    _, _, data = smoke_run
    folder = next(data.iterdir())
    # A run whose settings all differ from the defaults: lr 0.02 x 2 / 16 = 0.0025 (not the
    # default 0.02), 4 steps of a cosine schedule, a validation set.
    train = recipe("mask_rcnn", "smoke").train_split  # the demo's training split
    first = ["train", "--train-json", str(folder / f"{train}.json"), "--train-images",
             str(folder / train), "--val-json", str(folder / "val.json"), "--val-images",
             str(folder / "val"), "--image-size", "64", "--batch-size", "2", "--device", "cpu",
             "--preset", "RETINANET_R18_SMALL", "--warmup-steps", "1", "--workers", "0",
             "--steps", "4", "--scale-lr", "16", "--checkpoint-every", "2", "--seed", "3",
             "--no-progress"]  # fmt: skip
    straight = tmp_path / "straight"
    _keep_checkpoint_of_step(monkeypatch, 2, tmp_path / "step2.pt")
    assert main([*first, "--out", str(straight)]) == 0
    monkeypatch.undo()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (tmp_path / "step2.pt").rename(resumed / "last.pt")
    capsys.readouterr()

    # Nothing but --resume: every setting is the checkpoint's, the output folder its folder.
    assert main(["train", "--resume", str(resumed / "last.pt"), "--device", "cpu",
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    assert "lr: 0.0025 (the checkpoint's)" in capsys.readouterr().out
    one = json.loads((straight / "history.json").read_text())
    two = json.loads((resumed / "history.json").read_text())
    assert [s["step"] for s in two["steps"]] == [1, 2, 3, 4]
    for a, b in zip(one["steps"], two["steps"], strict=True):
        for key in ("loss", "loss_cls", "loss_bbox", "lr", "epoch"):
            assert a[key] == b[key], (a["step"], key)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert b["config"]["lr"] == 0.0025 and b["config"] == {
        **a["config"],
        "checkpoint_dir": str(resumed),
    }
    assert b["meta"] == a["meta"] and b["meta"]["val_json"] == str(folder / "val.json")
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert json.loads((resumed / "ap.json").read_text()) == json.loads(
        (straight / "ap.json").read_text()
    )

    # A given setting that differs from the checkpoint's: one line naming it and both values.
    again = ["train", "--resume", str(resumed / "last.pt"), "--device", "cpu", "--workers", "0",
             "--out", str(tmp_path / "x"), "--no-progress"]  # fmt: skip
    _fails_cleanly([*again, "--lr", "0.02"], capsys, "--lr 0.02 gives lr 0.02",
                   "the checkpoint's lr is 0.0025")  # fmt: skip
    _fails_cleanly([*again, "--steps", "6"], capsys, "--steps 6 differs from the checkpoint's "
                   "--steps 4", "--schedule cosine")  # fmt: skip
    _fails_cleanly([*again, "--batch-size", "4"], capsys,
                   "--batch-size 4 differs from the checkpoint's 2")  # fmt: skip
    _fails_cleanly([*again, "--model", "solo"], capsys,
                   "--model solo differs from the checkpoint's retinanet")  # fmt: skip
    assert main([*again, "--lr", "0.02", "--scale-lr", "16", "--steps", "4"]) == 0  # the same


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_train_freeze_backbone_keeps_it_frozen_and_resume_too(
    smoke_run, tmp_path, capsys, monkeypatch
):
    """``train --backbone-from --freeze-backbone``: SOLO's ResNet and FPN stay the Mask R-CNN
    demo's, the checkpoint says so, and ``--resume`` freezes them again (its optimiser state holds
    only the heads), continuing the run exactly."""
    _, out, data = smoke_run
    folder = next(data.iterdir())
    train = recipe("mask_rcnn", "smoke").train_split
    first = ["train", "--model", "solo", "--preset", "SOLO_R18_CPU", "--train-json",
             str(folder / f"{train}.json"), "--train-images", str(folder / train),
             "--image-size", "64", "--batch-size", "2", "--device", "cpu", "--workers", "0",
             "--optimizer", "adamw", "--lr", "0.001", "--warmup-steps", "1", "--steps", "4",
             "--checkpoint-every", "2", "--no-progress"]  # fmt: skip
    _fails_cleanly([*first, "--freeze-backbone", "--out", str(tmp_path / "x")], capsys,
                   "--freeze-backbone needs --backbone-from")  # fmt: skip
    straight = tmp_path / "straight"
    _keep_checkpoint_of_step(monkeypatch, 2, tmp_path / "step2.pt")
    given = ["--backbone-from", str(out / "last.pt"), "--freeze-backbone"]
    assert main([*first, *given, "--out", str(straight)]) == 0
    monkeypatch.undo()
    printed = capsys.readouterr().out
    assert ", frozen (only the heads learn)" in printed and "M of them trained)" in printed
    donor, a = load_checkpoint(out / "last.pt")["model"], load_checkpoint(straight / "last.pt")
    assert a["meta"]["frozen_backbone"] == ["resnet", "fpn"]
    for name, value in a["model"].items():
        if name.startswith("backbone."):
            assert torch.equal(value, donor[name]), name
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (tmp_path / "step2.pt").rename(resumed / "last.pt")
    assert main(["train", "--resume", str(resumed / "last.pt"), "--device", "cpu",
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    b = load_checkpoint(resumed / "last.pt")
    assert b["meta"]["frozen_backbone"] == ["resnet", "fpn"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    # a run that trained its whole backbone is not frozen on resume
    whole = tmp_path / "whole"
    assert main([*first, "--backbone-from", str(out / "last.pt"), "--out", str(whole)]) == 0
    assert load_checkpoint(whole / "last.pt")["meta"]["frozen_backbone"] is None
    refused = "--freeze-backbone: the checkpoint's run trained its whole backbone"
    _fails_cleanly(["train", "--resume", str(whole / "last.pt"), "--freeze-backbone",
                    "--device", "cpu", "--workers", "0"], capsys, refused)  # fmt: skip


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_resume_extends_a_constant_schedule_run_exactly(smoke_run, tmp_path, capsys):
    # With --schedule constant the lr of a step does not depend on the run's length, so a longer
    # run is well defined: 2 steps then 2 more equal 4 steps straight.
    _, _, data = smoke_run
    folder = next(data.iterdir())
    train = recipe("mask_rcnn", "smoke").train_split  # the demo's training split
    common = ["train", "--train-json", str(folder / f"{train}.json"), "--train-images",
              str(folder / train), "--image-size", "64", "--batch-size", "2", "--device",
              "cpu", "--preset", "RETINANET_R18_SMALL", "--warmup-steps", "1", "--workers", "0",
              "--schedule", "constant", "--lr", "0.005", "--no-progress"]  # fmt: skip
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "short")]) == 0
    checkpoint = str(tmp_path / "short" / "last.pt")
    capsys.readouterr()
    _fails_cleanly(["train", "--resume", checkpoint, "--steps", "1", "--device", "cpu"], capsys,
                   "--steps 1: the checkpoint is at step 2 already")  # fmt: skip
    assert main(["train", "--resume", checkpoint, "--steps", "4", "--device", "cpu",
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    one = json.loads((tmp_path / "straight" / "history.json").read_text())
    two = json.loads((tmp_path / "short" / "history.json").read_text())
    assert [s["step"] for s in two["steps"]] == [1, 2, 3, 4]
    for a, b in zip(one["steps"], two["steps"], strict=True):
        for key in ("loss", "lr"):
            assert a[key] == b[key], (a["step"], key)


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_evaluate_report_writes_the_analysis(smoke_run, tmp_path, capsys):
    import re

    from instseg_edu.engine.evaluate import METRIC_NAMES

    rc, out, _ = smoke_run
    assert rc == 0
    checkpoint = str(out / "last.pt")
    bad = ["evaluate", "--checkpoint", checkpoint, "--device", "cpu", "--report", str(tmp_path),
           "--iou-thr", "0.52"]  # fmt: skip
    _fails_cleanly(bad, capsys, "--iou-thr 0.52")
    report = tmp_path / "report"
    assert main(["evaluate", "--checkpoint", checkpoint, "--device", "cpu", "--workers", "0",
                 "--out", str(tmp_path / "ev"), "--report", str(report), "--score-thr", "0.05",
                 "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| AP |" in printed and f"wrote {report}/" in printed
    for name in ("summary.md", "analysis.json", "bbox_pr_curves.png", "bbox_confusion.png",
                 "bbox_outcomes.png", "bbox_gallery.png"):  # fmt: skip
        assert (report / name).is_file(), name
    # Same model, same images, same COCOeval: the demo's numbers, to the last bit.
    demo = json.loads((out / "ap.json").read_text())
    analysis = json.loads((report / "analysis.json").read_text())
    assert analysis["metrics"] == demo
    assert json.loads((tmp_path / "ev" / "ap.json").read_text()) == demo
    summary = (report / "summary.md").read_text()
    assert list(demo) == ["bbox", "segm"]  # the demo's Mask R-CNN
    for name in METRIC_NAMES:
        cells = re.search(rf"^\| {name} \| (\S+) \| (\S+) \|$", summary, re.M).groups()
        for iou_type, cell in zip(demo, cells):
            value = demo[iou_type][name]
            assert cell == ("n/a" if value < 0 else f"{value:.3f}"), (iou_type, name)
    assert analysis["settings"] == {"iou_thr": 0.5, "area": "all", "max_dets": 100,
                                    "score_thr": 0.05}  # fmt: skip
    totals = analysis["errors"]["bbox"]["all"]
    per_class = [v for k, v in analysis["errors"]["bbox"].items() if k != "all"]
    for key, total in totals.items():
        assert sum(c[key] for c in per_class) == total


@pytest.mark.slow
@pytest.mark.xdist_group("cli_smoke")  # share the module-scoped demo run on one worker
def test_predict_gives_images_of_the_same_name_their_own_drawings(smoke_run, tmp_path, capsys):
    import shutil

    rc, out, data = smoke_run
    assert rc == 0
    first, second = sorted((next(data.iterdir()) / "val").glob("*.png"))[:2]
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "c").mkdir(parents=True)
    inputs = [
        tmp_path / "a" / "img.png",
        tmp_path / "b" / "c" / "img.png",
        tmp_path / "a" / "x.png",
    ]
    for source, target in zip([first, second, second], inputs):
        shutil.copy(source, target)
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(out / "last.pt"), *map(str, inputs), "--out",
                 str(pred), "--device", "cpu", "--score-thr", "0.0"]) == 0  # fmt: skip
    drawings = sorted(str(p.relative_to(pred)) for p in pred.rglob("*.png"))
    assert drawings == ["a/img.png", "b/c/img.png", "x.png"]
    # Different images, different drawings (the second is not the first overwritten).
    assert (pred / "a" / "img.png").read_bytes() != (pred / "b" / "c" / "img.png").read_bytes()
    printed = capsys.readouterr().out
    for image, drawing in zip(inputs, ["a/img.png", "b/c/img.png", "x.png"]):
        assert f"{image}: " in printed and f" -> {pred / drawing}\n" in printed


def test_drawing_names_are_unique():
    from instseg_edu.cli import _drawing_names

    paths = ["/d/a/img.jpg", "/d/b/img.jpg", "/d/a/img.tif", "/d/a/one.png", "/d/a/one.png",
             "/d/two.jpg"]  # fmt: skip
    names = _drawing_names([Path(p) for p in paths])
    assert [str(n) for n in names] == ["a/img_jpg.png", "b/img.png", "a/img_tif.png", "one.png",
                                       "one-2.png", "two.png"]  # fmt: skip


def test_sync_bn_in_one_process_is_a_note_and_on_cpu_processes_an_error(
    tmp_path, capsys, monkeypatch
):
    missing = str(tmp_path / "missing.json")
    # One process: a note that it has no effect, then the command goes on (here to its error).
    assert main(["train", "--sync-bn", "--device", "cpu", "--train-json", missing]) == 2
    captured = capsys.readouterr()
    assert "note: --sync-bn has no effect in one process" in captured.out
    assert "--train-json" in captured.err
    # Two CPU processes (as under torchrun): refused in one line naming the flag, before the data.
    from instseg_edu.engine import distributed

    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    _fails_cleanly(["train", "--sync-bn", "--device", "cpu", "--train-json", missing], capsys,
                   "--sync-bn needs GPUs", "leave it out")  # fmt: skip


def test_warnings_are_one_line_in_the_command_and_ordinary_for_the_library():
    import argparse
    import warnings

    from instseg_edu.cli import _warnings_as_lines

    args = argparse.Namespace(command="train", debug=False)
    with _warnings_as_lines(args):
        line = warnings.formatwarning("first line\n  second", UserWarning, "/x/cli.py", 174)
        other = warnings.formatwarning("old", FutureWarning, "/x/y.py", 1)
    assert line == "instseg-edu train: warning: first line second\n"
    assert other == "instseg-edu train: warning (FutureWarning): old\n"
    # Outside the command (and with --debug) Python's own form, with the source location.
    assert "/x/cli.py:174: UserWarning" in warnings.formatwarning(
        "m", UserWarning, "/x/cli.py", 174
    )
    with _warnings_as_lines(argparse.Namespace(command="train", debug=True)):
        assert "UserWarning" in warnings.formatwarning("m", UserWarning, "/x/cli.py", 174)


@pytest.mark.slow
def test_drops_are_one_warning_line_a_count_and_a_file_in_the_run_folder(tmp_path):
    """As a user sees it (a separate process, DataLoader workers): the drops are announced once
    as one clean line, counted, and listed in full in OUT/dropped_annotations.json."""
    import numpy as np
    from PIL import Image

    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i in (1, 2, 3, 4):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 64, "width": 64})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [8, 8, 30, 30],
                     "segmentation": [[8, 8, 38, 8, 38, 38, 8, 38]], "iscrowd": 0})  # fmt: skip
    anns += [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": [[]]},
        {"id": 12, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5],
         "segmentation": {"size": [64, 64], "counts": [4096]}},  # covers no pixel
    ]  # fmt: skip
    ann_file = tmp_path / "train.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 1, "name": "square"}]}))  # fmt: skip
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "instseg_edu", "train", "--train-json", str(ann_file),
         "--train-images", str(tmp_path / "img"), "--preset", "RETINANET_R18_SMALL",
         "--image-size", "64", "--batch-size", "1", "--steps", "2", "--workers", "2",
         "--device", "cpu", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    err = [line for line in done.stderr.splitlines() if line.strip()]
    drops = [line for line in err if "dropped" in line]
    assert drops == [
        f"instseg-edu train: warning: {ann_file}: dropped 2 annotation(s) (annotation 11: its "
        "segmentation has no valid polygon (each needs at least 3 points, [x1, y1, x2, y2, x3, "
        "y3, ...]; got lengths [0]); "
        "annotation 12: its mask covers no pixel)"
    ], done.stderr
    assert "UserWarning" not in done.stderr and "cli.py" not in done.stderr, done.stderr
    listed = out / "dropped_annotations.json"
    assert f"note: 2 annotations dropped (2 from {ann_file}); all of them, with their reasons, " \
        f"are listed in {listed}" in done.stdout  # fmt: skip
    records = json.loads(listed.read_text())
    assert [(r["file"], r["annotation_id"]) for r in records] == [(str(ann_file), 11),
                                                                  (str(ann_file), 12)]  # fmt: skip
    assert "no pixel" in records[1]["reason"]
