# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Data and COCO: shapes, annotations, masks, and how detections are scored
#
# Every model in instseg_edu reads data the same way: a **COCO-format** JSON file plus a folder of
# images, through `instseg_edu.data.coco.CocoDataset` — your own data would go through exactly the
# same code. The built-in dataset is procedural **shapes**: drawn in seconds, exactly reproducible,
# with objects from 8 px to most of the image so every pyramid level has work to do.
#
# This notebook walks through
#
# 1. the shapes dataset and the three parts of a COCO file;
# 2. masks as **polygons** and as **RLE** (run-length encoding), built by hand and checked against
#    pycocotools;
# 3. how COCO evaluation **matches** detections to ground truth at each IoU threshold, built inline
#    and checked against `COCOeval`;
# 4. the **12 numbers** (AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l);
# 5. **where the mistakes are**: four kinds of false positive read from COCOeval's own matches,
#    and the **EvaluationExplorer**.

# %% tags=["parameters"]
from instseg_edu.recipes import describe_tier, select_tier

TIER = select_tier()  # "smoke", "cpu" or "gpu": INSTSEG_TIER, else INSTSEG_SMOKE=1, else the device
SMOKE = TIER == "smoke"
IMAGE_SIZE = 128 if SMOKE else 512
NUM_IMAGES = 4 if SMOKE else 64
SEED = 0
DATA_DIR = None  # None: a temporary folder; or e.g. "data/shapes" (git-ignored)
print(describe_tier(TIER))

# %%
import contextlib
import io
import json

import numpy as np
import plotly.graph_objects as go
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.shapes import make_shapes_dataset
from instseg_edu.engine.evaluate import evaluate_coco, format_ap_table
from instseg_edu.ops.boxes import box_iou
from instseg_edu.recipes import notebook_data_dir
from instseg_edu.viz.anchors import boxes_to_path, image_trace

root = notebook_data_dir(DATA_DIR)  # DATA_DIR, or a temporary folder the kernel deletes on exit
ann_file = make_shapes_dataset(root, NUM_IMAGES, image_size=IMAGE_SIZE, seed=SEED)
print("annotations:", ann_file)
print("images:", sorted(p.name for p in (root / "train").iterdir())[:4], "...")

# %% [markdown]
# ## 1. A COCO file has three lists
#
# * `images`: `id`, `file_name`, `width`, `height`;
# * `categories`: `id`, `name` (ids need not be contiguous; the dataset maps them to labels
#   `0..C−1`);
# * `annotations`: one per object — `image_id`, `category_id`, `bbox` as **`[x, y, w, h]`**,
#   `area`, `iscrowd`, and `segmentation` (a polygon list or an RLE dict).

# %%
coco_json = json.loads(ann_file.read_text())
print({k: len(v) for k, v in coco_json.items() if isinstance(v, list)})
print("image:", coco_json["images"][0])
print("category:", coco_json["categories"][0])
a = dict(coco_json["annotations"][0])
a["segmentation"] = {**a["segmentation"], "counts": a["segmentation"]["counts"][:30] + "…"}
print("annotation:", a)

# %% [markdown]
# `CocoDataset` turns an entry into `(image float32 [3, H, W] in [0, 1], Target)` with boxes in
# **`xyxy`** pixels (one format everywhere in the library), labels `0..C−1` and boolean masks:

# %%
dataset = CocoDataset(ann_file, root / "train")
image, target = dataset[0]
print(
    image.shape,
    image.dtype,
    "| boxes",
    target.boxes.shape,
    "labels",
    target.labels.tolist(),
    "| masks",
    tuple(target.masks.shape),
    target.masks.dtype,
)
x, y, w, h = coco_json["annotations"][0]["bbox"]
assert torch.allclose(target.boxes[0], torch.tensor([x, y, x + w, y + h]))

palette = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [0, 128, 128],
    ]
)
overlay = image.permute(1, 2, 0).numpy().copy()  # [H, W, 3]
for k, m in enumerate(target.masks.numpy()):
    overlay[m] = 0.5 * overlay[m] + 0.5 * palette[k % len(palette)] / 255
fig = go.Figure([image_trace(torch.from_numpy(overlay).permute(2, 0, 1), hoverinfo="skip")])
bx, by = boxes_to_path(target.boxes)
fig.add_trace(go.Scatter(x=bx, y=by, mode="lines", line={"color": "white"}, name="boxes"))
fig.update_layout(
    title="image 0: masks and boxes",
    height=420,
    yaxis={"autorange": "reversed", "scaleanchor": "x"},
)
fig

