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
# # 04 · RetinaNet: backbone, FPN, head, focal loss — and training it
#
# RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", 2017) is a one-stage detector:
#
# 1. a **ResNet** backbone and a **feature pyramid** (FPN) give five maps P3–P7 (strides 8–128;
#    the cpu tier's small model stops at P6, stride 64);
# 2. a small **head**, shared by all levels, predicts for each of the `A = 9` anchors of every cell
#    `C` class logits and 4 box deltas;
# 3. **training**: MaxIoU assignment and the delta coder (notebook 03) give targets; the **focal
#    loss** keeps the ~100 000 easy background anchors from drowning the few positives;
# 4. **inference**: top scores per level → decode → NMS.
#
# We look at the shapes of every stage, plot the focal loss, train with a live
# **TrainingDashboard**, evaluate with COCO's 12 numbers, look at the mistakes and choose the
# score to draw at.
#
# **Tiers.** The parameters cell picks one of three (`instseg_edu.recipes`): `gpu` when CUDA is
# present (ResNet-50-FPN at 512 px, thousands of steps), `cpu` without (a half-width ResNet-18
# RetinaNet with GroupNorm in its head, trained on 128 px images with 10–20 shapes each, kept in
# memory, for 4.5 minutes on two cores, the first of them pretraining its ResNet on object crops,
# and scored on the validation images at 192 px),
# `smoke` with `INSTSEG_SMOKE=1` (seconds, the tests). `INSTSEG_TIER=cpu` (or `gpu`, `smoke`) wins
# over both. The cell prints the tier and how long its training should take on this machine.

# %% tags=["parameters"]
from instseg_edu.recipes import (
    describe_tier,
    notebook_recipe,
    notebook_train_minutes,
    select_tier,
)

TIER = select_tier()  # "smoke", "cpu" or "gpu": INSTSEG_TIER, else INSTSEG_SMOKE=1, else the device
SMOKE = TIER == "smoke"
# The tier's recipe; INSTSEG_TRAIN_STEPS overrides its steps (the browser test trains a few more
# steps to watch the dashboard).
# cpu tier: training ends at TRAIN_MINUTES (4.5), its learning rate following the clock (at
# most the steps that fit at the speed timed now); other tiers, or INSTSEG_TRAIN_STEPS: None.
TRAIN_MINUTES = notebook_train_minutes(TIER)
# cpu tier: the first minute of TRAIN_MINUTES pretrains the ResNet on object crops (section 4);
# False: random weights, and that minute trains the detector instead.
PRETRAIN = True
RECIPE = notebook_recipe("retinanet", TIER, minutes=TRAIN_MINUTES, pretrain=PRETRAIN)
IMAGE_SIZE = RECIPE.image_size  # the shapes images are drawn at this side
TRAIN_SIZE = RECIPE.train_side  # training images resized to this side (every tier: IMAGE_SIZE)
TEST_SIZE = RECIPE.test_side  # validation images resized to this side (cpu tier: 192)
NUM_TRAIN = RECIPE.num_train
NUM_VAL = RECIPE.num_val
BATCH_SIZE = RECIPE.batch_size
TRAIN_STEPS = RECIPE.max_steps
LR = RECIPE.lr
MODEL = RECIPE.model
IN_MEMORY = RECIPE.in_memory  # decode every image once and keep it (the cpu tier)
WORKERS = RECIPE.loader_workers
COLOR_JITTER = RECIPE.color_jitter  # colour jitter in the training augmentation
TRAIN_SHAPES = RECIPE.train_shapes_per_image  # shapes per training image; standard: (3, 10)
DATA_DIR = None  # None: a temporary folder; or e.g. "data/shapes" (git-ignored) to keep it
SEED = 0
print(describe_tier(TIER, RECIPE))

# %%

import numpy as np
import plotly.graph_objects as go
import torch
from IPython.display import display

import instseg_edu.models.retinanet as retinanet
from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.memory import InMemoryDataset
from instseg_edu.data.shapes import make_shapes_dataset, split_name
from instseg_edu.data.transforms import collate, eval_transforms, train_transforms
from instseg_edu.engine.evaluate import evaluate_model, format_ap_table, predict_loader
from instseg_edu.engine.train import make_loader, resolve_device, train
from instseg_edu.losses import sigmoid_focal_loss
from instseg_edu.ops.boxes import box_iou
from instseg_edu.recipes import notebook_data_dir, save_notebook_model
from instseg_edu.viz.training import detection_thumbnail

