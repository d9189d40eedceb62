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
# # 09 · The four families, side by side
#
# Notebooks 04–08 took the four families apart one at a time. Here they meet on the same
# validation images:
#
# | family | stages | where a mask comes from |
# |---|---|---|
# | **RetinaNet** (Lin et al., 2017) | one: dense anchors, focal loss | none: boxes only |
# | **Mask R-CNN** (He et al., 2017) | two: RPN proposals, then RoI heads | a small FCN on each box's RoIAlign features, pasted back |
# | **SOLO** (Wang et al., 2020) | one, no boxes: an S×S grid of cells | one full mask per grid cell; the box is the mask's extent |
# | **YOLACT** (Bolya et al., 2019) | one: RetinaNet's head plus coefficients | image-wide prototypes combined by each detection's coefficients, cropped to its box |
#
# We compare what a learner can measure on their own machine: box and mask AP (pycocotools), how
# many images per second each trained on, how long one image takes to predict, the masks
# themselves, and *where* each one fails (COCOeval's own matches, sorted into kinds of error).
# The summary at the end is written from the numbers measured here, not from the papers, and
# recommends no model that has learned nothing useful yet.
#
# **Where the models come from.** Notebooks 04 (RetinaNet), 06 (Mask R-CNN), 07 (SOLO) and 08
# (YOLACT) save the model they trained to `runs/notebooks/<tier>/<family>.pt`; when that file
# exists (for this tier, run from the same folder) it is loaded, and its recipe and training time
# are printed. A family without one is trained here, with its notebook's recipe for this tier, on
# the same shapes data (in the `cpu` tier Mask R-CNN's recipe draws its training images with
# 10–20 shapes instead of 3–10; every family is scored on the same validation images).
#
# **Tiers.** `gpu` with CUDA (ResNet-50-FPN models at 512 px, each family's full recipe), `cpu`
# without (ResNet-18 models at 128 px), `smoke` with `INSTSEG_SMOKE=1` (two training steps each:
# it proves the code runs). `INSTSEG_TIER` wins over both. The `cpu` tier is meant to finish in
# under six minutes on two cores even when it trains all four families itself, and the four
# recipes together take far longer than that (each about 4–5 minutes). So in the `cpu` tier a
# family trained here gets a **time budget** (`TRAIN_BUDGET_S`): it trains for that many seconds,
# its learning-rate schedule following the clock (`fit_to_minutes`, as `instseg-edu demo
# --minutes` trains), with at most the steps that fit at the speed section 1 measures on this
# machine (and at most its recipe's). The same budget for everyone is also a fair race: which family learns
# most in the same minutes? Run notebooks 04–08 first (or set `TRAIN_BUDGET_S = None`) to compare
# the fully trained models instead.

# %% tags=["parameters"]
from instseg_edu.recipes import FAMILIES, describe_tier, notebook_recipe, select_tier

TIER = select_tier()  # "smoke", "cpu" or "gpu": INSTSEG_TIER, else INSTSEG_SMOKE=1, else the device
SMOKE = TIER == "smoke"
# Each family's notebook recipe (04, 06, 07, 08); INSTSEG_TRAIN_STEPS overrides their steps. A
# family trained here trains from random weights: the minute of pretraining on object crops of
# notebooks 04 and 06 would not fit the budget below.
RECIPES = {family: notebook_recipe(family, TIER, pretrain=False) for family in FAMILIES}
# Seconds of training for each family trained here (None: its whole recipe). 50 s each keeps the
# cpu tier under six minutes on two cores with all four trained here, even on a slow hour.
TRAIN_BUDGET_S = {"smoke": None, "cpu": 50.0, "gpu": None}[TIER]
USE_CHECKPOINTS = True  # load what notebooks 04-08 saved for this tier; False: train all four here
CHECKPOINT_ROOT = "runs"  # they save to <CHECKPOINT_ROOT>/notebooks/<tier>/<family>.pt
SCORE_THR = 0.3  # detections drawn and counted in the error analysis
NUM_SHOWN = 4  # validation images in the side-by-side figure
LATENCY_REPEATS = 1 if SMOKE else 10  # timed passes over the NUM_SHOWN images, batch of one
DATA_DIR = None  # None: a temporary folder; or e.g. "data/shapes" (git-ignored) to keep it
SEED = 0
for r in RECIPES.values():
    print(describe_tier(TIER, r, measure=False))
