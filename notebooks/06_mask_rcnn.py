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
# # 06 · Mask R-CNN, one stage at a time
#
# Mask R-CNN (He et al., 2017) is Faster R-CNN plus a small fully convolutional mask branch:
#
# 1. **RPN**: at every location of P2–P6, three anchors (ratios 0.5 / 1 / 2, side `8 × stride`)
#    get an objectness logit and four deltas;
# 2. **proposals**: best anchors per level → decode → clip → NMS 0.7 → the best 1000 per image;
# 3. **RoI stage**: proposals (plus the ground-truth boxes, in training) are assigned and sampled,
#    RoIAlign reads a 7×7 grid (box head) and a 14×14 grid (mask head) from one FPN level;
# 4. **predict**: class scores, class-specific boxes, NMS, then a 28×28 mask for each kept box,
#    pasted back into the image.
#
# Everything we draw below is what `instseg_edu.models.mask_rcnn` trains on: `model.targets(...)`
# is the very function `model.loss(...)` calls.
#
# **Tiers.** The parameters cell picks one (`instseg_edu.recipes`): `gpu` with CUDA (ResNet-50-FPN
# at 512 px), `cpu` without — `MASK_RCNN_R18_CPU`, a ResNet-18 Mask R-CNN on 128 px images kept in
# memory, whose mask RoIs are 7×7 and masks 14×14 (instead of 14×14 and 28×28), with 32 sampled
# RoIs per image (instead of 512), its ResNet first pretrained for a minute on object crops, then
# trained with AdamW for about four minutes on two cores on images with 10–20 shapes each (more
# objects to learn from in every step than the standard 3–10; it is still scored on the standard
# validation split): enough to find most shapes that are not tiny and draw a recognisable mask on
# them, with most, not all, of them named right — and `smoke` with `INSTSEG_SMOKE=1` (seconds,
# the tests). `INSTSEG_TIER` wins over both. The cell prints the tier and how long its training
# should take on this machine.

# %% tags=["parameters"]
from instseg_edu.recipes import (
    describe_tier,
    notebook_recipe,
    notebook_train_minutes,
    select_tier,
)

TIER = select_tier()  # "smoke", "cpu" or "gpu": INSTSEG_TIER, else INSTSEG_SMOKE=1, else the device
SMOKE = TIER == "smoke"
# cpu tier: training ends at TRAIN_MINUTES (4.5), its learning rate following the clock (at
# most the steps that fit at the speed timed now); other tiers, or INSTSEG_TRAIN_STEPS: None.
TRAIN_MINUTES = notebook_train_minutes(TIER)
# cpu tier: the first minute of TRAIN_MINUTES pretrains the ResNet on object crops (section 8);
# False: random weights, and that minute trains the detector instead.
PRETRAIN = True
# INSTSEG_TRAIN_STEPS overrides the steps in every tier.
RECIPE = notebook_recipe("mask_rcnn", TIER, minutes=TRAIN_MINUTES, pretrain=PRETRAIN)
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
SEED = 0
DATA_DIR = None  # None: a temporary folder; or e.g. "data/shapes" (git-ignored) to keep it
print(describe_tier(TIER, RECIPE))

# %%

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import display

import instseg_edu.models.mask_rcnn as mask_rcnn
from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.memory import InMemoryDataset
from instseg_edu.data.shapes import CLASSES, make_shapes_dataset, split_name
from instseg_edu.data.transforms import collate, eval_transforms, train_transforms
from instseg_edu.engine.analysis import best_f1_threshold
from instseg_edu.engine.evaluate import evaluate_model, format_ap_table
from instseg_edu.engine.train import make_loader, resolve_device, train
from instseg_edu.models.mask_rcnn import (
    build_mask_rcnn,
    map_rois_to_levels,
    mask_targets,
    paste_masks,
)
from instseg_edu.models.roi_heads import mask_targets_reference, paste_masks_reference
from instseg_edu.recipes import notebook_data_dir, save_notebook_model
from instseg_edu.viz.draw import gallery

torch.manual_seed(SEED)
device = resolve_device("auto")
root = notebook_data_dir(DATA_DIR)  # DATA_DIR, or a temporary folder the kernel deletes on exit
train_split = split_name("train", TRAIN_SHAPES)  # "train", or "train-10-20-shapes" when denser
train_json = make_shapes_dataset(root, NUM_TRAIN, image_size=IMAGE_SIZE, seed=SEED,
                                 split=train_split, shapes_per_image=TRAIN_SHAPES)  # fmt: skip
