"""One prepared GPU check: the CUDA tests, speed and time to AP against torchvision, and the live
training dashboard's cost, in about 8 minutes on one H100/H200-class GPU (its parts' limits add
up to 9), written down as ``gpu_check.json`` and ``gpu_check.md``.

    make gpu-wheels    # where a package registry is reachable: the missing wheels into .whl/
    make gpu-check     # on the GPU machine: python3 benchmarks/gpu_check.py --out runs/gpu_check
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check    # the same on a CPU, toy sizes

The parts run in this order, each in its own process with its own time budget (``BUDGET_S``), so
a slow part cannot starve the rest; a part that fails or runs out of time records its error (and
whatever figures it had written so far) and the check goes on:

``install``
    installs the wheels carried in ``.whl/`` and this package into a temporary folder, without
    network (``pip install --no-index --no-deps --target``), puts it first on ``PYTHONPATH`` for the
    other parts, and checks that everything they import is there;
``tests``
    ``pytest -m gpu`` over the test files that hold CUDA-only tests;
``throughput``
    ``train_throughput.py``'s measurement: R50-FPN, random init, 512², batch 8, ours in bf16 +
    channels_last against torchvision's RetinaNet and Mask R-CNN in their best precision (bf16 or
    fp32), then SOLO and YOLACT alone: train img/s, inference img/s, batch-1 latency, peak memory.
    Inference does equal work on both sides: score thresholds at 0 and the same
    ``max_per_img``, so both return the same number of detections (counted and recorded);
``time_to_ap``
    ``time_to_ap.py``'s protocol, short form: RetinaNet ours and torchvision's, 2 minutes of
    training each on the same shapes data, box AP every 30 s;
``notebook``
    ``notebooks/04_retinanet.ipynb`` executed at its ``gpu`` tier (``INSTSEG_TIER=gpu``) for a
    fixed number of training steps with the dashboard attached; a cell appended to the executed
    copy reads the dashboard's own timing back and times the same training steps with and without a
    dashboard (the dashboard's share of the step time);
``mask_rcnn``
    only when asked for (``--part mask_rcnn``, a separate run): the time-to-AP part for Mask R-CNN.

``--smoke`` runs all of it on the CPU at toy sizes (small models, a few steps, seconds of training)
so that the test suite keeps the script working; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_retinanet.ipynb"
WHEEL_LIST = ROOT / "benchmarks" / "gpu_wheels.txt"

PARTS = ("install", "tests", "throughput", "time_to_ap", "notebook", "mask_rcnn")
DEFAULT_PARTS = ("tests", "throughput", "time_to_ap", "notebook")
# Seconds per part on the GPU, from the first run on an H200 (benchmarks/RESULTS.md, "First GPU
# check"), where the parts took install 13.5 s, tests 33.6 s, throughput 73.2 s, time to AP 271.5 s
# and notebook 95.1 s: about 8.1 minutes in all, so these limits add up to 9 minutes, inside one
# 10-minute command. Time to AP is two sides of 2 minutes of training, plus its data, its
# evaluations (4 per side) and its models' start. The Mask R-CNN time to AP runs on its own
# (install + mask_rcnn: under 7 minutes); its mask evaluations take longer.
BUDGET_S = {
    "install": 20,
    "tests": 45,
    "throughput": 90,
    "time_to_ap": 280,
    "notebook": 105,
    "mask_rcnn": 360,
}
SMOKE_BUDGET_S = dict.fromkeys(PARTS, 600)  # only against a hang: a busy CPU is slow

# What the parts import beyond torch and torchvision: the install part checks each of them.
IMPORTS = (
    "numpy",
    "PIL",
    "tqdm",
    "pycocotools",
    "plotly",
    "ipywidgets",
    "IPython",
    "ipykernel",
    "jupyter_client",
    "nbclient",
    "nbformat",
    "zmq",
    "pytest",
    "pytest_timeout",
    "hypothesis",
    "anywidget",
    "instseg_edu",
    "instseg_edu.widgets",
)

# Sizes of each part: the real check, and the smoke run on a CPU.
THROUGHPUT = {"image_size": 512, "batch_size": 8, "warmup": 5, "steps": 20}
# Smoke runs only (here and in train_throughput.py): at most this many detections per image on
# both sides, not ours' max_per_img (50-100), or Mask R-CNN's mask heads, torchvision's above all,
# take most of the run's time on a CPU.
SMOKE_MAX_PER_IMG = 10
THROUGHPUT_SMOKE = {"image_size": 128, "batch_size": 2, "warmup": 0, "steps": 1}
TIME_TO_AP = {"minutes": 2.0, "eval_every": 0.5, "num_train": 1500, "num_val": 50}
TIME_TO_AP_SMOKE = {"minutes": 0.04, "eval_every": 0.02, "num_train": 8, "num_val": 4}
# Smoke run only: torchvision's Mask R-CNN samples and proposes as few boxes as ours' small preset
# (MASK_RCNN_R18_SMALL), or its training step alone takes most of the minute on a CPU.
SMOKE_TORCHVISION = {
    "mask_rcnn": {
        "rpn_batch_size_per_image": 128,
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 150,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 150,
        "box_batch_size_per_image": 64,
    }
}
# Notebook 04: its own training steps, then the A/B timing (steps per arm, repeats of both arms).
NOTEBOOK_RUN = {"train_steps": 100, "ab_steps": 30, "ab_repeats": 2}
NOTEBOOK_RUN_SMOKE = {"train_steps": 2, "ab_steps": 1, "ab_repeats": 1}

TARGETS = {
    "retinanet": {"train": 1.5, "infer": 1.5, "latency_ms": 12.0},
    "mask_rcnn": {"train": 2.0, "infer": 2.0, "latency_ms": 25.0},
    "dashboard_share": 0.05,
}


# ================================================================================ the parent
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check", help="folder for the two reports")
    parser.add_argument(
        "--part",
        action="append",
        choices=[p for p in PARTS if p != "install"],
        help=f"run only these parts (repeatable); default: {' '.join(DEFAULT_PARTS)}",
    )
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels")
    parser.add_argument("--no-install", action="store_true", help="use the installed packages")
    parser.add_argument("--smoke", action="store_true", help="on the CPU, toy sizes, seconds")
    parser.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_part:
        run_part(args.run_part, Path(args.work), args.smoke)
        return
    sys.exit(check(args))


def check(args) -> int:
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    info = environment(args.smoke)
    if not args.smoke and info["driver"] is None and not _cuda_available(env):
        print("gpu_check: no CUDA GPU here; `--smoke` runs the check on a CPU at toy sizes")
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="instseg_gpu_check_"))
    log = out / "gpu_check.log"
    log.write_text("")
    parts = list(dict.fromkeys(args.part or DEFAULT_PARTS))
    if not args.no_install:
        parts.insert(0, "install")
    budgets = SMOKE_BUDGET_S if args.smoke else BUDGET_S
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is the CPU run, GPU or not
        # One thread per process: on a busy CPU, threads waiting for each other cost far more.
        env.setdefault("OMP_NUM_THREADS", "1")
    report = {
        "smoke": args.smoke,
        "environment": info,
        "parts": {},
        "budget_s": {p: budgets[p] for p in parts},
    }
    print(f"GPU check: {', '.join(parts)} (at most {sum(budgets[p] for p in parts)} s)")
    for name in parts:
        part_start, cpu_start = time.perf_counter(), _children_cpu_s()
        print(f"-- {name} (budget {budgets[name]} s)", flush=True)
        if name == "install":
            result = install(Path(args.wheels), work, env, budgets[name], args.smoke)
        elif name == "tests":
            result = gpu_tests(work, env, budgets[name])
        else:
            result = child_part(name, work, env, budgets[name], args.smoke)
        result["budget_s"] = budgets[name]
        result["wall_s"] = round(time.perf_counter() - part_start, 1)
        result["cpu_s"] = round(_children_cpu_s() - cpu_start, 1)
        _append_log(log, name, work / f"{name}.log")
        report["parts"][name] = result
        report["total_s"] = round(time.perf_counter() - start, 1)
        report["targets"] = targets(report["parts"])
        write_reports(out, report)
        print(f"   {result['status']} in {result['wall_s']} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    return 0


def environment(smoke: bool) -> dict:
    """Device, driver and software versions, date, commit (without importing torch here: the
    parts run in their own processes)."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "python": platform.python_version(),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "cpu_count": os.cpu_count(),
        "commit": _run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "device": f"CPU ({platform.machine()})",
        "driver": None,
    }
    query = "--query-gpu=name,driver_version,memory.total"
    smi = None if smoke else _run_text(["nvidia-smi", query, "--format=csv,noheader,nounits"])
    if smi:
        name, driver, memory_mib = (field.strip() for field in smi.splitlines()[0].split(","))
        info.update(device=name, driver=driver, gpu_memory_gib=round(float(memory_mib) / 1024, 1))
    return info


