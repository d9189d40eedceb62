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
# # 05 · RoIPool versus RoIAlign
#
# The second stage of a two-stage detector needs a fixed-size feature — 7×7 for the box head,
# 14×14 for the mask head — for every region of interest, whatever its size. Both ops cut the RoI
# into that many bins and summarise each bin:
#
# * **RoIPool** (Fast R-CNN, 2015) snaps the RoI to the feature grid, snaps every bin edge to the
#   grid again, and takes the max over each bin's cells;
# * **RoIAlign** (Mask R-CNN, 2017, Sec. 3) rounds nothing: it places a few sample points in each
#   real-valued bin, reads the map there by bilinear interpolation and averages.
#
# We follow the classic worked example, rebuild both ops here in a few lines and check them against
# `torchvision.ops`, play with the **RoIExplorer**, and finally *measure* why the mask branch
# cannot live with RoIPool. The library versions are `instseg_edu.ops.roi.roi_pool_reference` and
# `roi_align_reference`; the models use torchvision's compiled kernels.

# %% tags=["parameters"]
from instseg_edu.recipes import describe_tier, select_tier

TIER = select_tier()  # "smoke", "cpu" or "gpu": INSTSEG_TIER, else INSTSEG_SMOKE=1, else the device
SMOKE = TIER == "smoke"
IMAGE_SIZE = 128 if SMOKE else 512  # shapes images for the mask experiment
NUM_IMAGES = 2 if SMOKE else 12
NUM_RANDOM_ROIS = 16 if SMOKE else 256
SEED = 0
print(describe_tier(TIER))

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.ops as tvo
from instseg_edu.widgets.roi_explorer import RoIExplorer

from instseg_edu.data.shapes import render_image
from instseg_edu.models.roi_heads import paste_masks
from instseg_edu.ops.roi import (
    roi_align_matmul,
    roi_align_reference,
    roi_align_sampling_points,
    roi_pool_cells,
    roi_pool_reference,
    roipool_misalignment,
)
from instseg_edu.viz.roi import (
    TRACE_NAMES,
    compare_roi_ops,
    roi_comparison_figure,
    synthetic_feature_map,
)

torch.manual_seed(SEED)

# %% [markdown]
# ## 1 · The worked example: an 800×800 image, stride 32
#
# Five stride-2 stages turn an 800×800 image into a 25×25 map. A 600×500 RoI covers
# 600/32 × 500/32 = **18.75 × 15.625** cells. The usual explanation of RoIPool floors that to
# **18 × 15** (first rounding), then cuts it into 7×7 bins of floor(18/7) × floor(15/7) = **2 × 2**
# cells (second rounding): the pooled grid covers 14 × 14 cells, so **4.75** cells across and
# **1.625** cells down of the RoI are never looked at. `roipool_misalignment` computes that account:

