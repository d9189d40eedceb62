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
# # 03 · Assignment and box coding: what each anchor is trained on
#
# Anchors (notebook 02) are only candidates. Before a loss can be computed, every anchor needs a
# **target**: background, ignored, or "this ground-truth box", and for the latter the four numbers
# the regression branch should output. RetinaNet (Lin et al., 2017, Sec. 4) uses
#
# * **MaxIoU assignment**: IoU ≥ 0.5 → positive, IoU < 0.4 → negative, in between → ignored, plus a
#   rescue for objects that no anchor overlaps well;
# * the **delta coder** of Faster R-CNN (Ren et al., 2015, Eq. 2): centre shift in box widths, log
#   of the size ratio.
#
# We build every step inline, `assert` that it equals the library functions
# (`instseg_edu.ops.assign.max_iou_assign`, `DeltaXYWHBBoxCoder`), check that the RetinaNet model's
# own `targets()` gives the same answer, and finish with the **AssignerExplorer**.

# %% tags=["parameters"]
from instseg_edu.recipes import describe_tier, select_tier

TIER = select_tier()  # "smoke", "cpu" or "gpu": INSTSEG_TIER, else INSTSEG_SMOKE=1, else the device
SMOKE = TIER == "smoke"
IMAGE_SIZE = 256 if SMOKE else 512
SAMPLE_INDEX = 3
SEED = 0
print(describe_tier(TIER))

# %%
import math

import plotly.graph_objects as go
import torch

from instseg_edu.data.shapes import CLASSES
from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.ops.assign import (
    IGNORED,
    LOW_QUALITY_POSITIVE,
    NEGATIVE,
    POSITIVE,
    REASON_NAMES,
    assignment_summary,
    max_iou_assign,
    max_iou_assign_steps,
)
from instseg_edu.ops.boxes import box_iof, box_iou
from instseg_edu.ops.coder import DeltaXYWHBBoxCoder
from instseg_edu.viz.assign import assignment_figure

torch.manual_seed(SEED)
from instseg_edu.viz.anchors import shapes_sample