def _cuda_available(env: dict) -> bool:
    code = "import torch; print(torch.cuda.is_available())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return proc.stdout.strip() == "True"


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished child processes: with other jobs on the
    machine, a part's CPU time says more about its cost than its wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_text(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def run_logged(cmd, env, timeout_s: float, log: Path, cwd=ROOT) -> tuple[str, int | None]:
    """Run ``cmd`` in its own process group, output appended to ``log``; at the time limit the whole
    group is killed (its data loader workers and notebook kernel included).

    Returns ``(status, returncode)`` with status ``"ok"``, ``"failed"`` or ``"timed out"``."""
    with open(log, "a") as f:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[gpu_check] killed after {timeout_s} s\n")
            return "timed out", None
        # Whatever the part left running (a kernel, loader workers) goes with it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return ("ok" if rc == 0 else "failed"), rc


def _tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:].strip()


def _append_log(log: Path, name: str, part_log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"\n===== {name} =====\n")
        if part_log.exists():
            f.write(part_log.read_text(errors="replace"))


# ------------------------------------------------------------------------------------ install
def install(wheels: Path, work: Path, env: dict, timeout_s: float, smoke: bool) -> dict:
    """Install the carried wheels (not in a smoke run: they are built for the GPU machine's Python)
    and this package into ``work/site``; prepend it to ``env["PYTHONPATH"]``."""
    site, log = work / "site", work / "install.log"
    deadline = time.perf_counter() + timeout_s
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--disable-pip-version-check", "--target", str(site)]
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    result = {"wheels_dir": str(wheels), "wheels": [f.name for f in files]}
    if smoke:
        result["wheels"], result["note"] = [], "smoke run: wheels not installed"
        files = []
    elif not files:
        result["note"] = f"no wheels in {wheels}: using the installed packages"
    else:
        result["wheels_not_carried"] = wheels_not_carried(files)
    result["wheels_mib"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)
    status = "ok"
    if files:
        status, _ = run_logged([*pip, *map(str, files)], env, timeout_s, log)
    if status == "ok":
        # The package itself, built from a copy of its sources (the build writes next to them).
        source = work / "source"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        for name in ("instseg_edu", "widgets"):
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        left = max(1.0, deadline - time.perf_counter())
        status, _ = run_logged([*pip, "--no-build-isolation", str(source)], env, left, log)
        if status == "failed":
            # The machine's setuptools may be older than pyproject.toml asks for (a license
            # expression needs 77). The parts import the package and run no console script, so
            # its folders laid out as installed serve as well.
            result["note"] = "pip could not build the package; its folders were copied instead"
            shutil.copytree(source / "instseg_edu", site / "instseg_edu", dirs_exist_ok=True)
            shutil.copytree(
                source / "widgets", site / "instseg_edu" / "widgets", dirs_exist_ok=True
            )
            status = "ok"
    if status != "ok":
        return {**result, "status": status, "error": _tail(log)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    try:
        # Run in `work`, not in the checkout: `python -c` puts its working folder first on
        # sys.path, and the checkout's instseg_edu/ has no widgets/ inside it.
        probe = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, str(site), *IMPORTS],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(5.0, deadline - time.perf_counter()),
        )
    except subprocess.TimeoutExpired:
        return {**result, "status": "timed out", "error": "importing the packages took too long"}
    if probe.returncode != 0:
        return {**result, "status": "failed", "error": probe.stderr[-1500:]}
    found = json.loads(probe.stdout)
    result.update(found)
    missing = [m for m, v in found["imports"].items() if v.startswith("missing")]
    result["status"] = "failed" if missing else "ok"
    if missing:
        result["error"] = "cannot import: " + ", ".join(
            f"{m} ({found['imports'][m]})" for m in missing
        )
    return result


