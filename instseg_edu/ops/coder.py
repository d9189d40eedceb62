"""The delta box coder: what a box-regression head actually predicts (R-CNN, Girshick et al. 2014,
Appendix C; Faster R-CNN, Ren et al. 2015, Sec. 3.1.2, Eq. 2).

A head does not predict pixel coordinates. It predicts how to move and rescale a reference box
``p`` (an anchor or a proposal) onto the target ``g``, in units of the reference box's size::

    dx = (gx - px) / pw        dy = (gy - py) / ph        (centre shift, in box widths/heights)
    dw = log(gw / pw)          dh = log(gh / ph)          (log of the size ratio)

then normalised as ``(d - target_means) / target_stds``. These four numbers have roughly the same
scale for tiny and huge boxes, which is what makes one regression head work on every FPN level.
Worked example: anchor ``(0, 0, 10, 10)``, target ``(2, 2, 12, 14)`` -> ``(0.2, 0.3, 0, log 1.2)``.

Decoding inverts this; ``dw, dh`` are clamped to ``±|log(16/1000)| ≈ ±4.135`` first, so a wild
prediction cannot grow a box by more than ``1000/16 = 62.5×`` (and cannot overflow ``exp``).
Numbers are those of MMDetection's ``DeltaXYWHBBoxCoder`` (widths ``x2 - x1``, no "+1").

The coder is a frozen dataclass of its two MMDetection keys, so a model's config holds it directly
as its ``bbox_coder`` (there is no separate coder config).

Taught in ``notebooks/03_assignment_and_box_coding.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DeltaXYWHBBoxCoder"]


@dataclass(frozen=True)
class DeltaXYWHBBoxCoder:
    """Encode boxes as deltas ``(dx, dy, dw, dh)`` relative to reference boxes, and decode back.

    Args:
        target_means: subtracted from the raw deltas (MMDetection key; usually zeros).
        target_stds: divides the raw deltas (RetinaNet ``(1, 1, 1, 1)``; Faster R-CNN's RPN
            ``(1, 1, 1, 1)``, its box head ``(0.1, 0.1, 0.2, 0.2)``).
    """

    target_means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        means = tuple(float(m) for m in self.target_means)
        stds = tuple(float(s) for s in self.target_stds)
        if len(means) != 4:
            raise ValueError(f"target_means={self.target_means!r} must have 4 values")
        if len(stds) != 4 or any(not s > 0 for s in stds):
            raise ValueError(f"target_stds={self.target_stds!r} must be 4 values > 0")
        object.__setattr__(self, "target_means", means)
        object.__setattr__(self, "target_stds", stds)

    def encode(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """Deltas that move ``boxes`` onto ``gt_boxes``.

        Args:
            boxes: ``float [..., 4]`` xyxy reference boxes (anchors/proposals), positive size.
            gt_boxes: ``float [..., 4]`` xyxy targets, broadcastable with ``boxes``.

        Returns:
            ``float [..., 4]`` normalised deltas ``(dx, dy, dw, dh)``.
        """
        px, py = (boxes[..., 0] + boxes[..., 2]) * 0.5, (boxes[..., 1] + boxes[..., 3]) * 0.5
        pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        gx, gy = (
            (gt_boxes[..., 0] + gt_boxes[..., 2]) * 0.5,
            (gt_boxes[..., 1] + gt_boxes[..., 3]) * 0.5,
        )
        gw, gh = gt_boxes[..., 2] - gt_boxes[..., 0], gt_boxes[..., 3] - gt_boxes[..., 1]
        raw = ((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph))
        # Means and stds stay Python floats: a tensor built from them on every call would be a
        # host-to-device copy on the GPU path.
        return torch.stack(
            [(d - m) / s for d, m, s in zip(raw, self.target_means, self.target_stds)], dim=-1
        )  # [..., 4]

    def decode(
        self,
        boxes: Tensor,
        deltas: Tensor,
        max_shape: tuple[int, int] | None = None,
        wh_ratio_clip: float = 16 / 1000,
    ) -> Tensor:
        """Apply predicted deltas to reference boxes.

        Args:
            boxes: ``float [..., 4]`` xyxy reference boxes.
            deltas: ``float [..., 4]`` normalised deltas, broadcastable with ``boxes``
                (class-specific ``[N, 4*C]`` deltas are reshaped to ``[N, C, 4]`` by the caller,
                with ``boxes[:, None]``).
            max_shape: ``(H, W)``: clip the result to ``x in [0, W]``, ``y in [0, H]``; ``None``: no
                clipping.
            wh_ratio_clip: ``dw, dh`` are clamped to ``±|log(wh_ratio_clip)|``.

        Returns:
            ``float [..., 4]`` xyxy boxes.
        """
        dx, dy, dw, dh = (
            deltas[..., i] * s + m
            for i, (m, s) in enumerate(zip(self.target_means, self.target_stds))
        )  # each [...], raw deltas
        max_ratio = abs(math.log(wh_ratio_clip))
        dxy = torch.stack([dx, dy], dim=-1)  # [..., 2]
        dwh = torch.stack([dw, dh], dim=-1).clamp(min=-max_ratio, max=max_ratio)  # [..., 2]
        pxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5  # [..., 2] centres
        pwh = boxes[..., 2:] - boxes[..., :2]  # [..., 2] sizes
        gxy = pxy + pwh * dxy
        gwh = pwh * dwh.exp()
        out = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)  # [..., 4] xyxy
        if max_shape is not None:
            h, w = max_shape[:2]
            x = out[..., 0::2].clamp(min=0, max=w)  # [..., 2]
            y = out[..., 1::2].clamp(min=0, max=h)  # [..., 2]
            out = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
        return out
