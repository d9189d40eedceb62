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
# # 07 · SOLO: segmenting objects by location
#
# SOLO (Wang et al., "SOLO: Segmenting Objects by Locations", ECCV 2020) has no boxes, no anchors
# and no RoIs. It divides the image into an **S × S grid**; the cell holding an object's centre
# predicts its **class** (category branch, `C` logits per cell) and its **mask** (mask branch, one
# output channel `i·S + j` per cell). FPN levels split objects by size, a small **centre region**
# makes a few neighbouring cells positive, **CoordConv** tells the mask branch where it is, the
# mask loss is **dice**, and inference ends with **Matrix NMS**.
#
# Everything below calls the library: `model.targets` is exactly what `model.loss` trains on.
#
# **Tiers.** The parameters cell picks one (`instseg_edu.recipes`): `gpu` with CUDA (ResNet-50-FPN
# at 512 px), `cpu` without (a small SOLO on the half-width ResNet-18 and FPN of notebook 06, 128
# px images kept in memory, 4.5 minutes on two cores), `smoke` with `INSTSEG_SMOKE=1` (seconds,
# the tests). `INSTSEG_TIER` wins over both. The cell prints the tier and how long its training
# should take on this machine.
#
# **Transfer learning.** The paper trains SOLO from a ResNet pretrained on ImageNet; from random
# weights its category grid learns too slowly for a few CPU minutes (mask AP50 about 0.05: hardly
# a cell becomes sure of a class). So the backbone starts here from the one that notebook 06's
# Mask R-CNN learned on these shapes, when that notebook has saved it (`BACKBONE_FROM`; `None` to
# train from scratch and compare): its ResNet and its FPN, the same P2–P6 neck. The heads start from
# random weights. The loaded ResNet and FPN keep learning with the heads (`FREEZE_BACKBONE`
# False). On 1000 training images it had paid to freeze them: only the heads learned, a step
# skipped the backbone's backward pass, and the minutes held 1.7 times the steps. On the 3000
# images of this tier, with scale ranges fitted to 128 px images (section 3), SOLO's larger shapes
# go to the coarser FPN levels, which Mask R-CNN used for other things, and those levels must
# learn again. Measured on two CPU cores: box / mask AP50 about 0.54 / 0.50 fine-tuning, 0.45 /
# 0.41 frozen with the paper's scale ranges, against 0.01 / 0.001 for the first from-scratch
# recipe. SOLO is still the slowest learner of the four here; the GPU tier is where it learns
# well.

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
# (transfer learning: the paper starts from ImageNet weights); None: from random weights.
BACKBONE_FROM = "mask_rcnn"
# INSTSEG_TRAIN_STEPS overrides the steps in every tier.
RECIPE = notebook_recipe("solo", TIER, minutes=TRAIN_MINUTES, backbone_from=BACKBONE_FROM)
IMAGE_SIZE = RECIPE.image_size
NUM_TRAIN = RECIPE.num_train
NUM_VAL = RECIPE.num_val
BATCH_SIZE = RECIPE.batch_size
TRAIN_STEPS = RECIPE.max_steps
LR = RECIPE.lr
MODEL = RECIPE.model
IN_MEMORY = RECIPE.in_memory  # decode every image once and keep it (the cpu tier)
WORKERS = RECIPE.loader_workers
COLOR_JITTER = RECIPE.color_jitter  # colour jitter in the training augmentation
# True: the loaded ResNet and FPN stay frozen and only SOLO's heads learn; every tier's recipe
# fine-tunes everything (False)
FREEZE_BACKBONE = RECIPE.freeze_backbone
DATA_DIR = None  # None: a temporary folder; or e.g. "data/shapes" (git-ignored) to keep it
SEED = 0
print(describe_tier(TIER, RECIPE))

# %%
import io

import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Image, display
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import instseg_edu.models.solo as solo
from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.memory import InMemoryDataset
from instseg_edu.data.shapes import make_shapes_splits
from instseg_edu.data.transforms import collate, eval_transforms, train_transforms
from instseg_edu.engine.analysis import best_f1_threshold
from instseg_edu.engine.evaluate import evaluate_model, format_ap_table, predict_loader
from instseg_edu.engine.train import make_loader, resolve_device, train
from instseg_edu.losses import dice_loss
from instseg_edu.ops.nms import matrix_nms, points_nms
from instseg_edu.recipes import load_notebook_backbone, notebook_data_dir, save_notebook_model
from instseg_edu.viz.draw import draw_detections


