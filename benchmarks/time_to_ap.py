"""Time to accuracy: ours against torchvision's model, trained for the same wall-clock time.

Both models (R50-FPN, random init) train on the same shapes train split at 512² from the same
loader for ``--minutes`` each, and are evaluated every ``--eval-every`` minutes with the same
pycocotools evaluation on the val split (evaluation time is not counted as training time). The
script prints both AP curves and the two questions the project asks:

- how long did ours need to reach torchvision's final AP (target: at most half the time)?
- is our final AP at least torchvision's?

    python benchmarks/time_to_ap.py --family retinanet --device cuda
    python benchmarks/time_to_ap.py --family mask_rcnn --device cuda
    python benchmarks/time_to_ap.py --family retinanet --device cpu --smoke   # seconds-long check

Each side runs in its best precision (bf16 autocast on CUDA for both by default; ``--tv-precision
fp32`` to compare) with SGD (momentum 0.9, weight decay 1e-4), a linear warm-up and the learning
rate given per side. Only the training steps count as training time (the loader's waits and the
evaluations do not); ``--max-wall-minutes`` also stops a side after that much wall-clock time
outside evaluation, so a loader-bound run still ends on time (its curve then ends short of
``--minutes``).

``parse_args`` and ``run`` are importable: ``benchmarks/gpu_check.py`` runs the same protocol.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import (
    Timer,
    autocast,
    build_torchvision,
    loaders,
    loss_total,
    shapes_data,
    torchvision_detections,
    torchvision_inputs,
)
from train_throughput import build_ours

from instseg_edu.engine.evaluate import detections_to_coco, evaluate_coco


def predict(name, model, family, batch, precision, device):
    with torch.inference_mode(), autocast(device, precision):
        if name == "ours":
            outputs = model(batch.images)
            outputs = type(outputs)(
                *(o.float() if torch.is_tensor(o) and o.is_floating_point() else o for o in outputs)
            )
            return model.predict(outputs, batch.image_sizes)
        images, _ = torchvision_inputs(batch, family)
        return torchvision_detections(model(images), family)


def evaluate(name, model, family, val_loader, val_set, precision, device):
    model.eval()
    results = []
    for batch in val_loader:
        batch = batch.to(device)
        detections = [d.to("cpu") for d in predict(name, model, family, batch, precision, device)]
        targets = [t.to("cpu") for t in batch.targets]
        results.extend(
            detections_to_coco(detections, targets, batch.image_sizes, val_set.label_to_cat_id)
        )
    model.train()
    iou_types = ("bbox", "segm") if family == "mask_rcnn" else ("bbox",)
    metrics = evaluate_coco(val_set.coco, results, iou_types)
    return {t: metrics[t]["AP"] for t in iou_types}


def run_side(name, model, family, args, train_loader, val_loader, val_set, device, on_point=None):
    """Train one side for ``args.minutes`` of training time; returns its AP curve (one point per
    evaluation: ``minutes`` of training, ``step``, ``bbox`` [and ``segm``] AP). ``on_point(point)``
    is called after each evaluation."""
    model = model.to(device).train()
    precision = args.precision if name == "ours" else args.tv_precision
    lr = args.lr if name == "ours" else args.tv_lr
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    budget, eval_every = args.minutes * 60, args.eval_every * 60
    max_wall = args.max_wall_minutes * 60 if args.max_wall_minutes else float("inf")
    timer = Timer(device)
    trained, next_eval, step, curve = 0.0, eval_every, 0, []
    start, eval_s, done = time.perf_counter(), 0.0, False
    while not done:
        for batch in train_loader:
            batch = batch.to(device, non_blocking=True)
            timer.start()
            warm = min(1.0, (step + 1) / args.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * warm
            with autocast(device, precision):
                if name == "ours":
                    losses = model.loss(model(batch.images), batch)
                else:
                    images, targets = torchvision_inputs(batch, family)
                    losses = model(images, targets)
                total = loss_total(losses, ours=name == "ours")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            trained += timer.elapsed()
            step += 1
            done = trained >= budget or time.perf_counter() - start - eval_s >= max_wall
            if trained >= next_eval or done:
                eval_start = time.perf_counter()
                ap = evaluate(name, model, family, val_loader, val_set, precision, device)
                eval_s += time.perf_counter() - eval_start
                point = {"minutes": trained / 60, "step": step, **ap}
                curve.append(point)
                print(
                    f"{family} {name:11s} {trained / 60:5.2f} min  step {step:6d}  "
                    + "  ".join(f"{k} AP {v:.3f}" for k, v in ap.items()),
                    flush=True,
                )
                if on_point is not None:
                    on_point(point)
                while next_eval <= trained:
                    next_eval += eval_every
            if done:
                break
    return curve


def time_to_reach(curve, key, value):
    for point in curve:
        if point[key] >= value:
            return point["minutes"]
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv``), with ``--smoke`` applied."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["retinanet", "mask_rcnn"], default="retinanet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default="data/shapes512")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--max-wall-minutes",
        type=float,
        default=None,
        help="also stop a side after this much wall-clock time outside evaluation",
    )
    parser.add_argument("--eval-every", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--tv-lr", type=float, default=0.02)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tv-precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--sides", nargs="+", default=["torchvision", "ours"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, small models, CPU-fast")
    parser.add_argument("--json", help="also write both curves here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.image_size, args.num_train, args.num_val, args.batch_size = 128, 8, 4, 2
        args.minutes, args.eval_every, args.workers, args.warmup_steps = 0.1, 0.05, 0, 5
        args.data = args.data + "_smoke"
    return args


def run(args: argparse.Namespace, on_point=None) -> dict:
    """Train and evaluate every side of ``args.sides`` in turn; returns ``{side: curve}``.
    ``on_point(side, point)`` is called after each evaluation."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False
    train_set, val_set = shapes_data(args.data, args.image_size, args.num_train, args.num_val)
    # Persistent workers: a new epoch (or evaluation) does not wait for workers to start.
    train_loader, val_loader = loaders(
        train_set, val_set, args.batch_size, args.workers, persistent=True
    )
    num_classes = len(train_set.classes)
    curves = {}
    for name in args.sides:
        torch.manual_seed(0)
        if name == "ours":
            model = build_ours(args.family, num_classes, args.smoke)
        else:
            model = build_torchvision(args.family, num_classes, args.image_size)
        callback = None if on_point is None else (lambda point, name=name: on_point(name, point))
        curves[name] = run_side(
            name, model, args.family, args, train_loader, val_loader, val_set, device, callback
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return curves


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    curves = run(args)

    if {"ours", "torchvision"} <= curves.keys():
        key = "segm" if args.family == "mask_rcnn" else "bbox"
        peer_final = curves["torchvision"][-1][key]
        reach = time_to_reach(curves["ours"], key, peer_final)
        finals = {
            k: (curves["ours"][-1][k], curves["torchvision"][-1][k])
            for k in curves["ours"][-1]
            if k in ("bbox", "segm")
        }
        print(
            f"torchvision's final {key} AP {peer_final:.3f}; ours reached it after "
            + (f"{reach:.2f} min" if reach is not None else "never (within the budget)")
        )
        for k, (ours, peer) in finals.items():
            ratio = f"{ours / peer:.2f}" if peer > 0 else "n/a (torchvision at 0)"
            print(f"final {k} AP: ours {ours:.3f}  torchvision {peer:.3f}  ratio {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "curves": curves}, f, indent=2)


if __name__ == "__main__":
    main()