if TRAIN_BUDGET_S is None:
    print("a family without a saved model trains its whole recipe here")
else:
    print(f"a family without a saved model trains here for {TRAIN_BUDGET_S:g} s "
          f"(all four: about {len(RECIPES) * TRAIN_BUDGET_S / 60:.1f} min of training)")  # fmt: skip

# %%
# %matplotlib inline
import math
import statistics
import time

import torch
from IPython.display import Markdown, display
from matplotlib.figure import Figure
from torch.utils.data import Subset

from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.memory import InMemoryDataset
from instseg_edu.data.shapes import CLASSES, make_shapes_dataset
from instseg_edu.data.transforms import collate, eval_transforms, train_transforms
from instseg_edu.engine.analysis import COUNT_NAMES, error_analysis, match_model
from instseg_edu.engine.checkpoint import load_checkpoint, model_from_checkpoint
from instseg_edu.engine.compare import SPEED_NOISE_RATIO, Measured, recommend
from instseg_edu.engine.train import make_loader, resolve_device, train
from instseg_edu.recipes import (
    fit_to_minutes,
    measure_step_seconds,
    notebook_checkpoint,
    notebook_data_dir,
)
from instseg_edu.viz.draw import draw_detections
from instseg_edu.viz.report import compare_outcomes_plot

NAMES = {"retinanet": "RetinaNet", "mask_rcnn": "Mask R-CNN", "solo": "SOLO", "yolact": "YOLACT"}
NOTEBOOK = {"retinanet": "04", "mask_rcnn": "06", "solo": "07", "yolact": "08"}  # who saves it
torch.manual_seed(SEED)
device = resolve_device("auto")
DEVICE_NAME = "GPU" if device.type == "cuda" else "CPU"

# One validation split for all four: every recipe of a tier has the same image size and number
# of validation images, and the shapes generator draws image i of a split from (seed, split, i),
# so these are also the images notebooks 04-08 evaluated on. All four are scored at the recipes'
# image size (notebook 06 scores Mask R-CNN at its recipe's test_size, 192 px in the cpu tier).
sizes = {(r.image_size, r.num_val, r.in_memory) for r in RECIPES.values()}
if len(sizes) != 1:
    raise ValueError(f"the {TIER} recipes differ in image size / validation images: {sizes}")
IMAGE_SIZE, NUM_VAL, IN_MEMORY = sizes.pop()
root = notebook_data_dir(DATA_DIR)  # DATA_DIR, or a temporary folder the kernel deletes on exit
val_json = make_shapes_dataset(root, NUM_VAL, IMAGE_SIZE, seed=SEED, split="val")
val_set = CocoDataset(val_json, root / "val", eval_transforms(IMAGE_SIZE))
if IN_MEMORY:  # read and resize every image once (the cpu tier)
    val_set = InMemoryDataset(val_set)
val_loader = make_loader(val_set, 8, shuffle=False)
print(f"device {device}; {len(val_set)} validation images of {IMAGE_SIZE}², classes {CLASSES}")

# %% [markdown]
# ## 1 · How fast does each family train here?
#
# `measure_step_seconds` builds a fresh model of the recipe and times real training steps
# (forward, loss, backward, optimiser update) on a batch of the recipe's size (RetinaNet's cpu
# recipe takes 4 images a step, the others 8), after one warm-up step. In the `cpu` tier these
# times set how many steps a family trained here gets from its budget.
#
# They are a lower bound: the training itself also loads and augments every batch, on images
# with other numbers of objects (on a two-core machine its steps took 1.1 to 1.45 times the
# pre-timed ones). So the steps that fit at this speed are only the most a family can train in its
# budget (`fit_to_minutes`); the clock ends the training, and the cosine schedule follows the
# clock, so it decays to its end on time whatever the steps take. The images per second in
# section 3's table are those each training actually achieved, not these.