# %%
STRIDE = 32
image_size = 800
rois = torch.tensor([[0, 0.0, 0.0, 600.0, 500.0]])  # (batch, x1, y1, x2, y2)
mis = roipool_misalignment(rois, 7, 1 / STRIDE)
print("feature map:", image_size // STRIDE, "x", image_size // STRIDE)
print("RoI on the map (cells):", mis.roi_cells[0].tolist())
print("first rounding  -> floored size:", mis.floored_cells[0].tolist())
print(
    "second rounding -> bin size:",
    mis.bin_cells[0].tolist(),
    "i.e. a grid of",
    (mis.bin_cells[0] * 7).tolist(),
)
print(
    "lost, in cells:",
    (mis.lost_px[0] / STRIDE).tolist(),
    " in image pixels:",
    mis.lost_px[0].tolist(),
)
assert mis.roi_cells[0].tolist() == [18.75, 15.625]
assert mis.floored_cells[0].tolist() == [18, 15] and mis.bin_cells[0].tolist() == [2, 2]
assert (mis.lost_px[0] / STRIDE).tolist() == [4.75, 1.625]  # the write-up's two errors

# %% [markdown]
# ### What torchvision's RoIPool actually does
#
# The real kernel (inherited from Caffe) rounds each *corner* to the nearest cell — halves away
# from zero, so 18.75 → 19 and 15.625 → 16 — and keeps the end cell, so it reads cells 0..19 ×
# 0..16. Then each bin starts at the floor and ends at the ceil of its real edges: no cell is
# dropped, but neighbouring bins overlap and every edge moves. In image pixels:

# %%
cells = roi_pool_cells(rois, 7, 1 / STRIDE, featmap_size=(25, 25))
print("rounded RoI (cells, end included):", cells.roi_cells[0].tolist())
print("cells read, in image pixels:", cells.roi_image[0].tolist())
print("x ranges of the 7 bins (cells):", cells.bins[0, 0, :, [0, 2]].tolist())
print("outer edges off by (x1, y1, x2, y2) px:", mis.boundary_px[0].tolist())
print("bin edges off by up to (x, y) px:", [round(v, 1) for v in mis.bin_edge_px[0].tolist()])
assert mis.boundary_px[0].tolist() == [0, 0, 40, 44]

# %% [markdown]
# RoIAlign keeps 18.75 × 15.625 cells. Its bins are 2.68 × 2.23 cells; with `sampling_ratio=0`
# (adaptive) each bin gets ceil(2.68) × ceil(2.23) = 3 × 3 sample points. With `aligned=True`
# the bins tile the RoI exactly.

# %%
samples = roi_align_sampling_points(rois, 7, 1 / STRIDE, 0, True, featmap_size=(25, 25))
print("samples per bin (x, y):", samples.grid[0].tolist(), " in all:", int(samples.real.sum()))
print("first bin (px):", [round(v, 2) for v in samples.bins_image[0, 0, 0].tolist()])
print("last bin  (px):", [round(v, 2) for v in samples.bins_image[0, -1, -1].tolist()])
assert int(samples.real.sum()) == 49 * 9

# %% [markdown]
# The same geometry drawn on a 25×25 map (a synthetic 800×800 image average-pooled by 32): the RoI
# in white, RoIPool's rounded RoI (dashed) and bin cells in orange, RoIAlign's bins and sample
# points in blue; then both 7×7 outputs and their difference.

# %%
feature_25 = synthetic_feature_map(STRIDE, size=image_size)  # [1, 1, 25, 25]
example = compare_roi_ops(feature_25, rois[0], 7, 1 / STRIDE, sampling_ratio=0, aligned=True)
roi_comparison_figure(example)

# %% [markdown]
# ## 2 · RoIPool in five lines
#
# Rebuilt from scratch (not calling the library), on random maps and RoIs of every kind — inside,
# straddling the border, outside, tiny, inverted — and checked against `torchvision.ops.roi_pool`.
# Each bin is an index range; "max over the bin" is a max over the whole map with everything
# outside the range masked out.

# %%
B, C, H, W = 2, 3, 25, 25
features = torch.randn(B, C, H, W)
xy = torch.rand(NUM_RANDOM_ROIS, 2) * 1000 - 100
wh = torch.rand(NUM_RANDOM_ROIS, 2) ** 2 * 700 - 20  # some negative: malformed RoIs
random_rois = torch.cat(
    [torch.randint(0, B, (NUM_RANDOM_ROIS, 1)).float(), xy, xy + wh], dim=1
)  # [K, 5]


def roi_pool_inline(features, rois, out, scale):
    # 1. scale to the map and round the corners; C's round sends halves away from zero
    x = rois[:, 1:] * scale  # [K, 4]
    q = torch.where((x - x.trunc()).abs() >= 0.5, x.trunc() + x.sign(), x.trunc()).long()
    # 2. inclusive size (at least one cell) and real bin size
    size = (q[:, 2:] - q[:, :2] + 1).clamp(min=1)  # [K, 2] (w, h)
    bin_size = size.float() / out  # [K, 2]
    # 3. bin edges: floor of the start, ceil of the end, shifted to the RoI and clipped to the map
    p = torch.arange(out).float()  # [P]
    start = torch.floor(p * bin_size[:, :, None]).long() + q[:, :2, None]  # [K, 2, P]
    end = torch.ceil((p + 1) * bin_size[:, :, None]).long() + q[:, :2, None]  # [K, 2, P]
    hw = torch.tensor([W, H])[:, None]  # [2, 1] limits for (x, y)
    start, end = start.clamp(min=0).minimum(hw), end.clamp(min=0).minimum(hw)
    # 4. which map columns / rows belong to which bin
    in_x = (torch.arange(W) >= start[:, 0, :, None]) & (
        torch.arange(W) < end[:, 0, :, None]
    )  # [K, P, W]
    in_y = (torch.arange(H) >= start[:, 1, :, None]) & (
        torch.arange(H) < end[:, 1, :, None]
    )  # [K, P, H]
    inside = in_y[:, :, None, :, None] & in_x[:, None, :, None, :]  # [K, P, P, H, W]
    # 5. masked max; an empty bin gives 0
    maps = features[rois[:, 0].long()][:, :, None, None]  # [K, C, 1, 1, H, W]
    pooled = maps.masked_fill(~inside[:, None], float("-inf")).amax(dim=(-2, -1))  # [K, C, P, P]
    return torch.where(inside.any(dim=(-2, -1))[:, None], pooled, torch.zeros_like(pooled))


for scale in (1 / 32, 1 / 16, 0.1):
    ours = roi_pool_inline(features, random_rois, 7, scale)
    torch.testing.assert_close(ours, tvo.roi_pool(features, random_rois, 7, scale))
    torch.testing.assert_close(ours, roi_pool_reference(features, random_rois, 7, scale))
print("inline RoIPool == torchvision == instseg_edu on", NUM_RANDOM_ROIS, "RoIs x 3 scales")

# %% [markdown]
# ## 3 · RoIAlign as two small matrix products
#
# A sample at `(y, x)` reads the map bilinearly: row weights times column weights. The samples of
# a bin form a grid (every y with every x), so the bin's average is
# `Σ_rows Σ_cols a_y[row] · f[row, col] · a_x[col]`, where `a_y` is the average of the samples' 1-D
# "tent" weights `max(0, 1 − |y − row|)`. torchvision's border rules: a sample more than one cell
# off the map reads 0, one within a cell of the border is clamped onto it. So RoIAlign is
# `A_y @ f @ A_xᵀ` for every RoI. We build it with `sampling_ratio=2`; the library also does the
# adaptive `ceil(roi_size / output_size)`.
#
# This is not only a way to read the op. `instseg_edu.ops.roi.roi_align_matmul` computes it as two
# batched products per image, and the Mask R-CNN heads train with it on the CPU when the maps are
# small (the CPU tier's 32×32 P2): dense matrix products run its backward pass several times
# faster than torchvision's kernel, which scatters one sample at a time (`benchmarks/roi.py`).


# %%
def roi_align_inline(features, rois, out, scale, sampling_ratio=2, aligned=True):
    # 1. scale to the map; no rounding, optionally the half-cell shift
    box = rois[:, 1:] * scale - (0.5 if aligned else 0.0)  # [K, 4]
    size = box[:, 2:] - box[:, :2]  # [K, 2] (w, h)
    if not aligned:
        size = size.clamp(min=1.0)  # the original op never lets a RoI shrink below one cell
    bin_size = size / out  # [K, 2]
    # 2. sample coordinates: sampling_ratio evenly spaced points per bin and axis
    p = torch.arange(out).float()[:, None]  # [P, 1]
    i = (torch.arange(sampling_ratio).float() + 0.5)[None]  # [1, S]
    s = (
        box[:, :2, None, None]
        + p * bin_size[:, :, None, None]
        + i * bin_size[:, :, None, None] / sampling_ratio
    )  # [K, 2, P, S]

    # 3. 1-D bilinear ("tent") weights with the border rules, averaged over a bin's samples
    def axis_weights(coord, n):
        valid = (coord >= -1) & (coord <= n)
        c = coord.clamp(0, n - 1)[..., None]  # [K, P, S, 1]
        tent = (1 - (c - torch.arange(n).float()).abs()).clamp(min=0) * valid[
            ..., None
        ]  # [K, P, S, n]
        return tent.mean(dim=2)  # [K, P, n]

    a_x = axis_weights(s[:, 0], W)  # [K, P, W]
    a_y = axis_weights(s[:, 1], H)  # [K, P, H]
    # 4. average of the bilinear reads = A_y @ f @ A_x^T
    maps = features[rois[:, 0].long()]  # [K, C, H, W]
    return torch.einsum("kph,kchw,kqw->kcpq", a_y, maps, a_x)  # [K, C, P, P]


for aligned in (False, True):
    for scale in (1 / 32, 1 / 16, 0.1):
        ours = roi_align_inline(features, random_rois, 7, scale, 2, aligned)
        theirs = tvo.roi_align(features, random_rois, 7, scale, 2, aligned)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            roi_align_reference(features, random_rois, 7, scale, 2, aligned),
            theirs,
            atol=1e-5,
            rtol=0,
        )
    adaptive = roi_align_reference(features, random_rois, 7, 1 / 32, 0, aligned)
    torch.testing.assert_close(
        adaptive, tvo.roi_align(features, random_rois, 7, 1 / 32, 0, aligned), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        roi_align_matmul(features, random_rois, 7, 1 / 32, 0, aligned),
        adaptive,
        atol=1e-5,
        rtol=0,
    )
