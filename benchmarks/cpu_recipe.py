"""How the CPU tier's Mask R-CNN recipe was chosen: train a variant for a fixed wall-clock budget,
score it on the shapes validation split.

Each run builds the variant, times a few training steps of it on this machine, sets ``max_steps``
so that training fills ``--seconds`` (the cosine schedule then ends on time), trains on the
recipe's in-memory 128 px shapes split and evaluates box and mask AP on its 200 validation images.
One line of JSON per run is appended to ``--json``. Variants are named changes to
``MASK_RCNN_R18_CPU`` and its recipe (see :data:`VARIANTS`); the table in ``benchmarks/RESULTS.md``
("CPU recipe") lists what they gave. Run one at a time on a quiet machine: the budget is wall-clock
time, so a busy machine trains fewer steps.

    python benchmarks/cpu_recipe.py current narrow_r32 --seconds 300 --json runs/cpu_recipe.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable

import torch

from instseg_edu.models.backbone import resnet_out_channels
from instseg_edu.models.mask_rcnn import build_mask_rcnn
from instseg_edu.recipes import measure_step_seconds, recipe

# ------------------------------------------------------------------------------- the variants


def _roi_sampler(cfg, num: int, pos_fraction: float):
    rcnn = cfg.train_cfg.rcnn
    rcnn = dataclasses.replace(
        rcnn, sampler=dataclasses.replace(rcnn.sampler, num=num, pos_fraction=pos_fraction)
    )
    return dataclasses.replace(cfg, train_cfg=dataclasses.replace(cfg.train_cfg, rcnn=rcnn))


def _width(cfg, base_channels: int):
    backbone = dataclasses.replace(cfg.backbone, base_channels=base_channels)
    neck = dataclasses.replace(cfg.neck, in_channels=resnet_out_channels(backbone))
    return dataclasses.replace(cfg, backbone=backbone, neck=neck)


def _heads(cfg, fc_out_channels: int | None = None, num_convs: int | None = None):
    roi_head = cfg.roi_head
    if fc_out_channels is not None:
        roi_head = dataclasses.replace(roi_head, fc_out_channels=fc_out_channels)
    if num_convs is not None:
        roi_head = dataclasses.replace(roi_head, num_convs=num_convs)
    return dataclasses.replace(cfg, roi_head=roi_head)


def _rpn_scale(cfg, scale: float):
    anchors = dataclasses.replace(cfg.rpn_head.anchor_generator, scales=(scale,))
    head = dataclasses.replace(cfg.rpn_head, anchor_generator=anchors)
    return dataclasses.replace(cfg, rpn_head=head)


def _finest_scale(cfg, value: float):
    return dataclasses.replace(cfg, roi_head=dataclasses.replace(cfg.roi_head, finest_scale=value))


def _three_stages(cfg):
    backbone = dataclasses.replace(cfg.backbone, num_stages=3, out_indices=(0, 1, 2))
    neck = dataclasses.replace(cfg.neck, in_channels=resnet_out_channels(backbone))
    return dataclasses.replace(cfg, backbone=backbone, neck=neck)


Variant = tuple[Callable, Callable]  # (model config -> config, recipe -> recipe)
_same: Callable = lambda x: x  # noqa: E731

#: name -> (change to the model config, change to the recipe), applied to today's preset.
VARIANTS: dict[str, Variant] = {
    "current": (_same, _same),
    # Before this recipe: a full-width ResNet-18 and 32 RoIs per image.
    "full_width_r32": (lambda c: _roi_sampler(_width(c, 64), 32, 0.5), _same),
    "narrow_r32": (lambda c: _roi_sampler(c, 32, 0.5), _same),
    "narrow_r128": (lambda c: _roi_sampler(c, 128, 0.5), _same),
    "rpn_anchors_16px": (lambda c: _rpn_scale(c, 4.0), _same),
    "finest_scale_14": (lambda c: _finest_scale(c, 14.0), _same),
    "three_stages": (_three_stages, _same),
    "batch_4": (_same, lambda r: dataclasses.replace(r, batch_size=4)),
    "lr_4e-3": (_same, lambda r: dataclasses.replace(r, lr=4e-3)),
    # Cheaper heads: the box head's two 1024-wide fc layers were 40 % of a step's FLOPs and the
    # mask head's four convs 19 %.
    "fc256": (lambda c: _heads(c, fc_out_channels=256), _same),
    "fc256_mask2": (lambda c: _heads(c, fc_out_channels=256, num_convs=2), _same),
    "fc256_mask2_nojitter": (
        lambda c: _heads(c, fc_out_channels=256, num_convs=2),
        lambda r: dataclasses.replace(r, color_jitter=False),
    ),
    "fc256_mask2_nojitter_lr3e-3": (
        lambda c: _heads(c, fc_out_channels=256, num_convs=2),
        lambda r: dataclasses.replace(r, color_jitter=False, lr=3e-3),
    ),
    # MMDetection's step schedule (x0.1 at 8/12 and 11/12 of the run) keeps the full rate longer.
    "step_schedule": (_same, lambda r: dataclasses.replace(r, schedule="step")),
    "fc256_mask2_nojitter_b16_lr3e-3": (
        lambda c: _heads(c, fc_out_channels=256, num_convs=2),
        lambda r: dataclasses.replace(r, color_jitter=False, lr=3e-3, batch_size=16),
    ),
}


def run(name: str, seconds: float, data: str, loading_overhead: float = 1.08, **sizes) -> dict:
    """Train variant ``name`` for about ``seconds`` and score it; returns the JSON record.
    ``sizes`` (``num_train``, ``num_val``, ``image_size``) shrink the data for a smoke run."""
    from instseg_edu.engine.evaluate import evaluate_model
    from instseg_edu.engine.train import make_loader, train

    change_cfg, change_recipe = VARIANTS[name]
    r = change_recipe(dataclasses.replace(recipe("mask_rcnn", "cpu"), **sizes))
    cfg = change_cfg(r.model_config(7))
    train_set, val_set = r.shapes_datasets(data)
    torch.manual_seed(1)
    # + drawing and augmenting batches
    step_s = measure_step_seconds(r, 5, "cpu", cfg) * loading_overhead
    steps = max(1, int(seconds / step_s))
    torch.manual_seed(0)
    model = build_mask_rcnn(cfg)
    loader = make_loader(train_set, r.batch_size, shuffle=True, seed=0,
                         drop_last=len(train_set) > r.batch_size)  # fmt: skip
    start = time.perf_counter()
    history = train(model, loader, r.train_config(max_steps=steps, device="cpu", progress=False))
    train_s = time.perf_counter() - start
    val_loader = make_loader(val_set, 8, shuffle=False)
    metrics = evaluate_model(model, val_loader, val_set.coco, val_set.label_to_cat_id, "cpu")
    return {
        "variant": name,
        "steps": steps,
        "batch_size": r.batch_size,
        "train_s": round(train_s, 1),
        "box_AP50": round(metrics["bbox"]["AP50"], 3),
        "mask_AP50": round(metrics["segm"]["AP50"], 3),
        "box_AP": round(metrics["bbox"]["AP"], 3),
        "mask_AP": round(metrics["segm"]["AP"], 3),
        "last_loss": round(history.steps[-1]["loss"], 3),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--seconds", type=float, default=300.0, help="training budget per run")
    parser.add_argument("--data", default="data/shapes/128px-1000-200", help="shapes root")
    parser.add_argument("--num-train", type=int, default=None, help="(smoke runs) fewer images")
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--json", default=None, help="append one JSON line per run here")
    args = parser.parse_args(argv)
    sizes = {key: getattr(args, key) for key in ("num_train", "num_val", "image_size")}
    sizes = {key: value for key, value in sizes.items() if value is not None}
    for name in args.variants:
        record = run(name, args.seconds, args.data, **sizes)
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