# %%
step_s = {f: measure_step_seconds(r, steps=1 if SMOKE else 3) for f, r in RECIPES.items()}
budgeted = {}  # the recipe a family trained here trains with
for f, r in RECIPES.items():
    if TRAIN_BUDGET_S is not None:  # the budget, with at most the steps that fit at this speed
        fitted = fit_to_minutes(r, TRAIN_BUDGET_S / 60, step_s[f])
        r = fitted.override(max_steps=min(r.max_steps, fitted.max_steps))
    budgeted[f] = r
    budget = "" if r.max_minutes is None else f" at most, for {60 * r.max_minutes:g} s"
    print(f"{NAMES[f]:11s} {r.model:23s} {step_s[f]:.3f} s/step pre-timed, batch "
          f"{r.batch_size} -> {r.max_steps} steps{budget}")  # fmt: skip


# %% [markdown]
# ## 2 · Load the saved models, train the missing ones
#
# A saved model is rebuilt from the config stored with it (so a later change of a preset cannot
# silently change it) and its weights loaded, by `model_from_checkpoint` (what `load_model` and
# the command line use too). Its training time is read back from its history: every logged step
# carries the throughput of its logging window, so `batch / img_s` summed over the steps is the
# wall-clock time the training loop ran.
#
# A family trained here uses `train` as its notebook does: the recipe's optimiser, warm-up,
# schedule and clipping, for its budget (`budgeted`, from section 1).


# %%
def training_seconds(history: dict, batch_size: int) -> float:
    """Wall-clock seconds of a training run, from its history's steps (``img_s`` per window)."""
    return sum(batch_size / s["img_s"] for s in history["steps"] if s.get("img_s", 0) > 0)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def load_saved(family: str, r):
    """The model notebook 04/06/07/08 saved for this tier, or ``None`` (with the reason)."""
    path = notebook_checkpoint(family, TIER, CHECKPOINT_ROOT)
    if not USE_CHECKPOINTS or not path.exists():
        return None, f"no {path}" if USE_CHECKPOINTS else "USE_CHECKPOINTS is False"
    ckpt = load_checkpoint(path)
    saved, meta = ckpt["recipe"], ckpt["meta"]
    if meta.get("classes") != list(CLASSES) or saved["image_size"] != r.image_size:
        return (
            None,
            f"{path} was trained on other data ({saved['image_size']} px, {meta['classes']})",
        )
    model = model_from_checkpoint(ckpt, str(path))  # meta names the family and its config
    info = {
        "source": f"notebook {NOTEBOOK[family]}",
        "loaded": True,
        "preset": meta["preset"],
        "steps": len(ckpt["history"]["steps"]),
        "batch": saved["batch_size"],
        "seconds": training_seconds(ckpt["history"], saved["batch_size"]),
    }
    print(f"{NAMES[family]}: loaded {path} — {meta['preset']}, {info['steps']} step(s) of "
          f"{saved['batch_size']} images ({saved['optimizer']}, lr {saved['lr']:g}), trained "
          f"{duration(info['seconds'])}")  # fmt: skip
    return (model, info), ""


# shapes per image -> that training split: one set of images serves every family that trains on
# it (the cpu tier's Mask R-CNN and RetinaNet train on images with more shapes than the others)
train_sets = {}


