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
# # 02 · Anchors: base anchors → grid → pyramid levels
#
# A one-stage detector such as RetinaNet (Lin et al., 2017, Sec. 4) does not predict boxes from
# nothing. At every cell of every feature-pyramid level it places a fixed set of **anchors** —
# reference boxes of a few sizes and shapes — and learns, for each anchor, a class score and a small
# correction. Which anchors exist decides which objects the detector *can* find: an object that no
# anchor overlaps well is hard to learn.
#
# This notebook builds the anchors step by step with `instseg_edu.ops.anchors.AnchorGenerator`
# (the generator the RetinaNet head uses, with MMDetection's numbers and config keys), explains
# every key of its config with its effect, and ends with the **AnchorExplorer**.

# %% tags=["parameters"]
from instseg_edu.recipes import describe_tier, select_tier

TIER = select_tier()  # "smoke", "cpu" or "gpu": INSTSEG_TIER, else INSTSEG_SMOKE=1, else the device
SMOKE = TIER == "smoke"
IMAGE_SIZE = 256 if SMOKE else 512
SAMPLE_INDEX = 3  # which shapes image to look at
SEED = 0
print(describe_tier(TIER))

# %%
import math

import plotly.graph_objects as go
import torch

from instseg_edu.data.shapes import CLASSES
from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.ops.boxes import box_iou
from instseg_edu.viz.anchors import anchor_figure, best_iou, boxes_to_path, shapes_sample

torch.manual_seed(SEED)
image, gt_boxes, gt_labels = shapes_sample(SAMPLE_INDEX, IMAGE_SIZE, seed=SEED)
print(f"image {tuple(image.shape)}, {len(gt_boxes)} objects:")
for k, (box, label) in enumerate(zip(gt_boxes.tolist(), gt_labels.tolist())):
    w, h = box[2] - box[0], box[3] - box[1]
    print(f"  gt {k}: {CLASSES[label]:9s} {w:4.0f} × {h:4.0f} px")

# %% [markdown]
# ## 1. Base anchors: the anchors of one cell
#
# RetinaNet's config (`bbox_head.anchor_generator` in MMDetection):
#
# ```python
# anchor_generator=dict(octave_base_scale=4, scales_per_octave=3,
#                       ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128])
# ```
#
# * `strides` — one per pyramid level (P3…P7): a cell of level *l* covers `stride × stride` pixels;
# * `octave_base_scale` and `scales_per_octave` — the scales `4 · 2^(i/3)`, `i = 0, 1, 2`:
#   three sizes spaced a third of an octave apart, so that consecutive levels (a factor 2 apart)
#   are bridged without gaps;
# * `ratios` — `h / w` of each anchor: wide (0.5), square (1), tall (2).
#
# A base anchor of level *l* has width `stride · scale / √ratio` and height
# `stride · scale · √ratio` (the area depends on the scale only), centred on the cell's corner.

# %%
gen = AnchorGenerator(
    strides=(8, 16, 32, 64, 128), ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3
)
print("scales:", [round(s, 3) for s in gen.scales])
print("anchors per cell A:", gen.num_base_anchors)
# [A, 4] for stride 8, ratio-major: (r0,s0), (r0,s1), (r0,s2), (r1,s0)…
base = gen.base_anchors()[0]
print(base)

# %% [markdown]
# Check the first row by hand: ratio 0.5, scale 4 on stride 8 gives `w = 8·4·√2 = 45.25`,
# `h = 8·4/√2 = 22.63`, centred at `(0, 0)`:

# %%
w0, h0 = 8 * 4 * math.sqrt(2), 8 * 4 / math.sqrt(2)
assert torch.allclose(base[0], torch.tensor([-w0 / 2, -h0 / 2, w0 / 2, h0 / 2]))
# the area depends only on the scale: rows 0, 3 and 6 share scale 4
areas = (base[:, 2] - base[:, 0]) * (base[:, 3] - base[:, 1])
assert torch.allclose(areas[[0, 3, 6]], torch.full((3,), (8 * 4.0) ** 2))

