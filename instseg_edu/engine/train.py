"""One training loop for every model family.

Every model follows the protocol of :mod:`instseg_edu.models`::

    outputs = model(batch.images)          # raw head tensors
    losses = model.loss(outputs, batch)    # {"loss_cls": .., "loss_bbox": .., "num_pos": ..}
    total = sum of the "loss_*" terms      # other keys are statistics, only logged

so :func:`train` never needs to know which family it trains. Around that it does what a real run
needs, each piece small enough to read:

- **device and precision**: CUDA when present, with bf16 autocast (no loss scaling needed: bf16 has
  float32's exponent range) and ``channels_last`` memory format (faster convolutions on tensor
  cores); the CPU otherwise, in float32 (``cpu_amp=True`` asks for bf16 there, on a CPU with bf16
  instructions, as the cpu tier's recipes do).
- **optimiser and schedule**: SGD or AdamW; linear warm-up from ``lr * warmup_ratio`` (as in
  MMDetection's ``LinearLR``), then step decay or cosine. The learning rate is a pure function of
  the step (:func:`lr_at`), so resuming needs nothing but the step number. With a time budget
  (``max_seconds``) the schedule follows the clock instead when the clock is ahead: the training
  ends on time with its learning rate decayed, however fast this machine is today; checkpoints
  keep the time used.
- **logging without stalls**: loss values stay on the GPU and are copied to the host every
  ``log_every`` steps in one transfer (a ``.item()`` per step would make the CPU wait for the GPU
  every step). :class:`History` keeps every step's loss terms, total, learning rate, img/s and
  statistics such as ``num_pos``.
- **callbacks**: objects with any of ``on_start``, ``on_step``, ``on_eval``, ``on_epoch``,
  ``on_end`` methods (a plain function is an ``on_step``); each gets a :class:`TrainState` and may
  call ``state.request_stop()``. Reading ``state.losses`` or ``state.history`` syncs pending values,
  so a dashboard that reads every 10th step costs one sync per 10 steps.
- **checkpoints**: atomic, ``weights_only``-loadable, with model, optimiser, step, epoch, history,
  every RNG state and the config; ``resume=`` continues with identical numbers (the data order of
  each epoch is seeded from ``(seed, epoch)``, already-consumed batches of the current epoch are
  skipped, and the RNG states are restored after that skip).
- **safety**: a non-finite loss raises :class:`NonFiniteLossError` naming the term and step, and no
  checkpoint is written from then on, so the last one on disk is good; ``KeyboardInterrupt`` (the
  stop button of a notebook) ends training cleanly and returns the :class:`History`.
- **several processes** (``torchrun``, see :mod:`instseg_edu.engine.distributed`): when a process
  group is initialised the same loop wraps the model in ``DistributedDataParallel`` (optionally
  with SyncBatchNorm), the loader must hand each process its share (:func:`make_loader` then uses
  a ``DistributedSampler``, re-seeded every epoch), the logged losses are averaged over the
  processes and img/s counts all of them, and only rank 0 draws the progress bar, calls the
  callbacks and writes checkpoints. ``batch_size`` is per process: the global batch is
  ``world_size * batch_size`` (:func:`scaled_lr` for the learning rate that goes with it).

Notebook: ``notebooks/`` (training a RetinaNet on shapes) walks through this loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from instseg_edu.engine.checkpoint import config_to_dict, load_checkpoint, save_checkpoint
from instseg_edu.engine.distributed import (
    all_gather_object,
    broadcast_buffers,
    get_rank,
    get_world_size,
    is_distributed,
)

logger = logging.getLogger(__name__)

HOOKS = ("on_start", "on_step", "on_eval", "on_epoch", "on_end")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite. ``.term``, ``.step``, ``.value``, ``.history`` and
    ``.checkpoint`` (the last good checkpoint's path, or ``None``) say where and what is left."""

    def __init__(self, term: str, step: int, value: float, history=None, checkpoint=None):
        self.term, self.step, self.value = term, step, value
        self.history, self.checkpoint = history, checkpoint
        where = (
            f"the last good checkpoint is {checkpoint}"
            if checkpoint
            else "no checkpoint had been written"
        )
        super().__init__(
            f"loss term {term!r} is {value} at step {step}; training stopped ({where}). "
            "Try a lower lr, a longer warm-up or grad_clip."
        )


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`. Length: ``max_steps`` and/or ``epochs`` (whichever ends first),
    and optionally a time budget, ``max_seconds``.

    Attributes:
        epochs: passes over the training loader.
        max_steps: optimiser steps.
        lr: base learning rate (MMDetection's RetinaNet: SGD 0.01 for 16 images per batch).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adamw"`` (with ``betas``).
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        warmup_steps: linear warm-up length; the first step uses ``lr * warmup_ratio``.
        schedule: after warm-up, ``"step"`` (multiply by ``gamma`` at each of ``milestones``, given
            as fractions of the run: MMDetection's 1x schedule decays at epochs 8 and 11 of 12),
            ``"cosine"`` (down to ``lr * min_lr_ratio``) or ``"constant"``.
        grad_clip: max global gradient norm, or ``None`` (MMDetection's RetinaNet uses 35).
        amp: bf16 autocast on CUDA (on the CPU only with ``cpu_amp``).
        cpu_amp: with ``amp``, bf16 autocast on a CPU with bf16 instructions too
            (:func:`cpu_has_native_bf16`: AVX-512 BF16 or AMX; float32 on other CPUs, where bf16
            is emulated and slower). It makes a step 1.1-1.5 times as fast and learns as much
            per step. oneDNN's bf16 weight gradient of a strided convolution on an input one
            pixel wide is wrong (torch 2.14.1; YOLACT's P7 at 64 px stopped on a NaN at its
            second step), so :func:`train` runs those few convolutions in float32
            (:func:`float32_for_one_wide_inputs`). Off here by default; the cpu tier's recipes
            turn it on (:attr:`~instseg_edu.recipes.Recipe.cpu_amp`).
        channels_last: NHWC memory format on CUDA, and on the CPU under bf16 autocast
            (``cpu_amp``; oneDNN's fastest bf16 layout: a Mask R-CNN step of the cpu tier 0.21 s
            instead of 0.25 s). A CPU-trained model is returned in the default layout.
        log_every: steps between host syncs of the logged values (and progress-bar updates).
        eval_every: steps between evaluations (``None``: only at the end, if an evaluator exists).
        checkpoint_dir: where ``last.pt`` is written (``None``: no checkpoints).
        checkpoint_every: steps between checkpoints (one is always written at the end).
        max_seconds: a time budget, or ``None``. Training ends once this many seconds of
            training (steps with their loading and logging; evaluations and checkpoints not
            counted) have passed, and the schedule follows the clock: its position is the larger
            of the fraction of steps done and the fraction of the budget used (:func:`lr_at`), so
            a machine slower than planned still decays the learning rate to its end on time, and
            one faster than planned ends at ``max_steps``. Runs with it are not repeatable to the
            bit (the clock decides the rates). One process only: under ``torchrun`` each process
            would follow its own clock.
        seed: seeds torch, numpy, Python's ``random`` and the data order.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; under
            ``torchrun``, ``"auto"`` and ``"cuda"`` mean this process's GPU (``cuda:LOCAL_RANK``).
        progress: show a tqdm progress bar (rank 0 only under ``torchrun``).
        sync_bn: under ``torchrun``, convert every BatchNorm to ``SyncBatchNorm`` (statistics over
            the global batch instead of each process's share; CUDA only). Ignored in one process.
        lr_mult: ``{key: m}``: a parameter whose name contains ``key`` learns at ``m`` times the
            schedule's rate (the longest matching key wins), as MMDetection's
            ``paramwise_cfg=dict(custom_keys={key: dict(lr_mult=m)})``. ``None``: every
            parameter at the schedule's rate. The CPU tier's Mask R-CNN gives its box head 0.2
            (:mod:`instseg_edu.recipes`).
    """

    epochs: int | None = None
    max_steps: int | None = None
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    warmup_ratio: float = 0.001
    schedule: str = "step"
    milestones: tuple[float, ...] = (8 / 12, 11 / 12)
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    amp: bool = True
    cpu_amp: bool = False
    channels_last: bool = True
    log_every: int = 20
    eval_every: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    max_seconds: float | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    sync_bn: bool = False
    lr_mult: dict[str, float] | None = None

    def __post_init__(self):
        if self.epochs is None and self.max_steps is None:
            raise ValueError("epochs and max_steps are both None; set at least one")
        for name in ("epochs", "max_steps", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} must be a positive int or None")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds={self.max_seconds!r} must be > 0 or None")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas} must be two numbers in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 < self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in (0, 1]")
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(
            self.milestones
        ):
            raise ValueError(
                f"milestones={self.milestones} must be increasing fractions of the run in (0, 1)"
            )
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma} must be in (0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be > 0 or None")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every={self.log_every!r} must be a positive int")
        for key, mult in (self.lr_mult or {}).items():
            if not (isinstance(key, str) and key) or not mult > 0:
                raise ValueError(f"lr_mult={self.lr_mult}: keys must be non-empty parameter name "
                                 "parts and multipliers > 0")  # fmt: skip
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device={self.device!r} is not a valid torch device") from e


@functools.cache  # the hardware does not change; benchmarks ask at every step
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX tiles).

    On such a CPU oneDNN's convolutions run under bf16 autocast about 1.1-1.5 times as fast as in
    float32 (``benchmarks/RESULTS.md``, "bf16 on the CPU"); on others bf16 is emulated and slower,
    so :func:`train` keeps float32 there even with ``TrainConfig.cpu_amp``. Most laptops' CPUs
    have no bf16 instructions.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, torch >= 2.1
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def float32_for_one_wide_inputs(model: torch.nn.Module) -> list:
    """Run ``model``'s strided convolutions in float32 whenever their input is one pixel wide or
    high, also under CPU bf16 autocast; returns the hook handles (``.remove()`` each to undo).

    oneDNN's bf16 convolution on the CPU (torch 2.14.1, AVX-512 BF16) computes a wrong **weight
    gradient** for a stride-2 convolution with a kernel wider than 1 on an input one pixel wide:
    every time, for 3x3, 5x5 and 7x7 kernels and heights 1 to 12, NCHW or channels-last, with
    errors up to 1e37 or inf (at widths 2 and 3, at stride 1 and with 1x1 kernels it agrees with
    float32 up to bf16's rounding; the output and the input's gradient are right everywhere). Such
    inputs are the coarsest levels of small or very narrow images: YOLACT's P6 -> P7 at 64 px, a
    ResNet's last stage on a crop under 32 px. Those convolutions are tiny, so running them in
    float32 (their input cast up, autocast off for that one call) costs nothing measurable and
    leaves every other one in bf16.
    A forward pre-hook switches autocast off and a forward hook switches it back, also when the
    forward raises (``always_call``). Outside CPU autocast the hooks change nothing.
    ``benchmarks/RESULTS.md`` (twenty-fifth round) has the measurements.
    """
    handles = []
    for module in model.modules():
        if not isinstance(module, torch.nn.Conv2d):
            continue
        if max(module.stride) == 1 or max(module.kernel_size) == 1:
            continue
        handles.append(module.register_forward_pre_hook(_float32_if_one_wide))
        handles.append(module.register_forward_hook(_autocast_back_on, always_call=True))
    return handles


def _float32_if_one_wide(module, args):
    x = args[0]
    if x.device.type != "cpu" or min(x.shape[-2:]) != 1 or not torch.is_autocast_enabled("cpu"):
        return None
    module._autocast_off = torch.autocast("cpu", enabled=False)
    module._autocast_off.__enter__()
    return (x.float(), *args[1:])


def _autocast_back_on(module, args, output):
    off = module.__dict__.pop("_autocast_off", None)
    if off is not None:
        off.__exit__(None, None, None)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU. Under a process group, ``"auto"`` and
    ``"cuda"`` (no index) mean this process's GPU, ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return resolved


def total_steps(cfg: TrainConfig, loader) -> int:
    """Optimiser steps of a run: ``max_steps``, ``epochs * len(loader)``, or the smaller one."""
    candidates = []
    if cfg.max_steps is not None:
        candidates.append(cfg.max_steps)
    if cfg.epochs is not None:
        try:
            n = len(loader)
        except TypeError as e:
            raise ValueError("epochs needs a loader with a length; set max_steps instead") from e
        candidates.append(cfg.epochs * n)
    return min(candidates)


def lr_at(step: int, cfg: TrainConfig, num_steps: int, seconds: float = 0.0) -> float:
    """Learning rate for the update that follows ``step`` completed steps (and ``seconds`` of
    training, which count only with ``cfg.max_seconds``).

    Warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 2.2) ramps linearly from
    ``lr * warmup_ratio`` at step 0 to ``lr`` at ``warmup_steps``; e.g. lr=0.01, ratio=0.001,
    500 warm-up steps: step 0 → 1e-5, step 250 → 0.005005, step 500 → 0.01. The schedule factor is
    applied on top (as MMDetection does when warm-up and decay overlap), at the run's position
    ``t = step / num_steps``, or, with a time budget, ``max(step / num_steps, seconds /
    max_seconds)``: cosine with 1000 steps planned in 300 s is at ``t = 0.5`` after 500 steps,
    or after 150 s should those come first. The warm-up always counts steps.
    """
    t = min(step / max(num_steps, 1), 1.0)
    time_t = 0.0 if cfg.max_seconds is None else min(seconds / cfg.max_seconds, 1.0)
    t = max(t, time_t)
    if cfg.schedule == "step":
        passed = sum(step >= m * num_steps or time_t >= m for m in cfg.milestones)
        factor = cfg.gamma**passed
    elif cfg.schedule == "cosine":
        factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    else:
        factor = 1.0
    if step < cfg.warmup_steps:
        factor *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / cfg.warmup_steps
    return cfg.lr * factor


def scaled_lr(lr: float, batch_size: int, reference_batch_size: int) -> float:
    """The linear scaling rule: ``lr * batch_size / reference_batch_size``.

    Goyal et al. 2017 ("Accurate, Large Minibatch SGD", Sec. 2.1): "when the minibatch size is
    multiplied by k, multiply the learning rate by k", together with a gradual warm-up (Sec. 2.2,
    ``TrainConfig.warmup_steps``) because the scaled rate is too large for the first updates. With
    ``k`` times the images per step, one step does the work of ``k`` small steps, so it takes a
    ``k`` times longer stride. MMDetection's RetinaNet: lr 0.01 for 16 images (8 GPUs x 2); on
    4 GPUs x 8 images (32) that is 0.02. It holds for SGD; AdamW is less sensitive to the batch.

    Args:
        lr: the learning rate tuned for ``reference_batch_size`` images per step.
        batch_size: images per optimiser step over every process (``world_size * per-process``).
        reference_batch_size: the batch ``lr`` was tuned for.
    """
    if batch_size < 1 or reference_batch_size < 1:
        raise ValueError(
            f"batch_size={batch_size} and reference_batch_size={reference_batch_size} must be >= 1"
        )
    return lr * batch_size / reference_batch_size


@dataclass
class History:
    """What happened during training, as plain Python data (``to_dict`` is JSON-ready).

    Attributes:
        steps: one dict per optimiser step: ``step`` (1-based), ``epoch`` (0-based), ``lr``,
            ``data_time`` (seconds the step waited for its batch from the loader, as MMDetection
            logs it; on a GPU the host runs ahead of the device, so a wait there is hidden while
            the device is still busy), ``img_s`` (throughput averaged over the logging window),
            ``loss`` (the total), every ``loss_*`` term and every statistic the model reported
            (e.g. ``num_pos``), plus ``grad_norm`` when ``grad_clip`` is set.
        evals: one dict per evaluation: ``step``, ``epoch`` (epochs completed when it ran),
            ``metrics`` (as ``evaluate_fn`` returned them, e.g. ``{"bbox": {"AP": ..}}``).
        interrupted: training was stopped by ``KeyboardInterrupt``.
        stopped_early: a callback requested the stop.
        out_of_time: training ended at ``max_seconds``, before ``max_steps``.
        train_seconds: seconds of training so far (steps with their loading and logging, not
            evaluations or checkpoints), carried across a resume; what ``max_seconds`` counts.
        checkpoint: path of the last checkpoint written, if any.
    """

    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    interrupted: bool = False
    stopped_early: bool = False
    out_of_time: bool = False
    train_seconds: float = 0.0
    checkpoint: str | None = None
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "steps": [dict(s) for s in self.steps],
            "evals": [_plain(e) for e in self.evals],
            "interrupted": self.interrupted,
            "stopped_early": self.stopped_early,
            "out_of_time": self.out_of_time,
            "train_seconds": self.train_seconds,
            "checkpoint": self.checkpoint,
            "config": _plain(self.config),
        }

    def loss_means(self, window: int = 50) -> tuple[int, float, float] | None:
        """``(k, first, last)``: the total loss averaged over the first and the last ``k`` logged
        steps, ``k = window`` or half the steps if fewer (so the two share no step); ``None``
        before any step."""
        losses = [s["loss"] for s in self.steps if "loss" in s]
        if not losses:
            return None
        k = max(1, min(window, len(losses) // 2))
        return k, sum(losses[:k]) / k, sum(losses[-k:]) / k

    def summary(self, window: int = 50) -> str:
        """One line for a log or a notebook: the steps, the total loss averaged over the first
        and the last ``window`` steps (single steps are noisy), and what ended the training.

        Example: ``"2022 steps in 210 s; loss 1.43 (mean of the first 50 steps) -> 0.57 (the
        last 50); ended by the time limit (max_seconds)"``.
        """
        line = f"{len(self.steps)} steps in {self.train_seconds:.0f} s"
        if (means := self.loss_means(window)) is not None:
            k, first, last = means
            line += f"; loss {first:.3g} (mean of the first {k} steps) -> {last:.3g} (the last {k})"
        if self.interrupted:
            line += "; interrupted"
        elif self.stopped_early:
            line += "; stopped early by a callback"
        elif self.out_of_time:
            line += "; ended by the time limit (max_seconds)"
        return line

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(
            steps=[dict(s) for s in d.get("steps", [])],
            evals=[_plain(e) for e in d.get("evals", [])],
            interrupted=bool(d.get("interrupted", False)),
            stopped_early=bool(d.get("stopped_early", False)),
            out_of_time=bool(d.get("out_of_time", False)),
            train_seconds=float(d.get("train_seconds", 0.0)),
            checkpoint=d.get("checkpoint"),
            config=_plain(d.get("config", {})),
        )

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one logged key, e.g. ``history.series("loss_cls")``."""
        pairs = [(s["step"], s[key]) for s in self.steps if key in s]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def loss_keys(self) -> list[str]:
        """The logged loss names, total first: ``["loss", "loss_bbox", "loss_cls"]``."""
        keys = {k for s in self.steps for k in s if k == "loss" or k.startswith("loss_")}
        return sorted(keys, key=lambda k: (k != "loss", k))

    def save_json(self, path: str | Path) -> Path:
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def _plain(obj):
    """Tensors/numpy scalars → Python numbers, tuples → lists (JSON and weights_only friendly)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class _StepLog:
    """Per-step values kept on the device until a flush copies them to the host in one transfer."""

    def __init__(self, history: History, on_flush: Callable[[dict], None], world_size: int = 1):
        self.history = history
        self.on_flush = on_flush
        self.world_size = world_size
        self.pending: list[tuple[dict, list[str], list[Tensor]]] = []
        self.last: dict = dict(history.steps[-1]) if history.steps else {}
        self.checkpoint = history.checkpoint  # the last checkpoint known to be good
        self.reset_window()

    def reset_window(self):
        self.window_start = time.perf_counter()
        self.window_images = 0

    def add(self, record: dict, losses: dict, total: Tensor, num_images: int) -> Tensor:
        """``record`` holds host values (step, epoch, lr); tensors are only detached here.

        With several processes the values are averaged over them here (one ``all_reduce`` of a
        small vector, queued like any kernel), so every process logs, and checks, the same
        numbers. Returns the logged total (a 0-d device tensor).
        """
        keys, values = ["loss"], [total.detach().float().reshape(())]
        for k, v in losses.items():
            if isinstance(v, Tensor):
                if v.numel() == 1:  # non-scalar statistics are not logged
                    keys.append(k)
                    values.append(v.detach().float().reshape(()))
            elif isinstance(v, (int, float)):
                record[k] = float(v)
        if self.world_size > 1:
            packed = torch.stack(values)  # [K]
            torch.distributed.all_reduce(packed)  # sum over processes
            values = list((packed / self.world_size).unbind())
        self.pending.append((record, keys, values))
        self.window_images += num_images * self.world_size  # equal shares: the sampler pads
        return values[0]

    def add_value(self, key: str, value: Tensor):
        """Attach one more device scalar (e.g. ``grad_norm``) to the latest step."""
        record, keys, values = self.pending[-1]
        keys.append(key)
        values.append(value.detach().float().reshape(()))

    def flush(self):
        """Copy pending values to the host (one sync), append them to the history, and raise
        :class:`NonFiniteLossError` at the first step whose loss is not finite."""
        if not self.pending:
            return
        flat = torch.stack([v for _, _, vals in self.pending for v in vals]).cpu().tolist()
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        img_s = self.window_images / elapsed
        pending, self.pending = self.pending, []
        i = 0
        for record, keys, _ in pending:
            vals = flat[i : i + len(keys)]
            i += len(keys)
            record.update(zip(keys, vals))
            record["img_s"] = img_s
            bad = [k for k in keys if (k == "loss" or k.startswith("loss_"))]
            bad = [k for k in bad if not math.isfinite(record[k])]
            if bad:
                term = next((k for k in bad if k != "loss"), "loss")
                raise NonFiniteLossError(
                    term, record["step"], record[term], self.history, self.checkpoint
                )
            self.history.steps.append(record)
            self.last = record
        self.reset_window()
        self.on_flush(self.last)


class TrainState:
    """What callbacks receive. Attributes: ``step`` (completed steps), ``epoch`` (0-based),
    ``total_steps`` (with ``config.max_seconds``, a bound: the clock may end the run first),
    ``train_seconds`` (seconds of training so far, what ``config.max_seconds`` counts), ``lr``,
    ``model``, ``optimizer``, ``batch`` and ``outputs`` of the latest step
    (only during ``on_step``), ``metrics`` of the latest evaluation, ``config``. Properties
    ``losses``, ``img_s`` and ``history`` first sync pending values from the device."""

    def __init__(self, model, optimizer, cfg, total, history, step_log):
        self.model, self.optimizer, self.config = model, optimizer, cfg
        self.total_steps = total
        self.train_seconds = history.train_seconds
        self.step = 0
        self.epoch = 0
        self.lr = cfg.lr
        self.batch = None
        self.outputs = None
        self.metrics: dict | None = None
        self.stop_requested = False
        self._history = history
        self._log = step_log

    def request_stop(self):
        """Finish after the current step (a final checkpoint and evaluation still happen)."""
        self.stop_requested = True

    @property
    def losses(self) -> dict[str, float]:
        """Loss terms (and total ``"loss"``) of the latest step, as floats."""
        self._log.flush()
        return {k: v for k, v in self._log.last.items() if k == "loss" or k.startswith("loss_")}

    @property
    def img_s(self) -> float:
        self._log.flush()
        return float(self._log.last.get("img_s", float("nan")))

    @property
    def history(self) -> History:
        self._log.flush()
        return self._history


class _Clock:
    """Seconds of training: wall clock from ``seconds`` on, less what runs under ``paused()``."""

    def __init__(self, seconds: float = 0.0):
        self._offset = seconds - time.perf_counter()

    def seconds(self) -> float:
        return self._offset + time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._offset -= time.perf_counter() - start


def _call(callbacks, hook: str, state: TrainState):
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is None and hook == "on_step" and callable(cb):
            if not any(hasattr(cb, h) for h in HOOKS):
                fn = cb  # a plain function is an on_step hook
        if fn is not None:
            fn(state)


def _rng_state() -> dict:
    """Every RNG a training step may draw from, as tensors and plain containers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (global state on purpose)
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
    }  # fmt: skip


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002


def _resume_rng(ckpt: dict, rank: int, world_size: int) -> dict | None:
    """This process's RNG states from a checkpoint (``None``: seed afresh)."""
    per_rank = ckpt.get("rng_ranks")
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world != world_size:
        logger.warning(
            "resuming a checkpoint of %d process(es) with %d: training continues, but not "
            "exactly as it would have (each process's share of the data changes)",
            saved_world,
            world_size,
        )
    if per_rank is not None and rank < len(per_rank):
        return per_rank[rank]
    if rank == 0:
        return ckpt["rng"]
    return None


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (augmentations may use the global numpy RNG)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of an epoch's data order: a deterministic mix of ``(seed, epoch)`` (and of ``rank``
    for processes other than rank 0, so that their augmentations differ)."""
    entropy = [seed, epoch] if rank == 0 else [seed, epoch, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _seed_loader(loader, seed: int, epoch: int, rank: int = 0):
    """Make the loader's shuffling of this epoch a function of ``(seed, epoch)`` only."""
    gen = getattr(loader, "generator", None)
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        # Its order is a permutation seeded with (its seed + epoch), the same on every process,
        # of which each process takes every world_size-th item. Without set_epoch every epoch
        # would repeat the first one's order.
        sampler.set_epoch(epoch)
    if gen is None and isinstance(sampler, torch.utils.data.RandomSampler):
        if sampler.generator is None:
            # A DataLoader(shuffle=True) without a generator draws its order from the global RNG,
            # which resume cannot replay; give its sampler a generator of its own.
            sampler.generator = torch.Generator()
        gen = sampler.generator
    if gen is not None:
        gen.manual_seed(epoch_seed(seed, epoch, rank))


def _check_sharded(loader):
    """Under a process group each process must read its own share, not the whole dataset."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if isinstance(batch_sampler, torch.utils.data.BatchSampler):
        sampler = batch_sampler.sampler
    if isinstance(sampler, (torch.utils.data.RandomSampler, torch.utils.data.SequentialSampler)):
        raise ValueError(
            f"train_loader's {type(sampler).__name__} gives every one of the {get_world_size()} "
            "processes the whole dataset; build it with make_loader (a DistributedSampler when a "
            "process group is initialised) or pass sampler=DistributedSampler(dataset)"
        )


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (with ``cfg.momentum``) or AdamW (with ``cfg.betas``) over the trainable parameters.

    On the CPU and CUDA the update runs as PyTorch's fused kernel (``fused=True``): one pass over
    all parameters instead of a few small ops per parameter tensor. The same update up to float
    rounding; on two CPU cores the AdamW step of the CPU tier's Mask R-CNN (7.5 M parameters in
    102 tensors) takes 7 ms instead of 58 (benchmarks/RESULTS.md). With ``cfg.lr_mult`` the
    parameters fall into one group per multiplier, each group carrying its ``"lr_mult"``, which
    :func:`train` applies to the schedule's rate at every step.

    Raises:
        ValueError: the model has no trainable parameters.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    params = [p for _, p in named]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    groups = lr_mult_groups(named, cfg.lr_mult) if cfg.lr_mult else params
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=fused)  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=fused)  # fmt: skip


def lr_mult_groups(named: list, lr_mult: dict[str, float]) -> list[dict]:
    """Optimiser parameter groups ``{"params", "lr_mult"}`` for ``TrainConfig.lr_mult``.

    Args:
        named: ``(name, parameter)`` pairs, as ``model.named_parameters()`` gives them.
        lr_mult: ``{key: multiplier}``; the longest key contained in a parameter's name decides
            its multiplier, 1 where none is (MMDetection's ``custom_keys``).

    Raises:
        ValueError: a key is in no parameter's name (a misspelt key would otherwise change
            nothing).
    """
    keys = sorted(lr_mult, key=len, reverse=True)
    groups: dict[float, list] = {}
    used = set()
    for name, p in named:
        key = next((k for k in keys if k in name), None)
        used.add(key)
        groups.setdefault(1.0 if key is None else lr_mult[key], []).append(p)
    unused = [k for k in lr_mult if k not in used]
    if unused:
        raise ValueError(f"lr_mult: no trainable parameter name contains {unused}")
    return [{"params": ps, "lr_mult": mult} for mult, ps in groups.items()]


def make_loader(
    dataset,
    batch_size: int,
    shuffle: bool = True,
    workers: int = 0,
    pin_memory: bool | None = None,
    seed: int = 0,
    *,
    drop_last: bool = False,
    collate_fn=None,
    persistent_workers: bool = False,
    distributed: bool | None = None,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of :class:`~instseg_edu.structures.Batch` with a seeded generator.

    ``pin_memory=None`` pins when CUDA is available (page-locked host memory lets the host-to-GPU
    copy run asynchronously). Workers are re-created every epoch by default, which keeps resumed
    runs identical even with random augmentations in the workers; ``persistent_workers=True``
    saves their start-up time at that price.

    ``distributed=None`` means "when a process group is initialised": each process then reads its
    own ``1 / world_size`` of the dataset through a ``DistributedSampler`` (shuffled with ``seed``
    plus the epoch, which :func:`train` sets; padded by repeating a few items so that every process
    gets as many), and ``batch_size`` is per process, as in torchvision's detection references.
    """
    if collate_fn is None:
        from instseg_edu.data.transforms import collate as collate_fn
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = None
    if is_distributed() if distributed is None else distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        shuffle = False  # the sampler shuffles
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=persistent_workers and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def _coco_dataset(dataset):
    while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):  # unwrap torch Subset
        dataset = dataset.dataset
    return dataset


class _ForwardAndLoss(torch.nn.Module):
    """``(outputs, losses)`` of a model in one ``forward``, for ``DistributedDataParallel``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, batch) -> tuple:
        outputs = self.model(images)
        return outputs, self.model.loss(outputs, batch)


def _default_evaluate_fn(val_loader, device, train_loader=None):
    ds = _coco_dataset(val_loader.dataset)
    if not (hasattr(ds, "coco") and hasattr(ds, "label_to_cat_id")):
        raise ValueError(
            "val_loader's dataset has no .coco and .label_to_cat_id (as CocoDataset has); "
            "pass evaluate_fn=... instead"
        )
    from instseg_edu.engine.evaluate import evaluate_model

    # The model's labels are the training set's: report them with its category ids (the
    # validation file's own order may differ; evaluate_model matches categories by id).
    train_ds = _coco_dataset(getattr(train_loader, "dataset", None))
    label_to_cat_id = getattr(train_ds, "label_to_cat_id", None) or ds.label_to_cat_id
    return lambda model: evaluate_model(model, val_loader, ds.coco, label_to_cat_id, device)


def train(
    model: torch.nn.Module,
    train_loader: Iterable,
    cfg: TrainConfig,
    *,
    val_loader=None,
    evaluate_fn: Callable[[torch.nn.Module], dict] | None = None,
    callbacks: Iterable = (),
    resume: str | Path | dict | None = None,
    meta: dict | None = None,
) -> History:
    """Train ``model`` on batches from ``train_loader`` (see the module docstring for the parts).

    Args:
        model: follows the :mod:`instseg_edu.models` protocol (``forward``, ``loss``).
        train_loader: yields :class:`~instseg_edu.structures.Batch` (see :func:`make_loader`).
        cfg: a :class:`TrainConfig`.
        val_loader: a loader over a ``CocoDataset`` for periodic COCO evaluation (used when
            ``evaluate_fn`` is not given).
        evaluate_fn: ``evaluate_fn(model) -> dict`` of metrics, called (model in eval mode) every
            ``cfg.eval_every`` steps and at the end.
        callbacks: objects with optional ``on_start/on_step/on_eval/on_epoch/on_end(state)``
            methods, or plain functions (called every step).
        resume: a checkpoint path (or loaded dict) to continue from.
        meta: extra plain data stored in every checkpoint (the CLI stores the model name and its
            config there, so ``evaluate`` and ``predict`` can rebuild it).

    Under a process group (``torchrun``) every process calls ``train`` with its own loader share
    (see the module docstring); callbacks run on rank 0 only, ``evaluate_fn`` on every process
    (:func:`~instseg_edu.engine.evaluate.evaluate_model` splits the work and gathers the results),
    and a stop requested by a callback takes effect at the next step whose values are synced
    (every ``log_every`` steps on CUDA, every step on the CPU), when the processes agree on it.
    Every process returns the same :class:`History`. The model's ``loss`` must reach every
    trainable parameter on every step (DDP runs with ``find_unused_parameters=False``): a term
    with nothing to train adds its prediction times 0, as the four families do.

    Returns:
        The :class:`History`. The model is left on the training device in eval mode.

    Raises:
        NonFiniteLossError: a loss term became NaN/inf (``.history`` has the steps before it).
        ValueError: ``sync_bn=True`` under a process group on the CPU (SyncBatchNorm needs CUDA),
            ``max_seconds`` under a process group (each process would follow its own clock), or
            a loader that gives every process the whole dataset.
    """
    device = resolve_device(cfg.device)
    on_cuda = device.type == "cuda"
    on_bf16_cpu = cfg.cpu_amp and device.type == "cpu" and cpu_has_native_bf16()
    use_amp = cfg.amp and (on_cuda or on_bf16_cpu)
    cpu_bf16 = use_amp and not on_cuda  # bf16 autocast on the CPU
    # NHWC: tensor cores' layout on CUDA, and oneDNN's fastest for bf16 on the CPU.
    channels_last = cfg.channels_last and (on_cuda or cpu_bf16)
    callbacks = list(callbacks)
    ddp = is_distributed()
    rank, world_size = get_rank(), get_world_size()
    main = rank == 0
    if ddp:
        _check_sharded(train_loader)
        if cfg.sync_bn and not on_cuda:
            raise ValueError(
                "sync_bn=True needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); on "
                "the CPU keep BatchNorm frozen (the backbone's norm_eval=True) instead"
            )
        if cfg.max_seconds is not None:
            raise ValueError(
                f"max_seconds={cfg.max_seconds} under torchrun: each process would follow its own "
                "clock and take other learning rates; set max_steps instead"
            )
    if evaluate_fn is None and val_loader is not None:
        evaluate_fn = _default_evaluate_fn(val_loader, device, train_loader)

    if ddp and cfg.sync_bn:
        # Replaces the BatchNorm modules inside `model` (same parameters and buffers, so the
        # state dict and checkpoints stay those of the plain model).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    # A oneDNN bf16 bug: see float32_for_one_wide_inputs. Removed when training ends.
    guards = float32_for_one_wide_inputs(model) if cpu_bf16 else []
    optimizer = make_optimizer(model, cfg)
    num_steps = total_steps(cfg, train_loader)

    step, epoch, skip = 0, 0, 0
    history = History(config=config_to_dict(cfg))
    rng = None
    if resume is not None:
        ckpt = resume if isinstance(resume, dict) else load_checkpoint(resume, map_location="cpu")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, skip = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        history = History.from_dict(ckpt["history"])
        history.config = config_to_dict(cfg)
        history.interrupted = history.stopped_early = history.out_of_time = False
        rng = _resume_rng(ckpt, rank, world_size)
        logger.info("resuming from step %d (epoch %d)", step, epoch)
    if rng is None:
        _seed_everything(cfg.seed + rank)  # rank 0 as one process; others draw other numbers
    net = None
    if ddp:
        # Averages the gradients over the processes during backward. Its forward runs the loss
        # too (heads such as Mask R-CNN's RoI heads run inside `loss`). Every family's loss
        # reaches every trainable parameter on every step, even where a term has nothing to
        # train (no positives, no masks: it adds that prediction times 0), so DDP need not
        # search the graph for unused parameters each step (find_unused_parameters=False).
        ids = [device.index] if on_cuda else None
        net = torch.nn.parallel.DistributedDataParallel(
            _ForwardAndLoss(model), device_ids=ids, find_unused_parameters=False
        )

    ckpt_path = Path(cfg.checkpoint_dir) / "last.pt" if cfg.checkpoint_dir else None

    from tqdm.auto import tqdm

    # Redrawn ten times a second in a terminal or a notebook; written to a log file (make demo >
    # log), every 30 s, so the log keeps a line per half-minute instead of thousands.
    on_screen = sys.stderr.isatty() or tqdm.__module__ == "tqdm.notebook"
    bar = tqdm(total=num_steps, initial=step, disable=not (cfg.progress and main), desc="train",
               dynamic_ncols=True, mininterval=0.1 if on_screen else 30.0)  # fmt: skip

    def show(record):
        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_s']:.1f}", refresh=False)

    def call(hook: str):
        if main:  # one dashboard, one set of files: rank 0's
            _call(callbacks, hook, state)

    step_log = _StepLog(history, show, world_size)
    state = TrainState(model, optimizer, cfg, num_steps, history, step_log)
    state.step, state.epoch = step, epoch
    # On the CPU a sync costs nothing, so every step is checked before its update is applied.
    sync_every = cfg.log_every if on_cuda else 1

    def save(batch_in_epoch: int):
        with clock.paused():  # checkpoints do not count against a time budget
            step_log.flush()  # never save unverified steps
            history.checkpoint = str(ckpt_path)
            history.train_seconds = clock.seconds()
            rng_ranks = all_gather_object(_rng_state()) if ddp else None  # every process's RNGs
            if main:
                save_checkpoint(ckpt_path, {
                    "format": 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {"schedule": cfg.schedule, "step": step},
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "history": history.to_dict(),
                    "rng": rng_ranks[0] if ddp else _rng_state(),
                    **({"rng_ranks": rng_ranks, "world_size": world_size} if ddp else {}),
                    "config": config_to_dict(cfg),
                    "meta": _plain(meta or {}),
                })  # fmt: skip
            step_log.checkpoint = str(ckpt_path)
            step_log.reset_window()

    def evaluate():
        with clock.paused():  # nor do evaluations
            step_log.flush()
            broadcast_buffers(model)  # every process evaluates rank 0's model
            model.eval()
            metrics = _plain(evaluate_fn(model))
            model.train()
            history.evals.append({"step": step, "epoch": epoch, "metrics": metrics})
            state.metrics = metrics
            call("on_eval")
            step_log.reset_window()

    def agreed_stop() -> bool:
        """Rank 0's callbacks decide; every process must stop at the same step."""
        if not ddp:
            return state.stop_requested
        flag = torch.full((), float(state.stop_requested), device=device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def end_epoch():
        nonlocal epoch, batch_in_epoch
        step_log.flush()
        call("on_epoch")
        epoch += 1
        batch_in_epoch = 0
        state.epoch = epoch

    try:
        epoch_len = len(train_loader)
    except TypeError:
        epoch_len = None
    model.train()
    call("on_start")
    batch_in_epoch = skip
    last_eval_step = history.evals[-1]["step"] if history.evals else -1
    stopping = False
    clock = _Clock(history.train_seconds)  # a resumed run goes on from its checkpoint's time

    def time_is_up() -> bool:
        return cfg.max_seconds is not None and clock.seconds() >= cfg.max_seconds

    out_of_time = time_is_up()
    try:
        while step < num_steps and not stopping and not out_of_time:
            _seed_loader(train_loader, cfg.seed, epoch, rank)
            batches = iter(train_loader)
            if skip:
                for _ in range(skip):  # batches this epoch already trained on before the resume
                    if next(batches, None) is None:
                        break
                skip = 0
            if rng is not None:
                _set_rng_state(rng)  # after the skip, so the skipped batches do not shift it
                rng = None
            seen = 0
            fetch_start = time.perf_counter()
            for batch in batches:
                # Seconds this step waited for its batch (MMDetection's data_time): near 0 while
                # the loader keeps up, the step's whole time when it does not.
                data_time = time.perf_counter() - fetch_start
                seen += 1
                lr = lr_at(step, cfg, num_steps, clock.seconds())
                for group in optimizer.param_groups:  # lr_mult: see lr_mult_groups
                    group["lr"] = lr * group.get("lr_mult", 1.0)
                batch = batch.to(device, non_blocking=True)
                if channels_last:
                    images = batch.images.contiguous(memory_format=torch.channels_last)
                    batch = dataclasses.replace(batch, images=images)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    if net is None:
                        outputs = model(batch.images)
                        losses = model.loss(outputs, batch)
                    else:
                        outputs, losses = net(batch.images, batch)
                loss_terms = [v for k, v in losses.items() if k.startswith("loss_")]
                if not loss_terms:
                    raise ValueError(f"model.loss returned no 'loss_*' keys: {sorted(losses)}")
                total = torch.stack([t.float().reshape(()) for t in loss_terms]).sum()
                record = {"step": step + 1, "epoch": epoch, "lr": lr, "data_time": data_time}
                logged = step_log.add(record, losses, total, len(batch))
                if not on_cuda and not math.isfinite(logged.item()):
                    step_log.flush()  # raises before the bad update (on every process)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if cfg.grad_clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    step_log.add_value("grad_norm", norm)
                optimizer.step()
                step += 1
                batch_in_epoch += 1
                state.step, state.lr, state.train_seconds = step, lr, clock.seconds()
                synced = step % sync_every == 0 or step == num_steps
                if synced:
                    step_log.flush()
                bar.update(1)
                state.batch, state.outputs = batch, outputs
                call("on_step")
                state.batch = state.outputs = None  # do not keep the graph's tensors alive
                if evaluate_fn is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    evaluate()
                    last_eval_step = step
                if ckpt_path and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save(batch_in_epoch)
                if synced or not ddp:
                    stopping = agreed_stop()
                out_of_time = time_is_up()
                if step >= num_steps or stopping or out_of_time:
                    if batch_in_epoch == epoch_len:  # that was also the epoch's last batch
                        end_epoch()
                    break
                fetch_start = time.perf_counter()
            else:  # the epoch ran out of batches
                if seen == 0 and batch_in_epoch == 0:
                    raise ValueError("train_loader yielded no batches")
                end_epoch()
        step_log.flush()
        broadcast_buffers(model)  # every process returns rank 0's model (the checkpoint's)
        history.stopped_early = stopping and step < num_steps
        history.out_of_time = out_of_time and not stopping and step < num_steps
        history.train_seconds = clock.seconds()
        if history.out_of_time:  # the clock ended it: the steps were only an upper bound
            bar.total = bar.n
            bar.set_description("train (time limit reached)", refresh=True)
        if evaluate_fn is not None and last_eval_step != step:
            evaluate()
        if ckpt_path:
            save(batch_in_epoch)
    except KeyboardInterrupt:
        history.interrupted = True
        history.train_seconds = clock.seconds()
        try:
            step_log.flush()
        except NonFiniteLossError:
            pass
        if main:
            logger.warning(
                "training interrupted at step %d; the model and the returned History are usable%s",
                step,
                f" (last checkpoint: {step_log.checkpoint})" if step_log.checkpoint else "",
            )
    finally:
        bar.close()
        for handle in guards:
            handle.remove()
        if channels_last and cpu_bf16:  # the CPU predicts in float32, NCHW: as it came
            model.to(memory_format=torch.contiguous_format)
    model.eval()
    call("on_end")
    return history