torch.manual_seed(SEED)
device = resolve_device("auto")
root = notebook_data_dir(DATA_DIR)  # DATA_DIR, or a temporary folder the kernel deletes on exit
train_split = split_name("train", TRAIN_SHAPES)  # "train", or "train-10-20-shapes" when denser
train_json = make_shapes_dataset(root, NUM_TRAIN, image_size=IMAGE_SIZE, seed=SEED,
                                 split=train_split, shapes_per_image=TRAIN_SHAPES)  # fmt: skip
val_json = make_shapes_dataset(root, NUM_VAL, image_size=IMAGE_SIZE, seed=SEED, split="val")
train_set = CocoDataset(train_json, root / train_split, eval_transforms(TRAIN_SIZE))
val_set = CocoDataset(val_json, root / "val", eval_transforms(TEST_SIZE))
augment = train_transforms(TRAIN_SIZE, jitter=COLOR_JITTER)  # random flip (+ jitter), every step
if IN_MEMORY:  # read and resize every image once; then only the augmentation runs per step
    train_set, val_set = InMemoryDataset(train_set, augment), InMemoryDataset(val_set)
else:
    train_set.transforms = augment
print(
    f"device {device}; {len(train_set)} train images of {TRAIN_SIZE}², {len(val_set)} val of "
    f"{TEST_SIZE}²"
)

# %% [markdown]
# ## 1. Backbone and FPN: the shapes
#
# The ResNet gives C2–C5 (strides 4–32). The FPN uses C3–C5 (`start_level=1`), adds a top-down
# path with lateral 1×1 convs, and two extra stride-2 convs on C5 (`add_extra_convs="on_input"`)
# for P6 and P7: five maps of the same width. The cpu tier's model (`num_outs=4`) has one extra
# level, P6: its 128 px images are too small for a stride of 128.

# %%
cfg = getattr(retinanet, MODEL).with_num_classes(len(train_set.classes))
model = retinanet.build_retinanet(cfg)
batch = collate([train_set[0], train_set[1]])
with torch.no_grad():
    c = model.backbone.resnet(model.normalize(batch.images))
    p = model.backbone.fpn(c)
for i, x in enumerate(c):
    print(f"C{i + 2}: {tuple(x.shape)}  stride {TRAIN_SIZE // x.shape[-1]}")
for i, x in enumerate(p):
    print(f"P{i + 3}: {tuple(x.shape)}  stride {model.backbone.strides[i]}")

# %% [markdown]
# ## 2. The head
#
# Two small conv towers (`stacked_convs` 3×3 convs each), then `A·C` class logits and `A·4` deltas
# per cell. `to_B_HWA_K` reorders `[B, A·K, H, W]` to `[B, H·W·A, K]` — the anchors' own order — and
# the levels are concatenated: `N = Σ H·W·A`.
#
# The classification bias starts at `−log((1 − π)/π)` with `π = 0.01`, so every anchor begins by
# saying "background, 99 %" (Sec. 3.3): without it, the first steps' loss from 100 000 negatives
# at p = 0.5 would be huge.
#
# The cpu tier's head (`RETINANET_R18_CPU`) puts a GroupNorm after each tower conv
# (`norm_num_groups=16`, MMDetection's `norm_cfg=dict(type='GN')`). The paper's head has none: its
# backbone starts from ImageNet weights. From random weights the normalised towers learn faster:
# when the cpu recipe was tuned, the same 4.5 minutes gave box AP50 0.31 with them against 0.23
# without (before its other changes; benchmarks/RESULTS.md, "RetinaNet's CPU recipe").

# %%
with torch.no_grad():
    outputs = model(batch.images)
n = sum(model.level_sizes(outputs.featmap_sizes))
print(
    "cls_logits",
    tuple(outputs.cls_logits.shape),
    "bbox_deltas",
    tuple(outputs.bbox_deltas.shape),
    "| N =",
    n,
    "anchors per image",
)
print(f"initial mean probability: {outputs.cls_logits.sigmoid().mean():.4f}")

# %% [markdown]
# ## 3. Focal loss
#
# With `p_t` the probability of the right answer, cross-entropy is `−log p_t`; the focal loss
# multiplies it by `α_t (1 − p_t)^γ`. Easy examples (`p_t → 1`) are scaled down almost to zero;
# `α = 0.25` weights positives, `1 − α` negatives. Inline, then against the library:

