"""How long an explorer takes to react to a control change, on a 512² image on the CPU.

Each case builds the explorer once, then sets one control to alternating values ``--repeats``
times; the time of each ``control.value = v`` (which runs the explorer's update synchronously:
library calls, figure data, and the serialisation of the update message for the browser) is
recorded. Target: median under 100 ms.

    python benchmarks/widgets.py            # all explorers, 30 changes per control
    python benchmarks/widgets.py --repeats 5 --threads 1
    python benchmarks/widgets.py --dashboard-steps 40   # also: TrainingDashboard's cost

The dashboard part trains the small RetinaNet (CUDA when present, else CPU) twice on shapes images,
without and with a :class:`TrainingDashboard` (redraw at most every 0.5 s, thumbnails every 10
steps), and reports the time spent inside its callbacks as a fraction of the run. Target: < 5 %.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _retinanet():
    from instseg_edu.data.shapes import CLASSES
    from instseg_edu.models.retinanet import RETINANET_R18_SMALL, build_retinanet

    torch.manual_seed(0)
    return build_retinanet(RETINANET_R18_SMALL.with_num_classes(len(CLASSES)))


def _cases():
    from instseg_edu.widgets.anchor_explorer import AnchorExplorer
    from instseg_edu.widgets.assigner_explorer import AssignerExplorer

    cases = [
        (
            "AnchorExplorer",
            lambda: AnchorExplorer(image_size=512),
            [
                ("octave_base_scale", (4.0, 6.0)),
                ("scales_per_octave", (3, 2)),
                ("x", (256, 300)),
            ],
        ),
        (
            "AnchorExplorer (level view)",
            _level_view,
            [
                ("octave_base_scale", (4.0, 6.0)),
                ("level", (0, -1)),
            ],
        ),
        (
            "AssignerExplorer",
            lambda: AssignerExplorer(_retinanet(), image_size=512),
            [
                ("pos_iou_thr", (0.5, 0.6)),
                ("match_low_quality", (False, True)),
                ("level", (0, -1)),
            ],
        ),
    ]
    try:
        from instseg_edu.widgets.roi_explorer import RoIExplorer
    except ImportError:  # written by another part of the project; optional here
        return cases
    cases.append(
        (
            "RoIExplorer",
            lambda: RoIExplorer(image_size=512),
            [
                ("x2", (330.0, 350.0)),
                ("sampling_ratio", (2, 0)),
                ("aligned", (True, False)),
            ],
        )
    )
    return cases


def _level_view():
    from instseg_edu.widgets.anchor_explorer import AnchorExplorer

    ex = AnchorExplorer(image_size=512)
    ex.view.value = "level"
    return ex


def _serialise_messages(fig) -> None:
    """Make the FigureWidget's outgoing messages go through the widget serialiser, as in Jupyter
    (without a front end, ipywidgets skips sending)."""
    from plotly.serializers import custom_serializers

    to_json = custom_serializers["to_json"]

    def record(change):
        if change["new"] is not None:
            to_json(change["new"], fig)

    fig.observe(record, names=["_py2js_update", "_py2js_restyle", "_py2js_relayout"])


def measure(factory, control: str, values, repeats: int) -> list[float]:
    explorer = factory()
    _serialise_messages(explorer.figure)
    widget = getattr(explorer, control)
    widget.value = values[-1]  # untimed: from here on every assignment is a real change
    times = []
    for i in range(repeats):
        value = values[i % len(values)]
        start = time.perf_counter()
        widget.value = value
        times.append(time.perf_counter() - start)
    return times


def dashboard_overhead(steps: int, image_size: int = 256, batch_size: int = 4) -> dict:
    """Train ``steps`` steps with and without the dashboard; returns times and its own cost."""
    import tempfile
    from pathlib import Path

    from instseg_edu.widgets.dashboard import TrainingDashboard

    from instseg_edu.data.coco import CocoDataset
    from instseg_edu.data.shapes import CLASSES, make_shapes_dataset
    from instseg_edu.data.transforms import eval_transforms
    from instseg_edu.engine.train import TrainConfig, make_loader, train
    from instseg_edu.models.retinanet import RETINANET_R18_SMALL, build_retinanet

    root = Path(tempfile.mkdtemp(prefix="instseg_bench_"))
    ann = make_shapes_dataset(root, 16, image_size=image_size)
    loader = make_loader(CocoDataset(ann, root / "train", eval_transforms(image_size)), batch_size)
    cfg = TrainConfig(max_steps=steps, warmup_steps=5, log_every=10, progress=False)
    out = {}
    for use in (False, True, False, True):  # interleaved, so drift hits both alike
        torch.manual_seed(0)
        model = build_retinanet(RETINANET_R18_SMALL.with_num_classes(len(CLASSES)))
        dash = TrainingDashboard(thumbnails_every=10, class_names=CLASSES)
        start = time.perf_counter()
        train(model, loader, cfg, callbacks=[dash] if use else [])
        wall = time.perf_counter() - start
        key = "with" if use else "without"
        out[key] = min(out.get(key, float("inf")), wall)
        if use:
            out["overhead_s"] = min(out.get("overhead_s", float("inf")), dash.overhead_s)
            out["redraws"] = dash.redraws
    out["fraction"] = out["overhead_s"] / out["with"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--target-ms", type=float, default=100.0)
    parser.add_argument("--dashboard-steps", type=int, default=0, help="0: skip the dashboard")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 512² image, CPU")
    print(f"{'explorer':30s} {'control':18s} {'median ms':>10s} {'p90 ms':>8s}")
    worst = 0.0
    for name, factory, controls in _cases():
        for control, values in controls:
            times = sorted(measure(factory, control, values, args.repeats))
            median = statistics.median(times) * 1000
            p90 = times[int(0.9 * (len(times) - 1))] * 1000
            worst = max(worst, median)
            print(f"{name:30s} {control:18s} {median:10.1f} {p90:8.1f}")
    ok = worst < args.target_ms
    print(
        f"worst median {worst:.1f} ms: {'OK' if ok else 'OVER'} (target < {args.target_ms:.0f} ms)"
    )
    if args.dashboard_steps:
        r = dashboard_overhead(args.dashboard_steps)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(
            f"TrainingDashboard, {args.dashboard_steps} steps on {device}: "
            f"run {r['without']:.2f} s without, {r['with']:.2f} s with; "
            f"{r['overhead_s']:.3f} s in its callbacks "
            f"({100 * r['fraction']:.1f} % of the run, {r['redraws']} redraws; target < 5 %)"
        )
        ok = ok and r["fraction"] < 0.05
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
