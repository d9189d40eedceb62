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
# # 08 · YOLACT: prototypes, coefficients, a matrix product — and Fast NMS
#
# YOLACT (Bolya et al., "YOLACT: Real-time Instance Segmentation", 2019) gets instance masks
# without any per-box feature cropping (no RoIAlign). It splits the job in two parallel parts:
#
# 1. the **protonet** turns P3 into `P` image-sized **prototype masks** `[B, P, H/4, W/4]`, shared
#    by every instance (Sec. 3.1);
# 2. the **prediction head** — RetinaNet's, with softmax classes — adds, for every anchor, `P`
#    **mask coefficients** in `[-1, 1]` (tanh) (Sec. 3.2);
# 3. **assembly**: a detection's mask is `sigmoid(prototypes · coefficients)`, cropped to its box
#    (Sec. 3.3); all detections at once are one matrix multiplication;
# 4. **Fast NMS** replaces greedy NMS by one triangular IoU matrix per class (Sec. 5).
#
# We open each step on a shapes image, rebuild the small pieces inline and `assert` they equal the
# library, train, and look at the predictions.
#
# **Tiers.** The parameters cell picks one (`instseg_edu.recipes`): `gpu` with CUDA (ResNet-50-FPN
# at 512 px), `cpu` without (a small YOLACT on the half-width ResNet-18 of notebook 06, 128 px
# images kept in memory, 4.5 minutes on two cores), `smoke` with `INSTSEG_SMOKE=1` (seconds, the
# tests). `INSTSEG_TIER` wins over both. The cell prints the tier and how long its training should
# take on this machine.
#
# **Transfer learning.** The paper trains YOLACT from a ResNet pretrained on ImageNet; from random
# weights its prototypes learn too slowly for a few CPU minutes (mask AP50 0.18). So the
# ResNet starts here from the one that notebook 06's Mask R-CNN learned on these shapes, when
# that notebook has saved it (`BACKBONE_FROM`; `None` to do without). Only the ResNet is copied:
# YOLACT's FPN makes other levels (P3–P7) than Mask R-CNN's (P2–P6), and every head starts from
# random weights. Without notebook 06's backbone the cpu tier spends its first minute pretraining
# the ResNet as a classifier of the training objects' crops, as notebooks 04 and 06 do
# (`PRETRAIN`; section 6). Measured on two CPU cores after 4.5 minutes, box / mask AP50: 0.50 /
# 0.40 from notebook 06's backbone, 0.37 / 0.26 after the minute of pretraining, 0.27 / 0.18 from
# random weights.

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
# The backbone starts from the Mask R-CNN notebook 06 trained in this tier, if it was saved
# (transfer learning: the paper starts from ImageNet weights); None: without it.
BACKBONE_FROM = "mask_rcnn"
# Without that backbone, the cpu tier's first minute pretrains the ResNet on object crops
# (section 6); False: from random weights.
PRETRAIN = True
# INSTSEG_TRAIN_STEPS overrides the steps in every tier.
RECIPE = notebook_recipe("yolact", TIER, minutes=TRAIN_MINUTES, pretrain=PRETRAIN,
                         backbone_from=BACKBONE_FROM)  # fmt: skip
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
DATA_DIR = None  # None: a temporary folder; or e.g. "data/shapes" (git-ignored) to keep it
SEED = 0
print(describe_tier(TIER, RECIPE))

# %%
# %matplotlib inline

import numpy as np
import torch
import torchvision
from IPython.display import display
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import instseg_edu.models.yolact as yolact
from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.memory import InMemoryDataset
from instseg_edu.data.shapes import make_shapes_splits
from instseg_edu.data.transforms import collate, eval_transforms, train_transforms
from instseg_edu.engine.analysis import best_f1_threshold
from instseg_edu.engine.evaluate import evaluate_model, format_ap_table
from instseg_edu.engine.train import make_loader, resolve_device, train
from instseg_edu.ops.nms import fast_nms
from instseg_edu.recipes import load_notebook_backbone, notebook_data_dir, save_notebook_model
from instseg_edu.viz.draw import gallery