# %%
logits = torch.linspace(-6, 6, 201)
p_sig = logits.sigmoid()
for target in (0.0, 1.0):
    t = torch.full_like(logits, target)
    p_t = torch.where(t == 1, p_sig, 1 - p_sig)
    alpha_t = torch.where(t == 1, torch.tensor(0.25), torch.tensor(0.75))
    inline = -alpha_t * (1 - p_t) ** 2 * torch.log(p_t)
    lib = sigmoid_focal_loss(logits[:, None], t[:, None], alpha=0.25, gamma=2.0, reduction="none")
    lib = lib[:, 0]
    assert torch.allclose(inline, lib, atol=1e-5)

fig = go.Figure()
p_t = torch.linspace(0.01, 0.999, 200)
for gamma in (0, 0.5, 1, 2, 5):
    fig.add_trace(
        go.Scatter(
            x=p_t.numpy(), y=(-((1 - p_t) ** gamma) * torch.log(p_t)).numpy(), name=f"γ = {gamma}"
        )
    )
fig.update_layout(
    title="focal loss (α = 1) vs probability of the true class (Fig. 1 of the paper)",
    xaxis_title="p_t",
    yaxis_title="loss",
    height=360,
)
fig

# %% [markdown]
# How much does one easy negative (p = 0.1 for a background anchor, `p_t = 0.9`) weigh against a
# hard positive (`p_t = 0.1`)? The ratio is what lets 100 000 negatives coexist with 100 positives:

# %%
for gamma in (0.0, 2.0):
    for alpha in (0.5, 0.25):
        easy_neg = sigmoid_focal_loss(
            torch.logit(torch.tensor([[0.1]])),
            torch.tensor([[0.0]]),
            alpha=alpha,
            gamma=gamma,
            reduction="sum",
        )
        hard_pos = sigmoid_focal_loss(
            torch.logit(torch.tensor([[0.1]])),
            torch.tensor([[1.0]]),
            alpha=alpha,
            gamma=gamma,
            reduction="sum",
        )
        print(
            f"γ={gamma}, α={alpha}: hard positive / easy negative = {float(hard_pos / easy_neg):8.1f}"
        )

# %% [markdown]
# ## 4. Pretraining the backbone: a minute of shape classification
#
# The paper's RetinaNet starts from a ResNet trained to classify ImageNet (Sec. 4.1): its backbone
# already knows what things look like before it learns where they are. We download nothing, so in
# the cpu tier the ResNet first learns to *classify* this training set's own objects. Every box is
# cut out as a 32 × 32 crop, with a little background around it (`ObjectCrops`); the ResNet, then
# global average pooling and one linear layer — an ImageNet classifier's shape (`CropClassifier`)
# — trains on them for `RECIPE.pretrain_seconds` with the same `train` loop as the detector. Then
# the linear layer is dropped, and the detector starts from a ResNet that tells a star from a
# cross. A detector trained from random weights learns its classes last: most of its early
# mistakes are right boxes with the wrong class (section 7).
#
# The minute comes out of `TRAIN_MINUTES`. In the same 4.5 minutes it took box AP50 from 0.41 to
# 0.47 (0.50 in this notebook) on the machine it was measured on (`benchmarks/RESULTS.md`,
# "Pretraining the backbone on object crops"). To compare, set `PRETRAIN = False` in the
# parameters cell and run again.

# %%
import torch.utils.data

from instseg_edu.engine.pretrain import ObjectCrops, pretrain_backbone
from instseg_edu.viz.training import crops_figure

sample = ObjectCrops(torch.utils.data.Subset(train_set, range(3)))  # the objects of 3 images
display(crops_figure(sample.crops[:16], sample.labels[:16], train_set.classes))
if RECIPE.pretrain_seconds:
    pretraining = pretrain_backbone(model, train_set, RECIPE.pretrain_seconds, val_set,
                                    device=str(device), seed=SEED)  # fmt: skip
    print(pretraining.describe())
    rows = pretraining.history.steps
    curves = go.Figure(layout={"height": 280, "title": "pretraining: one batch of crops per step",
                               "xaxis_title": "step", "margin": {"t": 40, "b": 40}})  # fmt: skip
    for key, name in (("loss_cls", "cross-entropy"), ("accuracy", "accuracy on the batch")):
        curves.add_scatter(x=[r["step"] for r in rows], y=[r[key] for r in rows], name=name)
    display(curves)