fig = go.Figure()
for k, box in enumerate(base):
    x, y = boxes_to_path(box[None])
    ratio, scale = gen.ratios[k // 3], gen.scales[k % 3]
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"ratio {ratio}, scale {scale:.2f}"))
fig.update_layout(
    title="the 9 base anchors of stride 8 (cell corner at the origin)",
    yaxis={"scaleanchor": "x", "autorange": "reversed"},
    height=420,
)
fig

# %% [markdown]
# ## 2. The grid: one copy per cell
#
# `grid_anchors(featmap_sizes)` shifts the base anchors to every cell: cell `(i, j)` adds
# `(j·stride, i·stride)` to both corners. The flat order is **row, column, anchor** — row
# `(i·W + j)·A + a` — the order a head output `[B, A·K, H, W]` has after
# `permute(0, 2, 3, 1).reshape(B, H·W·A, K)`. That is why the loss can line up predictions and
# anchors without any bookkeeping.

# %%
sizes = [(math.ceil(IMAGE_SIZE / s), math.ceil(IMAGE_SIZE / s)) for s in gen.strides]
anchors = gen.grid_anchors(sizes)  # list of [H*W*A, 4]
for s, (h, w), a in zip(gen.strides, sizes, anchors):
    print(f"stride {s:4.0f}: {h:3d} × {w:3d} cells × 9 = {len(a):6,d} anchors")
print(f"total: {sum(len(a) for a in anchors):,}")

i, j, a = 3, 5, 4
W0 = sizes[0][1]
shift = torch.tensor([j * 8, i * 8, j * 8, i * 8], dtype=torch.float32)
assert torch.equal(anchors[0][(i * W0 + j) * 9 + a], base[a] + shift)

# %% [markdown]
# Three quarters of all anchors live on the finest level: stride 8 has 4× the cells of stride 16.
#
# ## 3. Every config key and what it does
#
# | key | effect |
# |---|---|
# | `strides` | cell size per level; must equal the FPN output strides (checked by `RetinaNetConfig`) |
# | `ratios` | anchor shapes `h/w`; more ratios → more anchors per cell |
# | `octave_base_scale` | the smallest anchor is `octave_base_scale × stride` wide (square case) |
# | `scales_per_octave` | how many sizes between one level and the next |
# | `scales` | explicit scales instead of the octave ladder (the RPN of Mask R-CNN: `scales=[8]`) |
# | `base_sizes` | base size per level if it should differ from the stride |
# | `center_offset` | anchor centre inside the cell, as a fraction of the stride (0: corner, 0.5: centre) |
# | `legacy` | MMDetection v1 numbers: `(w − 1)` sizes, centres at `offset·(stride − 1)`, rounded |
#
# Each one, with numbers:


# %%
def describe(g: AnchorGenerator, label: str):
    b = g.base_anchors()[0]
    wh = (b[:, 2:] - b[:, :2]).round().int().tolist()
    centre = ((b[0, :2] + b[0, 2:]) / 2).tolist()
    print(
        f"{label:38s} A={g.num_base_anchors[0]}, centre {centre}, w×h of stride {g.strides[0]:.0f}: {wh}"
    )


describe(gen, "RetinaNet")
describe(AnchorGenerator((8, 16), (1.0,), octave_base_scale=4, scales_per_octave=3), "ratios=(1,)")
describe(
    AnchorGenerator((8, 16), (0.5, 1.0, 2.0), octave_base_scale=8, scales_per_octave=1),
    "octave_base_scale=8, 1 per octave",
)
describe(AnchorGenerator((4, 8), (0.5, 1.0, 2.0), scales=(8,)), "RPN: scales=(8,), strides 4, 8")
describe(AnchorGenerator((8, 16), (1.0,), scales=(4,), base_sizes=(10, 20)), "base_sizes=(10, 20)")
describe(AnchorGenerator((8, 16), (1.0,), scales=(4,), center_offset=0.5), "center_offset=0.5")
describe(AnchorGenerator((8, 16), (0.5,), scales=(4,), legacy=True), "legacy=True (v1)")