torch.manual_seed(SEED)
device = resolve_device("auto")
root = notebook_data_dir(DATA_DIR)  # DATA_DIR, or a temporary folder the kernel deletes on exit
splits = make_shapes_splits(root, NUM_TRAIN, NUM_VAL, image_size=IMAGE_SIZE, seed=SEED)
train_set = CocoDataset(splits["train"], root / "train", eval_transforms(TRAIN_SIZE))
val_set = CocoDataset(splits["val"], root / "val", eval_transforms(TEST_SIZE))
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
# ## 1. The outputs: anchors' logits, deltas, coefficients — and prototypes
#
# `A = 3` anchors per cell (ratios 0.5, 1, 2; one scale, `3 × stride`: 24…384 px on P3…P7),
# `C + 1` softmax logits (background last), 4 deltas and `P` coefficients per anchor. The
# prototypes are one tensor per image, at stride 4.

# %%
cfg = getattr(yolact, MODEL).with_num_classes(len(train_set.classes))
model = yolact.build_yolact(cfg)
if BACKBONE_FROM:
    print(load_notebook_backbone(model, BACKBONE_FROM, TIER))
model = model.to(device)
batch = collate([val_set[0], val_set[1]]).to(device)
with torch.no_grad():
    outputs = model(batch.images)
for name in ("cls_logits", "bbox_deltas", "coeffs", "prototypes"):
    print(f"{name:12s} {tuple(getattr(outputs, name).shape)}")
print("N =", sum(model.level_sizes(outputs.featmap_sizes)), "anchors; P =", model.num_protos)


# %% [markdown]
# The prototypes of the first image. Untrained, they already follow edges and colours; after
# training some fire on one side of objects, some on the background (see the paper's prototype
# figure). ReLU keeps them `≥ 0`.


# %%
def prototype_grid(protos: torch.Tensor, ncols: int = 8) -> Figure:
    p = protos.shape[0]
    nrows = (p + ncols - 1) // ncols
    fig = Figure(figsize=(1.6 * ncols, 1.6 * nrows))
    for i in range(p):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(protos[i].cpu().numpy(), cmap="viridis")
        ax.set_title(f"prototype {i}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig


display(prototype_grid(outputs.prototypes[0]))

# %% [markdown]
# ## 2. Coefficients and the linear combination
#
# Take the anchor with the best foreground score. Its `P` coefficients say how much of each
# prototype to add (positive) or subtract (negative); tanh keeps them in `[-1, 1]`.

# %%
scores = outputs.cls_logits[0].softmax(-1)[:, :-1]  # [N, C] foreground
anchor = int(scores.amax(dim=1).argmax())
coeffs = outputs.coeffs[0, anchor]  # [P]
fig = Figure(figsize=(8, 2.5))
ax = fig.add_subplot()
ax.bar(range(len(coeffs)), coeffs.cpu().numpy(), color=np.where(coeffs.cpu() >= 0, "C0", "C3"))
ax.set_xlabel("prototype")
ax.set_ylabel("coefficient")
ax.set_title(f"mask coefficients of anchor {anchor}")
display(fig)

# %% [markdown]
# The mask is `Σ_p c_p · prototype_p` (then a sigmoid). Inline as a loop, then against the
# library's `linear_combination` (an einsum — one matrix product for all detections):

# %%
protos = outputs.prototypes[0]  # [P, Hm, Wm]
inline = torch.zeros_like(protos[0])
for p in range(len(coeffs)):
    inline += coeffs[p] * protos[p]
lib = yolact.linear_combination(protos, coeffs[None])[0]
assert torch.allclose(inline, lib, atol=1e-4)
print("max |inline - library| =", float((inline - lib).abs().max()))

# %% [markdown]
# ## 3. Cropping
#
# The assembled mask covers the whole image; YOLACT keeps only what lies inside the detection's
# box (the ground-truth box during training). A pixel is kept when its centre is in the box.
# The box here is the anchor's decoded box, in prototype pixels (input pixels / 4).

# %%
anchors = model.anchors(outputs.featmap_sizes, device)
box = model.bbox_coder.decode(anchors[anchor], outputs.bbox_deltas[0, anchor])
box_m = box / model.proto_stride
full = lib.sigmoid()
cropped = yolact.crop_masks(full[None], box_m[None])[0]
assert torch.allclose(cropped, yolact.assemble_masks(protos, coeffs[None], box_m[None])[0])

fig = Figure(figsize=(7, 3.2))
for i, (m, title) in enumerate([(full, "sigmoid(P · c)"), (cropped, "cropped to the box")]):
    ax = fig.add_subplot(1, 2, i + 1)
    ax.imshow(m.cpu().numpy(), vmin=0, vmax=1, cmap="magma")
    x1, y1, x2, y2 = box_m.tolist()
    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="cyan"))
    ax.set_title(title)