else:
    print(f"no pretraining (tier {TIER!r}, PRETRAIN={PRETRAIN}): the ResNet starts from random "
          "weights")  # fmt: skip

# %% [markdown]
# ## 5. Training, with a live dashboard
#
# `train` is one loop for every model; the dashboard subscribes to its callbacks and redraws at
# most every `redraw_every` seconds (its `overhead_s` says what it cost). Positives per image is
# the loss's `num_pos` statistic. Thumbnails show the current predictions on the batch.

# %%
import time

from instseg_edu.widgets import TrainingDashboard

train_loader = make_loader(train_set, BATCH_SIZE, seed=SEED, workers=WORKERS)
val_loader = make_loader(val_set, BATCH_SIZE, shuffle=False, workers=WORKERS)
dashboard = TrainingDashboard(thumbnails_every=1 if SMOKE else 100, class_names=train_set.classes)
display(dashboard)

# The recipe's optimiser (AdamW on the CPU, SGD on the GPU), warm-up, cosine decay, clipping.
train_cfg = RECIPE.train_config(
    max_steps=TRAIN_STEPS, lr=LR, log_every=1 if SMOKE else 20, progress=not SMOKE, seed=SEED
)
start = time.perf_counter()
history = train(model, train_loader, train_cfg, callbacks=[dashboard])
train_s = time.perf_counter() - start
print(history.summary())
print(
    f"dashboard time {dashboard.overhead_s:.2f} s of {train_s:.1f} s, {dashboard.redraws} redraws"
)
# Saved for later notebooks (runs/notebooks/<tier>/retinanet.pt; `instseg-edu evaluate` reads it).
checkpoint = save_notebook_model(model, RECIPE, history, train_set)
print("saved", checkpoint.resolve())  # the kernel runs in the notebook's folder

# %% [markdown]
# ### `predict`, the readable way
#
# `model.predict` is written for the GPU: every image and level at once, each image's candidates
# picked with `first_k_true` (a stable sort standing in for `nonzero()[:k]`, with a size the host
# already knows). The same procedure image by image and level by level, as MMDetection writes it,
# is `retinanet_predict_reference` — read it first; then check that both give the same detections.

# %%
import inspect

from instseg_edu.models.references import retinanet_predict_reference

print(inspect.getsource(retinanet_predict_reference))


# %%
def same(a, b):  # equal detections, up to the order of exactly equal scores
    return sorted(zip(a.scores.tolist(), a.labels.tolist(), a.boxes.tolist())) == sorted(
        zip(b.scores.tolist(), b.labels.tolist(), b.boxes.tolist())
    )


model.eval()
vb = next(iter(val_loader)).to(device)
with torch.no_grad():
    out = model(vb.images)
fast = model.predict(out, vb.image_sizes)
assert all(map(same, fast, retinanet_predict_reference(model, out, vb.image_sizes)))
print("predict == retinanet_predict_reference ✓ ", [len(d) for d in fast], "detections")

# %% [markdown]
# ## 6. Evaluation: the 12 COCO numbers
#
# In the smoke tier the model has trained for two steps, so expect zeros. The cpu tier's few
# minutes find most of the shapes that are not tiny (box AP50 about 0.5 on the machine it was
# tuned on); on the GPU tier, AP on shapes climbs past 0.5 within a few thousand steps.
#
# In the cpu tier the validation images reach the model at `TEST_SIZE` = 192 px, half as large
# again as it was trained on: a third of the shapes are 8–16 px across, under the smallest anchors
# (16 px), and enlarged more of them are found (box AP50 +0.05 for the same weights). To see it,
# set `TEST_SIZE = IMAGE_SIZE` and run again. The larger shapes lose by it; section 9 takes their
# boxes from a second pass at the drawn size.

# %%
metrics = evaluate_model(model, val_loader, val_set.coco, val_set.label_to_cat_id, device)
print(format_ap_table(metrics))

# %% [markdown]
# ## 7. Predictions, and what the mistakes look like
#
# Ground truth in green, predictions above 0.3 in colour:

# %%
import ipywidgets as W

batches = list(predict_loader(model, val_loader, device, max_batches=1))


