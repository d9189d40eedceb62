"""The ``instseg-edu`` command: help, clean errors for bad input, and an end-to-end smoke run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from instseg_edu.cli import build_parser, main
from instseg_edu.engine.checkpoint import load_checkpoint
from instseg_edu.recipes import RECIPES


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
    metrics = json.loads((out / "ap.json").read_text())
    kinds = ["bbox"] if family == "retinanet" else ["bbox", "segm"]
    assert list(metrics) == kinds
    assert (out / "ap.md").read_text().startswith("| metric | " + " | ".join(kinds) + " |")
    meta = load_checkpoint(out / "last.pt")["meta"]
    assert (meta["model"], meta["preset"]) == (family, recipe.model)


def test_demo_tier_variable_is_checked(monkeypatch, capsys):
    monkeypatch.setenv("INSTSEG_TIER", "laptop")
    _fails_cleanly(["demo", "--device", "cpu"], capsys, "INSTSEG_TIER='laptop' must be one of")


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
def test_train_on_coco_files_and_resume(smoke_run, tmp_path):
    rc, out, data = smoke_run
    folder = next(data.iterdir())
    common = ["train", "--train-json", str(folder / "train.json"), "--train-images",
              str(folder / "train"), "--image-size", "64", "--batch-size", "2", "--device", "cpu",
              "--preset", "RETINANET_R18_SMALL", "--warmup-steps", "1", "--workers", "0",
              "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main([*common, "--steps", "1"]) == 0
    assert main([*common, "--steps", "2", "--resume", str(tmp_path / "last.pt")]) == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert [s["step"] for s in history["steps"]] == [1, 2]


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