print("inline RoIAlign == torchvision == instseg_edu (fixed and adaptive sampling; matmul form)")

# %% [markdown]
# ## 4 · The RoIExplorer
#
# Drag the RoI's corners, change the number of bins, the sampling ratio, the stride and the
# half-pixel `aligned` flag. The left panel shows a synthetic 512×512 image average-pooled at the
# chosen stride; RoIPool's cells (orange) jump from cell to cell while RoIAlign's bins (blue)
# follow the RoI smoothly. The label gives RoIPool's misalignment in image pixels. Untick
# `aligned` to see every sample move half a cell down and to the right.

# %%
explorer = RoIExplorer(roi=(90.0, 70.0, 330.0, 262.0), output_size=7, sampling_ratio=2)
explorer

# %% [markdown]
# The controls are ordinary widgets, so code can drive them too (this is how the tests do it):

# %%
pool_trace = explorer.figure.data[TRACE_NAMES.index("RoIPool output")]
align_trace = explorer.figure.data[TRACE_NAMES.index("RoIAlign output")]
pool_before, align_before = np.array(pool_trace.z), np.array(align_trace.z)
explorer.x1.value = 97.0  # 90 -> 97 px: 5.6 -> 6.1 cells, both still round to cell 6
print("RoIPool output unchanged:", np.array_equal(pool_before, pool_trace.z))
print("RoIAlign output changed: ", not np.array_equal(align_before, align_trace.z))
print(explorer.misalignment.value.replace("<b>", "").replace("</b>", ""))
assert np.array_equal(pool_before, pool_trace.z) and not np.array_equal(align_before, align_trace.z)