val_json = make_shapes_dataset(root, NUM_VAL, image_size=IMAGE_SIZE, seed=SEED, split="val")
train_set = CocoDataset(train_json, root / train_split, transforms=eval_transforms(TRAIN_SIZE))
val_set = CocoDataset(val_json, root / "val", transforms=eval_transforms(TEST_SIZE))
augment = train_transforms(TRAIN_SIZE, jitter=COLOR_JITTER)  # random flip (+ jitter), every step
if IN_MEMORY:  # read and resize every image once; then only the augmentation runs per step
    train_set, val_set = InMemoryDataset(train_set, augment), InMemoryDataset(val_set)
else:
    train_set.transforms = augment

cfg = getattr(mask_rcnn, MODEL).with_num_classes(len(CLASSES))
model = build_mask_rcnn(cfg).to(device)
batch = collate([val_set[i] for i in range(2)]).to(device)
print(f"{MODEL}: ResNet-{cfg.backbone.depth}, {len(CLASSES)} classes, mask RoIs "
      f"{cfg.roi_head.mask_roi_size}², masks {cfg.train_cfg.rcnn.mask_size}²; batch "
      f"{tuple(batch.images.shape)} on {device}")  # fmt: skip


# %%
def show(ax, image, boxes=(), colors="lime", title="", lw=1.0):
    """Draw an image [3, H, W] in [0, 1] with xyxy boxes."""
    ax.imshow(image.permute(1, 2, 0).cpu().clamp(0, 1))
    for i, b in enumerate(torch.as_tensor(boxes).reshape(-1, 4).tolist()):
        c = colors if isinstance(colors, str) else colors[i]
        ax.add_patch(
            plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color=c, lw=lw)
        )
    ax.set_title(title, fontsize=9)
    ax.axis("off")


# %% [markdown]
# ## 1 · Stage one: backbone, FPN and RPN
#
# `model(images)` returns the five FPN maps and, for every anchor of every level, an objectness
# logit and four deltas. The anchors are listed level after level (P2 first), each level row by
# row, column by column, then anchor by anchor.

# %%
model.train()
outputs = model(batch.images)
for level, f in enumerate(outputs.features):
    n = int((outputs.anchor_levels == level).sum())
    print(f"P{level + 2}: features {tuple(f.shape)}, {n} anchors")
print("rpn_logits", tuple(outputs.rpn_logits.shape), "rpn_deltas", tuple(outputs.rpn_deltas.shape))

# %% [markdown]
# ## 2 · RPN targets: assignment and sampling
#
# Anchors with IoU ≥ 0.7 to some object are positive, below 0.3 negative; each object also claims
# its best anchors (if that IoU ≥ 0.3) so that no object is left without one. Of the tens of
# thousands of anchors, only a small balanced sample (256 per image, at most half positive) enters
# the loss.

# %%
targets = model.targets(outputs, batch)
rpn = targets.rpn
img = 0
pos = torch.nonzero(rpn.pos_mask[img]).squeeze(1)
neg = torch.nonzero(rpn.neg_mask[img]).squeeze(1)
print(f"image {img}: {len(pos)} sampled positive anchors, {len(neg)} sampled negatives")
print(
    "positive anchors per level:", torch.bincount(outputs.anchor_levels[pos], minlength=5).tolist()
)
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
show(axes[0], batch.images[img], batch.targets[img].boxes, "yellow", "ground truth")
show(axes[1], batch.images[img], outputs.anchors[pos], "lime", "sampled positive anchors")
centres = (outputs.anchors[neg, :2] + outputs.anchors[neg, 2:]).cpu() / 2
axes[1].scatter(centres[:, 0], centres[:, 1], s=2, c="red")
plt.show()

# %% [markdown]
# ## 3 · Proposals before and after NMS
#
# Per level the `nms_pre` best anchors are decoded and clipped; NMS at 0.7 (separately per level,
# as MMDetection does) removes near-duplicates; the `max_per_img` best survivors are kept.