display(fig)

# %% [markdown]
# A hand check of the crop rule on a 4×4 grid: box `(1, 0.6, 3, 2)` keeps columns 1, 2 (centres
# 1.5, 2.5) of row 1 only (row 0's centre 0.5 is above 0.6).

# %%
print(yolact.crop_masks(torch.ones(1, 4, 4), torch.tensor([[1.0, 0.6, 3.0, 2.0]]))[0])

# %% [markdown]
# ## 4. Fast NMS vs standard NMS
#
# Greedy NMS walks the boxes by score and lets only *kept* boxes suppress. Fast NMS computes the
# upper-triangular IoU matrix once and removes any box overlapping *any* higher-scored box —
# suppressed or not. Three boxes in a row: A overlaps B, B overlaps C, A does not overlap C.

# %%
boxes = torch.tensor([[0.0, 0, 10, 10], [4.0, 0, 14, 10], [8.0, 0, 18, 10]])
toy_scores = torch.tensor([0.9, 0.8, 0.7])
iou = torchvision.ops.box_iou(boxes, boxes)
print("IoU matrix:\n", iou.numpy().round(2))
greedy = torchvision.ops.nms(boxes, toy_scores, iou_threshold=0.3)
fast = fast_nms(boxes, toy_scores[None], iou_threshold=0.3)
print("greedy NMS keeps", greedy.tolist(), " (C survives: its only big overlap is B, removed)")
print("Fast NMS keeps  ", fast.indices.tolist(), " (C removed by B, although B was removed)")
assert greedy.tolist() == [0, 2] and fast.indices.tolist() == [0]

# %% [markdown]
# ## 5. Targets: positives, OHEM negatives, the mask subset
#
# Anchors are assigned by IoU (≥ 0.5 positive, < 0.4 background). Softmax cross-entropy is taken
# over the positives and only the **hardest** negatives, 3 per positive (OHEM). Up to 100 positives
# per image train a mask, against their ground truth's mask downsampled to the prototypes.
#
# The paper adds one more loss, for training only (Sec. 5, "Semantic Segmentation Loss"): a 1×1
# conv on P3 predicts, for every P3 pixel, which classes cover it (`C` sigmoid outputs), against
# the union of each class's masks (`segm_targets`). Nothing at test time reads it; it teaches P3,
# which the anchors of the smallest boxes and the protonet both read, what tells the classes
# apart. In the cpu tier it took the medium shapes' boxes from 50 % to 55 % right
# (benchmarks/RESULTS.md, twenty-ninth round).

# %%
t = model.targets(outputs, batch)
for i in range(len(batch)):
    print(
        f"image {i}: {int(t.num_pos[i])} positives, {int(t.ohem_neg[i].sum())} OHEM negatives "
        f"kept of the {int((~t.pos[i]).sum())} other anchors (background or ignored), "
        f"{int(t.mask_valid[i].sum())} masks trained"
    )
if t.segm_targets is not None:  # the semantic branch is on (every tier's preset has it)
    present = t.segm_targets[0].flatten(1).amax(dim=1).nonzero().flatten()  # classes in image 0
    names = [train_set.classes[c] for c in present.tolist()]
    print(f"segm_targets {tuple(t.segm_targets.shape)} (B, C, P3's height and width): "
          f"image 0's pixels belong to {names}")  # fmt: skip
losses = model.loss(outputs, batch)
print({k: round(float(v), 3) for k, v in losses.items()})

# %% [markdown]
# ## 6. Training, with a live dashboard
#
# The same loop as every model (`instseg_edu.engine.train`), the dashboard drawing `loss_cls`,
# `loss_bbox`, `loss_mask` and `loss_segm` as they fall. `loss_mask` starts near 6.125 × ln 2 ≈
# 4.25 (every mask logit near 0). In the smoke tier: two steps (the masks will be noise); in the
# cpu tier, from notebook 06's backbone, it falls below 2 and most shapes get a rough mask; from
# random weights it stays near its start for the first few hundred steps, and may stay there for
# good when the prototypes' last ReLU dies (zero everywhere: no gradient reaches them). AdamW
# moves every weight by about the learning rate per step, which could push the protonet's last
# conv below zero everywhere within a hundred steps; so in the cpu tier the protonet learns at a
# fifth of the rate (`RECIPE.lr_mult`), and no run has lost its prototypes since. On a GPU, a few
# thousand steps give clean masks.
#
# First, in the cpu tier when notebook 06's backbone was not found, the ResNet spends a minute
# learning to classify the training set's objects, cut out as 32 × 32 crops (notebook 04, section
# 4, shows them): the stand-in for ImageNet weights. In the same 4.5 minutes it took box / mask
# AP50 from 0.27 / 0.18 to 0.37 / 0.26 (benchmarks/RESULTS.md, "YOLACT's prototypes"); a backbone
# that has learned to detect these shapes does better still, and makes it unnecessary.