def train_here(family: str, r):
    """Train ``family`` with its recipe, for its budget: ``budgeted[family]``."""
    shapes = r.train_shapes_per_image
    if shapes not in train_sets:
        largest = max(x.num_train for x in RECIPES.values() if x.train_shapes_per_image == shapes)
        train_json, train_dir = r.make_train_split(root, SEED, num_images=largest)
        base = CocoDataset(train_json, train_dir, eval_transforms(IMAGE_SIZE))
        augment = train_transforms(IMAGE_SIZE)
        if IN_MEMORY:
            train_sets[shapes] = InMemoryDataset(base, augment)
        else:
            base.transforms = augment
            train_sets[shapes] = base
    # Image i is the same whatever the split's size, so the first num_train images are exactly
    # the family's own notebook's training set.
    train_set = Subset(train_sets[shapes], range(r.num_train))
    loader = make_loader(train_set, r.batch_size, seed=SEED, workers=r.loader_workers)
    model = r.build_model(len(CLASSES))
    cfg = budgeted[family].train_config(seed=SEED, device=str(device),
                                        log_every=1 if SMOKE else 20, progress=not SMOKE)  # fmt: skip
    start = time.perf_counter()
    history = train(model, loader, cfg)
    seconds = time.perf_counter() - start
    print(f"{NAMES[family]}: trained here — {r.model}, {len(history.steps)} steps of "
          f"{r.batch_size} images in {seconds:.0f} s; last loss "
          f"{history.steps[-1]['loss']:.3f}")  # fmt: skip
    info = {"source": "trained here", "loaded": False, "preset": r.model, "steps": len(history.steps),
            "batch": r.batch_size, "seconds": seconds}  # fmt: skip
    return model, info


models, trained = {}, {}
for family, r in RECIPES.items():
    loaded, why = load_saved(family, r)
    if loaded is None:
        print(f"{NAMES[family]}: {why}; training it here")
        loaded = train_here(family, r)
    models[family], trained[family] = loaded
    models[family].to(device).eval()

# %% [markdown]
# ## 3 · Accuracy and speed on the same validation images
#
# `match_model` predicts over the validation loader once and runs pycocotools' `COCOeval` for
# boxes and (where the model returns them) masks; its `stats` are COCO's twelve numbers, the same
# as `evaluate_model`'s, and it keeps COCOeval's matches for section 5. RetinaNet has no masks.
#
# Train img/s is what each training achieved: its steps × batch over the seconds it ran (data
# loading included), from the run itself, not section 1's pre-timed steps.
#
# Latency is one image at a time (batch 1), `model(images)` then `model.predict` (thresholds, NMS,
# mask assembly and pasting), the median over `LATENCY_REPEATS` passes over the first
# `NUM_SHOWN` validation images after two warm-up passes (one in the smoke tier). The number of detections matters (each
# one is a mask to paste), so it is measured on the trained models.

# %%
# RetinaNet makes boxes only; the other three make masks too (asked for explicitly: a model that
# has learned nothing yet may return no detection at all, masks or not).
IOU_TYPES = {f: ("bbox",) if f == "retinanet" else ("bbox", "segm") for f in FAMILIES}
matches = {
    f: match_model(models[f], val_loader, val_set.coco, val_set.label_to_cat_id, device,
                   iou_types=IOU_TYPES[f])
    for f in FAMILIES
}  # fmt: skip
shown = [collate([val_set[i]]).to(device) for i in range(min(NUM_SHOWN, len(val_set)))]