# %%
p = targets.proposals
print("before NMS:", tuple(p.pre_nms_boxes.shape), " after NMS:", int(p.valid[img].sum()), "kept")
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
show(
    axes[0],
    batch.images[img],
    p.pre_nms_boxes[img, :: max(1, p.pre_nms_boxes.shape[1] // 60)],
    "orange",
    "before NMS (a sample)",
    lw=0.5,
)
show(axes[1], batch.images[img], p.boxes[img][p.valid[img]][:20], "cyan", "20 best after NMS")
plt.show()

# %% [markdown]
# `model.proposals` does this for the whole batch at once: every level's top-k in one tensor, the
# levels' NMS as one class-aware call per image, too-small boxes kept at score -1 rather than
# removed (so the GPU never waits for a count). The same steps image by image and level by level,
# as MMDetection's `RPNHead` writes them, are `rpn_proposals_reference` — read it first; then
# check that both give the same proposals.

# %%
import inspect

from instseg_edu.models.references import rpn_proposals_reference

print(inspect.getsource(rpn_proposals_reference))

# %%
proposal_cfg = model.cfg.train_cfg.rpn_proposal  # what targets() used above
expected = rpn_proposals_reference(model, outputs, batch.image_sizes, proposal_cfg)
for i, (boxes_i, scores_i, _) in enumerate(expected):
    n = int(p.valid[i].sum())
    assert n == len(boxes_i)
    assert sorted(p.scores[i, :n].tolist()) == sorted(scores_i.tolist())
print("proposals == rpn_proposals_reference ✓ ", [len(b) for b, _, _ in expected], "proposals")

# %% [markdown]
# ## 4 · RoI stage: which FPN level reads an RoI?
#
# The FPN paper maps an RoI of size `w × h` to level `k = ⌊k0 + log2(√(wh) / 224)⌋` with `k0 = 4`.
# Counting from P2 that is `⌊log2(√(wh) / 56)⌋`, clamped to P2…P5. A small inline version must
# agree with the library's `map_rois_to_levels`:

# %%
rois = targets.roi.rois[:, 1:]
k = torch.floor(
    4 + torch.log2(((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])).sqrt() / 224 + 1e-6)
)
inline_levels = (k.clamp(2, 5) - 2).long()
assert torch.equal(inline_levels, map_rois_to_levels(rois, 4))
print("sampled RoIs per level (P2..P5):", torch.bincount(inline_levels, minlength=4).tolist())

# %% [markdown]
# ## 5 · Sampled RoIs and their labels
#
# The ground-truth boxes join the proposals; RoIs with IoU ≥ 0.5 take their object's class, the
# others are background (label `C`). The sampler keeps `sampler.num` RoIs per image, at most a
# `pos_fraction` of them positive: 512 and a quarter in the full model; 32 and a half in the cpu
# tier's, whose 128 px images hold a few objects each (512 RoIs would be almost all background).

# %%
roi = targets.roi
sampler = cfg.train_cfg.rcnn.sampler
print(f"sampler: {sampler.num} RoIs per image, at most {sampler.pos_fraction:.0%} positive")
in_img = roi.rois[:, 0] == img
positive = in_img & (roi.labels >= 0)  # negatives are BACKGROUND (-1)
print(
    f"image {img}: {int(in_img.sum())} sampled RoIs, {int(positive.sum())} positive,",
    f"{int((roi.is_gt & in_img).sum())} of them ground-truth boxes",
)
palette = plt.get_cmap("tab10")
colors = [palette(int(c)) for c in roi.labels[positive].tolist()]
fig, ax = plt.subplots(figsize=(4.5, 4.5))
show(ax, batch.images[img], roi.rois[positive, 1:], colors, "positive RoIs, coloured by class")
plt.show()

# %% [markdown]
# ## 6 · Mask targets
#
# Each positive RoI's target is its object's mask cropped to the RoI and resized to `M × M`, the
# mask head's output: its RoIAlign grid (`mask_roi_size`, 14 in the full model) doubled by one
# deconvolution, so 28×28 — or 14×14 from the 7×7 grid of the cpu tier's model. The library does
# all RoIs at once with one `roi_align` over the stack of ground-truth masks. For an RoI whose
# sides are exact multiples of `M` pixels that is the same as averaging `M × M` blocks of the
# crop — a check we can do by hand with `F.interpolate(mode="area")`:

# %%
M = cfg.train_cfg.rcnn.mask_size
assert M == 2 * cfg.roi_head.mask_roi_size
gt_masks = torch.cat([t.masks for t in batch.targets])  # [G_total, Hp, Wp]
obj = 0
y, x = torch.nonzero(gt_masks[obj], as_tuple=True)
x1, y1 = int(x.min()), int(y.min())
side = M * max(1, (int(x.max()) - x1 + 1) // M)
x1, y1 = min(x1, gt_masks.shape[-1] - side), min(y1, gt_masks.shape[-2] - side)
box = torch.tensor([[x1, y1, x1 + side, y1 + side]], dtype=torch.float32, device=device)
crop = gt_masks[obj, y1 : y1 + side, x1 : x1 + side].float()[None, None]
by_hand = (F.interpolate(crop, size=(M, M), mode="area")[0, 0] >= 0.5).float()
library = mask_targets(gt_masks, box, torch.tensor([obj], device=device), mask_size=M)[0]
assert torch.equal(by_hand, library)

# Any RoI, one at a time: `mask_targets_reference` samples each bin bilinearly and averages, as
# MMDetection's `crop_and_resize` describes it. The model's targets agree with it everywhere but
# on exact ties (a bin average of 0.5 may round either way in float32).
mt = targets.mask
k = min(50, len(mt.masks))
averages = mask_targets_reference(gt_masks, mt.rois[:k], mt.gt_index[:k], M, binarize=False)
decided = (averages - 0.5).abs() > 1e-4
assert torch.equal(mt.masks[:k][decided], (averages[decided] >= 0.5).float())

n_show = min(6, len(mt.masks))
if n_show:
    fig, axes = plt.subplots(1, n_show, figsize=(1.6 * n_show, 1.8), squeeze=False)
    for i in range(n_show):
        axes[0, i].imshow(mt.masks[i].cpu(), cmap="gray")
        axes[0, i].set_title(CLASSES[int(mt.labels[i])], fontsize=8)
        axes[0, i].axis("off")
    plt.show()

# %% [markdown]
# ## 7 · Where a training step waits for the GPU
#
# On a GPU, Python only *queues* kernels and runs ahead. Anything whose answer Python needs now
# — `.item()`, a boolean-mask index `x[mask]` or `nonzero` (the result's size depends on the
# data), `unique`, a copy to the host — makes it wait until the device has caught up. That is
# a **host synchronisation**, and a dozen per step leave the GPU idle between kernels.
# `count_host_syncs` records them on any device, with the line that caused each.
#
# What remains is what cannot go: greedy NMS finishes on the host (one call per image, the
# FPN level serving as the class of a class-aware NMS), and the numbers of sampled RoIs, of
# positives and of RoIs per FPN level decide tensor sizes. Everything else — assignment,
# sampling, target encoding, mask targets — stays on the device. (`benchmarks/host_syncs.py`
# counts torchvision's Mask R-CNN on two 512² images: 109 waits per training step, about 2900
# per inference pass, most of them pasting one mask at a time.)

# %%
from instseg_edu.engine.host_sync import count_host_syncs

model.train()
with count_host_syncs() as syncs:
    losses = model.loss(model(batch.images), batch)
print(f"{syncs.count} host synchronisations in one training step of {len(batch)} images:")
print(syncs.summary())

# %% [markdown]
# ## 8 · Training, with a live dashboard
#
# The shared training loop (`instseg_edu.engine.train`) calls `model(images)` and
# `model.loss(outputs, batch)`: RPN BCE + L1, box-head cross-entropy + L1, mask BCE on the
# ground-truth class's channel. On a GPU it uses bf16 autocast and channels-last. The dashboard
# draws every loss term as it falls, and every few hundred steps the current predictions.
#
# The cpu tier's AdamW trains the box head at a fifth of the rate of the rest (`RECIPE.lr_mult`,
# MMDetection's `lr_mult`). AdamW moves every weight by about the learning rate in each step,
# whatever its gradient; the box head's first fc layer sums 3136 inputs (64 channels × 7 × 7)
# where a 3×3 conv of the FPN sums 576, so at one rate its outputs would swing about five times as
# far per step. At a fifth, five minutes gave 0.03–0.05 more box AP50 (benchmarks/RESULTS.md).
#
# Before it, in the cpu tier, the ResNet spends the first minute learning to classify the training
# set's objects, cut out as 32 × 32 crops: the stand-in for the ImageNet weights the paper starts
# from (notebook 04, section 4, shows the crops). In the same 4.5 minutes that took box / mask
# AP50 from 0.51 / 0.50 to 0.57 / 0.55 (benchmarks/RESULTS.md, "Pretraining the backbone on object
# crops"). `PRETRAIN = False` in the parameters cell trains from random weights instead.

# %%
from instseg_edu.engine.pretrain import pretrain_backbone

if RECIPE.pretrain_seconds:
    pretraining = pretrain_backbone(model, train_set, RECIPE.pretrain_seconds, val_set,
                                    device=str(device), seed=SEED)  # fmt: skip
    print(pretraining.describe())
else:
    print(f"no pretraining (tier {TIER!r}, PRETRAIN={PRETRAIN}): the ResNet starts from random "
          "weights")  # fmt: skip

# %%
from instseg_edu.widgets import TrainingDashboard

train_loader = make_loader(train_set, BATCH_SIZE, seed=SEED, workers=WORKERS)
dashboard = TrainingDashboard(thumbnails_every=1 if SMOKE else 200, class_names=train_set.classes)
display(dashboard)
# The recipe's optimiser (AdamW on the CPU, SGD on the GPU), rates, warm-up, schedule, clipping.
train_cfg = RECIPE.train_config(
    max_steps=TRAIN_STEPS, lr=LR, log_every=1 if SMOKE else 20, progress=not SMOKE, seed=SEED,
    device=str(device),
)  # fmt: skip
history = train(model, train_loader, train_cfg, callbacks=[dashboard])
print(history.summary())
# Saved for later notebooks (runs/notebooks/<tier>/mask_rcnn.pt; `instseg-edu evaluate` reads it).
checkpoint = save_notebook_model(model, RECIPE, history, train_set)
print("saved", checkpoint.resolve())  # the kernel runs in the notebook's folder

# %% [markdown]
# ## 9 · Predict: boxes, then masks pasted into the image
#
# `predict` keeps boxes above `score_thr`, runs per-class NMS, then the mask head on the kept
# boxes. Pasting an `M × M` mask into its box is bilinear resampling; `paste_masks` does all boxes of
# an image in one batched (separable) product. It must agree with the textbook version —
# `grid_sample` on a full-image grid, one mask at a time:

# %%
probs = torch.rand(3, 28, 28, device=device)
boxes = torch.tensor(
    [[5.0, 7.0, 60.0, 40.0], [30.5, 2.2, 90.1, 99.9], [-4.0, 50.0, 20.0, 70.0]], device=device
)
h, w = 100, 120
for m, (bx1, by1, bx2, by2) in zip(probs, boxes.tolist()):
    gx = ((torch.arange(w, device=device) + 0.5 - bx1) / (bx2 - bx1) * 2 - 1).expand(h, w)
    gy = ((torch.arange(h, device=device) + 0.5 - by1) / (by2 - by1) * 2 - 1)[:, None].expand(h, w)
    ref = F.grid_sample(m[None, None], torch.stack([gx, gy], -1)[None], align_corners=False)[0, 0]
    pasted = paste_masks(m[None], torch.tensor([[bx1, by1, bx2, by2]], device=device), (h, w))[0]
    assert torch.allclose(pasted, ref, atol=1e-5)
# the library keeps this one-mask-at-a-time form as `paste_masks_reference`
assert torch.allclose(
    paste_masks(probs, boxes, (h, w)), paste_masks_reference(probs, boxes, (h, w)), atol=1e-5
)

# %% [markdown]
# The trained model on validation images it has never seen: class, score and mask of every
# detection above the score of the best F1 (notebook 04, section 8), the ground truth dashed. (In
# the smoke tier it has trained for two steps: expect nothing useful.)
#
# In the cpu tier these images reach the model at `TEST_SIZE` = 192 px, half as large again as
# the 128 px it trained on (`RECIPE.test_size`, the test pipeline's resize). A third of the shapes
# are 8–16 px across, two to four cells of P2; enlarged, more of them are found and named right:
# the same weights scored about 0.05 higher box and mask AP50 at 192 px than at 128 px
# (benchmarks/RESULTS.md, eleventh round). To see it, set `TEST_SIZE = IMAGE_SIZE` and run again.

# %%
val_loader = make_loader(val_set, BATCH_SIZE, shuffle=False)
gallery_thr, sweep = best_f1_threshold(
    model, val_loader, val_set.coco, val_set.label_to_cat_id, device
)
gallery_thr = 0.3 if gallery_thr is None else gallery_thr  # None: no box right yet (smoke)
print(sweep.describe(gallery_thr, against=0.3))
model.eval()
shown = collate([val_set[i] for i in range(min(8, len(val_set)))]).to(device)
with torch.no_grad():
    detections = model.predict(model(shown.images), shown.image_sizes)
display(gallery(shown.images.cpu(), [d.to("cpu") for d in detections], CLASSES,
                image_sizes=shown.image_sizes, score_thr=gallery_thr,
                ground_truth=[t.to("cpu") for t in shown.targets]))  # fmt: skip

# %% [markdown]
# ## 10 · Evaluation (pycocotools box and mask AP)

# %%
metrics = evaluate_model(model, val_loader, val_json, val_set.label_to_cat_id, device)
print(format_ap_table(metrics))

# %% [markdown]
# ## 11 · The larger shapes: each test size for its own
#
# Split by size, the mistakes are not spread evenly. Enlarged to `TEST_SIZE`, a small shape is
# found more often, but a 60 px shape becomes 90 px, larger than almost any shape the model saw
# in training, and the medium shapes (32² to 96² px of area) are found about half as often as at
# the size they were drawn. SNIP's test (Singh & Davis, CVPR 2018, Sec. 5) keeps each size for the
# objects it sees well: here the boxes under `SIZE_CUT` px (longest side, original pixels) from the
# enlarged pass and the others from a pass at `IMAGE_SIZE` (`merge_scales`; `make demo` scores
# and draws this merge). The table gives, at each row's best-F1 threshold, how many masks drawn
# are right at IoU 0.5 and how many shapes are found, by size. (In the smoke tier both sizes are
# the same: one row.)

# %%
from instseg_edu.engine.analysis import match_coco, predict_results, score_sweep
from instseg_edu.engine.evaluate import coco_to_batch_detections, merge_scales

SIZE_CUT = 32  # px
per_size = {}
for size in dict.fromkeys((TEST_SIZE, IMAGE_SIZE)):  # the enlarged pass first
    at_size = CocoDataset(val_json, root / "val", transforms=eval_transforms(size))
    loader = make_loader(at_size, BATCH_SIZE, shuffle=False)
    per_size[size], image_ids = predict_results(model, loader, val_set.label_to_cat_id, device)
merged = merge_scales([per_size[TEST_SIZE], per_size[IMAGE_SIZE]],
                      [(0, SIZE_CUT), (SIZE_CUT, float("inf"))])  # fmt: skip
rows = {f"{size} px": results for size, results in per_size.items()}
rows["merged"] = merged
for name, results in rows.items():
    matches = match_coco(val_set.coco, results, "segm", image_ids=image_ids)
    thr, _, _, f1 = score_sweep(matches).best_f1()
    thr = thr if f1 > 0 else 0.3  # nothing right yet (smoke)
    by_size = "  ".join(
        "{}: {:.0%} right, {:.0%} found".format(area, *score_sweep(matches, area=area).at(thr))
        for area in ("small", "medium")
    )
    print(f"{name:>7s}  mask AP50 {matches.stats['AP50']:.3f}  score >= {thr:.2f}  {by_size}")

# %% [markdown]
# The merged masks on the same validation images as in section 9, at the merge's best F1:

# %%
merged_matches = match_coco(val_set.coco, merged, "bbox", image_ids=image_ids)
merged_thr, _, _, f1 = score_sweep(merged_matches).best_f1()
merged_thr = merged_thr if f1 > 0 else 0.3
shown_cpu = shown.to("cpu")
merged_detections = coco_to_batch_detections(merged, shown_cpu.targets, shown_cpu.image_sizes,
                                             val_set.label_to_cat_id)  # fmt: skip
display(gallery(shown_cpu.images, merged_detections, CLASSES, image_sizes=shown_cpu.image_sizes,
                score_thr=merged_thr, ground_truth=shown_cpu.targets))  # fmt: skip
