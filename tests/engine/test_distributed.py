"""Data-parallel training under ``torchrun --standalone --nproc_per_node=2`` (Gloo, on the CPU).

The worker programs are in tests/engine/_ddp_worker.py; one torchrun launch runs all of its
scenarios (a launch costs two fresh Python processes importing torch), and the tests here compare
rank 0's results with the same work done in this one process. The tests share one xdist group:
each launch keeps both cores busy, so they run one after another.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import _ddp_worker as worker
import pytest
import torch

from instseg_edu.cli import main
from instseg_edu.data.shapes import make_shapes_dataset, make_shapes_splits
from instseg_edu.engine.checkpoint import load_checkpoint
from instseg_edu.engine.distributed import launch
from instseg_edu.engine.train import make_loader, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.xdist_group("ddp")]


def torchrun(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (``python -m torch.distributed.run``).

    In a session of its own, so that a timeout (a hang) ends the launcher *and* its processes.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"torchrun {args} did not end within {timeout} s:\n{stdout}{stderr}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory):
    data, out = tmp_path_factory.mktemp("ddp_data"), tmp_path_factory.mktemp("ddp_out")
    done = torchrun(Path(worker.__file__), data, out)
    assert done.returncode == 0, done.stdout + done.stderr
    return data, out


def _loss_keys(step: dict) -> list[str]:
    return [k for k in step if k == "loss" or k.startswith("loss_")]


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_two_processes_equal_one_process_over_the_global_batch(worker_run, family):
    # Two processes x 2 images (items 0, 2 | 1, 3 of the unshuffled set) against one process x 4
    # images (0, 1, 2, 3): the same global batches. BatchNorm is frozen (norm_eval=True) in both,
    # see worker.build. The loss divisors are reduced over the processes; without that the
    # parameters differ by 1e-4 to 1e-3 after two steps.
    data, out = worker_run
    ddp = torch.load(out / "equality.pt", weights_only=True)[family]
    ds = worker.dataset(data)
    model = worker.build(family, len(ds.classes))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    loader = make_loader(ds, 2 * worker.PER_PROCESS_BATCH, shuffle=False)
    history = train(model, loader, worker.config())

    assert [s["step"] for s in ddp["steps"]] == [1, 2]
    for one, two in zip(history.steps, ddp["steps"], strict=True):
        for key in _loss_keys(one):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (one["step"], key)
    trained = model.state_dict()
    moved = max((trained[k].float() - v.float()).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3  # the steps did change the model, by far more than the tolerance
    for name, value in trained.items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_evaluation_split_over_processes_equals_one_process(worker_run, family):
    # 3 validation images on 2 processes: the sampler gives image 0 to both; counted once.
    data, out = worker_run
    ddp = torch.load(out / "equality.pt", weights_only=True)[family]
    val = worker.dataset(data, split="val")
    model = worker.build(family, len(val.classes))
    model.load_state_dict(ddp["state"])
    metrics = worker.evaluate(model, val)
    assert ddp["metrics"] == metrics
    if family != "solo":  # an untrained SOLO's masks cover none of the small objects: AP 0
        assert any(v > 0 for m in metrics.values() for v in m.values())  # not a trivial 0 == 0
    assert set(metrics) == ({"bbox"} if family == "retinanet" else {"bbox", "segm"})


def test_sync_bn_on_the_cpu_is_refused_clearly(worker_run):
    _, out = worker_run
    error = torch.load(out / "equality.pt", weights_only=True)["sync_bn_error"]
    assert error is not None and "SyncBatchNorm" in error and "CUDA" in error


def test_a_time_budget_under_torchrun_is_refused_clearly(worker_run):
    _, out = worker_run
    error = torch.load(out / "equality.pt", weights_only=True)["max_seconds_error"]
    assert error is not None and "max_seconds=60.0 under torchrun" in error and "clock" in error


def test_sync_bn_on_cpu_processes_is_one_line_from_the_command(tmp_path):
    # Refused before any data is read (the training file does not even exist), once, in one line.
    done = torchrun(
        "-m", "instseg_edu", "train", "--sync-bn", "--device", "cpu", "--train-json",
        tmp_path / "missing.json", "--train-images", tmp_path, "--no-progress",
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("instseg-edu train: error: --sync-bn needs GPUs") == 1, output
    assert "leave it out" in output and "missing.json" not in output, output
    assert "instseg_edu/" not in output and "ValueError" not in output, output  # no traceback


def test_resume_after_ctrl_c_continues_exactly(worker_run):
    # Shuffled, augmented data, BatchNorm in training mode; 4 images per process and epoch in
    # batches of 2: the checkpoint at step 3 is one batch into epoch 1, and Ctrl-C comes during
    # step 4. The resumed run must skip that batch, in the same order, with every process's RNG.
    data, out = worker_run
    r = torch.load(out / "resume.pt", weights_only=True)
    assert r["part"]["interrupted"] and [s["step"] for s in r["part"]["steps"]] == [1, 2, 3]
    assert [s["step"] for s in r["resumed"]] == [1, 2, 3, 4, 5]
    assert [s["epoch"] for s in r["resumed"]] == [0, 0, 1, 1, 2]
    for straight, resumed in zip(r["straight"], r["resumed"], strict=True):
        for key in [*_loss_keys(straight), "lr", "epoch"]:
            assert straight[key] == resumed[key], (straight["step"], key)
    for name, value in r["straight_state"].items():
        assert torch.equal(value, r["resumed_state"][name]), name
    ckpt = load_checkpoint(out / "resume" / "last.pt")
    assert ckpt["step"] == 5 and ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    # Each process updated its own BatchNorm statistics; train() leaves rank 0's everywhere.
    rank0, rank1 = r["buffers"]
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))


def test_torchrun_cli_train_writes_one_checkpoint_and_the_ap_of_one_process(tmp_path, capsys):
    paths = make_shapes_splits(tmp_path / "data", 8, 3, image_size=64, seed=0, workers=0)
    out = tmp_path / "out"
    done = torchrun(
        "-m", "instseg_edu", "train", "--model", "mask_rcnn", "--preset", "MASK_RCNN_R18_SMALL",
        "--train-json", paths["train"], "--train-images", paths["train"].parent / "train",
        "--val-json", paths["val"], "--val-images", paths["val"].parent / "val",
        "--image-size", "64", "--steps", "4", "--batch-size", "2", "--warmup-steps", "1",
        "--eval-every", "2", "--checkpoint-every", "2", "--scale-lr", "16", "--workers", "0",
        "--device", "cpu", "--no-progress", "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("model: mask_rcnn") == 1  # rank 0 prints, rank 1 does not
    assert "find_unused_parameters" not in done.stderr  # every loss reaches every parameter
    assert "batch 2 processes x 2 = 4" in done.stdout
    assert "lr: 0.02 x 4 / 16 = 0.005 (linear scaling rule" in done.stdout
    assert [p.name for p in out.iterdir() if ".pt" in p.name] == ["last.pt"]  # no temp files
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and ckpt["config"]["lr"] == 0.005
    history = json.loads((out / "history.json").read_text())
    assert [s["step"] for s in history["steps"]] == [1, 2, 3, 4]
    assert [e["step"] for e in history["evals"]] == [2, 4]
    ap = json.loads((out / "ap.json").read_text())
    assert history["evals"][-1]["metrics"] == ap

    # The same checkpoint evaluated by one process, in batches of 3 instead of 2 x 2.
    capsys.readouterr()
    evaluate = ["evaluate", "--checkpoint", str(out / "last.pt"), "--device", "cpu",
                "--workers", "0", "--batch-size", "3", "--out", str(tmp_path / "ev")]  # fmt: skip
    assert main(evaluate) == 0
    assert json.loads((tmp_path / "ev" / "ap.json").read_text()) == ap


@pytest.mark.parametrize("debug", [False, True], ids=["line", "debug"])
def test_a_failure_in_one_process_ends_both_and_is_shown_once(tmp_path, debug):
    """A broken image in process 1's share: both processes stop and the error is shown once, as
    the one-line data error, or with ``--debug`` as process 1's traceback."""
    train_json = make_shapes_dataset(tmp_path / "data", 8, image_size=64, seed=0, workers=0)
    images = train_json.parent / "train"
    # Process 1's second batch starts with the 3rd item of its share of epoch 0: break that file.
    sampler = torch.utils.data.DistributedSampler(range(8), num_replicas=2, rank=1, seed=0)
    files = json.loads(train_json.read_text())["images"]
    broken = images / files[list(sampler)[2]]["file_name"]
    broken.write_bytes(b"not a png")
    done = torchrun(
        "-m", "instseg_edu", "train", "--preset", "RETINANET_R18_SMALL", "--train-json",
        train_json, "--train-images", images, "--image-size", "64", "--steps", "2",
        "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-progress",
        "--out", tmp_path / "out", *(["--debug"] if debug else []),
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count(f"cannot read {broken}") == 1, output
    if debug:
        assert output.count("error in process 1 of 2") == 1, output
    else:
        assert output.count("instseg-edu train: error: ") == 1, output
        assert "instseg_edu/cli.py" not in output, output  # no traceback of ours (torchrun's own)
    assert "Connection closed by peer" not in output  # process 0's lost collective stays silent
    root_cause = output[output.index("Root Cause") :]
    assert "rank      : 1 (local_rank: 1)" in root_cause, output
    assert not (tmp_path / "out" / "last.pt").exists()


def test_launch_from_python_trains_on_disjoint_shares():
    result = launch(worker.launched, 6, nprocs=2, device="cpu")
    assert result["rank"] == 0 and result["world_size"] == 2
    assert [s["step"] for s in result["steps"]] == [1, 2]
    first, second = result["shares"]
    assert len(first) == len(second) == 3 and sorted(first + second) == list(range(6))


def test_a_process_without_masks_joins_the_same_collectives(tmp_path):
    """Process 1 has only box-only objects: its mask loss is the attached zero, yet it counts its
    (zero) masks into the divisor that process 0 waits for, instead of leaving it waiting."""
    worker.shapes(tmp_path)
    terms = {"mask_rcnn": "loss_mask", "solo": "loss_ins"}
    seen = launch(worker.uneven_masks, list(terms), str(tmp_path), nprocs=2, device="cpu")
    for family, term in terms.items():
        first, second = seen[family]
        assert second[term] == 0.0 and first[term] > 0.0, (family, seen[family])
        assert all(math.isfinite(v) for v in (*first.values(), *second.values())), family
