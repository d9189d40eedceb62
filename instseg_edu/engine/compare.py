"""Which model when: a recommendation from numbers measured on one machine, without over-reading
them.

Notebook 09 measures four families on the same validation images (box and mask AP, images per
second in training, milliseconds per image in prediction) and writes its "which one when" summary
from those numbers. A ranking always has a winner, so two guards keep the summary honest:

1. **A model must have learned something useful to be recommended.** After a short training a
   model can keep no detection at the working score threshold, or find almost nothing: it still
   has the lowest latency or the second-best mask AP of 0.000. Such a model is named, with the
   reason, and left out of every recommendation. Useful here means: at least one detection
   scores ``>= score_thr`` on the validation images, and box AP50 is at least
   :data:`MIN_USEFUL_AP50` (at 0.05 the precision–recall curve at IoU 0.5 averages 5 %: a few
   objects found among many false positives; below it, differences between models are mostly the
   luck of one short training run).
2. **A speed difference must be larger than the noise to be a trade-off.** Timings on a laptop
   move by several percent from one run to the next (other programs, the CPU's clock), so a ratio
   under :data:`SPEED_NOISE_RATIO` (1.2×) is not called faster, and "better masks, or faster
   answers" is offered only when the faster model is faster by at least that much.

Taught in ``notebooks/09_four_families.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "MIN_USEFUL_AP50",
    "SPEED_NOISE_RATIO",
    "Measured",
    "Recommendation",
    "not_useful_reason",
    "recommend",
]

#: Box AP50 below which a model is not recommended (see the module docstring).
MIN_USEFUL_AP50 = 0.05

#: Smallest ratio of two timings called a real difference (see the module docstring).
SPEED_NOISE_RATIO = 1.2


@dataclass(frozen=True)
class Measured:
    """What was measured for one model on the validation images.

    Attributes:
        box_ap, box_ap50: COCO's box AP and AP50, in ``[0, 1]``.
        mask_ap: COCO's mask AP, ``nan`` for a model without masks (e.g. RetinaNet).
        latency_ms: milliseconds to predict one image (batch of one), > 0.
        kept: detections scoring at least the score threshold, over all validation images.
    """

    box_ap: float
    box_ap50: float
    mask_ap: float
    latency_ms: float
    kept: int

    @property
    def makes_masks(self) -> bool:
        return not math.isnan(self.mask_ap)


def not_useful_reason(
    m: Measured, score_thr: float, min_ap50: float = MIN_USEFUL_AP50
) -> str | None:
    """Why ``m`` is not worth recommending, in words, or ``None`` when it is.

    >>> not_useful_reason(Measured(0.0, 0.004, 0.0, 12.0, kept=0), score_thr=0.3)
    'no detection scores ≥ 0.3: it has learned nothing useful yet'
    """
    if m.kept == 0:
        return f"no detection scores ≥ {score_thr:g}: it has learned nothing useful yet"
    if m.box_ap50 < min_ap50:
        return (
            f"box AP50 {m.box_ap50:.3f} is below {min_ap50:g}: too little learned to recommend it"
        )
    return None


class Recommendation(NamedTuple):
    """What :func:`recommend` concluded; names are the keys of its input.

    Attributes:
        not_useful: ``{name: reason}`` for every model left out (:func:`not_useful_reason`).
        best_boxes: the useful model with the highest box AP (``None``: no useful model).
        best_masks: the useful model with masks with the highest mask AP (``None``: none).
        fastest_masks: the useful model with masks with the lowest latency (``None``: none).
        latency_ratio: ``best_masks``' latency over ``fastest_masks``' (1.0 when they are the
            same model or there is none).
        trade_off: ``fastest_masks`` is another model than ``best_masks`` and clearly faster
            (``latency_ratio >= noise_ratio``): better masks, or faster answers.
    """

    not_useful: dict[str, str]
    best_boxes: str | None
    best_masks: str | None
    fastest_masks: str | None
    latency_ratio: float
    trade_off: bool


def recommend(
    measured: Mapping[str, Measured],
    *,
    score_thr: float,
    min_ap50: float = MIN_USEFUL_AP50,
    noise_ratio: float = SPEED_NOISE_RATIO,
) -> Recommendation:
    """Pick the models to recommend for boxes, for masks and for fast masks.

    Only useful models take part (:func:`not_useful_reason`); ties go to the first in
    ``measured``'s order. Example: YOLACT has the lowest latency but keeps no detection at
    ``score_thr``, so it is in ``not_useful`` and the fast-masks pick is the fastest of the others;
    if that one is also the best, or answers within ``noise_ratio`` of the best, there is no
    trade-off.

    Args:
        measured: ``{name: Measured}`` for models evaluated on the same images.
        score_thr: the working score threshold ``kept`` was counted at (named in the reasons).
        min_ap50: see :data:`MIN_USEFUL_AP50`.
        noise_ratio: see :data:`SPEED_NOISE_RATIO`.

    Returns:
        A :class:`Recommendation`.
    """
    not_useful = {}
    for name, m in measured.items():
        reason = not_useful_reason(m, score_thr, min_ap50)
        if reason is not None:
            not_useful[name] = reason
    useful = {name: m for name, m in measured.items() if name not in not_useful}
    with_masks = {name: m for name, m in useful.items() if m.makes_masks}

    def best(models: dict, key) -> str | None:
        return max(models, key=key) if models else None  # max keeps the first of equals

    best_boxes = best(useful, lambda n: useful[n].box_ap)
    best_masks = best(with_masks, lambda n: with_masks[n].mask_ap)
    fastest_masks = best(with_masks, lambda n: -with_masks[n].latency_ms)
    ratio = 1.0
    if best_masks is not None and fastest_masks != best_masks:
        ratio = with_masks[best_masks].latency_ms / with_masks[fastest_masks].latency_ms
    return Recommendation(
        not_useful=not_useful,
        best_boxes=best_boxes,
        best_masks=best_masks,
        fastest_masks=fastest_masks,
        latency_ratio=ratio,
        trade_off=fastest_masks != best_masks and ratio >= noise_ratio,
    )
