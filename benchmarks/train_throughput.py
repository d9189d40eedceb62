"""Training and inference speed: ours against torchvision's model, side by side in one run, on
equal work.

For each family (RetinaNet, Mask R-CNN), both models are R50-FPN with random init and nothing
frozen, see the same shapes batches (cycled from memory so the data loader is not measured) on the
same device and thread count, and are timed in alternation: each repeat times a training step,
batched inference and batch-1 latency of one side, then of the other (which side goes first
alternates), so a change of load on a shared machine hits both. The ratios ours / torchvision are
taken per repeat and their median is reported, with the range over the repeats.

Equal work. Untrained models score every candidate near the classification prior (about 0.01), so
at the usual score threshold 0.05 one side may return no detection (and skip its mask head) while
the other returns a hundred. Here the score thresholds are 0 on both sides (``host_syncs``' lenient
settings) and both keep the same ``max_per_img``, so both return ``max_per_img`` detections per
image. Mask R-CNN's second stage also does equal work: with random weights the RPN scores are noise
and the two RPNs keep different numbers of proposals after their NMS, so both are capped at the
fewest any image gets on either side (:func:`equalize_proposals`) and each box head sees the same
number of RoIs. The detections of every timed inference call (and the RoIs its box head saw) are
counted on both sides, printed, and must agree batch by batch: a difference stops the run with an
error. In training, torchvision's RPN keeps as many proposals as ours
(:func:`match_training_proposals`), and the RoIs each head trained on are printed. BatchNorm
statistics, which a training step updates, are restored after each timed training phase so that
inference always does the work counted before the timing.

The optimizer is SGD with momentum at learning rate 0: the step does all of its arithmetic, but
the weights stay at their initial values, so the detection counts cannot drift over the run (a
random-init R50 trained at a real learning rate can diverge within a few steps).

    python benchmarks/train_throughput.py --device cuda                  # the GPU measurement
    python benchmarks/train_throughput.py --device cpu --threads 2 --warmup 1 --repeats 3 \\
        --image-size 256 --json runs/throughput_cpu.json                 # the CPU measurement
    python benchmarks/train_throughput.py --device cpu --smoke          # a seconds-long check
                                                    # (at most 10 detections per image)

``torch.backends.cudnn.benchmark`` stays off: with a number of RoIs that changes every step it
re-tunes convolutions over and over and makes torchvision's Mask R-CNN about ten times slower.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from dataclasses import replace

import torch
from _common import (
    Timer,
    autocast,
    build_torchvision,
    loss_total,
    shapes_data,
    torchvision_inputs,
)
from gpu_check import SMOKE_MAX_PER_IMG, SMOKE_TORCHVISION
from host_syncs import LENIENT_TORCHVISION
from host_syncs import build_ours as build_ours_lenient

from instseg_edu.data.transforms import collate


def build_ours(family: str, num_classes: int, smoke: bool):
    """Ours with the score thresholds at 0 (``host_syncs.LENIENT_OURS``): random init, nothing
    frozen, BatchNorm statistics updated, as torchvision does without weights."""
    return build_ours_lenient(family, num_classes, smoke)


class Side:
    """How one model is stepped: ours takes a Batch, torchvision takes lists.

    For Mask R-CNN forward hooks on the box and mask heads count the RoIs they see, the work
    of the second stage (``rois["box"]``, ``rois["mask"]``, summed since the last
    :meth:`reset_rois`; :meth:`infer` resets them)."""

    def __init__(self, name, model, family, device, channels_last):
        self.name, self.model, self.family, self.device = name, model.to(device), family, device
        self.channels_last = channels_last and device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.rois = {"box": 0, "mask": 0}
        if family == "mask_rcnn":
            ours = name == "ours"
            heads = {
                "box": self.model.bbox_head if ours else self.model.roi_heads.box_head,
                "mask": self.model.mask_head if ours else self.model.roi_heads.mask_head,
            }
            for kind, head in heads.items():
                head.register_forward_hook(functools.partial(self._count_rois, kind))
        self.initial_buffers = [b.detach().clone() for b in self.model.buffers()]

    def _count_rois(self, kind: str, module, inputs, output) -> None:
        self.rois[kind] += inputs[0].shape[0]  # [R, F, S, S]: a size, no synchronisation

    def reset_rois(self) -> None:
        self.rois = {"box": 0, "mask": 0}

    def restore_buffers(self) -> None:
        """BatchNorm statistics back to their initial values: a training step updates them
        even at learning rate 0, and they decide which proposals and detections inference
        finds. Restored outside the timed loops, so inference always does the calibrated work."""
        with torch.no_grad():
            for buffer, initial in zip(self.model.buffers(), self.initial_buffers):
                buffer.copy_(initial)

    def train_step(self, batch, precision):
        self.model.train()
        with autocast(self.device, precision):
            if self.name == "ours":
                images = batch.images
                if self.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                losses = self.model.loss(self.model(images), batch)
            else:
                images, targets = torchvision_inputs(batch, self.family)
                losses = self.model(images, targets)
            total = loss_total(losses, ours=self.name == "ours")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer(self, batch, precision):
        self.model.eval()
        self.reset_rois()
        with autocast(self.device, precision):
            if self.name == "ours":
                return self.model.predict(self.model(batch.images), batch.image_sizes)
            images, _ = torchvision_inputs(batch, self.family)
            return self.model(images)

    @torch.no_grad()
    def forward(self, batch, precision):
        """Ours: the network alone (backbone, neck, heads), without turning its outputs into
        detections."""
        self.model.eval()
        with autocast(self.device, precision):
            return self.model(batch.images)

    def count(self, outputs) -> list[int]:
        """Detections returned for each image (tensor sizes: no host synchronisation)."""
        if self.name == "ours":
            return [len(d.scores) for d in outputs]
        return [len(o["scores"]) for o in outputs]

    def work(self, outputs) -> dict:
        """What the last :meth:`infer` did: detections per image and, for Mask R-CNN, the RoIs
        its box head saw."""
        done = {"detections": self.count(outputs)}
        if self.family == "mask_rcnn":
            done["box_head_rois"] = self.rois["box"]
        return done

    @torch.no_grad()
    def proposals_per_image(self, batch) -> list[int]:
        """Mask R-CNN: valid RPN proposals of each image at the current test settings."""
        self.model.eval()
        if self.name == "ours":
            outputs = self.model(batch.images)
            props = self.model.proposals(outputs, batch.image_sizes, self.model.cfg.test_cfg.rpn)
            return props.valid.sum(1).tolist()
        images, _ = torchvision_inputs(batch, self.family)
        image_list, _ = self.model.transform(images)
        proposals, _ = self.model.rpn(image_list, self.model.backbone(image_list.tensors))
        return [len(p) for p in proposals]


def max_per_img(model, family: str) -> int:
    """Ours: detections kept per image after NMS."""
    test = model.cfg.test_cfg
    return test.rcnn.max_per_img if family == "mask_rcnn" else test.max_per_img


def set_max_per_img(side: Side, keep: int) -> None:
    """Keep at most ``keep`` detections per image (ours: a config copy; torchvision: attribute)."""
    model = side.model
    if side.name == "torchvision":
        (model.roi_heads if side.family == "mask_rcnn" else model).detections_per_img = keep
        return
    test = model.cfg.test_cfg
    if side.family == "mask_rcnn":
        test = replace(test, rcnn=replace(test.rcnn, max_per_img=keep))
    else:
        test = replace(test, max_per_img=keep)
    model.cfg = replace(model.cfg, test_cfg=test)


def set_rpn_max_per_img(side: Side, keep: int) -> None:
    """Mask R-CNN: keep at most ``keep`` RPN proposals per image at test time."""
    model = side.model
    if side.name == "torchvision":
        model.rpn._post_nms_top_n = {**model.rpn._post_nms_top_n, "testing": keep}
        return
    test = model.cfg.test_cfg
    model.cfg = replace(model.cfg, test_cfg=replace(test, rpn=replace(test.rpn, max_per_img=keep)))


def match_training_proposals(ours: Side, peer: Side) -> tuple[int, int]:
    """Mask R-CNN: torchvision's RPN proposes as many boxes in training as ours.

    torchvision's defaults keep 2000 proposals per image after the RPN's NMS in training,
    MMDetection's (ours) 1000. Both sample 512 RoIs per image for the box head, at most a quarter
    positive, but more proposals give more positives: at 256² torchvision's mask head trained on
    78 RoIs where ours trained on 38. With ours' numbers on both sides (``nms_pre`` per level
    before NMS, ``max_per_img`` after) the heads do comparable work; the RoIs each head saw are
    counted and printed (not enforced: the sampling is random). Returns the two numbers."""
    rpn = ours.model.cfg.train_cfg.rpn_proposal
    model = peer.model.rpn
    model._pre_nms_top_n = {**model._pre_nms_top_n, "training": rpn.nms_pre}
    model._post_nms_top_n = {**model._post_nms_top_n, "training": rpn.max_per_img}
    return rpn.nms_pre, rpn.max_per_img


def equalize_proposals(sides: dict[str, Side], batches) -> int:
    """Mask R-CNN: cap both RPNs at the fewest proposals any image of ``batches`` gets on either
    side, so both box heads see the same number of RoIs per image.

    With random weights the RPN scores are noise, and which anchors survive its NMS (0.7 per
    level) differs between the two models: at 256² ours kept the full 1000 per image where
    torchvision's kept 470-970, so its box head did half the work. Capped at the smallest count
    ``K``, every image has at least ``K`` proposals on both sides and keeps exactly ``K``.
    Returns ``K``."""
    counts = [n for side in sides.values() for b in batches for n in side.proposals_per_image(b)]
    keep = max(1, min(counts))
    for side in sides.values():
        set_rpn_max_per_img(side, keep)
    return keep


def measure(side: Side, batches, batch1, precision, warmup, steps, device):
    """One side alone: train img/s, inference img/s, batch-1 latency (median ms), peak GiB."""
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        side.train_step(batches[i % len(batches)], precision)
    timer.start()
    for i in range(steps):
        side.train_step(batches[i % len(batches)], precision)
    train_s = timer.elapsed()
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )

    for i in range(warmup):
        side.infer(batches[i % len(batches)], precision)
    detections = []
    timer.start()
    for i in range(steps):
        detections.append(side.count(side.infer(batches[i % len(batches)], precision)))
    infer_s = timer.elapsed()

    latency_ms = _median_ms(timer, lambda: side.infer(batch1, precision), warmup, steps)
    # Ours: how much of the batch-1 latency is the network and how much turning its outputs into
    # detections (the rest).
    forward_ms = None
    if side.name == "ours":
        forward_ms = _median_ms(timer, lambda: side.forward(batch1, precision), warmup, steps)
    n_images = steps * len(batches[0])
    return {
        "precision": precision,
        "train_img_s": n_images / train_s,
        "infer_img_s": n_images / infer_s,
        "latency_ms": latency_ms,
        "forward_ms": forward_ms,
        "peak_gib": peak,
        "detections": detections,
    }


def _median_ms(timer, call, warmup: int, steps: int) -> float:
    """Median milliseconds of ``steps`` calls of ``call()`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + steps):
        timer.start()
        call()
        if i >= warmup:
            times.append(timer.elapsed() * 1000)
    return statistics.median(times)


def _time_phases(side: Side, batches, batch1, precision, steps, device, start: int) -> dict:
    """One repeat of one side: ``steps`` training steps, ``steps`` inference batches and ``steps``
    batch-1 calls; the work of every inference call (:meth:`Side.work`)."""
    timer = Timer(device)
    pick = [batches[(start + i) % len(batches)] for i in range(steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    side.reset_rois()
    timer.start()
    for batch in pick:
        side.train_step(batch, precision)
    train_s = timer.elapsed()
    train_rois = dict(side.rois)  # sampled RoIs (box head) and positives (mask head), summed
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    side.restore_buffers()
    work = []
    timer.start()
    for batch in pick:
        out = side.infer(batch, precision)
        work.append(side.work(out))  # tensor sizes and a hook's count: no synchronisation
    infer_s = timer.elapsed()
    latencies = []
    for _ in range(steps):
        timer.start()
        out = side.infer(batch1, precision)
        latencies.append(timer.elapsed() * 1000)
    work.append(side.work(out))
    n_images = steps * len(batches[0])
    return {
        "train_img_s": n_images / train_s,
        "infer_img_s": n_images / infer_s,
        "latency_ms": statistics.median(latencies),
        "peak_gib": peak,
        "train_rois_per_step": {k: v / steps for k, v in train_rois.items()},
        "work": work,  # per inference batch, then the batch-1 call: detections per image (and
        # Mask R-CNN's box-head RoIs)
    }


def measure_side_by_side(
    sides: dict[str, Side], batches, batch1, precision, warmup, repeats, steps, device
) -> dict:
    """Time the two sides in alternation on the same batches and compare them repeat by repeat.

    Each side is warmed up (``warmup`` training steps, inference batches and batch-1 calls), then
    each of ``repeats`` repeats times every side once (:func:`_time_phases`), the side that goes
    first alternating. Per repeat: ``train`` and ``infer`` are ours / torchvision's img/s,
    ``latency_speedup`` torchvision's batch-1 ms / ours (above 1: ours is faster everywhere).

    Returns:
        ``{"repeats": {side: [per-repeat figures]}, side: median figures, "ratios": median ratios,
        "ratio_ranges": (min, max) per ratio, "work": the inference work of the last repeat}``.

    Raises:
        RuntimeError: the two sides did different work in some inference call (other numbers of
            detections, or of box-head RoIs): the ratios would mean nothing.
    """
    names = list(sides)
    for side in sides.values():
        for i in range(warmup):
            side.train_step(batches[i % len(batches)], precision)
            side.restore_buffers()
            side.infer(batches[i % len(batches)], precision)
            side.infer(batch1, precision)
    per_repeat: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            per_repeat[name].append(
                _time_phases(sides[name], batches, batch1, precision, steps, device, r * steps)
            )
        work = {name: per_repeat[name][-1]["work"] for name in names}
        if len({json.dumps(w) for w in work.values()}) > 1:
            raise RuntimeError(
                f"unequal work in repeat {r}: "
                + ", ".join(f"{name} {w}" for name, w in work.items())
            )
    result: dict = {"precision": precision, "repeats": per_repeat}
    for name in names:
        runs = per_repeat[name]
        peaks = [run["peak_gib"] for run in runs if run["peak_gib"] is not None]
        result[name] = {
            "precision": precision,
            "train_img_s": statistics.median(run["train_img_s"] for run in runs),
            "infer_img_s": statistics.median(run["infer_img_s"] for run in runs),
            "latency_ms": statistics.median(run["latency_ms"] for run in runs),
            "peak_gib": max(peaks) if peaks else float("nan"),
        }
    result["work"] = per_repeat[names[0]][-1]["work"]
    if len(names) == 2:
        ours, peer = (per_repeat[name] for name in names)
        per = {
            "train": [o["train_img_s"] / p["train_img_s"] for o, p in zip(ours, peer)],
            "infer": [o["infer_img_s"] / p["infer_img_s"] for o, p in zip(ours, peer)],
            "latency_speedup": [p["latency_ms"] / o["latency_ms"] for o, p in zip(ours, peer)],
        }
        result["ratios"] = {k: statistics.median(v) for k, v in per.items()}
        result["ratio_ranges"] = {k: (min(v), max(v)) for k, v in per.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["retinanet", "mask_rcnn"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--precisions", nargs="+", help="default: bf16 fp32 on CUDA, fp32 on CPU")
    parser.add_argument("--data", help="default: data/shapes<image-size>")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, help="default: 8 on CUDA, 2 on the CPU")
    parser.add_argument("--warmup", type=int, help="default: 10 on CUDA, 1 on the CPU")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the two sides")
    parser.add_argument("--steps", type=int, help="per repeat; default: 10 on CUDA, 2 on the CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, small models, CPU-fast")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.smoke:
        args.image_size, args.batch_size, args.warmup, args.steps, args.repeats = 128, 2, 1, 1, 2
        args.precisions = ["fp32"]
    args.precisions = args.precisions or (["bf16", "fp32"] if cuda else ["fp32"])
    args.batch_size = args.batch_size or (8 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.steps = args.steps or (10 if cuda else 2)
    args.data = args.data or f"data/shapes{args.image_size}" + ("_smoke" if args.smoke else "")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)

    train, _ = shapes_data(args.data, args.image_size, num_train=4 * args.batch_size, num_val=8)
    num_classes = len(train.classes)
    batches = [
        collate([train[i * args.batch_size + j] for j in range(args.batch_size)]).to(device)
        for i in range(4)
    ]
    batch1 = collate([train[0]]).to(device)

    if args.smoke:
        print("smoke run: ours uses the small CPU preset, so the ratios below mean nothing")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu'}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{torch.get_num_threads()} threads, load average {load}, batch {args.batch_size}, "
        f"{args.image_size}², {args.repeats} repeats of {args.steps} steps"
    )
    results: dict = {
        "settings": {
            k: getattr(args, k)
            for k in ("device", "image_size", "batch_size", "warmup", "repeats", "steps")
        }
        | {
            "threads": torch.get_num_threads(),
            "load_average_start": load,
            "torch": torch.__version__,
        }
    }
    for family in args.families:
        torch.manual_seed(0)
        ours = Side("ours", build_ours(family, num_classes, args.smoke), family, device, True)
        smaller = SMOKE_TORCHVISION.get(family, {}) if args.smoke else {}
        peer_model = build_torchvision(
            family, num_classes, args.image_size, **LENIENT_TORCHVISION[family], **smaller
        )
        sides = {
            "ours": ours,
            "torchvision": Side("torchvision", peer_model, family, device, False),
        }
        keep = max_per_img(ours.model, family)
        if args.smoke:
            keep = min(keep, SMOKE_MAX_PER_IMG)
        for side in sides.values():
            set_max_per_img(side, keep)
            for group in side.optimizer.param_groups:
                group["lr"] = 0.0  # see the module docstring
        proposals = training_proposals = None
        if family == "mask_rcnn":
            training_proposals = match_training_proposals(ours, sides["torchvision"])
            proposals = equalize_proposals(sides, [*batches, batch1])
        runs = [
            measure_side_by_side(
                sides, batches, batch1, p, args.warmup, args.repeats, args.steps, device
            )
            for p in args.precisions
        ]
        for run in runs:
            for name in sides:
                r = run[name]
                print(
                    f"{family:9s} {name:11s} {run['precision']:4s} train {r['train_img_s']:7.2f} "
                    f"img/s  infer {r['infer_img_s']:7.2f} img/s  batch-1 "
                    f"{r['latency_ms']:7.1f} ms  peak "
                    + (f"{r['peak_gib']:5.2f} GiB" if cuda else "(CUDA only)")
                )
            work = run["work"]
            print(
                f"{family:9s} detections per image, both sides (equal work, max_per_img {keep}): "
                f"batches {[w['detections'] for w in work[:-1]]}, "
                f"batch-1 {work[-1]['detections']}"
            )
            if training_proposals is not None:
                trained = {
                    name: {
                        kind: statistics.mean(r["train_rois_per_step"][kind] for r in repeats)
                        for kind in ("box", "mask")
                    }
                    for name, repeats in run["repeats"].items()
                }
                print(
                    f"{family:9s} RoIs per training step, box head / mask head: "
                    + ", ".join(f"{n} {t['box']:.0f} / {t['mask']:.0f}" for n, t in trained.items())
                    + f" (RPN on both sides: {training_proposals[0]} per level before NMS, "
                    f"{training_proposals[1]} after)"
                )
            if proposals is not None:
                print(
                    f"{family:9s} box-head RoIs per call, both sides (RPN capped at {proposals} "
                    f"proposals per image): batches {[w['box_head_rois'] for w in work[:-1]]}, "
                    f"batch-1 {work[-1]['box_head_rois']}"
                )
        if len(runs) == 1:
            ratios, ranges = runs[0]["ratios"], runs[0]["ratio_ranges"]
            best = {name: runs[0][name] for name in sides}
        else:  # each side at its best precision: most img/s, least latency
            best = {
                name: {
                    "train_img_s": max(run[name]["train_img_s"] for run in runs),
                    "infer_img_s": max(run[name]["infer_img_s"] for run in runs),
                    "latency_ms": min(run[name]["latency_ms"] for run in runs),
                }
                for name in sides
            }
            o, p = best["ours"], best["torchvision"]
            ratios = {
                "train": o["train_img_s"] / p["train_img_s"],
                "infer": o["infer_img_s"] / p["infer_img_s"],
                "latency_speedup": p["latency_ms"] / o["latency_ms"],
            }
            ranges = None
        spans = {k: f" ({lo:.2f}-{hi:.2f})" for k, (lo, hi) in (ranges or {}).items()}
        shown = {k: f"{v:.2f}x{spans.get(k, '')}" for k, v in ratios.items()}
        print(
            f"{family:9s} ratio ours/torchvision: train {shown['train']}  "
            f"infer {shown['infer']}  batch-1 speed-up {shown['latency_speedup']}"
        )
        results[family] = {
            "runs": runs,
            "ours": best["ours"],
            "torchvision": best["torchvision"],
            "ratios": ratios,
            "ratio_ranges": ranges,
            "max_per_img": keep,
            "rpn_max_per_img": proposals,
            "rpn_training_proposals": training_proposals,
        }
        del sides, ours, peer_model
    results["settings"]["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
