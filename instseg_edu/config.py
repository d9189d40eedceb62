"""The configuration vocabulary: how every config of the library is written and checked.

A config is a frozen ``@dataclass`` whose field names are MMDetection's config keys. The pieces
that several families share are each defined once, next to the op they configure, and validated
there:

- :class:`~instseg_edu.ops.anchors.AnchorGeneratorConfig` (``anchor_generator``);
- :class:`~instseg_edu.ops.assign.MaxIoUAssignerConfig` (``assigner``);
- :class:`~instseg_edu.ops.coder.DeltaXYWHBBoxCoder` (``bbox_coder``: the coder is its own config);
- :class:`~instseg_edu.ops.sampling.SamplerConfig` (``sampler``);
- :class:`~instseg_edu.ops.nms.NMSConfig` (``nms``);
- :class:`~instseg_edu.losses.FocalLossConfig`, :class:`~instseg_edu.losses.L1LossConfig`,
  :class:`~instseg_edu.losses.SmoothL1LossConfig`,
  :class:`~instseg_edu.losses.CrossEntropyLossConfig` and
  :class:`~instseg_edu.losses.DiceLossConfig` (``loss_cls``, ``loss_bbox``, ...).

A family's config (``RetinaNetConfig``, ``MaskRCNNConfig``, ``SOLOConfig``, ``YOLACTConfig``)
composes them with its own head settings, ``train_cfg`` and ``test_cfg``; each has a
``num_classes`` and a ``with_num_classes(n)``. The small checks below are what those head
settings use, so that a family file holds its model, not pages of ``if ...: raise``.

A checkpoint stores its config as a plain dict
(:func:`instseg_edu.engine.checkpoint.config_to_dict`). When a key is renamed, the config class
lists the old name in its ``former_fields`` (old key → new key, a dotted path for a key that moved
into a nested config), and :func:`~instseg_edu.engine.checkpoint.config_from_dict` reads old
checkpoints through it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

__all__ = ["ClassesInBBoxHead", "check", "check_at_least", "check_in_range", "positive_tuple"]


class ClassesInBBoxHead:
    """``num_classes`` and ``with_num_classes`` of a family config whose ``bbox_head`` holds the
    classes (RetinaNet, SOLO, YOLACT; Mask R-CNN keeps ``num_classes`` at its top)."""

    @property
    def num_classes(self) -> int:
        """``C``, the foreground classes (``bbox_head.num_classes``)."""
        return self.bbox_head.num_classes

    def with_num_classes(self, num_classes: int):
        """The same config for another dataset: ``cfg.with_num_classes(len(dataset.classes))``."""
        return replace(self, bbox_head=replace(self.bbox_head, num_classes=num_classes))


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds (``message`` names the field)."""
    if not condition:
        raise ValueError(message)


def check_at_least(cfg, minimum: float, *names: str) -> None:
    """Each named field of ``cfg`` is ``>= minimum`` (``ValueError`` naming the first that is not).

    Example: ``check_at_least(self, 1, "num_classes", "in_channels")``.
    """
    for name in names:
        value = getattr(cfg, name)
        check(value >= minimum, f"{name}={value} must be >= {minimum}")


def check_in_range(
    cfg, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    """Field ``name`` of ``cfg`` lies in ``[lo, hi]`` (open at ``lo_open`` / ``hi_open``).

    Example: ``check_in_range(self, "score_thr", 0, 1, hi_open=True)`` accepts ``0 <= x < 1``.
    """
    value = getattr(cfg, name)
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    check(ok, f"{name}={value} must be in {interval}")


def positive_tuple(name: str, values: Iterable[float], length: int | None = None) -> tuple:
    """``values`` as a tuple of finite numbers ``> 0`` (of ``length`` entries when given).

    Raises:
        ValueError: naming ``name``, for an empty tuple, a value ``<= 0`` or not finite, or the
            wrong length.
    """
    out = tuple(values)
    check(
        len(out) > 0 and all(v > 0 and math.isfinite(v) for v in out),
        f"{name}={out} must be a non-empty sequence of finite values > 0",
    )
    check(length is None or len(out) == length, f"{name}={out} must have {length} values")
    return out