def show(fig: Figure, dpi: int = 80) -> None:
    """Display a matplotlib Figure as a PNG (works without pyplot and in any front end)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    display(Image(buf.getvalue()))


torch.manual_seed(SEED)
device = resolve_device("auto")
root = notebook_data_dir(DATA_DIR)  # DATA_DIR, or a temporary folder the kernel deletes on exit
splits = make_shapes_splits(root, NUM_TRAIN, NUM_VAL, image_size=IMAGE_SIZE, seed=SEED)
train_set = CocoDataset(splits["train"], root / "train", eval_transforms(IMAGE_SIZE))
val_set = CocoDataset(splits["val"], root / "val", eval_transforms(IMAGE_SIZE))
augment = train_transforms(IMAGE_SIZE, jitter=COLOR_JITTER)  # random flip (+ jitter), every step
if IN_MEMORY:  # read and resize every image once; then only the augmentation runs per step
    train_set, val_set = InMemoryDataset(train_set, augment), InMemoryDataset(val_set)
else:
    train_set.transforms = augment
cfg = getattr(solo, MODEL).with_num_classes(len(train_set.classes))
model = solo.build_solo(cfg)
if BACKBONE_FROM:
    print(load_notebook_backbone(model, BACKBONE_FROM, TIER, freeze=FREEZE_BACKBONE))
head = cfg.bbox_head
print(f"device {device}; {len(train_set)} train / {len(val_set)} val images of {IMAGE_SIZE}²")
print(f"{MODEL}: grids {head.num_grids}, scale ranges {head.scale_ranges}, sigma {head.sigma}")

# %% [markdown]
# ## 1. Features: P2–P6, then `split_feats`
#
# SOLO uses Mask R-CNN's FPN, P2–P6 (strides 4–64). `split_feats` halves P2 (stride 8) and
# resizes P6 to P5's size (stride 32): S² mask channels at stride 4 on P2 would be too costly, and a
# 12 × 12 grid gains nothing from stride 64. The mask branch then upsamples ×2, so the masks are
# predicted at strides 4, 4, 8, 16, 16.

# %%
batch = collate([train_set[0], train_set[1]])
with torch.no_grad():
    x = model.normalize(batch.images)
    p = model.backbone(x)
    levels = solo.split_feats(p)
    outputs = model(batch.images)
for i, (a, b, m, c) in enumerate(zip(p, levels, outputs.mask_logits, outputs.cate_logits)):
    print(f"P{i + 2} {tuple(a.shape[-2:])} -> split {tuple(b.shape[-2:])} | mask_logits "
          f"{tuple(m.shape)} (S²={head.num_grids[i] ** 2}) | cate_logits {tuple(c.shape)}")  # fmt: skip
assert [tuple(f.shape[-2:]) for f in levels] == [
    tuple(f.shape[-2:]) for f in model.features(batch.images)
]

# %% [markdown]
# ## 2. CoordConv
#
# Convolutions are translation invariant: the same pattern gives the same output anywhere. But
# channel `i·S + j` must paint the object *at cell (i, j)*, so the mask branch's input gets two
# extra channels with the normalised `x` and `y` coordinates in `[-1, 1]` (Sec. 3.2). Inline, then
# against the library:

# %%
feat = levels[2]
h, w = feat.shape[-2:]
inline = torch.stack(
    torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")[::-1]
)
assert torch.equal(solo.coord_features(feat)[0], inline)
fig = Figure(figsize=(6, 2.6), layout="constrained")
for k, (ax, name) in enumerate(zip(fig.subplots(1, 2), ("x channel", "y channel"))):
    im = ax.imshow(inline[k].numpy(), cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_title(f"{name} ({h}×{w})")
fig.colorbar(im, ax=fig.axes, shrink=0.8)
show(fig)

# %% [markdown]
# ## 3. The S × S grid and the centre regions
#
# For every object: its scale `sqrt(w·h)` picks the level(s) (`scale_ranges`, inclusive and
# overlapping; the paper's, `(1, 96), (48, 192), ...`, are for images of about 800 px, and the cpu
# tier's `SOLO_R18_CPU` takes a third of them for its 128 px images: a 40 px shape trains on
# levels 1 and 2, not on the finest grids with the 10 px ones); the centre of mass of its mask
# picks the centre cell; the **centre region** — `sigma = 0.2` times the box, around the centre of
# mass — picks the positive cells, at most the centre cell ± 1. We draw what `model.targets`
# returned for the first image: centres (dots), centre regions (dashed) and positive cells
# (filled, coloured by object).

# %%
targets = model.targets(outputs, batch)
img0 = targets.per_image[0]
gt = batch.targets[0]
hp, wp = batch.images.shape[-2:]
colors = [f"C{k % 10}" for k in range(len(gt))]
used_levels = [lvl for lvl in range(len(head.num_grids)) if img0.levels[:, lvl].any()] or [0]
fig = Figure(figsize=(4 * len(used_levels), 4.2), layout="constrained")
axes = np.atleast_1d(fig.subplots(1, len(used_levels)))
for ax, lvl in zip(axes, used_levels):
    s = head.num_grids[lvl]
    ax.imshow(batch.images[0].permute(1, 2, 0).numpy())
    for k in range(s + 1):  # grid lines
        ax.axhline(k * hp / s, color="white", lw=0.5, alpha=0.6)
        ax.axvline(k * wp / s, color="white", lw=0.5, alpha=0.6)
    regions = solo.center_region(img0.centers, gt.boxes, head.sigma)  # [G, 4] xyxy
    for g in img0.levels[:, lvl].nonzero().flatten().tolist():
        cy, cx = img0.centers[g].tolist()
        x1, y1, x2, y2 = regions[g].tolist()
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ls="--", color=colors[g]))
        ax.plot(cx, cy, "o", color=colors[g], ms=4)
    owners = targets.gt_index[lvl][0].reshape(s, s)  # [S, S]: object owning each cell
    for i, j in (owners >= 0).nonzero().tolist():
        ax.add_patch(Rectangle((j * wp / s, i * hp / s), wp / s, hp / s, alpha=0.35,
                               color=colors[int(owners[i, j])]))  # fmt: skip
    ax.set_title(f"level {lvl}: S={s}, scales {head.scale_ranges[lvl]}")
    ax.set_xlim(0, wp)
    ax.set_ylim(hp, 0)
show(fig)
for g in range(len(gt)):
    w_g, h_g = (gt.boxes[g, 2:] - gt.boxes[g, :2]).tolist()
    print(f"object {g}: class {train_set.classes[int(gt.labels[g])]}, scale {np.sqrt(w_g * h_g):6.1f}, "
          f"levels {img0.levels[g].nonzero().flatten().tolist()}, cells (top, down, left, right) "
          f"{[img0.cells[lvl, g].tolist() for lvl in img0.levels[g].nonzero().flatten().tolist()]}")  # fmt: skip

# %% [markdown]
# The same assignment, live: `SOLOGridExplorer` takes the model and calls its `targets` — the call
# the loss makes — whenever you move a control (with the control's `sigma` or scale range in the
# model's head config); the mask target on the right is that call's, at the model's mask size. Try `sigma = 1`: the whole box
# becomes the centre region, yet at most the centre cell ± 1 is positive; or narrow a level's
# scale range and watch objects move to the next level.

# %%
from instseg_edu.widgets.solo_explorer import SOLOGridExplorer

explorer = SOLOGridExplorer(model, batch.images[0], batch.targets[0])
explorer.sigma.value = 1.0
print(explorer.summary.value)
explorer.sigma.value = head.sigma
explorer

# %% [markdown]
# ## 4. Grid cell (i, j) → mask channel i·S + j
#
# The category target of a cell is a class; its mask target is the object's mask resized to the
# level's mask resolution, in channel `k = i·S + j` of `mask_logits`. The loss gathers exactly
# these channels: `mask_logits[l].flatten(0, 1)[ins_ind[l].flatten()]` lines up with
# `targets.ins_masks[l]`.

# %%
lvl = next((lvl for lvl in range(len(head.num_grids)) if targets.ins_ind[lvl][0].any()), None)
if lvl is None:
    print("no positive cell in this image")
else:
    s = head.num_grids[lvl]
    k = int(targets.ins_ind[lvl][0].nonzero()[0])
    i, j = divmod(k, s)
    assert k == i * s + j
    print(f"level {lvl}, cell (i, j) = ({i}, {j}) -> channel {k}: class "
          f"{train_set.classes[int(targets.cate_labels[lvl][0, i, j])]}, object {int(targets.gt_index[lvl][0, k])}")  # fmt: skip
    gathered = outputs.mask_logits[lvl].flatten(0, 1)[targets.ins_ind[lvl].flatten()]
    assert gathered.shape == targets.ins_masks[lvl].shape
    fig = Figure(figsize=(9, 3), layout="constrained")
    a0, a1, a2 = fig.subplots(1, 3)
    a0.imshow(batch.images[0].permute(1, 2, 0).numpy())
    a0.add_patch(Rectangle((j * wp / s, i * hp / s), wp / s, hp / s, color="yellow", alpha=0.5))
    a0.set_title(f"cell ({i}, {j}) of S={s}")
    a1.imshow(targets.ins_masks[lvl][0].numpy(), cmap="gray")
    a1.set_title(f"target of channel {k}")
    a2.imshow(outputs.mask_logits[lvl][0, k].sigmoid().numpy(), cmap="viridis", vmin=0, vmax=1)
    a2.set_title("prediction (untrained)")
    show(fig)

# %% [markdown]
# ## 5. Why dice, not per-pixel BCE
#
# A small object in a 64 × 64 mask: predicting "nothing anywhere" costs little with per-pixel
# binary cross-entropy, because almost every pixel *is* background. Dice compares the whole masks,
# `1 − 2 Σpt / (Σp² + Σt²)`, so an empty prediction of any object costs ≈ 1, whatever its size.

# %%
target = torch.zeros(1, 64, 64)
target[0, 30:36, 30:36] = 1.0  # 36 of 4096 pixels
candidates = {
    "all 0.01": torch.full_like(target, 0.01),
    "right square, 0.9 inside": target * 0.89 + 0.01,
    "square shifted by 3 px": torch.roll(target, 3, dims=2) * 0.89 + 0.01,
}
for name, probs in candidates.items():
    bce = F.binary_cross_entropy(probs, target).item()
    inline = 1 - 2 * (probs * target).sum() / ((probs**2).sum() + 1e-3 + (target**2).sum() + 1e-3)
    assert torch.allclose(inline, dice_loss(probs, target)[0])
    print(f"{name:26s} BCE {bce:.4f}   dice {float(inline):.4f}")

# %% [markdown]
# ## 6. Training, with a live dashboard
#
# The same `train` loop as every other model: `loss_ins` (dice × 3 over positive channels) and
# `loss_cate` (focal over all cells / (positives + 1)). The dashboard draws both as they fall, and
# `num_pos`, the positive cells per image. The cpu tier's `SOLO_R18_CPU` takes the focal loss at
# γ = 1, α = 0.5 instead of the paper's 2 and 0.25: in a few minutes its category branch is the part
# that learns slowest, and it learns faster with more of the gradient on its positive cells (mask
# AP50 +0.03 at equal steps, `benchmarks/RESULTS.md`, seventeenth round).

# %%
from instseg_edu.widgets import TrainingDashboard

train_loader = make_loader(train_set, BATCH_SIZE, seed=SEED, workers=WORKERS)
val_loader = make_loader(val_set, BATCH_SIZE, shuffle=False, workers=WORKERS)
dashboard = TrainingDashboard(thumbnails_every=1 if SMOKE else 200, class_names=train_set.classes)
display(dashboard)
# The recipe's optimiser (AdamW on the CPU, SGD on the GPU), warm-up, cosine decay, clipping.
train_cfg = RECIPE.train_config(
    max_steps=TRAIN_STEPS, lr=LR, log_every=1 if SMOKE else 20, progress=not SMOKE, seed=SEED
)
history = train(model, train_loader, train_cfg, callbacks=[dashboard])
last = history.steps[-1]
print(history.summary())
print(f"last step: loss_ins {last['loss_ins']:.3f}, loss_cate "
      f"{last['loss_cate']:.3f}, positives per image {last['num_pos']:.1f}")  # fmt: skip
# Saved for later notebooks (runs/notebooks/<tier>/solo.pt; `instseg-edu evaluate` reads it).
checkpoint = save_notebook_model(model, RECIPE, history, train_set)
print("saved", checkpoint.resolve())  # the kernel runs in the notebook's folder

# %% [markdown]
# ## 7. Inference: points NMS, maskness, Matrix NMS
#
# **Points NMS** keeps a cell's score only if it is the maximum of the 2 × 2 window made of itself
# and its top, left and top-left neighbours — neighbouring positive cells of one object would
# otherwise all report it. Inline on a toy grid, then the library:

# %%
heat = torch.tensor([[0.2, 0.9, 0.5], [0.3, 0.8, 0.1], [0.0, 0.4, 0.7]])[None, None]
padded = F.pad(heat, (1, 0, 1, 0))  # a zero row on top and a zero column on the left
windows = torch.stack([padded[..., :-1, :-1], padded[..., :-1, 1:], padded[..., 1:, :-1], heat])
inline = heat * (windows.amax(dim=0) == heat)
assert torch.equal(inline, points_nms(heat))
print(points_nms(heat)[0, 0])

# %% [markdown]
# **Matrix NMS** (SOLOv2, Sec. 4) decays each mask's score by its IoU with better masks of its
# class, `exp(−σ·iou²)`, compensated by how much those better masks were overlapped themselves —
# no sequential loop. Three discs: B overlaps A heavily, C overlaps B. C keeps its score: B, its
# only real competitor, is itself mostly a duplicate of A (the compensation term).

# %%
yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
discs = torch.stack([(yy - 32) ** 2 + (xx - c) ** 2 <= 14**2 for c in (20, 26, 46)])
scores = torch.tensor([0.9, 0.8, 0.7])
labels = torch.zeros(3, dtype=torch.long)
decayed = matrix_nms(discs, labels, scores, kernel="gaussian", sigma=2.0)
for name, s0, s1 in zip("ABC", scores.tolist(), decayed.tolist()):
    print(f"{name}: {s0:.2f} -> {s1:.3f}")

# %% [markdown]
# `model.predict` chains it all: points NMS, `score_thr`, masks above `mask_thr` (and larger than
# the level's stride), score × maskness, the best `nms_pre`, Matrix NMS, `update_thr`,
# `max_per_img`, then the masks are upsampled to the input size and cropped to each image. In the
# smoke tier the model has trained for two steps, so expect no or poor detections; in the cpu
# tier, from notebook 06's backbone, most larger shapes with their masks, many at scores above
# 0.6, and some of the small ones (from random weights, hardly any detection above 0.3: the category
# scores mostly stay under `score_thr`). The figure draws the detections above the score where
# their F1 on the validation split is highest (notebook 04, section 8), the ground truth dashed.

# %%
gallery_thr, sweep = best_f1_threshold(
    model, val_loader, val_set.coco, val_set.label_to_cat_id, device
)
gallery_thr = 0.3 if gallery_thr is None else gallery_thr  # None: no box right yet (smoke)
print(sweep.describe(gallery_thr, against=0.3))
batches = list(predict_loader(model, val_loader, device, max_batches=1))
vb, dets = batches[0]
ncols = min(4, len(dets))
nrows = -(-len(dets) // ncols)
fig = Figure(figsize=(3.5 * ncols, 3.5 * nrows), layout="constrained")
for ax, i in zip(np.atleast_1d(fig.subplots(nrows, ncols)).flat, range(len(dets))):
    d = dets[i]
    kept = int((d.scores >= gallery_thr).sum())
    t = vb.targets[i].to("cpu")
    draw_detections(vb.images[i].cpu(), d.boxes, d.labels, masks=d.masks, scores=d.scores,
                    class_names=val_set.classes, ax=ax, score_thr=gallery_thr,
                    image_size=vb.image_sizes[i], gt_boxes=t.boxes,
                    title=f"{kept} detections ≥ {gallery_thr:.2f}")  # fmt: skip
show(fig)

# %% [markdown]
# `predict` is written so that the GPU never waits for the host: candidates are picked with
# `first_k_true` (a stable sort standing in for `nonzero()[:k]`), and masks too small for their
# level stay in, at score `-inf`, instead of being removed. The same steps one image at a time,
# with boolean indexing as SOLO's `get_seg_single` writes them, are `solo_predict_reference` —
# read it first; then check that both give the same detections (and masks).

# %%
import inspect

from instseg_edu.models.references import solo_predict_reference

print(inspect.getsource(solo_predict_reference))


# %%
def same(a, b):  # equal detections, up to the order of exactly equal scores
    return sorted(zip(a.scores.tolist(), a.labels.tolist(), a.boxes.tolist())) == sorted(
        zip(b.scores.tolist(), b.labels.tolist(), b.boxes.tolist())
    )


model.eval()
with torch.no_grad():
    out = model(vb.images)
fast = model.predict(out, vb.image_sizes)
ref = solo_predict_reference(model, out, vb.image_sizes)
assert all(map(same, fast, ref))
assert all(f.masks.sum() == r.masks.sum() for f, r in zip(fast, ref))
print("predict == solo_predict_reference ✓ ", [len(d) for d in fast], "detections")


# %% [markdown]
# ## 8. Evaluation (pycocotools box and mask AP)
#
# SOLO has no box branch: a detection's box is its mask's tight box. Both are scored.

# %%
metrics = evaluate_model(model, val_loader, val_set.coco, val_set.label_to_cat_id, device)
print(format_ap_table(metrics))