def thumbnails(score_thr, shown_batches=None):
    """The first validation batch: ground truth in green, predictions scoring >= score_thr.
    shown_batches: (batch, detections) pairs to draw instead of the model's own (section 9)."""
    thumbs = []
    for b, dets in shown_batches or batches:
        for i, d in enumerate(dets):
            h, w = b.image_sizes[i]
            png = detection_thumbnail(
                b.images[i, :, :h, :w],
                d.boxes,
                d.scores,
                d.labels,
                b.targets[i].boxes,
                size=256,
                score_thr=score_thr,
                class_names=val_set.classes,
            )
            thumbs.append(W.Image(value=png, format="png"))
    return W.HBox(thumbs)


thumbnails(0.3)

# %% [markdown]
# Sorting the mistakes: at IoU 0.5, each detection above 0.3 is a **hit**, a **wrong class**
# (right place, other class), a **duplicate** (its object was already taken by a higher score) or a
# **background** false positive; each ground truth not hit is a **miss**, which we split by size
# (√(w·h) of each box, in the pixels the model saw). Look at both ends: the smallest objects, whose
# best anchors have low IoU (notebook 03), and, in the cpu tier, the largest ones: shown at 192 px
# they are larger than most shapes of the 128 px training images, and the shapes are painted from
# the largest to the smallest, so the smaller ones in front hide parts of their outline.

# %%
counts = {"hit": 0, "wrong class": 0, "duplicate": 0, "background": 0}
missed_sizes, hit_sizes = [], []
for b, dets in predict_loader(model, val_loader, device):
    for d, t in zip(dets, b.targets):
        t = t.to("cpu")
        keep = d.scores > 0.3
        boxes, labels = d.boxes[keep], d.labels[keep]
        taken = torch.zeros(len(t.boxes), dtype=torch.bool)
        iou = box_iou(boxes, t.boxes) if len(t.boxes) else torch.zeros(len(boxes), 0)
        for k in range(len(boxes)):  # by descending score
            same = iou[k] * (t.labels == labels[k])
            if len(t.boxes) and same.max() >= 0.5:
                j = int(same.argmax())
                counts["duplicate" if taken[j] else "hit"] += 1
                taken[j] = True
            elif len(t.boxes) and iou[k].max() >= 0.5:
                counts["wrong class"] += 1
            else:
                counts["background"] += 1
        side = (t.boxes[:, 2:] - t.boxes[:, :2]).prod(dim=1).sqrt()
        missed_sizes += side[~taken].tolist()
        hit_sizes += side[taken].tolist()
print(counts)
bins = [0, 16, 32, 64, 128, 1e9]
hist_hit = np.histogram(hit_sizes, bins)[0]
hist_miss = np.histogram(missed_sizes, bins)[0]
names = [f"{lo:.0f}–{hi:.0f} px" for lo, hi in zip(bins[:-2], bins[1:-1])] + [f"≥ {bins[-2]} px"]
for name, h_, m_ in zip(names, hist_hit, hist_miss):
    print(f"objects {name:>10}: found {h_:4d}, missed {m_:4d}")

# %% [markdown]
# ## 8. Which score to draw at
#
# Everything above was drawn and counted at score 0.3, a common default for pictures. It is a
# choice, not a property of the model: each threshold keeps another set of boxes, with its own
# **precision** (the share of the boxes drawn that are right) and **recall** (the share of the
# objects found). `score_sweep` gives both for every threshold at once, from pycocotools' own
# matches at IoU 0.5, the matching behind AP50: sort all detections by score, count the hits as
# the threshold comes down. AP averages over all thresholds; a picture, or an application, must
# pick one. A common pick is where **F1**, the harmonic mean of the two, is highest.

# %%
from instseg_edu.engine.analysis import match_model, score_sweep

matches = match_model(model, val_loader, val_set.coco, val_set.label_to_cat_id, device)["bbox"]
sweep = score_sweep(matches, iou_thr=0.5)
best_thr, best_p, best_r, best_f1 = sweep.best_f1()
fig = go.Figure(
    [go.Scatter(x=sweep.score, y=getattr(sweep, k), name=k) for k in ("precision", "recall", "f1")]
)
fig.update_layout(
    title="all classes, IoU 0.5: keep the boxes scoring ≥ the threshold",
    xaxis_title="score threshold",
    yaxis_range=[0, 1.02],
    width=640,
    height=340,
)
if np.isfinite(best_thr):
    fig.add_vline(x=best_thr, line_dash="dash", annotation_text=f"best F1 at {best_thr:.2f}")
display(fig)
p_03, r_03 = sweep.at(0.3)
print(f"at 0.3: {p_03:.0%} of the boxes drawn are right, {r_03:.0%} of the objects found")
if np.isfinite(best_thr):
    print(f"best F1 {best_f1:.2f} at {best_thr:.2f}: {best_p:.0%} right, {best_r:.0%} found")