def wheels_not_carried(files: list[Path]) -> list[str]:
    """The ``name==version`` lines of ``gpu_wheels.txt`` that no file in ``files`` matches."""

    def key(name: str, version: str) -> tuple[str, str]:
        return name.lower().replace("-", "_").replace(".", "_"), version

    have = {key(*f.name.split("-")[:2]) for f in files}
    wanted = [line.split("#")[0].strip() for line in WHEEL_LIST.read_text().splitlines()]
    return [w for w in wanted if w and key(*w.split("==")) not in have]


# Run with the new PYTHONPATH: each module's version (or why it is missing), where instseg_edu
# comes from, and every requirement of the installed wheels that the machine does not meet.
_IMPORT_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
site, modules = sys.argv[1], sys.argv[2:]
imports = {}
for name in modules:
    try:
        module = importlib.import_module(name)
        imports[name] = str(getattr(module, "__version__", "ok"))
    except Exception as e:
        imports[name] = f"missing: {type(e).__name__}: {e}"
unmet = []
try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:
    Requirement = None
if Requirement is not None:
    for dist in md.distributions(path=[site]):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                unmet.append(f"{dist.metadata['Name']} needs {req} (not installed)")
                continue
            try:
                ok = not req.specifier or req.specifier.contains(Version(have), prereleases=True)
            except ValueError:  # a version string packaging cannot read
                ok = True
            if not ok:
                unmet.append(f"{dist.metadata['Name']} needs {req} (found {have})")
print(json.dumps({"imports": imports, "unmet_requirements": sorted(set(unmet)),
                  "instseg_edu_from": getattr(sys.modules.get("instseg_edu"), "__file__", None)}))
"""


# -------------------------------------------------------------------------------------- tests
def gpu_test_files() -> list[str]:
    """The test files that hold ``gpu``-marked tests (collecting only these keeps the part
    independent of what the other test files import)."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text()
    )


def gpu_tests(work: Path, env: dict, timeout_s: float) -> dict:
    xml, log = work / "gpu_tests.xml", work / "tests.log"
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-q", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={xml}", "--timeout", str(min(30, int(timeout_s)))]
    status, rc = run_logged(cmd, env, timeout_s, log)
    result = {"files": files, **junit_counts(xml)}
    if rc == 1:  # pytest: some tests failed; the part itself ran
        status = "ok"
    result["status"] = status
    if status != "ok":
        result["error"] = _tail(log)
    return result


def junit_counts(xml: Path) -> dict:
    """Passed / failed / skipped counts and one entry per test from a JUnit XML report."""
    if not xml.exists():
        return {"collected": 0, "passed": 0, "failed": 0, "skipped": 0, "cases": []}
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "").strip()[:300]
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        cases.append(
            {"name": name, "outcome": outcome, "time_s": float(case.get("time", 0)), "msg": message}
        )
    count = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    return {"collected": len(cases), **count, "cases": cases}


