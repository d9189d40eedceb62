"""Training recipes for the three tiers: what the notebooks and the demo train, and for how long.

Most people who open the notebooks have a laptop, not a GPU. Every notebook and the demo
therefore run in one of three **tiers**:

- ``"smoke"``: tiny images, a few steps, seconds. It proves that the code runs (the test suite
  sets ``INSTSEG_SMOKE=1``); the model learns nothing.
- ``"cpu"``: a real training of a few minutes on a laptop-class CPU (two cores): small ResNet-18
  models on 128 px images, kept in memory (:class:`~instseg_edu.data.memory.InMemoryDataset`),
  trained with AdamW, the ResNet of RetinaNet, Mask R-CNN and YOLACT first pretrained for a
  minute as a classifier of the training objects' crops (``pretrain_seconds``,
  :mod:`instseg_edu.engine.pretrain`; YOLACT's only when it does not start from a trained
  backbone). The loss falls visibly and the larger objects come out right.
- ``"gpu"``: the full ResNet-50-FPN models on 512 px images, thousands of steps.

:func:`select_tier` picks one (``INSTSEG_TIER`` wins, then ``INSTSEG_SMOKE=1``, then the device),
:data:`RECIPES` holds one :class:`Recipe` per model family and tier, and :func:`describe_tier`
says which tier runs and how long its training should take on this machine, from a couple of
training steps timed here (:func:`measure_step_seconds`).

A recipe's field names are :class:`~instseg_edu.engine.train.TrainConfig`'s (``max_steps``,
``lr``, ``optimizer``, ``weight_decay``, ``warmup_steps``, ``schedule``, ``grad_clip``);
``model`` names a preset constant of the family's module (``MASK_RCNN_R18_CPU`` in
:mod:`instseg_edu.models.mask_rcnn`).
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from instseg_edu.data.shapes import (
    CLASSES,
    SHAPES_PER_IMAGE,
    check_shapes_per_image,
    make_shapes_dataset,
    render_image,
    split_name,
)
from instseg_edu.data.transforms import (
    check_ratio_range,
    collate,
    eval_transforms,
    train_transforms,
)
from instseg_edu.models import BUILDERS, build_model

TIERS = ("smoke", "cpu", "gpu")
FAMILIES = ("retinanet", "mask_rcnn", "solo", "yolact")

TIER_ENV = "INSTSEG_TIER"
"""Environment variable naming the tier; it wins over everything else."""
SMOKE_ENV = "INSTSEG_SMOKE"
"""``INSTSEG_SMOKE=1`` selects the smoke tier (what the test suite sets)."""
STEPS_ENV = "INSTSEG_TRAIN_STEPS"
"""Overrides a notebook recipe's ``max_steps`` (e.g. a browser test that watches the dashboard)."""

NOTEBOOK_SMOKE_IMAGE_SIZE = 128
"""Smoke-tier image size of the notebooks: they draw their images, so 64 px would show nothing."""


def select_tier() -> str:
    """The tier to run: ``"smoke"``, ``"cpu"`` or ``"gpu"``.

    ``INSTSEG_TIER`` when set (any of the three; it wins over everything else), else ``"smoke"``
    when ``INSTSEG_SMOKE=1``, else ``"gpu"`` when CUDA is available and ``"cpu"`` without.

    Raises:
        ValueError: ``INSTSEG_TIER`` is set to something else.
    """
    tier = os.environ.get(TIER_ENV)
    if tier is not None:
        if tier not in TIERS:
            raise ValueError(f"{TIER_ENV}={tier!r} must be one of {', '.join(TIERS)}")
        return tier
    if os.environ.get(SMOKE_ENV) == "1":
        return "smoke"
    return "gpu" if torch.cuda.is_available() else "cpu"


def _tier_reason() -> str:
    if os.environ.get(TIER_ENV) is not None:
        return f"{TIER_ENV}={os.environ[TIER_ENV]}"
    if os.environ.get(SMOKE_ENV) == "1":
        return f"{SMOKE_ENV}=1"
    return "CUDA is available" if torch.cuda.is_available() else "no CUDA device"