# %% [markdown]
# The same validation images, drawn at the threshold of the best F1. Fewer boxes, and more of them
# right; the shapes the model was unsure of lose their box. (The threshold was chosen on these
# very images, which is fine for a picture; to report a precision, choose it on other images.)

# %%
thumbnails(best_thr)

# %% [markdown]
# ## 9. Each test size for its own shapes
#
# Enlarging the validation images to `TEST_SIZE` finds more of the small shapes, but a medium one
# then becomes larger than almost any shape the model trained on, and it is found and named less
# often. So the cpu tier's recipe predicts the same images twice: at `TEST_SIZE` and again at each
# of `RECIPE.merge_test_sizes`, here the size the images were drawn at (128 px). Together these
# are `RECIPE.test_sizes`, the enlarged one first. Each pass keeps its own boxes: those whose
# longest side is under `RECIPE.size_cuts` (32 px) from the enlarged pass, the others from the
# 128 px one (`predict_at_sizes`, SNIP's valid ranges; notebook 06 does the same for Mask R-CNN,
# and `instseg-edu demo --model retinanet` scores this merge). The smoke and gpu tiers predict at
# one size, so there the merge is that one pass.
#
# Three ways of naming a size meet here; all of them count the drawn image's pixels except
# section 7's. The cut looks at a **predicted box's longest side**, in the 128 px image. COCO's
# **small** and **medium** (the `APs`, `APm` columns, and the rows below) look at the **area** of
# a shape's ground-truth mask: under 32² px, and 32² to 96² px. Section 7's bins use √(w·h) of the
# ground-truth box **at 192 px**, 1.5 times larger: its 32–64 px bin is roughly 21–43 px here. So a
# square shape 32 px across sits on both borders at once, but a thin small shape (area under 32²)
# can have a box over 32 px long: its box then comes from the 128 px pass, which finds fewer small
# shapes. That is why the merge can cost the small shapes a little while it helps the medium ones.
#
# Below, side by side, the 192 px pass alone (section 8's boxes) and the merge: AP by size, then
# at each one's best-F1 threshold how many boxes drawn are right and how many shapes are found, by
# size. Then the merged boxes on the images of section 7.

# %%
from instseg_edu.engine.analysis import match_coco
from instseg_edu.engine.evaluate import coco_to_batch_detections, predict_at_sizes

at_sizes = [val_set] + [
    CocoDataset(val_json, root / "val", eval_transforms(size)) for size in RECIPE.merge_test_sizes
]  # the same images at each of RECIPE.test_sizes
merged, image_ids, _ = predict_at_sizes(
    model, at_sizes, RECIPE.size_cuts, val_set.label_to_cat_id, device, batch_size=BATCH_SIZE
)
merged_matches = match_coco(val_set.coco, merged, "bbox", image_ids=image_ids)
print(f"test sizes {RECIPE.test_sizes} px, cuts {RECIPE.size_cuts} px (longest side at "
      f"{IMAGE_SIZE} px)")  # fmt: skip
passes = {f"{TEST_SIZE} px alone": matches, "merged": merged_matches}
print(format_ap_table({name: m.stats for name, m in passes.items()}))  # box AP, both ways
print(f"\n{'':>30s}" + "".join(f"{name:>16s}" for name in passes))
thresholds = {}
for name, m in passes.items():
    thr, _, _, f1 = score_sweep(m, iou_thr=0.5).best_f1()
    thresholds[name] = thr if f1 > 0 else 0.3  # nothing right yet (smoke)
print(f"{'best-F1 threshold':>30s}" + "".join(f"{t:16.2f}" for t in thresholds.values()))
for area in ("all", "small", "medium"):
    cells = []
    for name, m in passes.items():
        right, found = score_sweep(m, iou_thr=0.5, area=area).at(thresholds[name])
        cells.append(f"{right:4.0%} · {found:4.0%}")
    print(f"{area + ' shapes: right · found':>30s}" + "".join(f"{c:>16s}" for c in cells))
merged_thr = thresholds["merged"]
shown = batches[0][0].to("cpu")
merged_detections = coco_to_batch_detections(merged, shown.targets, shown.image_sizes,
                                             val_set.label_to_cat_id)  # fmt: skip
thumbnails(merged_thr, [(shown, merged_detections)])