# ------------------------------------------------------------------------- parts in a child
def child_part(name: str, work: Path, env: dict, timeout_s: float, smoke: bool) -> dict:
    """Run ``--run-part name`` in a child process; read back what it recorded, even if it failed."""
    record, log = work / f"{name}.json", work / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-part", name, "--work", str(work)]
    if smoke:
        cmd.append("--smoke")
    status, rc = run_logged(cmd, env, timeout_s, log)
    result = json.loads(record.read_text()) if record.exists() else {}
    result["status"] = status if status != "failed" else f"failed (exit {rc})"
    if status != "ok":
        result["error"] = _tail(log)
    return result


def run_part(name: str, work: Path, smoke: bool) -> None:
    record = Recorder(work / f"{name}.json")
    if name == "throughput":
        part_throughput(record, work, smoke)
    elif name == "time_to_ap":
        part_time_to_ap(record, work, smoke, "retinanet")
    elif name == "mask_rcnn":
        part_time_to_ap(record, work, smoke, "mask_rcnn")
    elif name == "notebook":
        part_notebook(record, work, smoke)
    else:
        raise ValueError(f"part {name!r} does not run in a child")


class Recorder(dict):
    """A dict written to its JSON file after every change, so a part stopped at its time limit
    still leaves what it measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        tmp.replace(self.path)


def _device(smoke: bool):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


# -------------------------------------------------------------------------------- throughput
def part_throughput(record: Recorder, work: Path, smoke: bool) -> None:
    import torch
    from _common import shapes_data

    from instseg_edu.data.transforms import collate

    sizes = THROUGHPUT_SMOKE if smoke else THROUGHPUT
    device = _device(smoke)
    torch.backends.cudnn.benchmark = False  # see train_throughput.py
    size, batch_size = sizes["image_size"], sizes["batch_size"]
    train, _ = shapes_data(work / f"shapes{size}", size, num_train=4 * batch_size, num_val=2)
    num_classes = len(train.classes)
    batches = [
        collate([train[i * batch_size + j] for j in range(batch_size)]).to(device) for i in range(4)
    ]
    batch1 = collate([train[0]]).to(device)
    precisions = ["fp32"] if device.type == "cpu" else ["bf16", "fp32"]
    record.update(sizes=sizes, device=device.type, torch=torch.__version__, families={})
    if device.type == "cuda":
        record.update(
            device_name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )

    failed = []
    for family in ("retinanet", "mask_rcnn", "solo", "yolact"):
        try:
            measure_family(record, family, num_classes, batches, batch1, precisions, sizes, smoke)
        except Exception as e:  # the next family still runs
            failed.append(family)
            record["families"].setdefault(family, {})["error"] = f"{type(e).__name__}: {e}"
            record.save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if failed:
        raise RuntimeError(f"throughput failed for {', '.join(failed)} (see gpu_check.json)")


def measure_family(record, family, num_classes, batches, batch1, precisions, sizes, smoke):
    """Ours (and torchvision's, where it has this family) through ``train_throughput.measure``
    in each precision, then the best of each figure, the detection counts and the ratios.

    Inference does equal work: score thresholds at 0 on both sides (``host_syncs``' lenient
    settings) and the same number of detections kept per image, ours' ``max_per_img`` (in a
    smoke run at most ``SMOKE_MAX_PER_IMG``). Should one side still return fewer on the first
    batch (a random-init box head can decode most boxes to nothing), both keep that many fewer:
    the smallest count per image of either side. The training steps run with a learning rate of 0
    (the optimizer step still does all its work) so that the weights, and with them these counts,
    stay as they were when the counts were set;
    the counts after the timing are recorded too."""
    import torch
    from _common import build_torchvision
    from host_syncs import LENIENT_TORCHVISION
    from host_syncs import build_ours as build_ours_lenient
    from train_throughput import Side, measure

    device, size = batches[0].images.device, sizes["image_size"]
    torch.manual_seed(0)
    sides = {"ours": Side("ours", build_ours_lenient(family, num_classes, smoke), family, device,
                          channels_last=True)}  # fmt: skip
    side_precisions = {"ours": precisions[:1], "torchvision": precisions}
    entry = record["families"][family] = {}
    if family in LENIENT_TORCHVISION:
        keep = max_per_img(sides["ours"].model, family)
        if smoke:
            keep = min(keep, SMOKE_MAX_PER_IMG)
        smaller = SMOKE_TORCHVISION.get(family, {}) if smoke else {}
        peer = build_torchvision(
            family, num_classes, size, **LENIENT_TORCHVISION[family], **smaller
        )
        sides["torchvision"] = Side("torchvision", peer, family, device, channels_last=False)
        counts = {}
        for name, side in sides.items():
            set_max_per_img(side, keep)
            counts[name] = per_image_counts(side, batches[0], side_precisions[name][0])
        entry["max_per_img"] = keep
        if counts["ours"] != counts["torchvision"]:
            entry["max_per_img"] = keep = max(1, min(counts["ours"] + counts["torchvision"]))
            for side in sides.values():
                set_max_per_img(side, keep)
        record.save()
    for name, side in sides.items():
        for group in side.optimizer.param_groups:
            group["lr"] = 0.0
        runs = []
        for precision in side_precisions[name]:
            try:
                runs.append(
                    measure(
                        side, batches, batch1, precision, sizes["warmup"], sizes["steps"], device
                    )  # fmt: skip
                )
            except Exception as e:  # e.g. a precision one side does not support
                runs.append({"precision": precision, "error": f"{type(e).__name__}: {e}"})
            entry[name] = {"runs": runs}
            record.save()
        entry[name].update(best_of(runs))
        # Counted after the timing, on the trained weights the timing saw.
        entry[name]["detections_per_batch"] = sum(
            per_image_counts(side, batches[0], entry[name]["infer_precision"])
        )
        record.save()
    if "torchvision" in entry:
        ours_best, peer_best = entry["ours"], entry["torchvision"]
        entry["ratios"] = {
            "train": ours_best["train_img_s"] / peer_best["train_img_s"],
            "infer": ours_best["infer_img_s"] / peer_best["infer_img_s"],
            "latency_speedup": peer_best["latency_ms"] / ours_best["latency_ms"],
        }
        counts = ours_best["detections_per_batch"], peer_best["detections_per_batch"]
        entry["equal_work"] = counts[0] == counts[1]
    record.save()
    del sides
    if device.type == "cuda":
        torch.cuda.empty_cache()


def max_per_img(model, family: str) -> int:
    """Ours: detections kept per image after NMS."""
    test = model.cfg.test_cfg
    return test.rcnn.max_per_img if family == "mask_rcnn" else test.max_per_img


def set_max_per_img(side, keep: int) -> None:
    """Keep at most ``keep`` detections per image (ours: a config copy; torchvision: attribute)."""
    from dataclasses import replace

    model, family = side.model, side.family
    if side.name == "torchvision":
        (model.roi_heads if family == "mask_rcnn" else model).detections_per_img = keep
        return
    test = model.cfg.test_cfg
    if family == "mask_rcnn":
        test = replace(test, rcnn=replace(test.rcnn, max_per_img=keep))
    else:
        test = replace(test, max_per_img=keep)
    model.cfg = replace(model.cfg, test_cfg=test)


def per_image_counts(side, batch, precision: str) -> list[int]:
    """Detections returned for each image of ``batch``."""
    outputs = side.infer(batch, precision)
    if side.name == "ours":
        return [len(d.scores) for d in outputs]
    return [len(o["scores"]) for o in outputs]


def best_of(runs: list[dict]) -> dict:
    """Each figure at its best over the precisions tried: most img/s, least latency."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        raise RuntimeError("every precision failed: " + "; ".join(r["error"] for r in runs))
    train = max(ok, key=lambda r: r["train_img_s"])
    infer = max(ok, key=lambda r: r["infer_img_s"])
    latency = min(ok, key=lambda r: r["latency_ms"])
    return {
        "train_img_s": train["train_img_s"],
        "train_precision": train["precision"],
        "infer_img_s": infer["infer_img_s"],
        "infer_precision": infer["precision"],
        "latency_ms": latency["latency_ms"],
        "latency_precision": latency["precision"],
        "forward_ms": latency.get("forward_ms"),  # ours: the network's share of that latency
        "peak_gib": train["peak_gib"],
    }