@dataclass(frozen=True)
class Recipe:
    """One family's training at one tier.

    Attributes:
        family: ``"retinanet"``, ``"mask_rcnn"``, ``"solo"`` or ``"yolact"``.
        tier: ``"smoke"``, ``"cpu"`` or ``"gpu"``.
        model: name of a preset constant in the family's module, e.g. ``"MASK_RCNN_R18_CPU"``.
        image_size: side of the drawn shapes images, pixels (they are square).
        train_size, test_size: longest side the training / test pipeline resizes each image to,
            pixels (MMDetection's ``Resize`` scale in ``train_pipeline`` / ``test_pipeline``);
            ``None``: ``image_size`` (:attr:`train_side`, :attr:`test_side`). A test size above
            the training size shows every shape larger than the model saw it in training.
        merge_test_sizes, size_cuts: further test sizes, and the box sizes (longest side,
            pixels of the original image, increasing) between the sizes' ranges: the validation
            images are predicted at :attr:`test_sizes` (``test_side`` first) and each size keeps
            the boxes of its range, the first size the smallest boxes
            (:func:`~instseg_edu.engine.evaluate.merge_scales`, SNIP's valid ranges). ``()``:
            one size. ``instseg-edu demo`` reports and draws the merge (one process only).
        num_train, num_val: shapes images in the training and validation splits.
        batch_size: images per optimiser step.
        max_steps: optimiser steps.
        lr, optimizer, weight_decay, warmup_steps, schedule, grad_clip, lr_mult: as in
            :class:`~instseg_edu.engine.train.TrainConfig`.
        in_memory: decode the training and validation images once and keep them in memory
            (:class:`~instseg_edu.data.memory.InMemoryDataset`), loading in the main process.
        workers: DataLoader worker processes when not ``in_memory``.
        color_jitter: colour jitter in the training augmentation
            (:func:`~instseg_edu.data.transforms.train_transforms`); flips are always on.
        train_shapes_per_image: ``(low, high)``, how many shapes are painted on each training
            image (:func:`~instseg_edu.data.shapes.make_shapes_dataset`'s ``shapes_per_image``).
            The standard dataset's :data:`~instseg_edu.data.shapes.SHAPES_PER_IMAGE` = (3, 10),
            or more: more objects to learn from in each step's images. Another range draws its own
            training split (:attr:`train_split`); validation is always the standard split.
        max_minutes: a time budget, or ``None``: training ends after this many minutes, its
            schedule following the clock (:class:`~instseg_edu.engine.train.TrainConfig`'s
            ``max_seconds``); ``max_steps`` is then an upper bound. :func:`fit_to_minutes` sets
            both. The pretraining's seconds come before it, outside it.
        expected_minutes: training minutes of these ``max_steps`` on the machine the tier is
            for (two CPU cores for ``"cpu"``), ``None`` where not measured; :func:`describe_tier`
            measures this machine. Change a recipe with :meth:`override`, which keeps it true.
        pretrain_seconds: seconds of classification pretraining of the ResNet on the training
            set's object crops before the detector trains
            (:func:`~instseg_edu.engine.pretrain.pretrain_backbone`: the stand-in for ImageNet
            weights), or ``None``: none.
        ratio_range: ``(low, high)``, scale jitter in the training augmentation: each image's
            longest side becomes ``train_side`` times a ratio drawn from this range, and a window
            of at most ``train_side`` is kept (:class:`~instseg_edu.data.transforms.
            RandomResizeCrop`; MMDetection's ``RandomResize`` ``ratio_range`` with
            ``RandomCrop``), or ``None``: none.
        cpu_amp: train under bf16 autocast on a CPU with bf16 instructions
            (:class:`~instseg_edu.engine.train.TrainConfig`'s ``cpu_amp``; float32 on other CPUs).
            The cpu tier's recipes do: on such a CPU a step takes 0.65 to 1.0 times as long
            (Mask R-CNN's about 0.75, SOLO's frozen one about the same), and the same minutes
            learn more (``benchmarks/RESULTS.md``, twentieth and twenty-fifth rounds).
        freeze_backbone: when the backbone starts from another trained model (a notebook's
            ``BACKBONE_FROM``, ``instseg-edu demo --backbone-from``), keep what was loaded frozen
            (:func:`~instseg_edu.engine.checkpoint.load_backbone`'s ``freeze``): only the heads
            learn, and each step skips the backbone's backward pass. From random weights it does
            nothing.
        note: one line on what to expect from the trained model.
    """

    family: str
    tier: str
    model: str
    image_size: int
    num_train: int
    num_val: int
    batch_size: int
    max_steps: int
    lr: float
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    schedule: str = "cosine"
    grad_clip: float | None = 35.0
    lr_mult: dict[str, float] | None = None
    in_memory: bool = False
    workers: int = 4
    color_jitter: bool = True
    train_shapes_per_image: tuple[int, int] = SHAPES_PER_IMAGE
    max_minutes: float | None = None
    expected_minutes: float | None = None
    note: str = ""
    train_size: int | None = None
    test_size: int | None = None
    pretrain_seconds: float | None = None
    ratio_range: tuple[float, float] | None = None
    merge_test_sizes: tuple[int, ...] = ()
    size_cuts: tuple[float, ...] = ()
    freeze_backbone: bool = False
    cpu_amp: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} must be one of {FAMILIES}")
        if self.tier not in TIERS:
            raise ValueError(f"tier={self.tier!r} must be one of {TIERS}")
        for name in ("image_size", "num_train", "num_val", "batch_size", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int or None")
        for name in ("max_minutes", "pretrain_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value!r} must be > 0 or None")
        # a list when read back from a checkpoint
        shapes = check_shapes_per_image(self.train_shapes_per_image, "train_shapes_per_image")
        object.__setattr__(self, "train_shapes_per_image", shapes)
        if self.ratio_range is not None:
            object.__setattr__(self, "ratio_range", check_ratio_range(self.ratio_range))
        sizes, cuts = tuple(self.merge_test_sizes), tuple(float(c) for c in self.size_cuts)
        if any(not isinstance(v, int) or v < 1 for v in sizes):
            raise ValueError(f"merge_test_sizes={sizes!r} must be positive ints")
        if len(cuts) != len(sizes) or any(c <= 0 for c in cuts) or cuts != tuple(sorted(set(cuts))):
            raise ValueError(f"size_cuts={cuts!r} must be one positive size per merge_test_sizes "
                             f"entry ({len(sizes)}), increasing")  # fmt: skip
        object.__setattr__(self, "merge_test_sizes", sizes)  # tuples, also from a checkpoint
        object.__setattr__(self, "size_cuts", cuts)

    def override(self, **changes) -> Recipe:
        """A copy with ``changes`` (any fields) whose ``expected_minutes`` still describes it.

        A new ``max_steps`` scales the expected time (105 steps of a 420-step recipe expected to
        take 4.8 min: 4.8 x 105 / 420 = 1.2 min), the pretraining's seconds apart (they do not
        scale); a new model, image size, batch size or data path makes it ``None``, since the
        time per step was measured for the recipe's own.
        """
        new = dataclasses.replace(self, **changes)
        if "expected_minutes" in changes or self.expected_minutes is None:
            return new
        step_cost = ("model", "image_size", "train_size", "batch_size", "in_memory", "workers",
                     "train_shapes_per_image", "freeze_backbone")  # fmt: skip
        if any(getattr(new, name) != getattr(self, name) for name in step_cost):
            return dataclasses.replace(new, expected_minutes=None)
        old_pretrain, new_pretrain = ((r.pretrain_seconds or 0) / 60 for r in (self, new))
        training = (self.expected_minutes - old_pretrain) * new.max_steps / self.max_steps
        return dataclasses.replace(new, expected_minutes=new_pretrain + training)

    def model_config(self, num_classes: int):
        """The preset named by ``model``, for ``num_classes`` foreground classes."""
        module = importlib.import_module(BUILDERS[self.family][0])
        cfg = getattr(module, self.model, None)
        if cfg is None:
            raise ValueError(f"model={self.model!r} is not a preset of {module.__name__}")
        return cfg.with_num_classes(num_classes)

    def build_model(self, num_classes: int) -> torch.nn.Module:
        """A freshly initialised model of this recipe."""
        return build_model(self.family, self.model_config(num_classes))

    def train_config(self, **overrides):
        """The :class:`~instseg_edu.engine.train.TrainConfig` of this recipe; ``overrides`` set
        any other field (``device``, ``seed``, ``log_every``, ``progress``, ...)."""
        from instseg_edu.engine.train import TrainConfig

        settings = dict(
            max_steps=self.max_steps,
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            grad_clip=self.grad_clip,
            lr_mult=self.lr_mult,
            max_seconds=None if self.max_minutes is None else 60 * self.max_minutes,
            cpu_amp=self.cpu_amp,
        )
        settings.update(overrides)
        if "warmup_steps" not in overrides:  # a shortened run warms up for at most its length
            settings["warmup_steps"] = min(self.warmup_steps, settings["max_steps"])
        return TrainConfig(**settings)

    @property
    def train_side(self) -> int:
        """Longest side of a training image at the network's input: ``train_size`` or
        ``image_size``."""
        return self.image_size if self.train_size is None else self.train_size

    @property
    def test_side(self) -> int:
        """Longest side of a validation image at the network's input: ``test_size`` or
        ``image_size``."""
        return self.image_size if self.test_size is None else self.test_size

    @property
    def test_sizes(self) -> tuple[int, ...]:
        """Every size the validation images are predicted at: :attr:`test_side`, then
        ``merge_test_sizes``."""
        return (self.test_side, *self.merge_test_sizes)

    @property
    def train_split(self) -> str:
        """Name of the training split: ``"train"`` for the standard dataset, else
        ``"train-<low>-<high>-shapes"`` (its own images, next to the standard splits)."""
        return split_name("train", self.train_shapes_per_image)

    def make_train_split(
        self, root: str | os.PathLike, seed: int = 0, num_images: int | None = None
    ) -> tuple[Path, Path]:
        """Generate (or reuse) this recipe's training split under ``root``: ``num_images``
        (default ``num_train``) images with ``train_shapes_per_image`` shapes each.

        Returns:
            ``(annotation JSON, image folder)``.
        """
        num = self.num_train if num_images is None else num_images
        ann_file = make_shapes_dataset(root, num, self.image_size, seed, self.train_split,
                                       shapes_per_image=self.train_shapes_per_image)  # fmt: skip
        return ann_file, Path(root) / self.train_split

    def shapes_datasets(self, root: str | os.PathLike, seed: int = 0):
        """Generate (or reuse) the shapes splits of this recipe under ``root`` and open them:
        :meth:`make_train_split` and the standard ``val`` split.

        Returns:
            ``(train_set, val_set)``: training with :func:`~instseg_edu.data.transforms.
            train_transforms` (resize to :attr:`train_side`, flip, and colour jitter when
            ``color_jitter``), validation with only the resize to :attr:`test_side`; both kept
            in memory when ``in_memory``.
        """
        from instseg_edu.data.coco import CocoDataset

        root = Path(root)
        train_json, train_dir = self.make_train_split(root, seed)
        val_json = make_shapes_dataset(root, self.num_val, self.image_size, seed, "val")
        augment = train_transforms(
            self.train_side, jitter=self.color_jitter, ratio_range=self.ratio_range
        )
        val_set = CocoDataset(val_json, root / "val", eval_transforms(self.test_side))
        if not self.in_memory:
            return CocoDataset(train_json, train_dir, augment), val_set
        from instseg_edu.data.memory import InMemoryDataset

        train_set = CocoDataset(train_json, train_dir, eval_transforms(self.train_side))
        return InMemoryDataset(train_set, augment), InMemoryDataset(val_set)

    @property
    def loader_workers(self) -> int:
        """DataLoader workers: none for an in-memory dataset (nothing to decode)."""
        return 0 if self.in_memory else self.workers

    def as_dict(self) -> dict:
        """Plain data (for a checkpoint, which :func:`torch.load` reads with ``weights_only``)."""
        return dataclasses.asdict(self)


def _cpu(family: str, model: str, **kw) -> Recipe:
    # 128 px images kept in memory, AdamW (from scratch it starts faster than SGD), cosine decay.
    # bf16 autocast where the CPU has bf16 instructions (cpu_amp; float32 elsewhere). 3000
    # training images, not 1000: in 4-4.5 minutes a model goes through 1000 images 15-30 times
    # and starts to learn them by heart (YOLACT's training class loss fell to 0.23 while half its
    # boxes on the medium validation shapes named the wrong class). Box AP50 at each recipe's
    # test size with 3000 images, one run each from the same start: Mask R-CNN 0.71 -> 0.74
    # (mask 0.69 -> 0.73), RetinaNet 0.60 -> 0.65, YOLACT 0.59 -> 0.70, SOLO 0.40 -> 0.45
    # (benchmarks/RESULTS.md, twenty-ninth round). They are drawn and read into memory in 10-20 s
    # and take 180-250 MiB.
    settings = dict(image_size=128, num_train=3000, num_val=200, batch_size=8,
                    optimizer="adamw", weight_decay=0.05, warmup_steps=50, grad_clip=10.0,
                    in_memory=True, workers=0, cpu_amp=True)  # fmt: skip
    settings.update(kw)
    return Recipe(family, "cpu", model, **settings)


def _gpu(family: str, model: str, **kw) -> Recipe:
    # ResNet-50-FPN from random weights at 512 px: MMDetection-style SGD with a warm-up.
    settings = dict(image_size=512, num_train=2000, num_val=200, batch_size=16, max_steps=3000,
                    optimizer="sgd", lr=0.01, weight_decay=1e-4, warmup_steps=500,
                    grad_clip=35.0, workers=4)  # fmt: skip
    settings.update(kw)
    return Recipe(family, "gpu", model, **settings)


def _smoke(cpu: Recipe) -> Recipe:
    # Seconds on any machine: the CPU tier's model, optimiser and data path on a few 64 px images.
    return dataclasses.replace(cpu, tier="smoke", image_size=64, train_size=None, test_size=None,
                               merge_test_sizes=(), size_cuts=(),
                               num_train=8, num_val=4, batch_size=2, max_steps=2, warmup_steps=1,
                               expected_minutes=None, note="",
                               pretrain_seconds=0.5 if cpu.pretrain_seconds else None)  # fmt: skip


RECIPES: dict[tuple[str, str], Recipe] = {
    # RetinaNet: a half-width ResNet-18 with GroupNorm in the head and smaller anchors
    # (RETINANET_R18_CPU), trained as Mask R-CNN on images with 10-20 shapes (more positives per
    # step) and scored on the validation images resized to 192 px (test_size: its small shapes
    # then come closer to its smallest anchors, 16 px). Box AP50 at equal minutes, one change
    # after another: 0.23 -> 0.31 (GroupNorm) -> 0.35 (denser images) -> 0.39 (the half-width
    # backbone and lr 2e-3: more steps) -> 0.44 (scored at 192 px); benchmarks/RESULTS.md,
    # "RetinaNet's CPU recipe". Then the ResNet starts from a minute of classification
    # pretraining on the training set's object crops (pretrain_seconds; engine.pretrain, the
    # stand-in for ImageNet weights): 0.41 -> 0.47 in the same 4.5 minutes (benchmarks/RESULTS.md,
    # "Pretraining the backbone on object crops"). A step of 4 images took 0.10 s on the two cores
    # it was tuned on, so the pretraining and 1800 steps take about 4 minutes there; notebook 04
    # and the demo train by the clock instead. Its boxes of 32 px or more come from a second pass
    # at 128 px, as Mask R-CNN's: at 192 px a medium shape looks larger than any it trained on
    # (four runs: the medium shapes' APm 0.15-0.16 -> 0.25-0.31, their boxes 35-45 % -> 43-54 %
    # right, box AP50 -0.003 to +0.014; benchmarks/RESULTS.md, twenty-first round).
    ("retinanet", "cpu"): _cpu(
        "retinanet", "RETINANET_R18_CPU", batch_size=4, max_steps=1800, lr=2e-3,
        train_shapes_per_image=(10, 20), test_size=192, merge_test_sizes=(128,),
        size_cuts=(32.0,), expected_minutes=4.0, pretrain_seconds=60.0,
        note="boxes only; most shapes found, at scores of 0.3-0.5, often beside a second box "
        "naming another class",
    ),
    ("retinanet", "gpu"): _gpu(
        "retinanet", "RETINANET_R50_FPN_SCRATCH", num_train=3000, batch_size=8, lr=0.02,
        warmup_steps=300, grad_clip=10.0,
    ),
    # Mask R-CNN: the CPU tier's best masks (MASK_RCNN_R18_CPU: a half-width ResNet-18, 32 RoIs
    # per image, 7x7 mask RoIs, 14x14 masks), trained on images with 10-20 shapes: from scratch
    # the model learns from how many objects it has looked at, and a denser image shows twice as
    # many. Its ResNet starts from a minute of classification pretraining on the training set's
    # object crops (pretrain_seconds): 0.51 -> 0.57 box AP50 and 0.50 -> 0.55 mask AP50 in the
    # same 4.5 minutes (benchmarks/RESULTS.md, "Pretraining the backbone on object crops"). A step
    # of 8 images takes about 0.33 s on two quiet cores (with loading), so the pretraining and
    # 540 steps take about 4 minutes (on a busy hour, 0.5 s a step: docs/notebooks.md). `make demo`
    # trains for five minutes instead (`instseg-edu demo --minutes 5`), its schedule following
    # the clock: as many steps as its machine gives it. The box head learns at a fifth of the
    # rate: AdamW moves every weight by about lr per step, and the box head's first fc layer sums
    # 3136 inputs (64 channels x 7 x 7) where a 3x3 conv of the FPN sums 576, so at one rate its
    # outputs would move about five times as far per step (benchmarks/RESULTS.md, tenth round).
    # It trains on the 128 px images as drawn and is scored on them resized to 192 px (test_size):
    # a third of the validation shapes are 8-16 px across, and shown half as large again the
    # model finds and names more of them (box AP50 +0.05 for the same weights; training at a
    # larger size instead costs more per step than it gives: benchmarks/RESULTS.md, eleventh
    # round). Enlarged, though, its medium shapes look larger than any it trained on, and it finds
    # them half as often as at 128 px; so the demo keeps from the 192 px pass the boxes under
    # 32 px and takes the others from a second pass at 128 px (merge_test_sizes, size_cuts):
    # box / mask AP50 +0.04 for the same weights, the medium shapes' boxes 45 % -> 60 % right
    # (benchmarks/RESULTS.md, eighteenth round).
    ("mask_rcnn", "cpu"): _cpu(
        "mask_rcnn", "MASK_RCNN_R18_CPU", max_steps=540, lr=2e-3, expected_minutes=4.0,
        train_shapes_per_image=(10, 20), lr_mult={"bbox_head": 0.2}, test_size=192,
        merge_test_sizes=(128,), size_cuts=(32.0,), pretrain_seconds=60.0,
        note="most shapes that are not tiny found with a recognisable mask; most, not all, named "
        "right",
    ),
    ("mask_rcnn", "gpu"): _gpu(
        "mask_rcnn", "MASK_RCNN_R50_FPN", batch_size=8, lr=0.02, schedule="step",
    ),
    # SOLO and YOLACT: their small presets on Mask R-CNN's half-width ResNet-18 (SOLO_R18_CPU,
    # YOLACT_R18_CPU): a step costs about half as much, so the same minutes hold about twice the
    # steps, at lr 2e-3 as the other two. From random weights that is still not enough for
    # SOLO's category grid (mask AP50 0.06 after 4.5 minutes) and gives YOLACT's masks a start
    # (0.12). Their notebooks therefore start the backbone from notebook 06's trained Mask R-CNN
    # when it was saved (load_notebook_backbone: transfer learning, as the papers start from
    # ImageNet weights): in the same minutes mask AP50 0.15 (SOLO) and 0.33 (YOLACT), box AP50
    # 0.19 and 0.43 (benchmarks/RESULTS.md, thirteenth round). Without such a backbone (notebook 06
    # not run in this tier; `instseg-edu demo --model yolact` without --backbone-from) YOLACT's
    # ResNet is first pretrained for a minute on object crops (pretrain_seconds), as RetinaNet's and
    # Mask R-CNN's: box / mask AP50 0.27 / 0.18 -> 0.37 / 0.25-0.26 in the same 4.5 minutes
    # (notebook 08 alone and the demo; benchmarks/RESULTS.md, "YOLACT's prototypes"); so 1170 steps,
    # not 1500, fill the same minutes. A backbone that has learned already replaces the pretraining
    # (notebook 08 and the demo then skip it). SOLO gained nothing from it (mask AP50 0.057 ->
    # 0.060) and keeps its minutes for training. YOLACT's protonet learns at a fifth of the rate
    # (lr_mult): AdamW moves every weight by about lr per step, and at the full rate its last conv's
    # outputs could fall below zero everywhere within the first hundred steps; the final ReLU then
    # gives zero prototypes, no gradient reaches them, and the masks never learn (mask AP 0 in two
    # of five runs after the pretraining). At a fifth no run lost them; where they had lived at the
    # full rate, the fifth cost up to 0.02 mask AP50 (benchmarks/RESULTS.md, "YOLACT's prototypes").
    # YOLACT is scored at 192 px as Mask R-CNN (+0.05-0.09 mask AP50), its boxes of 32 px or more
    # from a second pass at 128 px, as Mask R-CNN's (box / mask AP50 0.516 / 0.417 -> 0.535 / 0.434
    # for notebook 08's weights, the medium shapes' boxes 27 % -> 44 % right; benchmarks/
    # RESULTS.md, nineteenth round); SOLO at 128 px, where its grids were fitted (192 px halved
    # its AP). SOLO's category branch takes the focal loss at gamma 1, alpha 0.5 (SOLO_R18_CPU):
    # mask AP50 +0.03 at equal steps, two seeds. On 1000 training images SOLO learned more with
    # notebook 06's ResNet and FPN frozen (freeze_backbone: a step skips the backbone's backward
    # pass, 0.11 s instead of 0.18, and the same minutes hold 1.7 times the steps; box / mask AP50
    # 0.28-0.29 / 0.24-0.25 -> 0.32-0.33 / 0.28 over two seeds, benchmarks/RESULTS.md, nineteenth
    # round), its heads at lr 4e-3 instead of 2e-3 (+0.02). On 3000 images, with its scale ranges
    # fitted to 128 px (SOLO_R18_CPU), the loaded backbone learns again, at the same 4e-3: box /
    # mask AP50 0.45-0.46 / 0.41-0.42 frozen -> 0.54-0.55 / 0.50-0.51 over two seeds, its boxes on
    # the medium shapes 52-53 % -> 60-63 % right (benchmarks/RESULTS.md, thirtieth round): the
    # coarser FPN levels, which Mask R-CNN had used for other things, now carry the larger shapes.
    # YOLACT's ResNet, under its own new FPN, lost 0.1 mask AP50 frozen. max_steps: 4.5 minutes
    # at 0.2 s a step.
    # With 3000 training images (_cpu) and YOLACT's semantic segmentation loss (YOLACT_R18_CPU),
    # YOLACT's merged box / mask AP50 came to 0.74 / 0.66 from 0.59 / 0.50, and its medium
    # shapes' boxes to 69 % right from 50 % (benchmarks/RESULTS.md, twenty-ninth round).
    ("solo", "cpu"): _cpu(
        "solo", "SOLO_R18_CPU", max_steps=1350, lr=4e-3, expected_minutes=4.5,
        note="from notebook 06's backbone: larger shapes found with their mask, many small ones "
        "missed; from random weights: few detections, mask AP near 0",
    ),
    ("solo", "gpu"): _gpu("solo", "SOLO_R50_FPN_SCRATCH"),
    ("yolact", "cpu"): _cpu(
        "yolact", "YOLACT_R18_CPU", max_steps=1170, lr=2e-3, expected_minutes=4.5,
        test_size=192, merge_test_sizes=(128,), size_cuts=(32.0,), pretrain_seconds=60.0,
        lr_mult={"mask_head": 0.2},
        note="from notebook 06's backbone: most shapes found, with rough masks, most of the "
        "larger ones named right; after the pretraining alone: the larger shapes found, masks "
        "rougher",
    ),
    ("yolact", "gpu"): _gpu("yolact", "YOLACT_R50_FPN"),
}  # fmt: skip
RECIPES.update({(family, "smoke"): _smoke(RECIPES[(family, "cpu")]) for family in FAMILIES})


def recipe(family: str, tier: str) -> Recipe:
    """The recipe of ``family`` at ``tier``.

    Raises:
        ValueError: an unknown family or tier (naming the choices).
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} must be one of {', '.join(FAMILIES)}")
    if tier not in TIERS:
        raise ValueError(f"tier={tier!r} must be one of {', '.join(TIERS)}")
    return RECIPES[(family, tier)]


NOTEBOOK_TRAIN_MINUTES = 4.5
"""The training notebooks' time limit in the ``cpu`` tier (:func:`notebook_train_minutes`)."""


def notebook_train_minutes(tier: str) -> float | None:
    """A training notebook's ``TRAIN_MINUTES``: :data:`NOTEBOOK_TRAIN_MINUTES` in the ``cpu``
    tier, where training ends at it, its schedule following the clock; ``None`` (the recipe's
    steps, no limit) in the other tiers and whenever ``INSTSEG_TRAIN_STEPS`` sets the steps."""
    if tier != "cpu" or os.environ.get(STEPS_ENV) is not None:
        return None
    return NOTEBOOK_TRAIN_MINUTES


def notebook_recipe(
    family: str,
    tier: str,
    minutes: float | None = None,
    pretrain: bool = True,
    backbone_from: str | None = None,
    root: str | os.PathLike = "runs",
) -> Recipe:
    """The recipe a notebook trains with: :func:`recipe`, with 128 px images in the smoke tier
    (notebooks draw them) and ``max_steps`` from ``INSTSEG_TRAIN_STEPS`` when set.

    ``pretrain=False`` (a notebook's ``PRETRAIN``): no pretraining on object crops
    (``pretrain_seconds=None``), its time going to the detector's training. The same when
    ``backbone_from`` names a family whose notebook saved its model in this tier under ``root``
    (:func:`notebook_checkpoint`; notebooks 07's and 08's ``BACKBONE_FROM``): the backbone will
    start from that trained model (:func:`load_notebook_backbone`), which has learned more than a
    minute of pretraining would teach it; with :attr:`Recipe.freeze_backbone` its steps are timed
    with the backbone frozen, as they will run.

    ``minutes`` (the training notebooks' ``TRAIN_MINUTES``, :func:`notebook_train_minutes`):
    instead of the recipe's steps, a time budget of that many minutes with its schedule following
    the clock, the steps that fit at the speed of a few steps timed now as a bound
    (:func:`fit_to_minutes`). Ignored in the smoke tier and when ``INSTSEG_TRAIN_STEPS`` is set.

    Raises:
        ValueError: ``INSTSEG_TRAIN_STEPS`` is not a positive integer; ``family``, ``tier`` or
            ``backbone_from`` unknown.
    """
    r = recipe(family, tier)
    if tier == "smoke":
        r = r.override(image_size=NOTEBOOK_SMOKE_IMAGE_SIZE)
    loads = backbone_from is not None and notebook_checkpoint(backbone_from, tier, root).is_file()
    if loads:
        pretrain = False
    if not pretrain:
        r = r.override(pretrain_seconds=None)
    steps = os.environ.get(STEPS_ENV)
    if steps is not None:
        try:
            value = int(steps)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{STEPS_ENV}={steps!r} must be a positive integer")
        r = r.override(max_steps=value)
    elif minutes is not None and tier != "smoke":
        frozen = loads and r.freeze_backbone  # the steps load_notebook_backbone will leave
        r = fit_to_minutes(r, minutes, measure_step_seconds(r, frozen_backbone=frozen))
    return r


def notebook_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where a notebook draws its shapes images.

    ``data_dir`` when given (kept between runs, e.g. ``"data/shapes"``: git-ignored); otherwise a
    new temporary folder, deleted when this Python process, the notebook's kernel, exits (a
    restart or shut-down), so runs do not pile up copies of the data in the temporary folder.
    """
    if data_dir:
        return Path(data_dir)
    root = Path(tempfile.mkdtemp(prefix="instseg_shapes_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def notebook_checkpoint(family: str, tier: str, root: str | os.PathLike = "runs") -> Path:
    """Where a notebook saves the model it trained: ``root/notebooks/<tier>/<family>.pt``.

    Notebooks 04 (RetinaNet), 06 (Mask R-CNN), 07 (SOLO) and 08 (YOLACT) write it with
    :func:`~instseg_edu.engine.checkpoint.save_checkpoint` (model state, recipe, history), so a
    later notebook can compare the four without training them again.
    """
    recipe(family, tier)  # validates both names
    return Path(root) / "notebooks" / tier / f"{family}.pt"


def save_notebook_model(
    model: torch.nn.Module, r: Recipe, history, train_set, root: str | os.PathLike = "runs"
) -> Path:
    """Save the model a notebook trained to :func:`notebook_checkpoint` (atomically).

    What is written is what ``instseg-edu evaluate --checkpoint`` and notebook 09 read: the model's
    state dict, the recipe ``r`` (plain data), the training history (its ``config`` holds the
    settings that actually ran) and ``meta``: family, preset name, the model's own config
    (``model.cfg``, which may differ from the preset when a notebook changed a knob), the class
    names, ``label_to_cat_id`` and the image size.

    Args:
        model: a trained model of ``r.family`` (it has a ``cfg``).
        r: the notebook's :class:`Recipe` (``tier`` and ``family`` name the file).
        history: the :class:`~instseg_edu.engine.train.History` ``train`` returned.
        train_set: the training dataset (``classes``, ``label_to_cat_id``).
        root: folder under which ``notebooks/<tier>/<family>.pt`` is written.

    Returns:
        The path written.
    """
    from instseg_edu.engine.checkpoint import config_to_dict, save_checkpoint

    meta = {
        "model": r.family,
        "preset": r.model,
        "model_config": config_to_dict(model.cfg),
        "classes": list(train_set.classes),
        "label_to_cat_id": list(train_set.label_to_cat_id),
        "image_size": r.test_side,  # what `instseg-edu evaluate` resizes images to
    }
    state = {"model": model.state_dict(), "recipe": r.as_dict(), "history": history.to_dict(),
             "meta": meta}  # fmt: skip
    return save_checkpoint(notebook_checkpoint(r.family, r.tier, root), state)


def load_notebook_backbone(
    model: torch.nn.Module,
    donor: str,
    tier: str,
    root: str | os.PathLike = "runs",
    freeze: bool = False,
) -> str:
    """Start ``model``'s backbone from the model an earlier notebook trained, if it was saved.

    SOLO and YOLACT from random weights learn too slowly for a few CPU minutes; their papers start
    the ResNet from ImageNet weights. Notebooks 07 and 08 start it instead from notebook 06's
    Mask R-CNN (``donor="mask_rcnn"``) of the same ``tier``, read from
    :func:`notebook_checkpoint` by :func:`~instseg_edu.engine.checkpoint.load_backbone` (the
    ResNet, and the FPN when it is the same neck; never the heads), and with ``freeze`` (the
    recipe's :attr:`Recipe.freeze_backbone`) keeps what it loaded frozen.

    Returns:
        One line for the notebook to print: what was loaded from where, or why the backbone keeps
        its random weights (no such checkpoint yet: run the donor's notebook first; or a
        checkpoint whose ResNet differs).

    Raises:
        ValueError: ``donor`` or ``tier`` is not a known family / tier.
    """
    from instseg_edu.engine.checkpoint import (
        CheckpointError,
        describe_backbone_load,
        load_backbone,
    )

    path = notebook_checkpoint(donor, tier, root)
    if not path.is_file():
        return (f"backbone: random weights ({path} not found: run the {donor} notebook in this "
                f"tier first to start from its trained backbone)")  # fmt: skip
    try:
        loaded = load_backbone(model, path, freeze=freeze)
    except CheckpointError as e:
        return f"backbone: random weights ({e})"
    return describe_backbone_load(loaded, path, frozen=freeze)


# --------------------------------------------------------------------------------------------------
# How long will it take here?
# --------------------------------------------------------------------------------------------------


def shapes_batch(
    batch_size: int,
    image_size: int,
    seed: int = 0,
    shapes_per_image: tuple[int, int] = SHAPES_PER_IMAGE,
    resize_to: int | None = None,
):
    """A :class:`~instseg_edu.structures.Batch` of freshly drawn shapes images (nothing written
    to disk): the same kind of images and objects the recipes train on (``shapes_per_image``
    shapes painted on each, resized to ``resize_to`` when given), for timing."""
    from instseg_edu.structures import Target

    items = []
    for index in range(batch_size):
        scene, shapes = render_image(seed, "timing", index, image_size, shapes_per_image)
        masks = torch.from_numpy(scene.masks.copy())  # [G, H, W] bool
        ys = masks.any(dim=2)  # [G, H]: rows each object touches
        xs = masks.any(dim=1)  # [G, W]
        arange_h = torch.arange(image_size)
        arange_w = torch.arange(image_size)
        y1 = torch.where(ys, arange_h, image_size).amin(1)
        y2 = torch.where(ys, arange_h, -1).amax(1) + 1
        x1 = torch.where(xs, arange_w, image_size).amin(1)
        x2 = torch.where(xs, arange_w, -1).amax(1) + 1
        boxes = torch.stack([x1, y1, x2, y2], dim=1).float()  # [G, 4] xyxy
        labels = torch.tensor([CLASSES.index(shapes[k].kind) for k in scene.kept.tolist()])
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255  # [3, H, W]
        target = Target(boxes, labels.long(), masks, image_id=index + 1)
        if resize_to is not None:
            image, target = eval_transforms(resize_to)(image, target)
        items.append((image, target))
    return collate(items)


def measure_step_seconds(
    r: Recipe,
    steps: int = 3,
    device: str = "auto",
    model: torch.nn.Module | None = None,
    frozen_backbone: bool = False,
    **train_overrides,
) -> float:
    """Seconds per training step of recipe ``r`` on this machine (of a built ``model`` instead of
    the recipe's preset when given, which is trained in place: variants of it, as
    ``benchmarks/cpu_recipe.py`` times). ``frozen_backbone``: the preset with its whole backbone
    frozen (:meth:`~instseg_edu.models.backbone.BackboneWithFPN.freeze`), as a recipe with
    :attr:`Recipe.freeze_backbone` trains from a loaded ResNet and FPN. ``train_overrides``:
    other :class:`~instseg_edu.engine.train.TrainConfig` fields (``amp=False``, say).

    Builds the recipe's model, runs one warm-up step, then times ``steps`` real training steps
    (forward, loss, backward, optimiser update: :func:`~instseg_edu.engine.train.train` itself)
    on a batch of freshly drawn shapes images of the recipe's size, and returns the median step:
    one step slowed by another program (a browser starting, say) does not make a five-minute
    training look like fifty. Data loading is not counted (an in-memory recipe barely has any).
    """
    from instseg_edu.engine.train import resolve_device, train

    # Building the model draws random numbers and train() seeds every generator: leave the
    # caller's random numbers as they were.
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        dev = resolve_device(device)
        if model is None:
            model = build_model(r.family, r.model_config(len(CLASSES)))
            if frozen_backbone:
                model.backbone.freeze()
        batch = shapes_batch(r.batch_size, r.image_size, shapes_per_image=r.train_shapes_per_image,
                             resize_to=r.train_size)  # fmt: skip
        cfg = r.train_config(max_steps=1, device=str(dev), progress=False, warmup_steps=0,
                             max_seconds=None, **train_overrides)  # fmt: skip
        train(model, [batch], cfg)  # warm-up: allocations, kernel selection
        cfg = dataclasses.replace(cfg, max_steps=steps)
        clock = _StepClock(dev)
        train(model, [batch] * steps, cfg, callbacks=[clock])
        return float(np.median(np.diff(clock.times)))
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class _StepClock:
    """A training callback noting the time at the start and at the end of every step (after the
    device has finished it)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def _note(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def on_start(self, state) -> None:
        self._note()

    def on_step(self, state) -> None:
        self._note()


PLAN_MARGIN = 1.3
"""How much longer a real training step takes than one timed by :func:`measure_step_seconds`:
the real one also loads and augments its batch, its images hold other numbers of objects, and a
shared machine has slower minutes. 1.1 to 1.45 on two CPU cores (notebook 09's four families;
0.95 to 1.4 in nine runs of the CPU demo's Mask R-CNN), so an estimate allows 1.3
(:func:`describe_tier`). The other way round happens too: notebook 04's RetinaNet, its images in
memory, ran its steps at 0.7 to 0.9 times the timed one (:func:`fit_to_minutes` allows it)."""


def slow_step_warning(r: Recipe, seconds_per_step: float, factor: float = 3.0) -> str | None:
    """A warning when a step timed here (:func:`measure_step_seconds`) takes more than ``factor``
    times as long as on the machine recipe ``r`` was timed on, else ``None``.

    That machine's timed step is the recipe's training time (``expected_minutes`` less the
    pretraining) per step, divided by :data:`PLAN_MARGIN` (its real steps also loaded their
    batches). A time budget then holds that many times fewer steps, and the model learns much
    less than the recipe's figures say; most often another program is using the cores (a
    demo sharing two cores with a test run timed 4.98 s a step instead of about 0.2 s, trained
    77 steps, and reached box AP50 0.03). ``None`` also when the recipe has no
    ``expected_minutes``.
    """
    if r.expected_minutes is None or not seconds_per_step > 0:
        return None
    there = (60 * r.expected_minutes - (r.pretrain_seconds or 0)) / r.max_steps / PLAN_MARGIN
    if seconds_per_step <= factor * there:
        return None
    return (f"warning: a step takes {seconds_per_step / there:.0f} times as long here as on the "
            f"machine this recipe was timed on ({seconds_per_step:.2f} s against about "
            f"{there:.2f} s): the same minutes hold that many times fewer steps, and the model "
            "will learn much less; is another program using the CPU?")  # fmt: skip


def fit_to_minutes(
    r: Recipe, minutes: float, seconds_per_step: float, margin: float = 0.6
) -> Recipe:
    """``r`` trained for ``minutes``: a time budget (``max_minutes``) whose schedule follows the
    clock, with as many steps as fit when a step takes ``margin`` x ``seconds_per_step`` (a
    pre-timed step, :func:`measure_step_seconds`) as the upper bound; at least one step.
    ``minutes`` covers the whole run: the recipe's ``pretrain_seconds`` first, then the
    detector's training in the minutes left (``max_minutes``).

    A step's time differs from machine to machine, and on a shared machine from hour to hour (the
    CPU tier's Mask R-CNN step took 0.31 to 0.56 s on the same two cores), so a fixed step count
    cannot promise a time, and a plan that allows for a slow hour leaves a fast hour's minutes
    unused. With the budget, the learning rate's schedule is at the larger of the fraction of
    steps done and the fraction of minutes used (:func:`~instseg_edu.engine.train.lr_at`), and
    training ends at ``minutes`` with the rate decayed, however long the steps take today. A real
    step takes 0.7 to 1.45 times a timed one (:data:`PLAN_MARGIN`; RetinaNet's in-memory steps
    are the quick end), so at the default ``margin=0.6`` the clock, not the step count, ends the
    run: ``instseg-edu demo --minutes`` and the training notebooks' cpu tier use it so. (At 0.8 a
    notebook 04 run stopped at its 2017 steps after 184 of its 210 s.) A bound set too high costs
    nothing: the warm-up counts its own steps (at most the new length,
    :meth:`Recipe.train_config`), and the schedule follows the clock. ``expected_minutes`` becomes
    ``None``: the time now belongs to this machine, not to the one the tier was timed on.

    Raises:
        ValueError: ``minutes``, ``seconds_per_step`` or ``margin`` not positive; ``minutes`` no
            longer than the pretraining.
    """
    for name, value in (("minutes", minutes), ("seconds_per_step", seconds_per_step),
                        ("margin", margin)):  # fmt: skip
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0")
    training = minutes - (r.pretrain_seconds or 0) / 60
    if not training > 0:
        raise ValueError(f"minutes={minutes!r} leaves no time to train after the "
                         f"pretraining's {r.pretrain_seconds:g} s (pretrain_seconds)")  # fmt: skip
    steps = max(1, int(training * 60 / (margin * seconds_per_step)))
    return r.override(max_steps=steps, max_minutes=training, expected_minutes=None)


def describe_tier(
    tier: str,
    r: Recipe | None = None,
    *,
    measure: bool = True,
    reason: str | None = None,
    frozen_backbone: bool = False,
) -> str:
    """One line: which tier runs, why, and how long its training should take on this machine.

    With a recipe of the ``cpu`` or ``gpu`` tier and ``measure``, the time is ``max_steps`` x the
    seconds per step measured now (:func:`measure_step_seconds`, a few seconds) x
    :data:`PLAN_MARGIN` (a real step also loads its batch); in parentheses follows the recipe's
    ``expected_minutes`` for the machine the tier is for (scaled to the steps run when the recipe
    was changed with :meth:`Recipe.override`). ``reason`` says why this tier was chosen (default:
    what :func:`select_tier` looked at). A recipe with a time budget (``max_minutes``, from
    :func:`fit_to_minutes`) is not timed again: the line gives the budget. ``frozen_backbone``:
    time the steps with the backbone frozen (:func:`measure_step_seconds`), as they will run.
    A cpu-tier recipe that trains in bf16 on this CPU (:attr:`Recipe.cpu_amp`) says so after the
    model's name.
    """
    head = f"tier {tier!r} ({reason or _tier_reason()})"
    if r is None:
        sizes = "small images, seconds" if tier == "smoke" else "full-size images"
        line = f"{head}: this notebook trains no model ({sizes})"
    elif tier == "smoke":
        line = (
            f"{head}: {r.model} on {r.num_train} images of {r.image_size} px, {r.max_steps} "
            "steps: seconds; it proves the code runs and learns nothing"
        )
    else:
        from instseg_edu.engine.train import cpu_has_native_bf16

        bf16 = r.cpu_amp and tier == "cpu" and cpu_has_native_bf16()
        what = (
            f"{r.model}"
            + (" in bf16 (this CPU has bf16 instructions)" if bf16 else "")
            + f", {r.num_train} images of {r.train_side} px"
            + ("" if r.test_side == r.train_side else f" (scored at {r.test_side} px)")
            + f", batch {r.batch_size}, {r.max_steps} steps"
        )
        pre = ""
        if r.pretrain_seconds is not None:
            pre = f", after {r.pretrain_seconds:g} s of pretraining its ResNet on object crops"
        if r.max_minutes is not None:
            line = (f"{head}: {what} at most{pre}: training ends at {r.max_minutes:g} min, its "
                    "learning rate following the clock")  # fmt: skip
        elif measure:
            seconds = measure_step_seconds(r, frozen_backbone=frozen_backbone)
            estimate = r.max_steps * seconds * PLAN_MARGIN / 60 + (r.pretrain_seconds or 0) / 60
            line = (f"{head}: {what}{pre}; {seconds:.2f} s per step measured here, so training "
                    f"takes about {estimate:.1f} min")  # fmt: skip
        else:
            line = f"{head}: {what}{pre}"
        if r.expected_minutes is not None:
            where = "two CPU cores" if tier == "cpu" else "one GPU"
            line += f" (about {_minutes(r.expected_minutes)} on {where})"
    return line


def _minutes(minutes: float) -> str:
    """``"4.8 min"``, or ``"40 s"`` under a minute."""
    return f"{minutes:.1f} min" if minutes >= 1 else f"{minutes * 60:.0f} s"
