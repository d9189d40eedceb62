"""The benchmark scripts run end to end at toy sizes, so they work when a GPU is there to run them
for real. Each runs in a subprocess from a temporary directory (their data folders are relative)
and must print its comparison; the numbers themselves are not checked here (toy sizes, a busy CPU),
except where they are exact: batched assignment equals the loop, and host-sync counts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
              "--repeats", "1")  # fmt: skip
    for op in ("RoIAlign 7x7, sampling_ratio=2", "RoIAlign 7x7, adaptive", "RoIPool 7x7"):
        assert re.search(re.escape(op) + r"\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out), out


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
    out = run(tmp_path, "train_throughput.py", "--smoke", "--families", "retinanet")
    for side in ("ours", "torchvision"):
        assert re.search(rf"retinanet {side}\s+fp32 train\s+[\d.]+ img/s\s+infer\s+[\d.]+", out)
    assert re.search(r"ratio ours/torchvision: train [\d.]+x\s+infer [\d.]+x", out), out


def test_time_to_ap_evaluates_both_sides_with_pycocotools(tmp_path):
    out = run(tmp_path, "time_to_ap.py", "--smoke", "--family", "mask_rcnn", "--json", "tta.json")
    for kind in ("bbox", "segm"):
        assert re.search(rf"final {kind} AP: ours [\d.]+\s+torchvision [\d.]+\s+ratio ", out), out
    curves = json.loads((tmp_path / "tta.json").read_text())["curves"]
    assert set(curves) == {"ours", "torchvision"}
    assert all(point["segm"] >= 0 for side in curves.values() for point in side)