# -------------------------------------------------------------------------------- time to AP
def part_time_to_ap(record: Recorder, work: Path, smoke: bool, family: str) -> None:
    import time_to_ap

    sizes = TIME_TO_AP_SMOKE if smoke else TIME_TO_AP
    argv = ["--family", family, "--data", str(work / "shapes_tta"), "--device", _device(smoke).type]
    argv += ["--workers", str(min(12, max(1, (os.cpu_count() or 2) - 2)))]
    args = time_to_ap.parse_args([*argv, "--smoke"] if smoke else argv)
    args.minutes, args.eval_every = sizes["minutes"], sizes["eval_every"]
    args.num_train, args.num_val = sizes["num_train"], sizes["num_val"]
    # A loader-bound side stops on time too; its curve then ends short of the 2 minutes.
    args.max_wall_minutes = args.minutes
    record.update(
        family=family,
        minutes=args.minutes,
        eval_every=args.eval_every,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_train=args.num_train,
        num_val=args.num_val,
        precision={"ours": args.precision, "torchvision": args.tv_precision},
        curves={side: [] for side in args.sides},
    )
    record.save()

    def on_point(side, point):
        record["curves"][side].append(point)
        record.save()

    time_to_ap.run(args, on_point)
    record.update(summarise_time_to_ap(record["curves"], args.minutes))
    record.save()


def summarise_time_to_ap(curves: dict, minutes: float) -> dict:
    """Ours at half the training time against torchvision at the end, box AP (and mask AP)."""
    ours, peer = curves.get("ours") or [], curves.get("torchvision") or []
    summary = {}
    for key in ("bbox", "segm"):
        if not ours or not peer or key not in ours[-1]:
            continue
        half = next((p for p in ours if p["minutes"] >= minutes / 2 - 1e-9), None)
        summary[key] = {
            "ours_at_half": half[key] if half else None,
            "ours_at_half_minutes": half["minutes"] if half else None,
            "ours_final": ours[-1][key],
            "torchvision_final": peer[-1][key],
            "torchvision_final_minutes": peer[-1]["minutes"],
            "ours_reached_torchvision_final_after_min": next(
                (p["minutes"] for p in ours if p[key] >= peer[-1][key]), None
            ),
        }
    return {"summary": summary}


