"""The ``instseg-edu`` command (also ``python -m instseg_edu``).

Subcommands:

- ``demo``: build the shapes dataset if missing, train one model family on it (``--model``,
  Mask R-CNN by default) with its recipe for this machine (:mod:`instseg_edu.recipes`: a
  ResNet-50-FPN model on a GPU; a small ResNet-18 model on 128 px images for about five minutes
  on a CPU), evaluate it with pycocotools (box and mask AP) and write the AP table, the loss curve
  and a prediction gallery with masks to ``runs/demo/``;
- ``train``: train a model family on the shapes dataset or on your own COCO-format data;
- ``evaluate``: COCO AP of a checkpoint on a validation set (``--report DIR``: where it fails);
- ``predict``: draw a checkpoint's detections on image files.

A checkpoint written here stores the model family and its config as plain data (``meta``), so
``evaluate`` and ``predict`` rebuild the model without being told which one it was
(:func:`instseg_edu.engine.checkpoint.load_model`, which a program can call too). It also
stores the model's category list (``classes`` and ``label_to_cat_id``): a validation file is
matched to it by category id, and predictions are reported with those ids.

Any problem in the data — found up front, while loading an item (also inside a DataLoader
worker), or during evaluation — ends the command with one line naming the file, the image or
annotation id and the problem, and exit status 2; ``--debug`` shows the traceback instead.

Under ``torchrun`` (``torchrun --nproc_per_node=N -m instseg_edu train ...``), ``train``, ``demo``
and ``evaluate`` run data-parallel: ``--batch-size`` is per process, rank 0 prints and writes every
output, and an error is shown once, by the process that failed first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from instseg_edu.models import BUILDERS, build_model

#: family → (module, builder, config class, GPU preset, CPU preset)
FAMILIES = {
    family: (*BUILDERS[family], gpu, cpu)
    for family, (gpu, cpu) in {
        "retinanet": ("RETINANET_R50_FPN_SCRATCH", "RETINANET_R18_SMALL"),
        "mask_rcnn": ("MASK_RCNN_R50_FPN", "MASK_RCNN_R18_SMALL"),
        "solo": ("SOLO_R50_FPN_SCRATCH", "SOLO_R18_SMALL"),
        "yolact": ("YOLACT_R50_FPN", "YOLACT_R18_SMALL"),
    }.items()
}

#: Families that learn masks: they refuse a training set without a single mask.
MASK_FAMILIES = ("mask_rcnn", "solo", "yolact")

GALLERY_IMAGES = 8


class CliError(Exception):
    """A problem the user can fix (bad path, bad option); printed without a traceback."""


# ------------------------------------------------------------------------------------------------
# Building blocks shared by the subcommands
# ------------------------------------------------------------------------------------------------


def _device(name: str):
    import torch

    from instseg_edu.engine.train import resolve_device

    try:
        device = resolve_device(name)
    except RuntimeError as e:
        raise CliError(f"--device {name!r} is not a valid device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def _family_module(family: str):
    import importlib

    if family not in FAMILIES:
        raise CliError(f"unknown model {family!r}; choose from {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[family][0])


def _preset(family: str, name: str | None, device) -> tuple[str, object]:
    module = _family_module(family)
    _, _, config_cls, gpu, cpu = FAMILIES[family]
    name = name or (gpu if device.type == "cuda" else cpu)
    cfg = getattr(module, name, None)
    if cfg is None or type(cfg).__name__ != config_cls:
        presets = [k for k, v in vars(module).items() if type(v).__name__ == config_cls]
        raise CliError(f"unknown preset {name!r} for {family}; available: {sorted(presets)}")
    return name, cfg


def _build(family: str, cfg):
    return build_model(family, cfg)


def _existing(path: str | None, what: str, flag: str, *, folder: bool = False) -> Path:
    if path is None:
        raise CliError(f"{flag} is required")
    p = Path(path)
    ok = p.is_dir() if folder else p.is_file()
    if not ok:
        raise CliError(f"{flag}: {what} {str(p)!r} does not exist")
    return p


SHAPES_SEED = 0
"""The seed of the shapes images of ``demo`` and ``train --data shapes``: always the standard
validation split (``demo`` trains on its recipe's training split, which for the CPU tier's Mask
R-CNN has more shapes per image). ``--seed`` changes the initial weights, the data order and the
augmentation, never the images (a run with another seed is scored on the same validation
images, and the folder is not redrawn)."""


def _shapes(root: str, image_size: int, num_train: int, num_val: int, seed: int = SHAPES_SEED,
            train_shapes_per_image: tuple[int, int] | None = None):  # fmt: skip
    """Generate (or reuse) the shapes splits; each size/count gets its own folder. The training
    split has ``train_shapes_per_image`` shapes per image when given (a recipe's
    :meth:`~instseg_edu.recipes.Recipe.make_train_split`), the standard number otherwise."""
    from instseg_edu.data.shapes import SHAPES_PER_IMAGE, make_shapes_dataset, split_name
    from instseg_edu.engine.distributed import is_distributed, is_main_process

    folder = Path(root) / f"{image_size}px-{num_train}-{num_val}"
    shapes = train_shapes_per_image or SHAPES_PER_IMAGE
    train_split = split_name("train", shapes)

    def make() -> tuple[Path, Path]:
        train = make_shapes_dataset(folder, num_train, image_size, seed, train_split,
                                    shapes_per_image=shapes)  # fmt: skip
        return train, make_shapes_dataset(folder, num_val, image_size, seed, "val")

    start = time.perf_counter()
    if is_distributed():  # rank 0 writes the files, the other processes then reuse them
        if is_main_process():
            make()
        import torch.distributed

        torch.distributed.barrier()
    train_json, val_json = make()
    print(f"data: {folder} ({time.perf_counter() - start:.1f} s)", flush=True)
    return train_json, folder / train_split, val_json, folder / "val"


def _datasets(train_json, train_images, val_json, val_images, image_size: int,
              categories: list[dict] | None = None, in_memory: bool = False,
              val_image_size: int | None = None):  # fmt: skip
    """Training and validation sets, resized to ``image_size`` (the validation set to
    ``val_image_size`` when given). The validation set's labels are the model's: those of the
    training set, or ``categories`` (a checkpoint's list), matched to its file by category id.
    ``in_memory``: read every image once, resized, and keep it (only the random augmentation
    then runs per step; see :class:`~instseg_edu.data.memory.InMemoryDataset`)."""
    from instseg_edu.data.coco import CocoDataset
    from instseg_edu.data.memory import InMemoryDataset
    from instseg_edu.data.transforms import eval_transforms, train_transforms

    train_set = val_set = None
    start = time.perf_counter()
    try:
        if train_json is not None:
            if in_memory:
                train_set = InMemoryDataset(
                    CocoDataset(train_json, train_images, eval_transforms(image_size)),
                    train_transforms(image_size),
                )
            else:
                train_set = CocoDataset(train_json, train_images, train_transforms(image_size))
            categories = train_set.categories
        if val_json is not None:
            resize = eval_transforms(val_image_size or image_size)
            val_set = CocoDataset(val_json, val_images, resize, categories=categories)
            if in_memory:
                val_set = InMemoryDataset(val_set)
        if in_memory:
            count = sum(len(d) for d in (train_set, val_set) if d is not None)
            print(f"data: {count} images read into memory in {time.perf_counter() - start:.1f} s",
                  flush=True)  # fmt: skip
    except ValueError as e:  # malformed annotation files: the message names file and problem
        raise CliError(str(e)) from None
    return train_set, val_set


def _checkpoint_categories(meta: dict) -> list[dict] | None:
    """The category list a checkpoint stores, or None for one written before it did."""
    from instseg_edu.data.annotations import categories_list

    if meta.get("classes") is None or meta.get("label_to_cat_id") is None:
        return None
    return categories_list(meta["label_to_cat_id"], meta["classes"])


def _default_workers(device) -> int:
    cpus = os.cpu_count() or 1
    return min(8, cpus) if device.type == "cuda" else min(2, max(0, cpus - 1))


def _best_f1_on(model, val_set, device, batch_size: int):
    """:func:`~instseg_edu.engine.analysis.best_f1_threshold` over the whole validation split, in
    this process also under torchrun (only the main process draws): ``(threshold or None,
    sweep)``."""
    from instseg_edu.engine.analysis import best_f1_threshold
    from instseg_edu.engine.train import make_loader

    loader = make_loader(val_set, batch_size, shuffle=False, distributed=False)
    return best_f1_threshold(model, loader, val_set.coco, val_set.label_to_cat_id, device)


def _threshold_and_why(thr, sweep) -> tuple[float, str]:
    """``(the gallery's threshold, the line that says what it gives)``: ``thr``, else 0.3."""
    if thr is None:
        return 0.3, "score >= 0.30: no box was right at IoU 0.5 on the validation split"
    line = f"{sweep.describe(thr)} at IoU 0.5 on the validation split, its best F1"
    if f"{thr:.2f}" != "0.30":
        line += f" (at {sweep.describe(0.3)})"
    return thr, line


def _predict_at_sizes(model, val_sets, sizes, size_cuts, device, batch_size: int, workers: int):
    """:func:`~instseg_edu.engine.evaluate.predict_at_sizes` (``val_sets``: the same images
    resized to each of ``sizes``, the first for the smallest boxes).

    Returns:
        ``(per_size results, merged results, image ids, how)``; ``how`` describes the merge for a
        printed title (``""`` for one size).
    """
    from instseg_edu.engine.evaluate import predict_at_sizes

    merged, image_ids, per_size = predict_at_sizes(
        model, val_sets, size_cuts, val_sets[0].label_to_cat_id, device,
        batch_size=batch_size, workers=workers,
    )  # fmt: skip
    if len(val_sets) == 1:
        return per_size, merged, image_ids, ""
    bounds = [0.0, *size_cuts, float("inf")]
    how = ", each test size for its boxes: " + ", ".join(
        f"{size} px {low:g}-{high:g} px" for size, low, high in zip(sizes, bounds, bounds[1:])
    )
    return per_size, merged, image_ids, how


def _report_at_sizes(model, val_sets, sizes, size_cuts, device, out: Path | None,
                     batch_size: int, workers: int):  # fmt: skip
    """COCO evaluation of one pass per test size (:func:`_predict_at_sizes`), read back as
    COCOeval's matches: the AP table printed and written to ``out`` (``ap.md``, ``ap.json``);
    with several sizes the table is the merge's, after one line with the first size's AP alone
    (``demo`` with ``Recipe.merge_test_sizes``, ``evaluate --test-sizes``). Returns
    ``(results, {iou_type: CocoMatches})`` for a gallery or ``--report``."""
    from instseg_edu.engine.analysis import match_coco
    from instseg_edu.engine.evaluate import format_ap_table

    start = time.perf_counter()
    per_size, results, image_ids, how = _predict_at_sizes(model, val_sets, sizes, size_cuts,
                                                          device, batch_size, workers)  # fmt: skip
    coco = val_sets[0].coco
    iou_types = ("bbox", "segm") if any("segmentation" in r for r in results) else ("bbox",)
    matches = {t: match_coco(coco, results, t, image_ids=image_ids) for t in iou_types}
    metrics = {t: m.stats for t, m in matches.items()}
    table = format_ap_table(metrics)
    alone = ""
    if len(val_sets) > 1:
        first = {t: match_coco(coco, per_size[0], t, image_ids=image_ids).stats for t in iou_types}
        alone = f"at {sizes[0]} px alone: " + ", ".join(
            f"{t} AP50 {first[t]['AP50']:.3f}, AP {first[t]['AP']:.3f}" for t in iou_types
        )
        print(f"\n{alone}", end="")
    print(f"\nCOCO evaluation on {len(val_sets[0])} images{how} "
          f"({time.perf_counter() - start:.1f} s):\n{table}", flush=True)  # fmt: skip
    if out is not None:
        (out / "ap.json").write_text(json.dumps(metrics, indent=1))
        text = f"COCO evaluation{how}\n\n{table}\n\n({alone})\n" if alone else table + "\n"
        (out / "ap.md").write_text(text)
    return results, matches


def _write_figures(out: Path, history, model, val_set, class_names, device,
                   score_thr: float | None = 0.3, batch_size: int = 8,
                   merged=None) -> list[str]:  # fmt: skip
    """Loss curve and a gallery of the predictions scoring ``>= score_thr`` on the first validation
    images (the threshold is in the gallery's title); ``score_thr=None``: the threshold of the best
    box F1 on the validation split (:func:`_best_f1_on`), else 0.3. ``merged``: the
    ``(results, matches)`` of :func:`_report_at_sizes`, drawn (and swept) instead of a new pass."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: skipping the figures (pip install matplotlib)")
        return []
    import torch

    from instseg_edu.data.transforms import collate
    from instseg_edu.viz.draw import gallery, loss_curve_figure

    written = []
    if history.steps:
        loss_curve_figure(history).savefig(out / "loss_curve.png", dpi=100)
        written.append("loss_curve.png")
    if val_set is not None and len(val_set):
        chosen = ""
        if score_thr is None:
            if merged is None:
                best, sweep = _best_f1_on(model, val_set, device, batch_size)
            else:
                from instseg_edu.engine.analysis import score_sweep

                sweep = score_sweep(merged[1]["bbox"])
                best = sweep.best_threshold()
            score_thr, why = _threshold_and_why(best, sweep)
            chosen = "" if best is None else " (the best F1 on the validation split)"
            print(f"gallery: {why}", flush=True)
        batch = collate([val_set[i] for i in range(min(GALLERY_IMAGES, len(val_set)))])
        if merged is None:
            model.eval()
            with torch.inference_mode():
                detections = model.predict(model(batch.images.to(device)), batch.image_sizes)
            detections = [d.to("cpu") for d in detections]
        else:  # the merged results, back in each image's input frame
            from instseg_edu.engine.evaluate import coco_to_batch_detections

            detections = coco_to_batch_detections(merged[0], batch.targets, batch.image_sizes,
                                                  val_set.label_to_cat_id)  # fmt: skip
        titles = [f"image {t.image_id}" for t in batch.targets]
        fig = gallery(batch.images, detections, class_names, image_sizes=batch.image_sizes,
                      titles=titles, score_thr=score_thr, ground_truth=batch.targets,
                      panel_size=4.5)  # fmt: skip
        fig.suptitle(f"predictions with score >= {score_thr:.2f}{chosen}; ground truth dashed "
                     "white")  # fmt: skip
        fig.savefig(out / "predictions.png", dpi=100)
        written.append("predictions.png")
    return written


#: Where ``train`` (and ``evaluate --out``) list every annotation the rules dropped.
DROPPED_FILE = "dropped_annotations.json"


def _report_dropped(out: Path | None, *datasets) -> None:
    """Say how many annotations were dropped from each file (the warnings name the first few) and
    write the whole list, ``[{"file", "annotation_id", "reason"}, ...]``, to ``out/DROPPED_FILE``
    (without ``out``: say how to get it)."""
    from instseg_edu.engine.distributed import is_main_process

    records = [
        {"file": str(ds.ann_file), "annotation_id": ann_id, "reason": reason}
        for ds in datasets
        if ds is not None
        for ann_id, reason in ds.dropped.items()
    ]
    if not records:
        return
    per_file = ", ".join(
        f"{sum(r['file'] == str(ds.ann_file) for r in records)} from {ds.ann_file}"
        for ds in dict.fromkeys(d for d in datasets if d is not None and d.dropped)
    )
    if out is None:
        print(f"note: {len(records)} annotations dropped ({per_file}); add --out DIR to get "
              f"their list in DIR/{DROPPED_FILE}", flush=True)  # fmt: skip
        return
    if is_main_process():
        (out / DROPPED_FILE).write_text(json.dumps(records, indent=1) + "\n")
    print(f"note: {len(records)} annotations dropped ({per_file}); all of them, with their "
          f"reasons, are listed in {out / DROPPED_FILE}", flush=True)  # fmt: skip


def _evaluate_and_report(model, val_set, device, out: Path | None, batch_size: int, workers: int):
    from instseg_edu.engine.distributed import is_main_process
    from instseg_edu.engine.evaluate import evaluate_model, format_ap_table
    from instseg_edu.engine.train import make_loader

    loader = make_loader(val_set, batch_size, shuffle=False, workers=workers)
    start = time.perf_counter()
    metrics = evaluate_model(model, loader, val_set.coco, val_set.label_to_cat_id, device)
    table = format_ap_table(metrics)
    print(f"\nCOCO evaluation on {len(val_set)} images ({time.perf_counter() - start:.1f} s):")
    print(table, flush=True)
    if out is not None and is_main_process():
        (out / "ap.json").write_text(json.dumps(metrics, indent=1))
        (out / "ap.md").write_text(table + "\n")
    return metrics


def _run_training(args, family, preset_name, model_cfg, train_set, val_set, device, train_cfg,
                  *, data_meta):  # fmt: skip
    """Shared by ``demo`` and ``train``: train, evaluate, write every output. Returns exit code."""
    import math

    from instseg_edu.engine.checkpoint import config_to_dict
    from instseg_edu.engine.distributed import claim_failure, get_world_size, is_main_process
    from instseg_edu.engine.train import NonFiniteLossError, make_loader, train

    world = get_world_size()
    main = is_main_process()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _report_dropped(out, train_set, val_set)
    # Before any step: a set with nothing to learn would train to loss 0 without a word.
    if train_set.check_trainable(needs_masks=family in MASK_FAMILIES):  # box-only objects
        counts = train_set.counts
        print(f"note: {train_set.ann_file}: {counts['box_only']} of "
              f"{counts['mask'] + counts['box_only']} objects are box-only: "
              f"{BOX_ONLY_TRAINING[family]} ({family})", flush=True)  # fmt: skip
    import torch

    torch.manual_seed(args.seed)  # initial weights from --seed, whatever ran before in the process
    model = _build(family, model_cfg)
    # The parts of the backbone kept frozen (train --freeze-backbone, or a recipe's
    # freeze_backbone), stored in the checkpoint so that --resume freezes them again.
    frozen_parts = getattr(args, "frozen_parts", None)
    if frozen_parts:  # --resume of a frozen run
        model.backbone.freeze(fpn="fpn" in frozen_parts)
    if getattr(args, "backbone_from", None):
        frozen = bool(getattr(args, "freeze_backbone", False))
        from instseg_edu.engine.checkpoint import (
            CheckpointError,
            describe_backbone_load,
            load_backbone,
        )

        try:
            loaded = load_backbone(model, args.backbone_from, freeze=frozen)
        except (FileNotFoundError, CheckpointError) as e:
            raise CliError(f"--backbone-from: {e}") from None
        print(describe_backbone_load(loaded, args.backbone_from, frozen), flush=True)
        if frozen:
            fpn = any(name.startswith("backbone.fpn.") for name in loaded)
            frozen_parts = ["resnet"] + (["fpn"] if fpn else [])
    pretrain_seconds = getattr(args, "pretrain_seconds", None)
    if pretrain_seconds:
        if world > 1:  # it follows one clock; every process would take other steps
            print(f"note: no pretraining under torchrun ({world} processes): the ResNet starts "
                  "from its initial weights", flush=True)  # fmt: skip
        else:
            from instseg_edu.engine.pretrain import pretrain_backbone

            print(
                f"pretraining the ResNet for {pretrain_seconds:g} s as a classifier of the "
                "training objects' crops (the stand-in for ImageNet weights)",
                flush=True,
            )
            done = pretrain_backbone(model, train_set, pretrain_seconds, val_set,
                                     device=str(device), seed=args.seed)  # fmt: skip
            print(done.describe(), flush=True)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    batch = (
        f"batch {args.batch_size}"
        if world == 1
        else f"batch {world} processes x {args.batch_size} = {world * args.batch_size}"
    )
    # args.image_size is the checkpoint's (scoring) size; the demo may train at another.
    train_size = getattr(args, "train_image_size", args.image_size)
    scored = "" if train_size == args.image_size else f" (scored at {args.image_size} px)"
    print(
        f"model: {family} {preset_name} ({n_params:.1f} M parameters"
        + (f", {n_trained:.1f} M of them trained" if n_trained < n_params else "")
        + f") on {device}, "
        f"{len(train_set)} training images at {train_size} px{scored}, {batch}",
        flush=True,
    )
    per_process = math.ceil(len(train_set) / world)  # each process's share of an epoch
    loader = make_loader(train_set, args.batch_size, shuffle=True, workers=args.workers,
                         seed=args.seed, drop_last=per_process > args.batch_size)  # fmt: skip
    meta = {
        "model": family,
        "preset": preset_name,
        "model_config": config_to_dict(model_cfg),
        "classes": list(train_set.classes),
        "label_to_cat_id": list(train_set.label_to_cat_id),
        "image_size": args.image_size,
        "frozen_backbone": frozen_parts or None,
        **data_meta,
    }
    evaluate_fn = None
    if val_set is not None and train_cfg.eval_every:
        from instseg_edu.engine.evaluate import evaluate_model

        val_loader = make_loader(val_set, args.batch_size, shuffle=False, workers=args.workers)
        evaluate_fn = lambda m: evaluate_model(  # noqa: E731
            m, val_loader, val_set.coco, val_set.label_to_cat_id, device
        )
    start = time.perf_counter()
    try:
        history = train(model, loader, train_cfg, evaluate_fn=evaluate_fn, meta=meta,
                        resume=getattr(args, "resume", None))  # fmt: skip
    except NonFiniteLossError as e:  # raised by every process at the same step
        if claim_failure():
            print(f"instseg-edu: {e}", file=sys.stderr)
        if e.history is not None and main:
            e.history.save_json(out / "history.json")
        return 1
    minutes = (time.perf_counter() - start) / 60
    if main:
        history.save_json(out / "history.json")
    last = history.steps[-1] if history.steps else {}
    means = history.loss_means()
    print(
        f"trained {len(history.steps)} steps in {minutes:.1f} min"
        + (f", loss {means[1]:.3g} -> {means[2]:.3g} (means of the first and the last {means[0]} "
           f"steps), {last['img_s']:.1f} img/s" if last and means else "")
        + (" (interrupted)" if history.interrupted else "")
        + (" (stopped early)" if history.stopped_early else "")
        + (f" (the time budget, {train_cfg.max_seconds / 60:g} min, ended it: at most "
           + (f"{train_cfg.max_steps} steps" if train_cfg.max_steps else
              f"{train_cfg.epochs} epochs")
           + " were allowed)" if history.out_of_time else ""),
        flush=True,
    )  # fmt: skip
    written = ["history.json"] + (["last.pt"] if history.checkpoint else [])
    if history.interrupted and world > 1:
        # The other processes were interrupted too, at their own step: no more collectives.
        print(f"wrote {out}/{{{', '.join(written)}}}")
        return 130
    sizes, merged = getattr(args, "test_sizes", ()), None
    if val_set is not None and len(sizes) > 1 and world > 1:
        print(f"note: scored at {sizes[0]} px only: the merge of test sizes "
              f"{', '.join(map(str, sizes))} runs in one process", flush=True)  # fmt: skip
    if val_set is not None and len(sizes) > 1 and world == 1:
        val_json, val_images = data_meta["val_json"], data_meta["val_images"]
        others = [_datasets(None, None, val_json, val_images, size, train_set.categories)[1]
                  for size in sizes[1:]]  # fmt: skip
        val_sets = [val_set, *others]
        merged = _report_at_sizes(model, val_sets, sizes, args.size_cuts, device, out,
                                  args.batch_size, args.workers)  # fmt: skip
        written += ["ap.md", "ap.json"]
    elif val_set is not None:
        _evaluate_and_report(model, val_set, device, out, args.batch_size, args.workers)
        written += ["ap.md", "ap.json"]
    if main:
        written += _write_figures(out, history, model, val_set, train_set.classes, device,
                                  score_thr=getattr(args, "score_thr", 0.3),
                                  batch_size=args.batch_size, merged=merged)  # fmt: skip
    print(f"wrote {out}/{{{', '.join(written)}}}")
    return 0


def _train_config(args, device, recipe=None, **overrides):
    """The command's ``TrainConfig``: ``recipe.train_config`` when a recipe is given, and the
    device, seed, output folder and progress bar from ``args``."""
    from instseg_edu.engine.train import TrainConfig

    make = TrainConfig if recipe is None else recipe.train_config
    try:
        return make(**{
            "device": str(device), "seed": args.seed, "checkpoint_dir": str(args.out),
            "progress": not args.no_progress, **overrides,
        })  # fmt: skip
    except ValueError as e:
        raise CliError(str(e)) from None


# ------------------------------------------------------------------------------------------------
# Subcommands
# ------------------------------------------------------------------------------------------------

DEMO_OVERRIDES = ("image_size", "max_steps", "batch_size", "num_train", "num_val")


def _demo_tier(args, device) -> tuple[str, str]:
    """``(tier, why)``: ``--smoke``, else ``INSTSEG_TIER`` when set, else the device's tier."""
    from instseg_edu.recipes import TIER_ENV, select_tier

    if args.smoke:
        return "smoke", "--smoke"
    if os.environ.get(TIER_ENV) is not None:
        return select_tier(), f"{TIER_ENV}={os.environ[TIER_ENV]}"
    tier = "gpu" if device.type == "cuda" else "cpu"
    return tier, f"training on {device}"


def _check_minutes(args, tier: str, distributed: bool) -> None:
    """``--minutes`` needs a step worth timing, and one process (each would follow its own
    clock)."""
    if args.steps is not None:
        raise CliError("give --steps or --minutes, not both")
    if not args.minutes > 0:
        raise CliError(f"--minutes={args.minutes} must be > 0")
    if tier == "smoke":
        raise CliError("--minutes has no meaning for the smoke tier (2 steps on tiny images)")
    if distributed:
        raise CliError("--minutes under torchrun: each process would follow its own clock and "
                       "take other learning rates; give --steps")  # fmt: skip


def _check_pretrain_seconds(args) -> None:
    if args.pretrain_seconds < 0:
        raise CliError(f"--pretrain-seconds={args.pretrain_seconds:g} must be >= 0")


def cmd_demo(args) -> int:
    from instseg_edu.engine.distributed import is_distributed
    from instseg_edu.recipes import (
        describe_tier,
        fit_to_minutes,
        measure_step_seconds,
        recipe,
        slow_step_warning,
    )

    device = _device(args.device)
    try:
        tier, why = _demo_tier(args, device)
    except ValueError as e:
        raise CliError(str(e)) from None
    r = recipe(args.model, tier)
    given = {key: getattr(args, "steps" if key == "max_steps" else key) for key in DEMO_OVERRIDES}
    changes = {k: v for k, v in given.items() if v is not None}
    if "image_size" in changes:  # drawn at the size asked for, and not resized after
        changes.update(train_size=None, test_size=None, merge_test_sizes=(), size_cuts=())
    dropped_pretraining = False
    if args.pretrain_seconds is not None:
        _check_pretrain_seconds(args)
        changes["pretrain_seconds"] = args.pretrain_seconds or None  # 0: none
    elif args.backbone_from is not None and r.pretrain_seconds is not None:
        # The stand-in for ImageNet weights is not needed: the given backbone has learned more.
        changes["pretrain_seconds"], dropped_pretraining = None, True
    r = r.override(**changes)  # expected time follows
    # SOLO's recipe keeps a given backbone frozen (Recipe.freeze_backbone), and times it so.
    args.freeze_backbone = r.freeze_backbone and args.backbone_from is not None
    if args.minutes is None:
        print(describe_tier(tier, r, measure=tier != "smoke" and not is_distributed(), reason=why,
                            frozen_backbone=args.freeze_backbone), flush=True)  # fmt: skip
    else:
        _check_minutes(args, tier, is_distributed())
        seconds = measure_step_seconds(r, device=str(device), frozen_backbone=args.freeze_backbone)
        slow = slow_step_warning(r, seconds)
        try:
            r = fit_to_minutes(r, args.minutes, seconds)
        except ValueError as e:
            raise CliError(f"--minutes: {e}") from None
        print(describe_tier(tier, r, measure=False, reason=why), flush=True)
        at_this_speed = round(r.max_minutes * 60 / seconds)
        first = ("" if r.pretrain_seconds is None else
                 f"the first {r.pretrain_seconds:g} s pretrain the ResNet, then ")  # fmt: skip
        print(f"--minutes {args.minutes:g}: {first}{seconds:.2f} s per step timed here, so about "
              f"{at_this_speed} steps at that speed (a real step also loads its batch, and one "
              f"hour's steps differ from another's; at most {r.max_steps}); the cosine schedule "
              f"follows the clock and ends at {args.minutes:g} min", flush=True)  # fmt: skip
        if slow:
            print(slow, flush=True)
    if dropped_pretraining:
        print("--backbone-from: no pretraining on object crops; the ResNet starts from the "
              "given model's, which has learned more (--pretrain-seconds S pretrains it all the "
              "same)", flush=True)  # fmt: skip
    args.pretrain_seconds = r.pretrain_seconds
    # args.image_size: the checkpoint's size, which evaluate and predict resize images to
    args.image_size, args.batch_size = r.test_side, r.batch_size
    args.test_sizes, args.size_cuts = r.test_sizes, r.size_cuts  # scored and drawn at them
    args.train_image_size = r.train_side
    if args.workers is None:  # in memory: nothing left to decode in worker processes
        args.workers = 0 if args.smoke or r.in_memory else _default_workers(device)
    train_json, train_dir, val_json, val_dir = _shapes(
        args.data, r.image_size, r.num_train, r.num_val,
        train_shapes_per_image=r.train_shapes_per_image,
    )  # fmt: skip
    train_set, val_set = _datasets(train_json, train_dir, val_json, val_dir, r.train_side,
                                   in_memory=r.in_memory, val_image_size=r.test_side)  # fmt: skip
    preset_name, model_cfg = _preset(args.model, r.model, device)
    model_cfg = model_cfg.with_num_classes(len(train_set.classes))
    train_cfg = _train_config(args, device, recipe=r, log_every=10)
    data_meta = {"val_json": str(val_json), "val_images": str(val_dir), "recipe": r.as_dict()}
    return _run_training(args, args.model, preset_name, model_cfg, train_set, val_set, device,
                         train_cfg, data_meta=data_meta)  # fmt: skip


def _lr(args) -> float:
    """``--lr``, scaled by the linear rule when ``--scale-lr REF`` is given (and then printed)."""
    from instseg_edu.engine.distributed import get_world_size
    from instseg_edu.engine.train import scaled_lr

    world = get_world_size()
    global_batch = world * args.batch_size
    if args.scale_lr is None:
        if world > 1:
            print(f"lr: {args.lr:g} for the global batch of {global_batch} (not scaled)")
        return args.lr
    if args.scale_lr < 1:
        raise CliError(f"--scale-lr {args.scale_lr}: the reference batch must be >= 1")
    lr = scaled_lr(args.lr, global_batch, args.scale_lr)
    print(
        f"lr: {args.lr:g} x {global_batch} / {args.scale_lr} = {lr:g} (linear scaling rule, "
        f"Goyal et al. 2017: --lr is for a batch of {args.scale_lr}; the global batch is "
        f"{world} x {args.batch_size}; warm-up {args.warmup_steps} steps)",
        flush=True,
    )
    return lr


#: ``train``'s defaults. The parser leaves these options ``None`` when they are not given, so
#: that ``--resume`` can tell a given value from a default: it takes what is not given from the
#: checkpoint, not from here.
TRAIN_DEFAULTS = {
    "model": "retinanet", "image_size": 512, "batch_size": 8, "lr": 0.02, "optimizer": "sgd",
    "schedule": "cosine", "warmup_steps": 300, "grad_clip": 10.0, "checkpoint_every": 500,
    "seed": 0, "sync_bn": False, "out": "runs/train",
}  # fmt: skip

#: What each mask family does with a box-only object (an annotation without segmentation).
BOX_ONLY_TRAINING = {
    "mask_rcnn": "their RPN, box and class terms are trained, their mask term is skipped",
    "yolact": "their box and class terms are trained, their mask term is skipped (and the "
    "semantic-segmentation term, when on, leaves their boxes out)",
    "solo": "SOLO has no box branch: each is placed on the category grid by its box (its centre "
    "and area stand in for the mask's) and its cells are trained on its class; its mask term "
    "is skipped",
}


def cmd_train(args) -> int:
    device = _device(args.device)
    max_seconds = _train_seconds(args)
    if args.pretrain_seconds is not None:
        _check_pretrain_seconds(args)
        if args.resume is not None and args.pretrain_seconds > 0:
            raise CliError("--pretrain-seconds with --resume: a resumed run continues from its "
                           "checkpoint's weights, pretrained already if they were")  # fmt: skip
    if args.resume is not None and args.backbone_from is not None:
        raise CliError("--backbone-from with --resume: a resumed run continues from its "
                       "checkpoint's weights; give one of them")  # fmt: skip
    if args.freeze_backbone and args.resume is None and args.backbone_from is None:
        raise CliError("--freeze-backbone needs --backbone-from: it freezes the backbone loaded "
                       "from another trained model (from random weights nothing would learn "
                       "in it)")  # fmt: skip
    resume = _resume_settings(args) if args.resume is not None else None
    for key, value in TRAIN_DEFAULTS.items():
        if getattr(args, key) is None and not (resume and key == "lr"):  # see _resumed_run
            setattr(args, key, value)
    _check_sync_bn(args, device, from_checkpoint=resume is not None and resume["sync_bn_stored"])
    if args.data == "shapes":
        if args.train_json or args.train_images:
            raise CliError("give either --data shapes or --train-json/--train-images, not both")
        train_json, train_dir, val_json, val_dir = _shapes(
            args.shapes_root, args.image_size, args.num_train, args.num_val
        )
    else:
        train_json = _existing(args.train_json, "annotation file", "--train-json")
        train_dir = _existing(args.train_images, "image folder", "--train-images", folder=True)
        val_json = val_dir = None
        if args.val_json or args.val_images:
            val_json = _existing(args.val_json, "annotation file", "--val-json")
            val_dir = _existing(args.val_images, "image folder", "--val-images", folder=True)
    if args.workers is None:
        args.workers = _default_workers(device)
    train_set, val_set = _datasets(train_json, train_dir, val_json, val_dir, args.image_size)
    if resume is None:
        preset_name, model_cfg = _preset(args.model, args.preset, device)
        model_cfg = model_cfg.with_num_classes(len(train_set.classes))
        length = {"max_steps": args.steps} if args.steps else {"epochs": args.epochs or 12}
        train_cfg = _train_config(
            args, device, lr=_lr(args), optimizer=args.optimizer, warmup_steps=args.warmup_steps,
            schedule=args.schedule, grad_clip=args.grad_clip, eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every, sync_bn=args.sync_bn,
            max_seconds=max_seconds, **length,
        )  # fmt: skip
    else:
        preset_name, model_cfg, train_cfg = _resumed_run(args, device, resume, train_set)
    data_meta = {
        "train_json": str(train_json),
        "train_images": str(train_dir),
        "val_json": None if val_json is None else str(val_json),
        "val_images": None if val_dir is None else str(val_dir),
        "batch_size": args.batch_size,
    }
    return _run_training(args, args.model, preset_name, model_cfg, train_set, val_set, device,
                         train_cfg, data_meta=data_meta)  # fmt: skip


def _train_seconds(args) -> float | None:
    """``train --minutes``: the time budget in seconds (``TrainConfig.max_seconds``), or None."""
    from instseg_edu.engine.distributed import is_distributed

    if args.minutes is None:
        return None
    if not args.minutes > 0:
        raise CliError(f"--minutes={args.minutes} must be > 0")
    if is_distributed():
        raise CliError("--minutes under torchrun: each process would follow its own clock and "
                       "take other learning rates; give --steps or --epochs")  # fmt: skip
    return args.minutes * 60


def _check_sync_bn(args, device, *, from_checkpoint: bool) -> None:
    """``--sync-bn`` in one process does nothing (say so); on CPU processes it cannot run."""
    from instseg_edu.engine.distributed import get_world_size

    if not args.sync_bn:
        return
    flag = "--sync-bn (the checkpoint's setting)" if from_checkpoint else "--sync-bn"
    if get_world_size() == 1:
        if not from_checkpoint:
            print("note: --sync-bn has no effect in one process: it shares BatchNorm statistics "
                  "between the processes of a torchrun run", flush=True)  # fmt: skip
        return
    if device.type != "cuda":
        advice = (
            "resume it on GPUs" if from_checkpoint else "on CPU processes leave it out: each "
            "process then normalises with the BatchNorm statistics of its own images"
        )  # fmt: skip
        raise CliError(f"{flag} needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); {advice}")


def _resume_settings(args) -> dict:
    """``--resume``: every setting not given on the command line comes from the checkpoint, and a
    given one that would make the run differ from its continuation is refused (one line naming
    the option and both values). Fills ``args`` in place; returns the checkpoint's pieces."""
    from instseg_edu.engine.checkpoint import load_checkpoint

    path = _existing(args.resume, "checkpoint", "--resume")
    ckpt = load_checkpoint(path, map_location="cpu")
    meta, cfg = ckpt.get("meta") or {}, ckpt.get("config") or {}
    if meta.get("model") not in FAMILIES or "model_config" not in meta or not cfg:
        raise CliError(f"--resume: {path} has no model description or training config; was it "
                       "written by `instseg-edu train`?")  # fmt: skip

    def keep(flag: str, attr: str, stored):
        given = getattr(args, attr)
        if given is not None and stored is not None and given != stored:
            raise CliError(
                f"{flag} {given} differs from the checkpoint's {stored}: --resume continues "
                f"the run exactly as it was started; leave {flag} out (or start a new run)"
            )
        if given is None:
            setattr(args, attr, stored)

    keep("--model", "model", meta["model"])
    keep("--preset", "preset", meta.get("preset"))
    keep("--image-size", "image_size", meta.get("image_size"))
    keep("--batch-size", "batch_size", meta.get("batch_size"))  # None in older checkpoints
    for flag, attr in (("--seed", "seed"), ("--optimizer", "optimizer"),
                       ("--schedule", "schedule"), ("--warmup-steps", "warmup_steps"),
                       ("--grad-clip", "grad_clip")):  # fmt: skip
        keep(flag, attr, cfg.get(attr))
    stored_sync_bn = bool(cfg.get("sync_bn"))
    if args.sync_bn and not stored_sync_bn:
        raise CliError("--sync-bn: the checkpoint was trained without it; --resume continues the "
                       "run exactly as it was started; leave --sync-bn out")  # fmt: skip
    stored_seconds = cfg.get("max_seconds")
    if args.minutes is not None and (
        stored_seconds is None or abs(args.minutes * 60 - stored_seconds) > 1e-6
    ):
        stored = "none" if stored_seconds is None else f"--minutes {stored_seconds / 60:g}"
        raise CliError(
            f"--minutes {args.minutes:g} differs from the checkpoint's time budget ({stored}): "
            "--resume continues the run exactly as it was started, with the rest of its budget; "
            "leave --minutes out"
        )
    sync_bn_stored = stored_sync_bn and args.sync_bn is None
    args.sync_bn = stored_sync_bn
    # a frozen backbone stays frozen: the optimiser state holds only the trainable parameters
    args.frozen_parts = meta.get("frozen_backbone")
    if args.freeze_backbone and not args.frozen_parts:
        raise CliError("--freeze-backbone: the checkpoint's run trained its whole backbone; "
                       "--resume continues the run exactly as it was started; leave "
                       "--freeze-backbone out")  # fmt: skip
    # Options that do not change the numbers: given or the checkpoint's.
    for attr in ("eval_every", "checkpoint_every"):
        if getattr(args, attr) is None:
            setattr(args, attr, cfg.get(attr))
    if args.out is None:
        args.out = str(path.parent)
    if args.data is None and args.train_json is None and args.train_images is None:
        args.train_json, args.train_images = meta.get("train_json"), meta.get("train_images")
    if args.val_json is None and args.val_images is None:
        args.val_json, args.val_images = meta.get("val_json"), meta.get("val_images")
    return {"ckpt": ckpt, "meta": meta, "config": cfg, "sync_bn_stored": sync_bn_stored}


def _resumed_run(args, device, resume: dict, train_set):
    """The model config and :class:`TrainConfig` of the checkpoint, with the changes ``--resume``
    allows: the device, progress bar, output folder, evaluation and checkpoint intervals, and a
    new length (``--steps`` / ``--epochs``) only where the learning rate of every step does not
    depend on the length (``--schedule constant``)."""
    import math

    from instseg_edu.engine.checkpoint import config_from_dict
    from instseg_edu.engine.train import TrainConfig

    meta, cfg = resume["meta"], resume["config"]
    ckpt_categories = _checkpoint_categories(meta)
    if ckpt_categories is not None and train_set.categories != ckpt_categories:
        raise CliError(
            f"--resume: the categories of {train_set.ann_file} "
            f"({[(c['id'], c['name']) for c in train_set.categories]}) are not the checkpoint's "
            f"({[(c['id'], c['name']) for c in ckpt_categories]})"
        )
    config_cls = getattr(_family_module(args.model), FAMILIES[args.model][2])
    try:
        model_cfg = config_from_dict(config_cls, meta["model_config"])
    except (TypeError, ValueError) as e:
        raise CliError(f"--resume: cannot rebuild the checkpoint's model config ({e})") from None

    if args.lr is None and args.scale_lr is None:
        lr = cfg["lr"]
        print(f"lr: {lr:g} (the checkpoint's)", flush=True)
    else:
        if args.lr is None:
            args.lr = TRAIN_DEFAULTS["lr"]
        lr = _lr(args)
        if not math.isclose(lr, cfg["lr"], rel_tol=1e-9):
            flag = f"--lr {args.lr:g}" + ("" if args.scale_lr is None else
                                           f" --scale-lr {args.scale_lr}")  # fmt: skip
            raise CliError(
                f"{flag} gives lr {lr:g}, but the checkpoint's lr is {cfg['lr']:g}: --resume "
                "continues the run exactly as it was started; leave --lr and --scale-lr out"
            )
    length = {"epochs": cfg.get("epochs"), "max_steps": cfg.get("max_steps")}
    if args.steps is not None or args.epochs is not None:
        wanted = ({"epochs": None, "max_steps": args.steps} if args.steps
                  else {"epochs": args.epochs, "max_steps": None})  # fmt: skip
        if wanted != length:
            flag = f"--steps {args.steps}" if args.steps else f"--epochs {args.epochs}"
            stored = (f"--steps {length['max_steps']}" if length["max_steps"] else
                      f"--epochs {length['epochs']}")  # fmt: skip
            if cfg["schedule"] != "constant":
                raise CliError(
                    f"{flag} differs from the checkpoint's {stored}: with --schedule "
                    f"{cfg['schedule']} the learning rate of every step depends on the run's "
                    "length, so a longer or shorter run is not this run continued; resume with "
                    "the same length (only a --schedule constant run can be extended)"
                )
            step = int(resume["ckpt"].get("step", 0))
            if args.steps is not None and args.steps <= step:
                raise CliError(f"{flag}: the checkpoint is at step {step} already")
            length = wanted
    overrides = {
        "device": str(device), "progress": not args.no_progress, "checkpoint_dir": str(args.out),
        "eval_every": args.eval_every, "checkpoint_every": args.checkpoint_every, **length,
    }  # fmt: skip
    try:
        train_cfg = config_from_dict(TrainConfig, {**cfg, **overrides})
    except (TypeError, ValueError) as e:
        raise CliError(f"--resume: cannot rebuild the checkpoint's training config ({e})") from None
    return meta.get("preset") or "(from the checkpoint)", model_cfg, train_cfg


def cmd_evaluate(args) -> int:
    from instseg_edu.engine.checkpoint import load_model

    device = _device(args.device)
    _existing(args.checkpoint, "checkpoint", "--checkpoint")
    model, meta = load_model(args.checkpoint, device)
    val_json = args.val_json or meta.get("val_json")
    val_images = args.val_images or meta.get("val_images")
    if val_json is None:
        raise CliError("the checkpoint names no validation set: pass --val-json and --val-images")
    val_json = _existing(val_json, "annotation file", "--val-json")
    val_images = _existing(val_images, "image folder", "--val-images", folder=True)
    if args.report and not any(abs(args.iou_thr - t / 100) < 1e-6 for t in range(50, 100, 5)):
        raise CliError(f"--iou-thr {args.iou_thr} must be one of COCO's 0.5, 0.55, ..., 0.95")
    stored = meta.get("recipe") or {}
    if args.test_sizes is None and stored.get("merge_test_sizes"):  # as the demo scored it
        args.test_sizes = [int(meta.get("image_size", 512)), *stored["merge_test_sizes"]]
        args.size_cuts = args.size_cuts or list(stored["size_cuts"])
    sizes = args.test_sizes or [int(meta.get("image_size", 512))]
    if len(args.size_cuts) != len(sizes) - 1:
        listed = " ".join(map(str, sizes))
        raise CliError(f"--size-cuts needs {len(sizes) - 1} value(s) for --test-sizes {listed}: "
                       "the box sizes between their ranges")  # fmt: skip
    cuts = args.size_cuts
    if any(c <= 0 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise CliError(f"--size-cuts {args.size_cuts} must be positive and increasing")
    if len(sizes) > 1:
        from instseg_edu.engine.distributed import get_world_size

        if get_world_size() > 1:
            raise CliError("--test-sizes runs in one process; start it without torchrun")
    categories = _checkpoint_categories(meta)
    val_sets = [_datasets(None, None, val_json, val_images, size, categories=categories)[1]
                for size in sizes]  # fmt: skip
    out = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    _report_dropped(out, val_sets[0])
    workers = _default_workers(device) if args.workers is None else args.workers
    if args.report or len(sizes) > 1:
        _analysis_report(model, val_sets, sizes, device, out, args, workers)
    else:
        _evaluate_and_report(model, val_sets[0], device, out, args.batch_size, workers)
    return 0


def _analysis_report(model, val_sets, sizes, device, out: Path | None, args,
                     workers: int) -> None:  # fmt: skip
    """``evaluate --report DIR`` or ``--test-sizes``: :func:`_report_at_sizes`, then the analysis
    of its matches written to ``--report``'s DIR."""
    write_report = None
    if args.report:
        try:
            from instseg_edu.viz.report import write_report
        except ImportError as e:
            raise CliError(f"--report needs matplotlib and plotly ({e}): pip install "
                           "matplotlib plotly") from None  # fmt: skip
    _, matches = _report_at_sizes(model, val_sets, sizes, args.size_cuts, device, out,
                                  args.batch_size, workers)  # fmt: skip
    if write_report is None:
        return
    report = Path(args.report)
    written = write_report(report, matches, images=val_sets[0], iou_thr=args.iou_thr,
                           score_thr=args.score_thr,
                           title=f"Evaluation of {Path(args.checkpoint).name}")  # fmt: skip
    print(f"wrote {report}/{{{', '.join(written)}}}")


def cmd_predict(args) -> int:
    import torch

    from instseg_edu.data.images import read_image
    from instseg_edu.data.transforms import collate, eval_transforms
    from instseg_edu.engine.checkpoint import load_model
    from instseg_edu.engine.evaluate import detections_to_coco
    from instseg_edu.structures import Target

    device = _device(args.device)
    _existing(args.checkpoint, "checkpoint", "--checkpoint")
    paths = [_existing(p, "image", "IMAGE") for p in args.images]
    model, meta = load_model(args.checkpoint, device)
    classes = meta.get("classes")
    label_to_cat_id = meta.get("label_to_cat_id") or list(range(len(classes or [])))
    transform = eval_transforms(int(meta.get("image_size", 512)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from instseg_edu.viz.draw import draw_detections

    results = []
    names = _drawing_names(paths)
    for image_id, (path, name) in enumerate(zip(paths, names), start=1):
        image = read_image(path)  # [3, H, W] in [0, 1], EXIF orientation applied
        h, w = image.shape[-2:]
        empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, h, w, dtype=torch.bool), image_id=image_id,
                       orig_size=(h, w))  # fmt: skip
        batch = collate([transform(image, empty)])
        with torch.inference_mode():
            (det,) = model.predict(model(batch.images.to(device)), batch.image_sizes)
        det = det.to("cpu")
        fig = draw_detections(batch.images[0], det.boxes, det.labels, det.masks, det.scores,
                              classes, score_thr=args.score_thr, title=path.name,
                              image_size=batch.image_sizes[0])  # fmt: skip
        drawing = out / name
        drawing.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(drawing, dpi=100)
        for r in detections_to_coco([det], batch.targets, batch.image_sizes, label_to_cat_id):
            if r["score"] >= args.score_thr:
                results.append({**r, "file_name": str(path), "drawing": str(name)})
        kept = int((det.scores >= args.score_thr).sum())
        print(f"{path}: {kept} detections above {args.score_thr} -> {drawing}")
    (out / "predictions.json").write_text(json.dumps(results))
    return 0


def _drawing_names(paths: list[Path]) -> list[Path]:
    """A distinct output name per input image, relative to ``--out``: ``STEM.png`` when no other
    input has that stem; otherwise the input's folders below the inputs' common folder are kept
    (``a/img.jpg``, ``b/img.jpg`` -> ``a/img.png``, ``b/img.png``), then its suffix
    (``img.jpg``, ``img.tif`` -> ``img_jpg.png``, ``img_tif.png``), then a counter (the same file
    given twice: ``img.png``, ``img-2.png``)."""
    from collections import Counter

    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    stems = Counter(p.stem for p in set(resolved))  # distinct files
    names = []
    for p in resolved:
        if stems[p.stem] == 1:
            names.append(Path(f"{p.stem}.png"))
            continue
        folder = p.parent.relative_to(common)
        same_place = sum(q.stem == p.stem and q.parent == p.parent for q in set(resolved))
        stem = p.stem if same_place == 1 else f"{p.stem}_{p.suffix.lstrip('.')}"
        names.append(folder / f"{stem}.png")
    taken: set[Path] = set()
    for i, name in enumerate(names):
        n = 1
        while names[i] in taken:
            n += 1
            names[i] = name.with_name(f"{name.stem}-{n}.png")
        taken.add(names[i])
    return names


# ------------------------------------------------------------------------------------------------
# Argument parsing
# ------------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, data order and augmentation (the shapes "
                   "images are always the standard split)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--backbone-from", default=None, metavar="CHECKPOINT",
                   help="start the ResNet (and the FPN, when it is the same neck) from another "
                   "trained model's last.pt, e.g. the Mask R-CNN demo's for SOLO or YOLACT; "
                   "the heads start from random weights")  # fmt: skip
    p.add_argument("--pretrain-seconds", type=float, default=None, metavar="SECONDS",
                   help="first train the ResNet for SECONDS as a classifier of the training "
                   "objects' crops, the stand-in for ImageNet weights (demo: the recipe's, 60 s "
                   "for RetinaNet, Mask R-CNN and YOLACT on a CPU, part of --minutes, none with "
                   "--backbone-from; 0: none; train: none unless given, not counted in "
                   "--minutes)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instseg-edu",
        description="Train, evaluate and look at the instseg_edu detectors.",
        epilog="Run `instseg-edu COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="train a model on the shapes dataset and write AP table and figures",
        description="Build the shapes dataset if missing, train one model family with its recipe "
        "for this machine (instseg_edu.recipes: ResNet-50-FPN models at 512 px on a GPU; small "
        "ResNet-18 models at 128 px, kept in memory, for about five minutes on a CPU), evaluate "
        "it with pycocotools (box AP, and mask AP for the mask families), and write ap.md, "
        "ap.json, history.json, loss_curve.png, predictions.png (with masks) and last.pt to "
        "--out. The tier: --smoke, else INSTSEG_TIER when set, else the device's (cpu or gpu).",
    )
    p.add_argument("--model", choices=list(FAMILIES), default="mask_rcnn",
                   help="model family (default: mask_rcnn, the best masks in a few CPU "
                   "minutes)")  # fmt: skip
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument(
        "--data", default="data/shapes", help="shapes dataset root (default: data/shapes)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--minutes", type=float, default=None,
                   help="train for this many minutes instead: the learning rate's schedule "
                   "follows the clock and ends at the limit, whatever a step takes today "
                   "(make demo: 5)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the shapes images in pixels, drawn at it and trained at it "
                   "and scored at it (default: the recipe's; the CPU recipe of Mask R-CNN "
                   "trains on 128 px images and scores them resized to 192)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-train", type=int, default=None, help="shapes training images")
    p.add_argument("--num-val", type=int, default=None, help="shapes validation images")
    p.add_argument("--score-thr", type=float, default=None,
                   help="draw predictions.png's boxes scoring at least this (default: where the "
                   "box F1 at IoU 0.5 is highest on the validation split)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on tiny images (tests)")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train",
        help="train a model on shapes or on COCO-format data",
        description="Train a model family. Data: --data shapes (generated under --shapes-root), or "
        "your own COCO-format files with --train-json/--train-images (and optionally "
        "--val-json/--val-images for evaluation).",
    )
    # Options that decide a run's numbers default to None here (TRAIN_DEFAULTS fills them in):
    # --resume takes every one not given from the checkpoint.
    p.add_argument("--model", choices=sorted(FAMILIES), default=None,
                   help="model family (default: retinanet)")  # fmt: skip
    p.add_argument("--preset", default=None,
                   help="config constant of the model module, e.g. RETINANET_R18_SMALL "
                   "(default: R50-FPN on a GPU, the small R18 preset on a CPU)")  # fmt: skip
    p.add_argument("--data", choices=["shapes"], default=None, help="use the shapes dataset")
    p.add_argument("--shapes-root", default="data/shapes")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--train-json", help="COCO instances JSON of the training set")
    p.add_argument("--train-images", help="folder of the training images")
    p.add_argument("--val-json", help="COCO instances JSON of the validation set")
    p.add_argument("--val-images", help="folder of the validation images")
    p.add_argument("--image-size", type=int, default=None,
                   help="longest side after resizing (default: 512)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 12 unless --steps)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps")
    p.add_argument("--minutes", type=float, default=None,
                   help="a time budget: training ends after this many minutes (evaluations and "
                   "checkpoints not counted) or at --steps / --epochs, whichever comes first, "
                   "and the learning rate's schedule follows whichever is further along; a "
                   "resumed run keeps the rest of its budget (not under torchrun)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per process and step (default: 8); under torchrun the global "
                   "batch is N processes x this")  # fmt: skip
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of the global batch (default: 0.02; see --scale-lr)",
    )
    p.add_argument("--scale-lr", type=int, default=None, metavar="REF_BATCH",
                   help="--lr was tuned for REF_BATCH images per step: multiply it by "
                   "global batch / REF_BATCH (linear scaling rule, Goyal et al. 2017)")  # fmt: skip
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch "
                   "(SyncBatchNorm)")  # fmt: skip
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                   help="(default: sgd)")  # fmt: skip
    p.add_argument("--schedule", choices=["step", "cosine", "constant"], default=None,
                   help="learning rate after warm-up (default: cosine)")  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=None, help="(default: 300)")
    p.add_argument("--grad-clip", type=float, default=None,
                   help="largest gradient norm (default: 10)")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (default: 500)")  # fmt: skip
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/train; with --resume, the checkpoint's "
                   "folder)")  # fmt: skip
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="with --backbone-from: keep the loaded ResNet (and FPN) frozen, only the "
                   "heads learn and a step skips the backbone's backward pass (a --resume of "
                   "such a run keeps it frozen)")  # fmt: skip
    p.add_argument("--resume", default=None,
                   help="checkpoint to continue from (e.g. OUT/last.pt). The run continues "
                   "exactly: options not given are the checkpoint's, and one given with "
                   "another value than the checkpoint's is refused (--steps/--epochs may "
                   "change only with --schedule constant)")  # fmt: skip
    _common(p)
    p.set_defaults(seed=None)  # 0, or with --resume the checkpoint's
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="COCO AP of a checkpoint",
        description="Evaluate a checkpoint with pycocotools (bbox, and segm for mask models). The "
        "validation set defaults to the one the checkpoint was trained with.",
    )
    p.add_argument("--checkpoint", required=True, help="a last.pt written by train or demo")
    p.add_argument("--val-json")
    p.add_argument("--val-images")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="also write ap.json and ap.md here")
    p.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="also write the error analysis to DIR: summary.md (COCO's 12 numbers, "
        "per-class AP, true/false positives by kind, missed), analysis.json, "
        "precision-recall curves, confusion matrix and a gallery of the worst images",
    )
    p.add_argument(
        "--test-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="predict at each of these sizes (longest side at the network's input; default: the "
        "checkpoint's) and keep from each only its own boxes, split by --size-cuts (SNIP's valid "
        "ranges), e.g. --test-sizes 192 128 --size-cuts 32: boxes under 32 px (original image) "
        "from the 192 px pass, the others from the 128 px pass",
    )
    p.add_argument(
        "--size-cuts",
        type=float,
        nargs="*",
        default=[],
        metavar="PX",
        help="box sizes (longest side, original pixels) between the --test-sizes' ranges",
    )
    p.add_argument(
        "--iou-thr",
        type=float,
        default=0.5,
        help="IoU threshold of the --report error analysis (0.5, 0.55, ..., 0.95)",
    )
    p.add_argument(
        "--score-thr",
        type=float,
        default=0.3,
        help="detections scoring below it are left out of the --report error counts",
    )
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="draw a checkpoint's detections on images",
        description="Run a checkpoint on image files and write one drawn PNG per image plus "
        "predictions.json (COCO results, in original pixels) to --out. A drawing is named after "
        "its image (STEM.png); images that share a name keep their folders below the inputs' "
        "common folder (a/img.png, b/img.png).",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", default="runs/predict")
    p.add_argument("--score-thr", type=float, default=0.3)
    _common(p)
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from instseg_edu.engine.distributed import launched_by_torchrun

    with _warnings_as_lines(args):
        if launched_by_torchrun():
            return _main_distributed(args)
        return _run(args)


@contextlib.contextmanager
def _warnings_as_lines(args):
    """Print each warning as one line, ``instseg-edu COMMAND: warning: MESSAGE``, instead of
    Python's form (source file, line number, category and the code line), and under torchrun
    only from rank 0 (every process reads the same files and would repeat it). Only how the
    command prints changes: the library still issues ordinary warnings, which a program using it
    can filter, record or turn into errors. ``--debug`` keeps Python's form."""
    import warnings

    if getattr(args, "debug", False):
        yield
        return
    rank0 = os.environ.get("RANK", "0") == "0"  # set by torchrun before any process group

    def one_line(message, category, filename, lineno, line=None) -> str:
        if not rank0:
            return ""
        kind = "warning" if category is UserWarning else f"warning ({category.__name__})"
        return f"instseg-edu {args.command}: {kind}: {' '.join(str(message).split())}\n"

    original = warnings.formatwarning
    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = original


def _run(args) -> int:
    from instseg_edu.data.annotations import DataError
    from instseg_edu.engine.checkpoint import CheckpointError
    from instseg_edu.engine.distributed import claim_failure

    try:
        return args.func(args)
    except (CliError, DataError, FileNotFoundError, CheckpointError) as e:
        if getattr(args, "debug", False):
            raise
        if isinstance(e, DataError):  # also when a DataLoader worker re-raised it
            message = e.line
        elif isinstance(e, FileNotFoundError) and e.filename:
            message = f"{e.strerror}: {e.filename}"
        else:
            message = str(e)
        if claim_failure():  # under torchrun: shown by the first process that failed only
            print(f"instseg-edu {args.command}: error: {message}", file=sys.stderr)
        return 2


DISTRIBUTED_COMMANDS = ("train", "demo", "evaluate")


def _main_distributed(args) -> int:
    """One process of ``torchrun``: join the process group, run the command, leave the group
    (after success, an error or Ctrl-C). Only rank 0 prints to stdout; an error is printed by
    the process that failed first (:func:`~instseg_edu.engine.distributed.claim_failure`)."""
    from instseg_edu.engine import distributed

    if args.command not in DISTRIBUTED_COMMANDS:
        print(f"instseg-edu {args.command}: error: runs in one process; start it without "
              f"torchrun (data-parallel commands: {', '.join(DISTRIBUTED_COMMANDS)})",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        device = distributed.init_process_group(args.device)
    except RuntimeError as e:
        print(f"instseg-edu {args.command}: error: {e}", file=sys.stderr)
        return 2
    args.device = str(device)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    try:
        with contextlib.ExitStack() as stack:
            if rank != 0:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(
                    open(os.devnull, "w"))))  # fmt: skip
            return _run(args)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"instseg-edu {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if distributed.claim_failure():
            print(f"instseg-edu {args.command}: error in process {rank} of {world}:",
                  file=sys.stderr)  # fmt: skip
            raise
        distributed.wait_for_launcher()  # the first failure is the one to show
        return 1
    finally:
        distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