# %%
from instseg_edu.engine.pretrain import pretrain_backbone

if RECIPE.pretrain_seconds:
    pretraining = pretrain_backbone(model, train_set, RECIPE.pretrain_seconds, val_set,
                                    device=str(device), seed=SEED)  # fmt: skip
    print(pretraining.describe())
elif PRETRAIN and TIER != "gpu":  # the recipe's minute, given up for notebook 06's backbone
    print("no pretraining: the ResNet starts from notebook 06's Mask R-CNN (section 1)")
else:
    print(f"no pretraining (tier {TIER!r}, PRETRAIN={PRETRAIN})")

# %%
from instseg_edu.widgets import TrainingDashboard

train_loader = make_loader(train_set, BATCH_SIZE, seed=SEED, workers=WORKERS)
dashboard = TrainingDashboard(thumbnails_every=1 if SMOKE else 200, class_names=train_set.classes)
display(dashboard)
# The recipe's optimiser (AdamW on the CPU, SGD on the GPU), warm-up, cosine decay, clipping.
train_cfg = RECIPE.train_config(
    max_steps=TRAIN_STEPS, lr=LR, log_every=1 if SMOKE else 50, progress=not SMOKE, seed=SEED
)
history = train(model, train_loader, train_cfg, callbacks=[dashboard])
print(history.summary())
print("the loss terms at every fifth of the steps:")
for key in ("loss_cls", "loss_bbox", "loss_mask", "loss_segm"):
    if key in history.steps[0]:
        print(key, [round(s[key], 3) for s in history.steps[:: max(1, len(history.steps) // 5)]])
# Saved for later notebooks (runs/notebooks/<tier>/yolact.pt; `instseg-edu evaluate` reads it).
checkpoint = save_notebook_model(model, RECIPE, history, train_set)
print("saved", checkpoint.resolve())  # the kernel runs in the notebook's folder

# %% [markdown]
# ## 7. Predictions
#
# `predict`: softmax → best `nms_pre` anchors per level → decode → Fast NMS per class → for the
# kept detections `sigmoid(prototypes · coefficients)`, cropped with the *predicted* box, upsampled
# to the input, thresholded at 0.5 and cut to the true image size.

# %%
# The gallery draws the boxes above the score where their F1 on the validation split is highest
# (notebook 04, section 8), and says what share of them is right.
val_loader = make_loader(val_set, BATCH_SIZE, shuffle=False, workers=WORKERS)
gallery_thr, sweep = best_f1_threshold(
    model, val_loader, val_set.coco, val_set.label_to_cat_id, device
)
gallery_thr = 0.3 if gallery_thr is None else gallery_thr  # None: no box right yet (smoke)
print(sweep.describe(gallery_thr, against=0.3))
model.eval()
batch = collate([val_set[i] for i in range(min(4, len(val_set)))]).to(device)
with torch.no_grad():
    dets = model.predict(model(batch.images), batch.image_sizes)
for d, (h, w) in zip(dets, batch.image_sizes):
    assert d.masks.shape == (len(d), h, w) and d.masks.dtype == torch.bool
display(
    gallery(
        batch.images.cpu(),
        [t.to("cpu") for t in batch.targets],
        val_set.classes,
        image_sizes=batch.image_sizes,
        titles=["ground truth"] * len(batch),
    )
)
gallery(batch.images.cpu(), [d.to("cpu") for d in dets], val_set.classes,
        image_sizes=batch.image_sizes, score_thr=gallery_thr)  # fmt: skip

# %% [markdown]
# `predict` runs Fast NMS for every image at once and reads the number of detections once for
# the batch. The same steps image by image and level by level — the best `nms_pre` anchors of each
# level, Fast NMS written as loops (`fast_nms_reference`), each kept detection's mask — are
# `yolact_predict_reference`: read it first; then check that both give the same detections.

# %%
import inspect

from instseg_edu.models.references import yolact_predict_reference

print(inspect.getsource(yolact_predict_reference))


# %%
def same(a, b):  # equal detections, up to the order of exactly equal scores
    return sorted(zip(a.scores.tolist(), a.labels.tolist(), a.boxes.tolist())) == sorted(
        zip(b.scores.tolist(), b.labels.tolist(), b.boxes.tolist())
    )


with torch.no_grad():
    out = model(batch.images)
ref = yolact_predict_reference(model, out, batch.image_sizes)
assert all(map(same, dets, ref))
print("predict == yolact_predict_reference ✓ ", [len(d) for d in dets], "detections")


# %% [markdown]
# COCO's box and mask AP over the whole validation split:

# %%
metrics = evaluate_model(model, val_loader, val_set.coco, val_set.label_to_cat_id, device)
print(format_ap_table(metrics))

# %% [markdown]
# **Each test size for its own shapes.** The cpu tier scores the 128 px images enlarged to
# `TEST_SIZE` = 192 px: YOLACT then finds more of the small shapes, but a medium one (32² to 96² px
# of area) becomes larger than almost any shape it trained on, and is found less often. As in
# notebook 06, section 11, the recipe also predicts at the size the images were drawn
# (`RECIPE.test_sizes`) and keeps each pass for its own boxes: those under `RECIPE.size_cuts`
# (longest side, original pixels) from the enlarged pass, the others from the second
# (`predict_at_sizes`, SNIP's valid ranges; `instseg-edu demo --model yolact` scores the same
# merge). Below: the merged AP, how many boxes drawn at the merge's best F1 are right and how many
# shapes are found, by size, and the merged detections on the images of the gallery above. (The
# smoke and gpu tiers predict at one size: the merge is that pass.)

# %%
from instseg_edu.engine.analysis import match_coco, score_sweep
from instseg_edu.engine.evaluate import coco_to_batch_detections, predict_at_sizes

at_sizes = [val_set] + [
    CocoDataset(splits["val"], root / "val", eval_transforms(size))
    for size in RECIPE.merge_test_sizes
]  # the same images at each of RECIPE.test_sizes
merged, image_ids, _ = predict_at_sizes(
    model, at_sizes, RECIPE.size_cuts, val_set.label_to_cat_id, device, batch_size=BATCH_SIZE
)
merged_matches = {t: match_coco(val_set.coco, merged, t, image_ids=image_ids) for t in metrics}
print(f"test sizes {RECIPE.test_sizes}, cuts {RECIPE.size_cuts} px")
print(format_ap_table({t: m.stats for t, m in merged_matches.items()}))
merged_thr, _, _, f1 = score_sweep(merged_matches["bbox"]).best_f1()
merged_thr = merged_thr if f1 > 0 else 0.3  # nothing right yet (smoke)
for area in ("all", "small", "medium"):
    right, found = score_sweep(merged_matches["bbox"], area=area).at(merged_thr)
    print(f"boxes at score >= {merged_thr:.2f}, {area:>6s} shapes: {right:.0%} right, "
          f"{found:.0%} found")  # fmt: skip
shown = batch.to("cpu")
merged_detections = coco_to_batch_detections(merged, shown.targets, shown.image_sizes,
                                             val_set.label_to_cat_id)  # fmt: skip
gallery(shown.images, merged_detections, val_set.classes, image_sizes=shown.image_sizes,
        score_thr=merged_thr)  # fmt: skip

# %% [markdown]
# ## 8. Explore: edit a detection's coefficients
#
# `PrototypeExplorer` lists the model's best detections, exactly as `predict` makes them (its
# `kept_detections` step: Fast NMS's survivors with their coefficients). Pick one, move its
# coefficient sliders and watch `crop(sigmoid(Prototypes · c))` — computed by the same
# `assemble_masks` that `predict` uses — change. Try setting all coefficients to 0 (the mask
# becomes sigmoid(0) = 0.5 everywhere inside the box) or flipping the sign of the largest one.

# %%
from instseg_edu.widgets.yolact_explorer import PrototypeExplorer

explorer = PrototypeExplorer.from_model(model, batch.images[:1], num_candidates=10)
explorer.coeff_sliders[0].value = 0.5  # what a slider move does, from code
explorer