# %% [markdown]
# Invalid values fail early, naming the field:

# %%
try:
    AnchorGenerator((8, 16), (0.0, 1.0), octave_base_scale=4, scales_per_octave=3)
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 4. Valid flags in a padded batch
#
# Images of a batch are padded (bottom/right) to a common size; anchors of a cell that starts in
# the padding of *this* image — row `i >= ceil(h / stride)` or column `j >= ceil(w / stride)`,
# MMDetection's rule — are invalid and the assigner ignores them.

# %%
flags = gen.valid_flags([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], image_size=(40, 64))
print("valid cells of stride 8 in a 40 × 64 image padded to 64 × 64:")
print(flags[0].reshape(8, 8, 9)[..., 0].int())

# %% [markdown]
# ## 5. Which level fits which object?
#
# For each object: its best IoU with any anchor of each level. Small objects find their anchors
# on stride 8, large ones on 64 or 128 — and an object between two scales may have no anchor with
# IoU ≥ 0.5 anywhere (the next notebook shows what the assigner does about it).

# %%
for k, box in enumerate(gt_boxes):
    per_level = [float(box_iou(a, box[None]).max()) for a in anchors]
    best = max(range(len(per_level)), key=per_level.__getitem__)
    cells = ", ".join(f"{v:.2f}" for v in per_level)
    print(
        f"gt {k} ({CLASSES[gt_labels[k]]:9s}): best IoU per level [{cells}] → stride {gen.strides[best]:.0f}"
    )

# %% [markdown]
# Anchors of the cell under the image centre, on every level, coloured by their best IoU with the
# ground truth (green):

# %%
picked = []
for (h, w), s, a in zip(sizes, gen.strides, anchors):
    i, j = min(IMAGE_SIZE // 2 // int(s), h - 1), min(IMAGE_SIZE // 2 // int(s), w - 1)
    picked.append(a[(i * w + j) * 9 : (i * w + j + 1) * 9])
picked = torch.cat(picked)
anchor_figure(
    image,
    gt_boxes,
    picked,
    best_iou(picked, gt_boxes),
    [len(a) for a in anchors],
    gen.strides,
    gt_labels=gt_labels,
    class_names=CLASSES,
    title="anchors at the image centre, all levels",
)

# %% [markdown]
# ## 6. AnchorExplorer
#
# Change the config and watch the anchors. Try:
#
# * `octave_base_scale` 4 → 8: the smallest objects lose their good anchors;
# * `scales_per_octave` 3 → 1: gaps open between levels (objects at the wrong size get low IoU);
# * `view = level`, `level = stride 8`: the tiling of a whole level (every k-th cell);
# * `center_offset = 0.5`: anchors move half a stride.
#
# Every anchor drawn comes from `AnchorGenerator.grid_anchors`; the bar chart counts them per level.

# %%
from instseg_edu.widgets import AnchorExplorer

explorer = AnchorExplorer(image, gt_boxes, gt_labels, CLASSES)
explorer

# %% [markdown]
# The explorer's state can be read back, e.g. to check it against a direct call:

# %%
explorer.octave_base_scale.value = 6.0
direct = AnchorGenerator(
    (8, 16, 32, 64, 128), (0.5, 1.0, 2.0), octave_base_scale=6.0, scales_per_octave=3
)
assert all(torch.equal(a, b) for a, b in zip(explorer.anchors, direct.grid_anchors(sizes)))
explorer.octave_base_scale.value = 4.0
print(f"last update took {explorer.last_update_s * 1000:.1f} ms")