# ---------------------------------------------------------------------------------- notebook
# Appended to the executed copy of notebook 04 (the notebook itself is not changed): reads the
# dashboard's own timing back, then times the same training steps without and with a dashboard.
PROBE = """\
# Added by benchmarks/gpu_check.py: what the training dashboard costs.
import dataclasses as _dc
import json as _json
import time as _time

import torch as _torch
from IPython.display import display as _display

from instseg_edu.engine.train import make_loader as _make_loader
from instseg_edu.engine.train import train as _train
from instseg_edu.widgets import TrainingDashboard as _Dashboard


def _timed(callbacks, steps, loader):
    cfg = _dc.replace(train_cfg, max_steps=steps, warmup_steps=1, progress=False)
    if _torch.cuda.is_available():
        _torch.cuda.synchronize()
    start = _time.perf_counter()
    steps_run = _train(model, loader, cfg, callbacks=callbacks).steps
    if _torch.cuda.is_available():
        _torch.cuda.synchronize()
    return _time.perf_counter() - start, sum(r.get("data_time", 0.0) for r in steps_run)


_workers = train_loader.num_workers
_loader = _make_loader(train_set, BATCH_SIZE, seed=SEED, workers=_workers,
                       persistent_workers=_workers > 0)
_timed([], 2, _loader)  # start the loader's workers before timing
# Each arm once untimed, then in the order A B B A A B ...: a drift over the run (the loader's
# queue, the clocks) then falls on both arms alike, not on whichever runs first.
_order = ["without", "with"]
for _r in range({repeats}):
    _order += ["without", "with"] if _r % 2 == 0 else ["with", "without"]
_arms = {{"without": [], "with": []}}
_waits = {{"without": [], "with": []}}
for _i, _arm in enumerate(_order):
    _callbacks = []
    if _arm == "with":
        _every = min(int(dashboard.thumbnails_every.value), {steps})
        _callbacks = [_Dashboard(thumbnails_every=_every, class_names=train_set.classes)]
        _display(_callbacks[0])
    _s, _w = _timed(_callbacks, {steps}, _loader)
    if _i >= 2:
        _arms[_arm].append(_s)
        _waits[_arm].append(_w)
_report = {{
    "tier": globals().get("TIER"),
    "device": str(device),
    "model": globals().get("MODEL"),
    "image_size": globals().get("IMAGE_SIZE"),
    "batch_size": BATCH_SIZE,
    "loader_workers": _workers,
    "train_steps": len(history.steps),
    "train_s": globals().get("train_s"),
    "train_data_s": sum(r.get("data_time", 0.0) for r in history.steps),
    "dashboard_s": dashboard.overhead_s,
    "redraws": dashboard.redraws,
    "ab_steps": {steps},
    "ab_repeats": {repeats},
    "ab_without_s": sum(_arms["without"]),
    "ab_with_s": sum(_arms["with"]),
    "ab_without_runs_s": _arms["without"],
    "ab_with_runs_s": _arms["with"],
    "ab_without_data_s": sum(_waits["without"]),
    "ab_with_data_s": sum(_waits["with"]),
}}
with open({path!r}, "w") as _f:
    _json.dump(_report, _f)
print(_report)
"""


def part_notebook(record: Recorder, work: Path, smoke: bool) -> None:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    sizes = NOTEBOOK_RUN_SMOKE if smoke else NOTEBOOK_RUN
    run_dir, report = work / "notebook", work / "dashboard.json"
    run_dir.mkdir()
    # The kernel inherits this process's environment.
    for key in ("INSTSEG_TIER", "INSTSEG_SMOKE"):
        os.environ.pop(key, None)
    if smoke:
        os.environ["INSTSEG_SMOKE"] = "1"
    else:
        os.environ["INSTSEG_TIER"] = "gpu"
    os.environ["INSTSEG_TRAIN_STEPS"] = str(sizes["train_steps"])
    os.environ["MPLBACKEND"] = "Agg"
    os.environ["IPYTHONDIR"] = str(work / "ipython")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(work / "jupyter_runtime")
    record.update(notebook=NOTEBOOK.name, **sizes)
    record.update({k: v for k, v in os.environ.items() if k.startswith("INSTSEG_")})
    record.save()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = PROBE.format(steps=sizes["ab_steps"], repeats=sizes["ab_repeats"], path=str(report))
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        record["error"] = str(e)[-1500:]
        record.save()
        raise
    finally:
        record["notebook_s"] = time.perf_counter() - start
        record["slowest_cells"] = slowest_cells(nb)
        record.save()
    measured = json.loads(report.read_text())
    record.update(measured)
    record.update(dashboard_shares(measured))
    record.save()


def slowest_cells(nb, count: int = 6) -> list[dict]:
    """The ``count`` code cells that took longest, from the timing nbclient records in each
    cell's metadata (``execution``: ``shell.execute_reply`` minus ``iopub.execute_input``), each
    with its first source line."""
    from datetime import datetime

    cells = []
    for index, cell in enumerate(nb.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        began, ended = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if cell.cell_type != "code" or not (began and ended):
            continue
        began, ended = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (began, ended))
        seconds = (ended - began).total_seconds()
        first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")[:60]
        cells.append({"cell": index, "seconds": round(seconds, 2), "source": first})
    return sorted(cells, key=lambda c: -c["seconds"])[:count]