# %% [markdown]
# ## 2. Polygons vs RLE
#
# A **polygon** lists outline vertices `[x1, y1, x2, y2, …]` — compact for simple shapes, but it
# cannot describe holes (a ring). **RLE** describes any mask: read the pixels **column by column**
# (Fortran order) and store the lengths of alternating runs of 0s and 1s, starting with 0s. A 4×4
# example, by hand:

# %%
toy = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=np.uint8)
flat = toy.flatten(order="F")  # column-major: 0000 0110 0110 0000
runs, current, length = [], 0, 0
for v in flat:
    if v == current:
        length += 1
    else:
        runs.append(length)
        current, length = v, 1
runs.append(length)
print("column-major pixels:", flat.tolist())
print("run lengths:", runs)  # 5 zeros, 2 ones, 2 zeros, 2 ones, 5 zeros
rle = mask_utils.encode(np.asfortranarray(toy))
uncompressed = mask_utils.frPyObjects({"size": [4, 4], "counts": runs}, 4, 4)
assert np.array_equal(mask_utils.decode(uncompressed), toy)
assert np.array_equal(mask_utils.decode(rle), toy)
print("pycocotools' compressed string for the same runs:", rle["counts"])

# %% [markdown]
# The same object as a polygon and as RLE. We trace a polygon from the mask's box corners
# inward (a crude outline) to see how a polygon rasterises, and compare areas:

# %%
mask = target.masks[0].numpy().astype(np.uint8)
rle0 = mask_utils.encode(np.asfortranarray(mask))
ys, xs = np.nonzero(mask)
hull = [
    float(xs.min()),
    float(ys[xs.argmin()]),
    float(xs[ys.argmin()]),
    float(ys.min()),
    float(xs.max()) + 1,
    float(ys[xs.argmax()]),
    float(xs[ys.argmax()]),
    float(ys.max()) + 1,
]
poly_rle = mask_utils.merge(mask_utils.frPyObjects([hull], *mask.shape))
print(
    f"mask area {int(mask_utils.area(rle0))} px (RLE: {len(rle0['counts'])} bytes) | "
    f"4-vertex polygon area {int(mask_utils.area(poly_rle))} px "
    f"| IoU polygon vs mask {float(mask_utils.iou([poly_rle], [rle0], [0])[0, 0]):.2f}"
)

# %% [markdown]
# ## 3. How COCO evaluation matches detections to ground truth
#
# For one image and one class, at an IoU threshold `t`, COCOeval goes through the detections by
# **descending score**; each takes the still-unmatched ground truth it overlaps most, if that IoU
# is at least `t`. A detection that finds none is a **false positive**; a ground truth left over
# is a **miss**. A second detection on an already-taken object is a false positive — that is how
# duplicates are punished.
#
# We fake a detector's output on image 0: each object found with some jitter, one duplicate, and
# one box on the background.

# %%
g = torch.Generator().manual_seed(SEED)
boxes = target.boxes.clone()
wh = boxes[:, 2:] - boxes[:, :2]
jitter = (torch.rand(len(boxes), 4, generator=g) - 0.5) * torch.cat([wh, wh], 1) * 0.5
det_boxes = torch.cat([boxes + jitter, boxes[:1] + 2, torch.tensor([[1.0, 1.0, 20.0, 20.0]])])
det_labels = torch.cat([target.labels, target.labels[:1], target.labels[:1]])
det_scores = torch.linspace(0.95, 0.3, len(det_boxes))
det_scores[len(boxes)] = 0.2  # the duplicate scores lower than the original
image_id = dataset.image_ids[0]
results = [
    {
        "image_id": image_id,
        "category_id": dataset.label_to_cat_id[int(lab)],
        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
        "score": float(s),
    }
    for b, lab, s in zip(det_boxes.tolist(), det_labels.tolist(), det_scores.tolist())
]


def greedy_match(det_boxes, det_scores, det_labels, gt_boxes, gt_labels, t):
    """Inline COCO matching for one image: per class, by descending score, best IoU >= t."""
    matched = torch.full((len(det_boxes),), -1)  # gt index per detection, -1: false positive
    for c in det_labels.unique():
        d_idx = torch.nonzero(det_labels == c).flatten()
        g_idx = torch.nonzero(gt_labels == c).flatten()
        d_idx = d_idx[torch.argsort(det_scores[d_idx], descending=True, stable=True)]
        taken = torch.zeros(len(g_idx), dtype=torch.bool)
        ious = box_iou(det_boxes[d_idx], gt_boxes[g_idx])  # [d, g]
        for row, d in enumerate(d_idx):
            best, best_iou = -1, min(t, 1 - 1e-10)
            for col in range(len(g_idx)):
                if not taken[col] and ious[row, col] >= best_iou:
                    best, best_iou = col, float(ious[row, col])
            if best >= 0:
                taken[best] = True
                matched[d] = g_idx[best]
    return matched