def latency_ms(model) -> float:
    """Median milliseconds of ``predict(model(image))`` on one image (batch of one)."""

    def once(batch):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.predict(model(batch.images), batch.image_sizes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        for batch in shown * (1 if SMOKE else 2):  # warm-up: allocations, kernel choices
            once(batch)
        times = [once(batch) for _ in range(LATENCY_REPEATS) for batch in shown]
    return 1000 * statistics.median(times)


latency = {f: latency_ms(models[f]) for f in FAMILIES}


def ap(family: str, iou_type: str, key: str) -> float:
    m = matches[family].get(iou_type)
    return math.nan if m is None else m.stats[key]


table = {
    f: {
        "box AP": ap(f, "bbox", "AP"),
        "box AP50": ap(f, "bbox", "AP50"),
        "mask AP": ap(f, "segm", "AP"),
        "mask AP50": ap(f, "segm", "AP50"),
        "train img/s": trained[f]["steps"] * trained[f]["batch"] / trained[f]["seconds"],
        "latency ms": latency[f],
    }
    for f in FAMILIES
}


def cell(v: float, digits: int) -> str:
    return "—" if math.isnan(v) else f"{v:.{digits}f}"


rows = [
    "| family | model | from | training | box AP | box AP50 | mask AP | mask AP50 | train img/s "
    "| latency (batch 1) |",
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
]
for f in FAMILIES:
    t, info = table[f], trained[f]
    rows.append(
        f"| {NAMES[f]} | `{info['preset']}` | {info['source']} | {info['steps']} × "
        f"{info['batch']} images, {duration(info['seconds'])} | {cell(t['box AP'], 3)} | "
        f"{cell(t['box AP50'], 3)} | {cell(t['mask AP'], 3)} | {cell(t['mask AP50'], 3)} | "
        f"{t['train img/s']:.1f} | {t['latency ms']:.1f} ms |"
    )
display(Markdown("\n".join(rows) + f"\n\n{len(val_set)} validation images of {IMAGE_SIZE}² on "
                 f"this {DEVICE_NAME} ({device}), tier `{TIER}`."))  # fmt: skip

# %% [markdown]
# ## 4 · Masks side by side
#
# The first validation images, ground truth on top, then one row per family: every detection
# scoring at least `SCORE_THR`, with its mask where the family makes one. Look at the borders:
# Mask R-CNN's come from a small `M × M` grid stretched over the box, SOLO's and YOLACT's from
# image-wide maps at a quarter (or an eighth) of the resolution.

# %%
with torch.inference_mode():
    predictions = {f: [models[f].predict(models[f](b.images), b.image_sizes)[0].to("cpu")
                       for b in shown] for f in FAMILIES}  # fmt: skip
fig = Figure(figsize=(2.2 * len(shown), 2.3 * (1 + len(FAMILIES))), layout="constrained")
axes = fig.subplots(1 + len(FAMILIES), len(shown), squeeze=False)
for j, b in enumerate(shown):
    image, gt = b.images[0].cpu(), b.targets[0].to("cpu")
    draw_detections(image, gt.boxes, gt.labels, gt.masks, class_names=CLASSES, ax=axes[0, j],
                    image_size=b.image_sizes[0], title="ground truth" if j == 0 else None)  # fmt: skip
    for i, f in enumerate(FAMILIES, start=1):
        d = predictions[f][j]
        draw_detections(image, d.boxes, d.labels, d.masks, d.scores, CLASSES, ax=axes[i, j],
                        score_thr=SCORE_THR, image_size=b.image_sizes[0],
                        title=NAMES[f] if j == 0 else None)  # fmt: skip
display(fig)

# %% [markdown]
# ## 5 · Where each one fails
#
# `error_analysis` reads COCOeval's own matches at one IoU threshold and score threshold and puts
# every kept detection into one bin — true positive, wrong class, duplicate, poor localisation,
# background — and every object it did not find into *missed* (notebook 01 explains the kinds).
# The counts add up to what COCO reports. Boxes first (all four), then masks (the three that make
# them): a family whose boxes are right but whose masks are "poorly localised" has a mask problem,
# not a detection problem.

# %%
IOU_THR = 0.5
errors = {
    iou_type: {NAMES[f]: error_analysis(m[iou_type], iou_thr=IOU_THR, score_thr=SCORE_THR)
               for f, m in matches.items() if iou_type in m}
    for iou_type in ("bbox", "segm")
}  # fmt: skip
for iou_type, what in (("bbox", "boxes"), ("segm", "masks")):
    fig = compare_outcomes_plot(errors[iou_type])
    fig.axes[0].set_title(f"{what}: {fig.axes[0].get_title()}")
    display(fig)

# %% [markdown]
# The explorer holds all seven result sets (four families' boxes, three families' masks) as named
# matches: switch between them with `results` and page through the images with the most errors;
# click a detection to see the ground truth it was compared with and the IoU.

# %%
from instseg_edu.widgets import EvaluationExplorer

named = {f"{NAMES[f]} {what}": m[iou_type] for f, m in matches.items()
         for iou_type, what in (("bbox", "boxes"), ("segm", "masks")) if iou_type in m}  # fmt: skip
explorer = EvaluationExplorer(named, images=val_set, iou_thr=IOU_THR, score_thr=SCORE_THR)
explorer

# %% [markdown]
# ## 6 · Which one when
#
# Written from this run's table: rerun the notebook on another machine, tier or budget and the
# sentences follow the numbers. A ranking always has a winner, even among models that learned
# nothing, so `recommend` (`instseg_edu.engine.compare`) first leaves out every model that keeps
# no detection at `SCORE_THR` or has a box AP50 under 0.05, and says why; and a speed ratio under
# 1.2× (timings move that much from run to run) is not called faster, nor a trade-off.


# %%
def best(column: str, *, lowest: bool = False) -> list[str]:
    """Families ranked by ``column`` of the table (families without the number left out)."""
    have = [f for f in FAMILIES if not math.isnan(table[f][column])]
    return sorted(have, key=lambda f: table[f][column], reverse=not lowest)


def listing(families: list[str], column: str) -> str:
    """'A at 0.123, B at 0.045 and C at 0.000' for a ranked list of families."""
    parts = [f"{NAMES[f]} at {table[f][column]:.3f}" for f in families]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def worst_kind(family: str) -> tuple[str, int, int]:
    """The family's most frequent error at IOU_THR (of its masks where it makes them): the kind,
    its count, and the count of all its errors."""
    name = NAMES[family]
    e = errors["segm"][name] if name in errors["segm"] else errors["bbox"][name]
    totals = e.totals()
    kinds = [k for k in COUNT_NAMES if k != "true positive"]
    kind = max(kinds, key=lambda k: totals[k])
    return kind, totals[kind], sum(totals[k] for k in kinds)


measured = {
    f: Measured(box_ap=table[f]["box AP"], box_ap50=table[f]["box AP50"],
                mask_ap=table[f]["mask AP"], latency_ms=table[f]["latency ms"],
                kept=int((matches[f]["bbox"].dt_score >= SCORE_THR).sum()))
    for f in FAMILIES
}  # fmt: skip
choice = recommend(measured, score_thr=SCORE_THR)
ms = {f: table[f]["latency ms"] for f in FAMILIES}
img_s = {f: table[f]["train img/s"] for f in FAMILIES}

lines = []
if SMOKE:
    lines.append("In the smoke tier every family trained for a couple of steps: the accuracy "
                 "columns are noise, only the speeds mean something.")  # fmt: skip
elif len(choice.not_useful) == len(FAMILIES):
    lines.append(f"No family has learned enough to recommend yet (after "
                 f"{max(i['steps'] for i in trained.values())} steps at most): the accuracy "
                 "rankings below mean nothing in this run; the speeds do.")  # fmt: skip
for f, why in choice.not_useful.items():
    lines.append(f"**{NAMES[f]} is not recommended:** {why}.")

f = choice.best_boxes
lines.append(f"**Boxes:** box AP {listing(best('box AP'), 'box AP')}. "
             + ("None of them is worth taking for boxes yet." if f is None else
                f"For boxes take {NAMES[f]} (AP50 {table[f]['box AP50']:.3f})"
                + (": it makes no masks, and when boxes are all you need it is the best here."
                   if f == "retinanet" else ".")))  # fmt: skip

lines.append(f"**Masks:** mask AP {listing(best('mask AP'), 'mask AP')}; RetinaNet makes none.")
f, g = choice.best_masks, choice.fastest_masks
if f is None:
    lines.append("None of the mask models is worth taking yet.")
elif choice.trade_off:
    lines.append(f"**The trade-off:** for the best masks take {NAMES[f]}; if each image must be "
                 f"answered quickly take {NAMES[g]}, which gives up "
                 f"{table[f]['mask AP'] - table[g]['mask AP']:.3f} mask AP for a "
                 f"{choice.latency_ratio:.1f}× lower latency.")  # fmt: skip
elif f == g:
    others = [k for k in FAMILIES if k != f and measured[k].makes_masks
              and k not in choice.not_useful]  # fmt: skip
    lines.append(f"**No trade-off in this run:** {NAMES[f]} "
                 + ("makes both the best masks and the fastest ones." if others else
                    "is the only mask model worth taking."))  # fmt: skip
else:
    lines.append(f"**No trade-off in this run:** for masks take {NAMES[f]}. {NAMES[g]} answers "
                 f"only {choice.latency_ratio:.2f}× faster, within the noise of a timing "
                 f"(under {SPEED_NOISE_RATIO:g}×).")  # fmt: skip

fast, slow = min(FAMILIES, key=ms.get), max(FAMILIES, key=ms.get)
if ms[slow] / ms[fast] >= SPEED_NOISE_RATIO:
    lines.append(f"**Speed of prediction:** {NAMES[fast]} answers fastest, {ms[fast]:.1f} ms for "
                 f"one image on this {DEVICE_NAME}, {ms[slow] / ms[fast]:.1f}× faster than "
                 f"{NAMES[slow]} ({ms[slow]:.1f} ms).")  # fmt: skip
else:
    lines.append(f"**Speed of prediction:** all four answer one image in {ms[fast]:.1f} to "
                 f"{ms[slow]:.1f} ms on this {DEVICE_NAME}: within {SPEED_NOISE_RATIO:g}× of "
                 "each other, none is clearly faster.")  # fmt: skip
fast, slow = max(FAMILIES, key=img_s.get), min(FAMILIES, key=img_s.get)
if img_s[fast] / img_s[slow] >= SPEED_NOISE_RATIO:
    lines.append(f"**Speed of training:** {NAMES[fast]} trained on the most images per second "
                 f"({img_s[fast]:.1f}), {NAMES[slow]} on the fewest ({img_s[slow]:.1f}): in the "
                 f"same minutes {NAMES[fast]} sees {img_s[fast] / img_s[slow]:.1f}× as many "
                 "images.")  # fmt: skip
else:
    lines.append(f"**Speed of training:** all four trained on {img_s[slow]:.1f} to "
                 f"{img_s[fast]:.1f} images per second: within {SPEED_NOISE_RATIO:g}× of each "
                 "other, none is clearly faster.")  # fmt: skip

for f in FAMILIES:
    kind, count, total = worst_kind(f)
    what = "masks" if NAMES[f] in errors["segm"] else "boxes"
    if total == 0:
        lines.append(f"{NAMES[f]} makes no error at all ({what}, IoU {IOU_THR}).")
    else:
        lines.append(f"{NAMES[f]}'s most frequent error ({what}, IoU {IOU_THR}, score ≥ "
                     f"{SCORE_THR}): *{kind}*, {count} of its {total}.")  # fmt: skip
by_source = {}
for f, info in trained.items():
    by_source.setdefault(info["loaded"], []).append(NAMES[f])
budget = "" if TRAIN_BUDGET_S is None else f" ({TRAIN_BUDGET_S:g} s each)"
where = {True: "loaded from their notebooks", False: f"trained here{budget}"}
lines.append("All of this holds for these models — "
             + "; ".join(f"{', '.join(n)} {where[s]}" for s, n in by_source.items())
             + f" — on {IMAGE_SIZE}² shapes images and this {DEVICE_NAME}: train longer and the "
             "accuracy columns change, move to another device and the speed columns do.")  # fmt: skip
display(Markdown("\n\n".join(lines)))