# %% [markdown]
# ## 5 · Why the mask branch needs RoIAlign — measured
#
# Mask R-CNN predicts each object's mask on an M×M grid inside its box (14×14 features, 28×28
# masks) and pastes it back into the image. Here we skip the network: we take the **true** mask
# of each object in shapes images, read it into an M×M grid with each op — directly (stride 1, as
# when building mask targets) and from stride-4 and stride-8 maps (like FPN levels P2, P3) — then
# paste it back with the model's own `paste_masks` and compare with the true mask. Any loss of IoU
# is due to the RoI op alone.


# %%
def tight_boxes(masks):
    """[G, H, W] bool -> [G, 4] xyxy float boxes (pixel edges)."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [G, H], [G, W]
    idx_h, idx_w = torch.arange(masks.shape[1]), torch.arange(masks.shape[2])
    y1 = torch.where(rows, idx_h, masks.shape[1]).amin(1)
    y2 = torch.where(rows, idx_h, -1).amax(1) + 1
    x1 = torch.where(cols, idx_w, masks.shape[2]).amin(1)
    x2 = torch.where(cols, idx_w, -1).amax(1) + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def mask_iou(a, b):
    return (a & b).sum((1, 2)).float() / (a | b).sum((1, 2)).clamp(min=1).float()


results = {}  # (op, stride, M) -> list of IoUs
shown = {}  # the first image's pasted masks at stride 4, M = 28
for index in range(NUM_IMAGES):
    scene, _ = render_image(SEED, "val", index, IMAGE_SIZE)
    masks = torch.from_numpy(scene.masks)  # [G, H, W] bool
    if len(masks) == 0:
        continue
    boxes = tight_boxes(masks)  # [G, 4]
    rois = torch.cat([torch.arange(len(masks)).float()[:, None], boxes], dim=1)  # mask g = image g
    for stride in (1, 4, 8):
        level = F.avg_pool2d(masks[:, None].float(), stride)  # [G, 1, H/stride, W/stride]
        for m in (14, 28):
            grids = {
                "RoIPool": roi_pool_reference(level, rois, m, 1 / stride),
                "RoIAlign": roi_align_reference(level, rois, m, 1 / stride, 0, aligned=True),
            }
            for op, grid in grids.items():
                pasted = paste_masks(grid[:, 0], boxes, masks.shape[1:]) >= 0.5  # [G, H, W]
                results.setdefault((op, stride, m), []).append(mask_iou(pasted, masks))
                if not shown.get("done") and stride == 4 and m == 28:
                    shown[op] = pasted
    if "image" not in shown:
        shown.update(image=scene.image, masks=masks, done=True)

print(
    f"mean mask IoU after pasting back ({sum(len(v) for v in results[('RoIPool', 1, 14)])} objects)"
)
print(f"{'stride':>6} {'M':>4} {'RoIPool':>8} {'RoIAlign':>9}")
for stride in (1, 4, 8):
    for m in (14, 28):
        pool = torch.cat(results[("RoIPool", stride, m)]).mean().item()
        align = torch.cat(results[("RoIAlign", stride, m)]).mean().item()
        print(f"{stride:>6} {m:>4} {pool:>8.3f} {align:>9.3f}")
        assert align > pool  # every setting: RoIAlign keeps more of the mask

# %% [markdown]
# RoIPool loses on every row. Its max over each bin dilates the mask, its rounded corners (and
# the kept end cell) shift it by up to a cell — 4 or 8 image pixels on P2/P3, far more than a
# thin object part can tolerate — while RoIAlign's only loss is the blur of the coarser map. That
# is the gap behind the paper's mask AP jump from RoIPool to RoIAlign (Mask R-CNN, Table 2c).

# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
axes[0].imshow(shown["image"])
axes[0].set_title("shapes image")
for ax, op in zip(axes[1:], ("RoIPool", "RoIAlign")):
    truth = shown["masks"].any(0).numpy()
    ours = shown[op].any(0).numpy()
    overlay = np.stack([ours & ~truth, ours & truth, truth & ~ours], axis=-1).astype(float)
    ax.imshow(overlay)
    ax.set_title(f"{op}, stride 4, 28×28: green ok, red extra, blue missed", fontsize=8)
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Takeaways
#
# * RoIPool rounds twice (RoI corners, bin edges); the textbook floor account of the 600×500 RoI
#   at stride 32 loses 4.75 × 1.625 cells (152 × 52 px); torchvision's round-and-cover variant
#   instead reads 40 × 44 px too much and moves bin edges by up to ~62 px.
# * RoIAlign rounds nothing: real bins, `sampling_ratio²` bilinear samples per bin (adaptive:
#   `ceil(bin size)`), averaged; `aligned=True` removes the last half-cell offset.
# * Both are a few vectorized lines of PyTorch (`instseg_edu.ops.roi`), equal to torchvision's
#   kernels; the models use the kernels (`benchmarks/roi.py` shows what they buy), except that
#   Mask R-CNN trains on the CPU with the matrix-product form, whose backward pass is faster.
# * For masks the difference is not cosmetic: the IoU table above is the measured cost of RoIPool.