coco_gt = dataset.coco
with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
    ev = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), "bbox")
    ev.params.imgIds = [image_id]
    ev.evaluate()
gt_ann_ids = [a["id"] for a in coco_json["annotations"] if a["image_id"] == image_id]
dt_of = {}
for e in ev.evalImgs:
    if e is None or e["aRng"] != [0, 1e10]:
        continue
    for j, dt_id in enumerate(e["dtIds"]):
        dt_of[dt_id] = e["dtMatches"][:, j]  # [T] matched gt annotation id (0: none)
dt_ids = sorted(dt_of)  # loadRes numbers the detections 1.. in our order
for ti, t in enumerate(ev.params.iouThrs):
    ours = greedy_match(det_boxes, det_scores, det_labels, target.boxes, target.labels, float(t))
    theirs = [gt_ann_ids.index(int(dt_of[i][ti])) if dt_of[i][ti] > 0 else -1 for i in dt_ids]
    assert ours.tolist() == theirs, (t, ours.tolist(), theirs)
print("inline matching == COCOeval at all 10 IoU thresholds ✓")

# %% [markdown]
# True and false positives at IoU 0.5 and at 0.75 — a loose box is a hit at 0.5 and a miss at 0.75:

# %%
fig = go.Figure()
for col, t in enumerate((0.5, 0.75)):
    m = greedy_match(det_boxes, det_scores, det_labels, target.boxes, target.labels, t)
    offset = col * (IMAGE_SIZE + 10)
    tr = image_trace(image, hoverinfo="skip")
    tr.x0 = 0.5 + offset
    fig.add_trace(tr)
    for name, sel, color in (("TP", m >= 0, "#1a9850"), ("FP", m < 0, "#d73027")):
        x, y = boxes_to_path(det_boxes[sel] + torch.tensor([offset, 0, offset, 0]))
        fig.add_trace(
            go.Scatter(
                x=x, y=y, mode="lines", line={"color": color, "width": 2}, name=f"{name} @ IoU {t}"
            )
        )
    gx, gy = boxes_to_path(target.boxes + torch.tensor([offset, 0, offset, 0]))
    fig.add_trace(
        go.Scatter(
            x=gx,
            y=gy,
            mode="lines",
            line={"color": "white", "dash": "dot"},
            name="ground truth",
            showlegend=col == 0,
        )
    )
fig.update_layout(
    title="left: IoU ≥ 0.5 · right: IoU ≥ 0.75",
    height=380,
    yaxis={"autorange": "reversed", "scaleanchor": "x"},
)
fig

# %% [markdown]
# ## 4. The 12 numbers
#
# From the matches, COCOeval builds a precision/recall curve per class and threshold and averages:
# **AP** over IoU 0.50:0.05:0.95 (the headline), **AP50**/**AP75** at one threshold, **APs/APm/APl**
# for objects under 32², between, and over 96² pixels; **AR1/AR10/AR100** the recall with at most
# 1/10/100 detections per image, and **ARs/ARm/ARl** by size. `-1` (shown `n/a`) means there is no
# ground truth of that size.

# %%
metrics = evaluate_coco(coco_gt, results, iou_types=("bbox",), image_ids=[image_id])
print(format_ap_table(metrics))
perfect = [
    dict(r, bbox=[x, y, w, h])
    for r, (x, y, w, h) in zip(
        results, [a["bbox"] for a in coco_json["annotations"] if a["image_id"] == image_id]
    )
]
assert evaluate_coco(coco_gt, perfect, ("bbox",), image_ids=[image_id])["bbox"]["AP"] == 1.0

