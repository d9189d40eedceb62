"""Small operations on binary masks shared by the mask models (SOLO, YOLACT, the notebooks).

- :func:`center_of_mass` — the mean row and column of a mask's pixels (SOLO's centre cell).
- :func:`resize_masks` — bilinear resize of binary masks, rounded back to ``{0, 1}``.
- :func:`masks_to_boxes` — the tight box of each mask (boxes of mask-only predictions).
- :func:`crop_masks` — zero a mask outside its box (YOLACT's crop, Sec. 3.3).

Pixel ``(i, j)`` covers ``[j, j + 1) × [i, i + 1)`` in image coordinates, so its centre is
``(j + 0.5, i + 0.5)``; boxes are ``xyxy`` on pixel edges.

Shape legend: ``G`` masks (objects), ``K`` masks (detections), ``H, W`` their height and width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["center_of_mass", "crop_masks", "masks_to_boxes", "resize_masks"]


def center_of_mass(masks: Tensor) -> Tensor:
    """Centre of mass ``(y, x)`` of each binary mask, in float64 pixel indices.

    The mean row and mean column of the mask's pixels — ``scipy.ndimage.center_of_mass`` without
    scipy. Example: a mask with pixels at rows 2..4 and columns 10..11 has centre ``(3.0, 10.5)``.
    An empty mask gives ``(0, 0)``.

    Args:
        masks: ``bool [G, H, W]``.

    Returns:
        ``float64 [G, 2]``.
    """
    g, h, w = masks.shape
    m = masks.to(torch.float64)
    area = m.sum(dim=(1, 2)).clamp(min=1)  # [G]
    rows = torch.arange(h, device=masks.device, dtype=torch.float64)  # [H]
    cols = torch.arange(w, device=masks.device, dtype=torch.float64)  # [W]
    cy = (m.sum(dim=2) * rows).sum(dim=1) / area  # [G]: row profile [G, H] · row index
    cx = (m.sum(dim=1) * cols).sum(dim=1) / area  # [G]: column profile [G, W] · column index
    return torch.stack([cy, cx], dim=1)  # [G, 2]


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize binary masks bilinearly and round: ``bool [G, H, W] → float {0, 1} [G, h, w]``.

    SOLO resizes each ground-truth mask with ``mmcv.imrescale`` (bilinear on a ``uint8`` mask,
    rounded back to 0/1) by ``1 / output_stride``; for a padded input whose sides are multiples of
    32 that is exactly the level's mask size, which we resize to directly.
    """
    if masks.shape[0] == 0:
        return masks.new_zeros(0, *size, dtype=torch.float32)
    m = F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return (m[:, 0] >= 0.5).float()  # [G, h, w]


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight box of each mask, xyxy on pixel edges (COCO's convention): a mask covering columns
    3..5 and rows 1..2 gives ``(3, 1, 6, 3)``. Empty masks give ``(0, 0, 0, 0)``.

    Args:
        masks: ``bool [K, H, W]``.

    Returns:
        ``float32 [K, 4]``.
    """
    k, h, w = masks.shape
    rows = masks.any(dim=2)  # [K, H]
    cols = masks.any(dim=1)  # [K, W]
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ys, h).amin(dim=1) if h else ys.new_zeros(k)
    y2 = torch.where(rows, ys + 1, 0).amax(dim=1) if h else ys.new_zeros(k)
    x1 = torch.where(cols, xs, w).amin(dim=1) if w else xs.new_zeros(k)
    x2 = torch.where(cols, xs + 1, 0).amax(dim=1) if w else xs.new_zeros(k)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()  # [K, 4]
    return torch.where(rows.any(dim=1)[:, None], boxes, torch.zeros_like(boxes))


def crop_masks(masks: Tensor, boxes: Tensor) -> Tensor:
    """Zero every mask outside its box (YOLACT, Bolya et al. 2019, Sec. 3.3, "Cropping").

    A pixel ``(i, j)`` covers ``[j, j+1) × [i, i+1)`` and is kept when its centre
    ``(j + 0.5, i + 0.5)`` lies in ``[x1, x2) × [y1, y2)``. Example on a 4×4 grid with the box
    ``(1, 0.6, 3, 2)``: columns 1, 2 (centres 1.5, 2.5) and rows 1 (centre 1.5; row 0's centre 0.5
    is above 0.6) survive. (The YOLACT code pads the box by one pixel and truncates coordinates; the
    centre rule is the same rule used to rasterise masks and boxes elsewhere in this library.)

    Args:
        masks: ``float [..., K, H, W]``.
        boxes: ``float [..., K, 4]`` xyxy in the *masks'* pixel units.

    Returns:
        ``masks * inside``, same shape and dtype.
    """
    h, w = masks.shape[-2:]
    xs = torch.arange(w, device=masks.device, dtype=boxes.dtype) + 0.5  # [W] pixel centres
    ys = torch.arange(h, device=masks.device, dtype=boxes.dtype) + 0.5  # [H]
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))  # each [..., K, 1]
    in_x = (xs >= x1) & (xs < x2)  # [..., K, W]
    in_y = (ys >= y1) & (ys < y2)  # [..., K, H]
    inside = in_y[..., :, None] & in_x[..., None, :]  # [..., K, H, W]
    return masks * inside.to(masks.dtype)