image, gt_boxes, gt_labels = shapes_sample(SAMPLE_INDEX, IMAGE_SIZE, seed=SEED)
gen = AnchorGenerator(
    (8, 16, 32, 64, 128), (0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3
)
sizes = [(math.ceil(IMAGE_SIZE / s), math.ceil(IMAGE_SIZE / s)) for s in gen.strides]
per_level = gen.grid_anchors(sizes)
level_sizes = [len(a) for a in per_level]
anchors = torch.cat(per_level)  # [N, 4]: all levels, as the loss sees them
print(f"{len(anchors):,} anchors, {len(gt_boxes)} ground-truth boxes")

# %% [markdown]
# ## 1. The four steps, inline
#
# The IoU matrix `[N, G]` (anchors × ground truth) is all the assigner looks at.
# `gt_inds` holds the result: `-1` ignored, `0` negative, `k ≥ 1` positive for ground truth `k − 1`.

# %%
POS_IOU_THR, NEG_IOU_THR, MIN_POS_IOU = 0.5, 0.4, 0.0

iou = box_iou(anchors, gt_boxes)  # [N, G]
max_iou, argmax = iou.max(dim=1)  # [N]: each anchor's best ground truth
gt_max, gt_argmax = iou.max(dim=0)  # [G]: each ground truth's best anchor

# step 1: everything starts ignored
gt_inds = torch.full((len(anchors),), -1, dtype=torch.long)
# step 2: best IoU below neg_iou_thr → negative
gt_inds[(max_iou >= 0) & (max_iou < NEG_IOU_THR)] = 0
# step 3: best IoU at least pos_iou_thr → positive for that best ground truth
pos = max_iou >= POS_IOU_THR
gt_inds[pos] = argmax[pos] + 1
after_step3 = gt_inds.clone()
# step 4: every ground truth claims its best anchor(s), even below pos_iou_thr
for k in range(len(gt_boxes)):
    if gt_max[k] >= MIN_POS_IOU and gt_max[k] > 0:
        gt_inds[iou[:, k] == gt_max[k]] = k + 1  # gt_max_assign_all: every tied anchor

for name, value in [("ignored", -1), ("negative", 0)]:
    print(f"{name:9s}: {int((gt_inds == value).sum()):6,d}")
print(
    f"positive : {int((gt_inds > 0).sum()):6,d}  (of which {int(((gt_inds > 0) & (after_step3 <= 0)).sum())} rescued by step 4)"
)

# %% [markdown]
# Now the library function — the very one the RetinaNet loss calls. It must agree exactly. It
# returns the library's encoding, the one every model's targets use: `gt_index` is 0-based with
# `-1` for "no ground truth", and `reason` tells the negatives from the ignored boxes.
# MMDetection's three-state `gt_inds` is there too, as a read-only view of those two fields:

# %%
assignment = max_iou_assign(
    anchors,
    gt_boxes,
    gt_labels,
    pos_iou_thr=POS_IOU_THR,
    neg_iou_thr=NEG_IOU_THR,
    min_pos_iou=MIN_POS_IOU,
    match_low_quality=True,
    gt_max_assign_all=True,
)
assert torch.equal(assignment.gt_inds, gt_inds)
assert torch.equal(assignment.gt_index, torch.where(gt_inds > 0, gt_inds - 1, -1))
assert torch.equal(assignment.reason == NEGATIVE, gt_inds == 0)
assert torch.equal(assignment.max_iou, max_iou)
steps = max_iou_assign_steps(iou, pos_iou_thr=POS_IOU_THR, neg_iou_thr=NEG_IOU_THR)
assert torch.equal(steps.step3_positives, after_step3)
# labels: the class of the assigned ground truth, -1 elsewhere
assert torch.equal(assignment.labels[gt_inds > 0], gt_labels[gt_inds[gt_inds > 0] - 1])
print("inline assignment == max_iou_assign ✓")

summary = assignment_summary(assignment, len(gt_boxes), level_sizes=level_sizes)
for r in (NEGATIVE, IGNORED, POSITIVE, LOW_QUALITY_POSITIVE):
    print(
        f"{REASON_NAMES[r]:22s} {int(summary.counts[r]):6,d}   per level {summary.counts_per_level[:, r].tolist()}"
    )
print("positives per ground truth:", summary.pos_per_gt.tolist())

# %% [markdown]
# ## 2. The low-quality rescue
#
# Which objects would have **no** positive anchor without step 4? Typically the tiny ones: the
# smallest RetinaNet anchor is 32 px wide on stride 8, so a 12 px object reaches an IoU of about
# (12·12)/(32·32) ≈ 0.14 at best.

# %%
no_rescue = max_iou_assign(
    anchors,
    gt_boxes,
    gt_labels,
    pos_iou_thr=POS_IOU_THR,
    neg_iou_thr=NEG_IOU_THR,
    match_low_quality=False,
)
rescued = assignment_summary(no_rescue, len(gt_boxes)).unmatched_gt.tolist()
for k in rescued:
    w, h = (gt_boxes[k, 2:] - gt_boxes[k, :2]).tolist()
    print(
        f"gt {k} ({CLASSES[gt_labels[k]]}, {w:.0f}×{h:.0f} px): best IoU {gt_max[k]:.2f} → positive only thanks to step 4"
    )

# %% [markdown]
# A subtle consequence (MMDetection's comment on its own code): step 4 **overwrites** step 3. An
# anchor with IoU 0.9 to gt 0 and 0.8 to gt 1 is positive for gt 0 after step 3 — but if it is gt 1's
# best anchor, step 4 hands it to gt 1. Built by hand:

# %%
toy_iou = torch.tensor([[0.9, 0.8], [0.95, 0.1], [0.1, 0.3]])  # 3 anchors × 2 gt
toy = max_iou_assign_steps(toy_iou, pos_iou_thr=0.5, neg_iou_thr=0.4)
print(
    "after step 3:", toy.step3_positives.tolist(), " after step 4:", toy.step4_low_quality.tolist()
)
assert toy.step3_positives.tolist() == [1, 1, 0] and toy.step4_low_quality.tolist() == [2, 1, 0]

# %% [markdown]
# ## 3. Ignore regions and a negative range
#
# COCO marks crowds (`iscrowd=1`) as ignore regions: an anchor lying mostly inside one (IoF, the
# intersection over the *anchor's* area, above `ignore_iof_thr`) is neither positive nor negative.
# And `neg_iou_thr` may be a pair `(lo, hi)`: only anchors with `lo ≤ IoU < hi` are negatives.

# %%
# pretend the top-left strip is a crowd
crowd = torch.tensor([[0.0, 0.0, IMAGE_SIZE / 2, IMAGE_SIZE / 4]])
with_crowd = max_iou_assign(
    anchors,
    gt_boxes,
    gt_labels,
    pos_iou_thr=0.5,
    neg_iou_thr=0.4,
    ignore_iof_thr=0.5,
    gt_boxes_ignore=crowd,
)
inside = box_iof(anchors, crowd).amax(dim=1) > 0.5
assert bool((with_crowd.gt_inds[inside] == -1).all())
print(f"{int(inside.sum()):,} anchors inside the crowd region are ignored")

ranged = max_iou_assign(anchors, gt_boxes, gt_labels, pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4))
print(
    "negatives with neg_iou_thr=0.4:",
    int((assignment.gt_inds == 0).sum()),
    " with (0.1, 0.4):",
    int((ranged.gt_inds == 0).sum()),
)

# %% [markdown]
# ## 4. The delta coder
#
# A positive anchor `p` learns to move onto its ground truth `g`:
#
# $$d_x = \frac{g_x - p_x}{p_w},\quad d_y = \frac{g_y - p_y}{p_h},\quad d_w = \log\frac{g_w}{p_w},\quad d_h = \log\frac{g_h}{p_h}$$
#
# then `(d − target_means) / target_stds`. Inline, then against the library:

# %%
pos_idx = torch.nonzero(assignment.gt_inds > 0).flatten()
p = anchors[pos_idx]
g = gt_boxes[assignment.gt_inds[pos_idx] - 1]
pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
px, py = p[:, 0] + pw / 2, p[:, 1] + ph / 2
gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
gx, gy = g[:, 0] + gw / 2, g[:, 1] + gh / 2
deltas = torch.stack(
    [(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1
)

coder = DeltaXYWHBBoxCoder()  # RetinaNet: means 0, stds 1
assert torch.allclose(coder.encode(p, g), deltas, atol=1e-6)
assert torch.allclose(coder.decode(p, deltas), g, atol=1e-3)  # round trip
print(f"{len(p)} positive anchors; delta std per coordinate: {deltas.std(dim=0).tolist()}")

# %% [markdown]
# **Why `target_stds`?** Positive anchors already overlap their target, so raw deltas are small
# (std ≈ 0.1 for the shift, ≈ 0.2 for the log-size). Faster R-CNN's box head divides by
# `(0.1, 0.1, 0.2, 0.2)` so the regression targets have unit scale and the L1/smooth-L1 loss is
# balanced against the classification loss. RetinaNet keeps `(1, 1, 1, 1)`.

# %%
rcnn_coder = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2))
scaled = rcnn_coder.encode(p, g)
assert torch.allclose(scaled, deltas / torch.tensor([0.1, 0.1, 0.2, 0.2]), atol=1e-5)
fig = go.Figure()
for name, d in (("stds (1, 1, 1, 1)", deltas), ("stds (0.1, 0.1, 0.2, 0.2)", scaled)):
    fig.add_trace(go.Histogram(x=d.flatten().numpy(), name=name, opacity=0.6, nbinsx=40))
fig.update_layout(barmode="overlay", title="regression targets of the positive anchors", height=320)
fig

# %% [markdown]
# Decoding clamps `dw, dh` to `±log(1000/16)`, so a wild prediction cannot blow a box up:

# %%
wild = coder.decode(p[:1], torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
print("anchor", p[0].tolist(), "→ decoded with dw=dh=10:", [round(v, 1) for v in wild[0].tolist()])

# %% [markdown]
# ## 5. The same answer inside the model
#
# `RetinaNet.targets(outputs, batch)` is what `RetinaNet.loss` calls: one batched assignment of
# every anchor of every image. Its assignment of our image is exactly the one above.

# %%
from instseg_edu.models.retinanet import RETINANET_R18_SMALL, build_retinanet
from instseg_edu.structures import Batch, Target

model = build_retinanet(RETINANET_R18_SMALL.with_num_classes(len(CLASSES))).eval()
target = Target(
    gt_boxes, gt_labels, torch.zeros(len(gt_boxes), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
)
batch = Batch(image[None], [(IMAGE_SIZE, IMAGE_SIZE)], [target])
with torch.no_grad():
    outputs = model(batch.images)
    targets = model.targets(outputs, batch)
assert torch.equal(targets.assignment.gt_inds[0], assignment.gt_inds)
print("model.targets() assignment == max_iou_assign ✓  num_pos =", targets.num_pos.tolist())

# %% [markdown]
# Drawn: positives (red), low-quality positives (purple), ignored (amber); negatives are hidden —
# click them in the legend. On the right, every anchor's best IoU with the thresholds, and the
# positives each object got.

# %%
assignment_figure(
    image,
    gt_boxes,
    anchors,
    assignment,
    summary,
    pos_iou_thr=POS_IOU_THR,
    neg_iou_thr=NEG_IOU_THR,
    min_pos_iou=MIN_POS_IOU,
    gt_labels=gt_labels,
    class_names=CLASSES,
)

# %% [markdown]
# ## 6. AssignerExplorer
#
# The explorer takes the model: what it draws is `model.targets(outputs, batch)` — the call the
# loss makes — with the model's anchors and its assigner config as the starting point. Move the
# thresholds and watch the colours, the histogram lines and the positives per object.
# Try `pos_iou_thr = 0.7` (the RPN's value), `match_low_quality` off (the warning names the objects
# that are then never trained as foreground), or `min_pos_iou = 0.3` (the RPN's value). The level
# filter only changes what is drawn: assignment competes across all levels, as in training.

# %%
from instseg_edu.widgets import AssignerExplorer

explorer = AssignerExplorer(model, image, gt_boxes, gt_labels, CLASSES)
explorer

# %%
explorer.match_low_quality.value = False
assert torch.equal(explorer.assignment.gt_inds, no_rescue.gt_inds)
explorer.match_low_quality.value = True
print(f"last update took {explorer.last_update_s * 1000:.1f} ms")