def dashboard_shares(m: dict) -> dict:
    """The dashboard's share of training time, two ways.

    ``self_share``: the time spent inside its callbacks over the notebook's training time. On a GPU
    this is an upper bound: a redraw reads the loss history, which waits for the queued steps to
    finish, and that wait (work the GPU had to do anyway) is counted as the dashboard's.
    ``ab_share``: the same training steps timed without and with a dashboard; the extra time over
    the time with it. This is what the 5% target is judged on.
    """
    train_s = m.get("train_s")
    with_s, without_s = m["ab_with_s"], m["ab_without_s"]
    return {
        "self_share": m["dashboard_s"] / train_s if train_s else None,
        "ab_share": (with_s - without_s) / with_s if with_s > 0 else None,
        "step_ms_without": 1000 * without_s / (m["ab_steps"] * m["ab_repeats"]),
        "step_ms_with": 1000 * with_s / (m["ab_steps"] * m["ab_repeats"]),
    }


# =================================================================================== targets
def targets(parts: dict) -> list[dict]:
    """Each stated target: ``value`` as measured (None: not measured) and ``met`` (None: not
    measured)."""
    rows = []

    def row(name, goal, figure, text, met):
        measured = figure is not None
        rows.append({"name": name, "target": goal, "value": text.format(figure) if measured else
                     None, "met": met(figure) if measured else None})  # fmt: skip

    tests = parts.get("tests")
    if tests is not None:
        n, passed = tests.get("collected", 0), tests.get("passed", 0)
        text = f"{passed}/{n} passed, {tests.get('failed', 0)} failed, "
        text += f"{tests.get('skipped', 0)} skipped"
        ran = tests.get("status") == "ok"
        row("gpu tests", "every `gpu` test passes", n, text, lambda n: ran and 0 < n == passed)

    names = {"retinanet": "RetinaNet", "mask_rcnn": "Mask R-CNN"}
    families = parts["throughput"].get("families", {}) if "throughput" in parts else None
    for family in names if families is not None else ():
        goal, entry = TARGETS[family], families.get(family, {})
        ratios = entry.get("ratios", {})
        for key, what in (("train", "train img/s"), ("infer", "inference img/s")):
            row(f"{names[family]} {what}", f"≥ {goal[key]}× torchvision's", ratios.get(key),
                "{:.2f}×", lambda r, g=goal[key]: r >= g)  # fmt: skip
        row(f"{names[family]} batch-1 latency", f"≤ {goal['latency_ms']:.0f} ms",
            entry.get("ours", {}).get("latency_ms"), "{:.1f} ms",
            lambda ms, g=goal["latency_ms"]: ms <= g)  # fmt: skip

    for part, family in (("time_to_ap", "RetinaNet"), ("mask_rcnn", "Mask R-CNN")):
        if part not in parts:
            continue
        s = parts[part].get("summary", {}).get("bbox", {})
        half, final = s.get("ours_at_half"), s.get("torchvision_final")
        pair = (half, final) if half is not None and final is not None else None
        row(f"{family} time to AP", "box AP of ours at 1 min ≥ torchvision's at 2 min", pair,
            "ours {0[0]:.3f}, torchvision {0[1]:.3f}", lambda p: p[0] >= p[1])  # fmt: skip

    if "notebook" in parts:
        goal = TARGETS["dashboard_share"]
        row("dashboard overhead", f"≤ {goal:.0%} of the training time",
            parts["notebook"].get("ab_share"), "{:.1%}", lambda share: share <= goal)  # fmt: skip
    return rows


