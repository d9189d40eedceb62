"""Where a trained model is wrong by object size, at each test size and with each size for its own.

The CPU recipes score the 128 px shapes images enlarged to 192 px (``Recipe.test_size``): the
smallest shapes are found and named more often. This script asks what the enlargement costs the
larger shapes, and what keeping each size for its own objects gives (SNIP's valid ranges:
:func:`instseg_edu.engine.evaluate.merge_scales`). For one checkpoint it predicts the standard
validation split at every ``--sizes`` (one pass each), then merges the passes, each contributing
the detections whose box's longest side (original pixels) falls in its range; ``--cuts`` are the
boundaries, the first size taking the smallest boxes. For each it prints COCO's AP50, AP, APs and
APm, and the precision (boxes drawn that are right at IoU 0.5) and recall (objects found) of the
boxes scoring at least the best-F1 threshold, over all objects, the small ones (< 32² px) and the
medium ones (32²–96²) (:func:`instseg_edu.engine.analysis.score_sweep`):

    python benchmarks/eval_sizes.py runs/demo/last.pt --sizes 192 128 --cuts 32
    python benchmarks/eval_sizes.py runs/demo/last.pt --smoke   # seconds-long check

Inference time is printed per pass: the merge costs the sum of its passes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.shapes import make_shapes_dataset
from instseg_edu.data.transforms import eval_transforms
from instseg_edu.engine.analysis import match_coco, predict_results, score_sweep
from instseg_edu.engine.checkpoint import load_model
from instseg_edu.engine.evaluate import merge_scales
from instseg_edu.engine.train import make_loader


def describe(name: str, coco_gt, results: list[dict], image_ids, iou_types) -> dict:
    """COCO's numbers and the best-F1 operating point by area, printed and returned."""
    record = {"name": name}
    for iou_type in iou_types:
        matches = match_coco(coco_gt, results, iou_type, image_ids=image_ids)
        thr = score_sweep(matches).best_f1()[0]
        row = {k: round(matches.stats[k], 3) for k in ("AP50", "AP", "APs", "APm")}
        row["score_thr"] = round(thr, 2)
        for area in ("all", "small", "medium"):
            precision, recall = score_sweep(matches, area=area).at(thr)
            row[area] = {"precision": round(precision, 3), "recall": round(recall, 3)}
        record[iou_type] = row
        print(f"{name:>18s} {iou_type:4s}  AP50 {row['AP50']:.3f}  AP {row['AP']:.3f}  "
              f"APs {row['APs']:.3f}  APm {row['APm']:.3f}  | score >= {thr:.2f}: "
              + "  ".join(f"{a} {row[a]['precision']:.0%} right, {row[a]['recall']:.0%} found"
                          for a in ("all", "small", "medium")), flush=True)  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a model checkpoint (instseg-edu train / demo)")
    parser.add_argument("--data", default="data/shapes/128px-1000-200",
                        help="shapes root; its standard val split is made if missing")  # fmt: skip
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128, help="the val images' size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 128],
                        help="test sizes (longest side at the network's input)")  # fmt: skip
    parser.add_argument("--cuts", type=float, nargs="*", default=[32.0],
                        help="box sizes (longest side, original px) between the sizes' ranges: "
                        "one fewer than --sizes")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="4 images of 64 px")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_val, args.image_size = 4, 64
    if len(args.cuts) != len(args.sizes) - 1:
        parser.error(f"--cuts needs {len(args.sizes) - 1} value(s) for {len(args.sizes)} sizes")
    torch.set_num_threads(args.threads)
    model, meta = load_model(args.checkpoint, "cpu")
    model.eval()
    val_json = make_shapes_dataset(args.data, args.num_val, args.image_size, 0, "val")
    per_size, records = [], []
    for size in args.sizes:
        val_set = CocoDataset(val_json, f"{args.data}/val", eval_transforms(size))
        loader = make_loader(val_set, 8, shuffle=False, workers=0)
        start = time.perf_counter()
        results, image_ids = predict_results(model, loader, val_set.label_to_cat_id, "cpu")
        print(f"predicted {len(image_ids)} images at {size} px in "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
        per_size.append(results)
    iou_types = ("bbox", "segm") if any("segmentation" in r for r in per_size[0]) else ("bbox",)
    for size, results in zip(args.sizes, per_size):
        records.append(describe(f"at {size} px", val_set.coco, results, image_ids, iou_types))
    bounds = [0.0, *args.cuts, float("inf")]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    merged = merge_scales(per_size, ranges)
    name = "+".join(f"{s}:{lo:g}-{hi:g}" for s, (lo, hi) in zip(args.sizes, ranges))
    records.append(describe(name, val_set.coco, merged, image_ids, iou_types))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "model": meta.get("model"),
                       "records": records}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