# %% [markdown]
# ## 5. Where the mistakes are: four kinds of false positive, and the EvaluationExplorer
#
# The 12 numbers say how good a detector is, not *where* it fails. `instseg_edu.engine.analysis`
# runs COCOeval once and reads back what it decided for every detection — the `dtMatches`,
# `gtMatches` and ignore flags of section 3 — so nothing is matched twice and every count adds up
# to COCO's. At an IoU threshold `t` each kept detection is a **true positive** or a false
# positive of one of four kinds, checked in this order (the error analyses of Hoiem et al. 2012,
# "Diagnosing Error in Object Detectors", and TIDE, Bolya et al. 2020):
#
# * **wrong class** — IoU ≥ `t` with an object of *another* class: found, but named wrong;
# * **duplicate** — IoU ≥ `t` with an object of its class that a higher-scoring detection already
#   took (section 3's "second detection on a taken object");
# * **poor localisation** — its best IoU with an object of its class is in `[0.1, t)`;
# * **background** — everything else.
#
# Every ground-truth object is **found** or **missed**. We simulate a detector on all the images
# with each mistake built in: most objects found with some jitter, some boxes far off, some labels
# swapped, some objects found twice, some missed, and one box on the background per image.

# %%
from instseg_edu.engine.analysis import (
    BACKGROUND,
    error_analysis,
    match_coco,
    per_class_ap,
    precision_recall,
)

rng = np.random.default_rng(SEED)
cat_ids = sorted(coco_gt.getCatIds())
simulated = []


def simulated_box(x, y, w, h, jitter):
    dx, dy, dw, dh = rng.uniform(-jitter, jitter, 4) * [w, h, w, h]
    return [x + dx, y + dy, max(w + dw, 1.0), max(h + dh, 1.0)]


for ann in coco_json["annotations"]:
    x, y, w, h = ann["bbox"]
    kind = rng.choice(["hit", "far", "swap", "twice", "miss"], p=[0.55, 0.1, 0.1, 0.1, 0.15])
    if kind == "miss":
        continue
    box = simulated_box(x, y, w, h, 0.45 if kind == "far" else 0.12)
    cat = ann["category_id"]
    if kind == "swap":
        cat = int(rng.choice([c for c in cat_ids if c != cat]))
    score = rng.uniform(0.5, 0.95) if kind in ("hit", "twice") else rng.uniform(0.2, 0.7)
    simulated.append(dict(image_id=ann["image_id"], category_id=cat, bbox=box, score=score))
    if kind == "twice":
        simulated.append(
            dict(simulated[-1], bbox=simulated_box(x, y, w, h, 0.05), score=score * 0.8)
        )
for image_id in dataset.image_ids:
    w, h = rng.uniform(8, 24, 2)
    x, y = rng.uniform(0, IMAGE_SIZE - w), rng.uniform(0, IMAGE_SIZE - h)
    simulated.append(
        dict(
            image_id=image_id,
            category_id=int(rng.choice(cat_ids)),
            bbox=[x, y, w, h],
            score=rng.uniform(0.2, 0.6),
        )
    )

matches = match_coco(coco_gt, simulated, "bbox")
errors = error_analysis(matches, iou_thr=0.5, score_thr=0.0)
print(errors.totals())
print(format_ap_table({"bbox": matches.stats}))

# %% [markdown]
# The counts add up to COCO's: true positives plus false positives are the detections COCO does
# not ignore, true positives plus misses are its ground truth, and the per-class precision–recall
# curves rebuilt from these matches give exactly COCOeval's AP50 and AP:

# %%
totals = errors.totals()
false_positives = sum(
    totals[k] for k in ("wrong class", "duplicate", "poor localisation", "background")
)
counted = errors.dt_outcome <= BACKGROUND  # outcome codes 0..4: TP and the four kinds of FP
assert totals["true positive"] + false_positives == counted.sum()
assert totals["true positive"] + totals["missed"] == errors.num_gt.sum()
reference = evaluate_coco(coco_gt, simulated, ("bbox",))["bbox"]
assert abs(precision_recall(matches, 0.5).mean_ap - reference["AP50"]) < 1e-12
ap = per_class_ap(matches)  # each class's AP over IoU 0.50:0.95, -1 without ground truth
assert abs(ap[ap > -1].mean() - reference["AP"]) < 1e-12
print("TP + FP = detections counted, TP + missed = ground truth, AP50 and AP == COCOeval's ✓")

# %% [markdown]
# The **EvaluationExplorer** shows the same analysis image by image, worst image first: boxes in
# the colour of their outcome (missed objects dashed cyan), the per-class precision–recall curves
# with a ◆ where the score threshold puts each class, and the confusion matrix with a background
# row and a missed column. Pick a detection to see the ground truth behind its outcome and the
# IoU. Try raising **IoU** to 0.75: loose boxes turn from true positives into poor localisation,
# and their objects into misses.

# %%
from instseg_edu.widgets import EvaluationExplorer

explorer = EvaluationExplorer(matches, images=dataset, score_thr=0.3)
explorer