# =================================================================================== reports
def write_reports(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def _f(value, fmt=".1f", none="–") -> str:
    return none if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    env, parts = report["environment"], report["parts"]
    title = (
        "GPU check (smoke run: CPU, toy sizes, figures mean nothing)"
        if report["smoke"]
        else ("GPU check")
    )
    lines = [
        f"## {title}: {env.get('device')}, {env['date']}",
        "",
        f"{env.get('device')}, driver {env.get('driver') or '–'}, "
        f"torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}, "
        f"{env.get('cpu_count')} CPUs, commit {env.get('commit') or '–'}; "
        f"the check took {report.get('total_s', 0) / 60:.1f} min.",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    verdict = {True: "**met**", False: "**not met**", None: "not measured"}
    for t in report.get("targets", []):
        lines.append(f"| {t['name']} | {t['target']} | {t['value'] or '–'} | {verdict[t['met']]} |")
    lines += ["", "| part | budget | took | CPU time | status |", "|---|---:|---:|---:|---|"]
    for name, p in parts.items():
        lines.append(
            f"| {name} | {p['budget_s']} s | {p['wall_s']} s | {p['cpu_s']} s | {p['status']} |"
        )
    for name, p in parts.items():
        if p.get("error"):
            lines += ["", f"{name} error:", "", "```", p["error"][-800:], "```"]

    if "install" in parts:
        p = parts["install"]
        lines += ["", "### Install", ""]
        lines.append(
            f"{len(p.get('wheels', []))} wheels ({p.get('wheels_mib', 0)} MiB) from "
            f"`{Path(p['wheels_dir']).name}/`" + (f"; {p['note']}" if p.get("note") else "") + "."
        )
        if p.get("wheels_not_carried"):
            lines.append("Listed but not carried: " + ", ".join(p["wheels_not_carried"]) + ".")
        if p.get("unmet_requirements"):
            lines.append("Requirements not met: " + "; ".join(p["unmet_requirements"]) + ".")
    if "tests" in parts:
        p = parts["tests"]
        lines += ["", "### `pytest -m gpu`", ""]
        for c in p.get("cases", []):
            msg = f" — {c['msg']}" if c["msg"] else ""
            lines.append(f"- {c['outcome']}: `{c['name']}` ({c['time_s']:.1f} s){msg}")
    if "throughput" in parts:
        lines += throughput_lines(parts["throughput"])
    for name in ("time_to_ap", "mask_rcnn"):
        if name in parts:
            lines += time_to_ap_lines(parts[name])
    if "notebook" in parts:
        lines += notebook_lines(parts["notebook"])
    return "\n".join(lines) + "\n"


def throughput_lines(p: dict) -> list[str]:
    s = p.get("sizes", {})
    lines = [
        "",
        f"### Throughput ({s.get('image_size')}², batch {s.get('batch_size')}, "
        f"{s.get('steps')} timed steps after {s.get('warmup')} warm-up)",
        "",
        "| model | side | train img/s | inference img/s | batch-1 ms | peak GiB | "
        "detections / batch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for family, entry in p.get("families", {}).items():
        for side in ("ours", "torchvision"):
            b = entry.get(side)
            if b is None or "train_img_s" not in b:
                continue
            latency = f"{b['latency_ms']:.1f}"
            if b.get("forward_ms") is not None:  # ours: the network's part of it
                latency += f" (network {b['forward_ms']:.1f})"
            lines.append(
                f"| {family} | {side} | {b['train_img_s']:.1f} ({b['train_precision']}) | "
                f"{b['infer_img_s']:.1f} ({b['infer_precision']}) | {latency} | "
                f"{_f(b['peak_gib'], '.2f')} | {b['detections_per_batch']} |"
            )
        if "ratios" in entry:
            r = entry["ratios"]
            lines.append(
                f"| {family} | ours / torchvision | {r['train']:.2f}× | {r['infer']:.2f}× | "
                f"{r['latency_speedup']:.2f}× faster | | "
                f"{'equal' if entry['equal_work'] else 'NOT equal'} |"
            )
    return lines


def time_to_ap_lines(p: dict) -> list[str]:
    curves = p.get("curves", {})
    lines = [
        "",
        f"### Time to AP: {p.get('family')}, {p.get('minutes')} min of training per side, "
        f"evaluated every {p.get('eval_every')} min ({p.get('num_train')} train / "
        f"{p.get('num_val')} val images of {p.get('image_size')}², batch {p.get('batch_size')})",
        "",
        "| side | minutes trained | step | box AP | mask AP |",
        "|---|---:|---:|---:|---:|",
    ]
    for side, curve in curves.items():
        for point in curve:
            lines.append(
                f"| {side} | {point['minutes']:.2f} | {point['step']} | "
                f"{point['bbox']:.3f} | {_f(point.get('segm'), '.3f')} |"
            )
    for key, s in p.get("summary", {}).items():
        reach = s["ours_reached_torchvision_final_after_min"]
        lines.append(
            f"\n{key}: torchvision's final AP {s['torchvision_final']:.3f} "
            f"(after {s['torchvision_final_minutes']:.2f} min); ours "
            + (f"reached it after {reach:.2f} min" if reach is not None else "did not reach it")
            + f", {s['ours_final']:.3f} at the end."
        )
    return lines


def notebook_lines(p: dict) -> list[str]:
    lines = ["", f"### Notebook 04 with the training dashboard ({p.get('notebook')})", ""]
    if "ab_share" not in p:
        return lines + ["not measured"]
    lines.append(
        f"Tier {p.get('tier') or p.get('INSTSEG_TIER') or '–'} on {p['device']}: {p['model']}, "
        f"{p['image_size']}², batch {p['batch_size']}, {p['loader_workers']} loader workers; the "
        f"notebook ran in {p['notebook_s']:.0f} s. Its {p['train_steps']} training steps took "
        f"{_f(p.get('train_s'))} s, {p['dashboard_s']:.2f} s of them inside the dashboard's "
        f"callbacks ({_f(p.get('self_share') and 100 * p['self_share'])}%, {p['redraws']} redraws; "
        "an upper bound on a GPU, where a redraw also waits for the queued steps). "
        f"The same steps timed without and with a dashboard ({p['ab_repeats']} × "
        f"{p['ab_steps']} steps each): {p['step_ms_without']:.1f} and {p['step_ms_with']:.1f} "
        f"ms per step, a share of {100 * p['ab_share']:.1f}%."
    )
    if p.get("train_data_s") is not None:
        waits = ", ".join(f"{arm} {_f(p.get(f'ab_{arm}_data_s'))} s" for arm in ("without", "with"))
        lines += [
            "",
            f"Waiting for the loader's batches (`data_time`): {_f(p['train_data_s'])} s of the "
            f"notebook's training; in the timed runs {waits}.",
        ]
    runs = [(arm, p.get(f"ab_{arm}_runs_s")) for arm in ("without", "with")]
    if all(r for _, r in runs):
        lines += [
            "",
            "Each timed run, in seconds: "
            + "; ".join(f"{arm} " + ", ".join(f"{t:.2f}" for t in r) for arm, r in runs)
            + ".",
        ]
    if p.get("slowest_cells"):
        lines += ["", "Its slowest cells: " + "; ".join(
            f"{c['seconds']:.1f} s `{c['source']}`" for c in p["slowest_cells"]) + "."]  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
