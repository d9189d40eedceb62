"""SOLO's grid assignment: which grid cell of which FPN level learns which object (Wang et al.
2020, "SOLO: Segmenting Objects by Locations", Sec. 3.3.1; SOLO's ``solo_target_single``).

For each level ``(lo, hi), S`` and each object whose scale ``sqrt(w · h)`` lies in ``[lo, hi]``:

1. the object's centre is its mask's centre of mass (:func:`~instseg_edu.ops.masks.center_of_mass`);
   the centre cell is the cell of the ``S × S`` grid over the padded image that holds it;
2. its **centre region** (:func:`center_region`) is its box scaled by ``sigma`` around that centre;
   the cells the region touches — at most the centre cell and its 8 neighbours — are positive;
3. a positive cell ``(i, j)`` gets the object's class, and its mask channel ``i · S + j`` learns
   the object's mask; a later object takes over a cell an earlier one claimed.

:func:`solo_target_single` does this for one image, vectorised over objects and cells; the loop
as SOLO writes it is :func:`~instseg_edu.models.references.solo_target_single_reference`. The
model (:mod:`instseg_edu.models.solo`) calls it per image and batches the rest.

Encodings (:mod:`instseg_edu.structures`): a cell's label is ``BACKGROUND`` when no object owns
it, its ``gt_index`` ``NO_GT``.

Shape legend: ``G`` objects, ``L`` FPN levels, ``S`` a level's grid size, ``Hp, Wp`` the padded
input size.

Taught in ``notebooks/07_solo.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from instseg_edu.ops.masks import center_of_mass
from instseg_edu.structures import BACKGROUND, NO_GT

__all__ = ["MIN_MASK_AREA", "SOLOImageTargets", "center_region", "solo_target_single"]

#: Objects whose mask has fewer pixels than this (in the padded input image) train no cell
#: (hard-coded ``seg_mask.sum() < 10`` in SOLO's ``solo_target_single``).
MIN_MASK_AREA = 10


class SOLOImageTargets(NamedTuple):
    """What :func:`solo_target_single` assigns in one image.

    Attributes:
        cate_labels: per level ``int64 [S, S]``: the class of the object owning each cell,
            :data:`BACKGROUND` (-1) elsewhere.
        gt_index: per level ``int64 [S²]``: for mask channel ``i · S + j``, the index (into the
            image's ground truth) of the object whose mask it learns, or ``NO_GT`` (-1).
        centers: ``float64 [G, 2]`` ``(y, x)`` centre of mass of each mask in input pixels
            (pixel ``(r, c)`` counts at ``(r, c)``, as ``scipy.ndimage.center_of_mass``).
        levels: ``bool [G, L]``: object trained on level ``l`` (scale in range and mask area
            ``>= MIN_MASK_AREA``).
        cells: ``int64 [L, G, 4]`` ``(top, down, left, right)`` inclusive cell ranges of each
            object's positive cells on each level, ``-1`` where ``levels`` is False.
    """

    cate_labels: list[Tensor]
    gt_index: list[Tensor]
    centers: Tensor
    levels: Tensor
    cells: Tensor

    @property
    def gt_inds(self) -> list[Tensor]:
        """The former name of ``gt_index`` (read-only)."""
        return self.gt_index


def center_region(centers: Tensor, boxes: Tensor, sigma: float) -> Tensor:
    """SOLO's centre region of each object (Sec. 3.3.1, "center region"): its box scaled by
    ``sigma`` around the centre of mass of its mask.

    Example: centre ``(y, x) = (23.5, 23.5)``, box ``(8, 8, 40, 40)``, ``sigma = 0.2``: the region
    is ``23.5 ± 0.2 · 32 / 2 = 23.5 ± 3.2``, i.e. ``(20.3, 20.3, 26.7, 26.7)``.

    Args:
        centers: ``float64 [G, 2]`` ``(y, x)`` in pixel-index coordinates (:func:`center_of_mass`).
        boxes: ``float [G, 4]`` xyxy pixels; only their widths and heights are used.
        sigma: the region's size as a fraction of the box (SOLO: 0.2).

    Returns:
        ``float64 [G, 4]`` ``(x1, y1, x2, y2)`` in the centres' coordinates.
    """
    wh = (boxes[:, 2:] - boxes[:, :2]).to(torch.float64)  # [G, 2] (w, h)
    half = 0.5 * wh * sigma  # [G, 2]
    cxy = centers.flip(1)  # [G, 2] (x, y); a list index would copy itself to the device
    return torch.cat([cxy - half, cxy + half], dim=1)  # [G, 4]


def _grid_index(pos: Tensor, extent: float, num_grid: int) -> Tensor:
    """Grid cell of a pixel coordinate: SOLO's ``int((pos / extent) // (1. / num_grid))``.

    ``torch.div(..., rounding_mode="floor")`` on float64 is Python's float ``//`` (same algorithm),
    so a centre that lies exactly on a cell border lands in the same cell as in SOLO.
    """
    return torch.div(pos / extent, 1.0 / num_grid, rounding_mode="floor").long()


def solo_target_single(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    *,
    num_grids: tuple[int, ...],
    scale_ranges: tuple[tuple[float, float], ...],
    sigma: float,
    has_mask: Tensor | None = None,
) -> SOLOImageTargets:
    """SOLO's target assignment for one image (Sec. 3.3.1; ``SOLOHead.solo_target_single``).

    For each level ``(lo, hi), S`` and each object with ``lo <= sqrt(w · h) <= hi`` whose mask has
    at least :data:`MIN_MASK_AREA` pixels:

    1. ``(cy, cx)`` = centre of mass of its mask; the centre cell is
       ``(cy / Hp // (1 / S), cx / Wp // (1 / S))``.
    2. The centre region (:func:`center_region`) is ``cy ± sigma · h / 2``,
       ``cx ± sigma · w / 2`` (``h, w`` of its box); the cells it touches, clipped to the grid
       and to the centre cell ± 1, are positive.
    3. Those cells get the object's class; their mask channels ``i · S + j`` learn its mask.

    Worked example: a 64×64 padded image, ``S = 4`` (16-pixel cells), a box ``(8, 8, 40, 40)``
    with a full mask: centre of mass ``(23.5, 23.5)`` → cell ``(1, 1)``; with ``sigma = 0.2`` the
    region is ``23.5 ± 3.2`` → rows and columns ``20.3 // 16 = 1 .. 26.7 // 16 = 1``: one cell,
    channel ``1 · 4 + 1 = 5``.

    When two objects claim the same cell, the later one (higher index) wins, as in SOLO's loop.
    The computation is vectorised over objects and cells (a ``[G, S, S]`` coverage tensor per
    level); callers loop over images only. The loop itself, object by object and cell by cell:
    :func:`~instseg_edu.models.references.solo_target_single_reference`.

    A **box-only** object (``has_mask`` False) is placed by its box: its centre is the box's
    centre in the same pixel-index convention, ``((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5)`` —
    exactly the centre of mass of a mask filling the box — and its box area stands in for the
    mask area. Its cells get its class like any other; ``SOLO.targets`` leaves their mask
    channels out of the dice loss. (SOLO and MMDetection's ``SOLOHead`` skip an object whose mask
    is empty, which would train its cells as *background*: the category branch would learn to
    ignore the object. A mask channel is shared by every object centred in its cell, in every
    image, so it still learns from the objects that have masks.)

    Args:
        gt_boxes: ``float [G, 4]`` xyxy pixels.
        gt_labels: ``int64 [G]`` classes ``0..C-1``.
        gt_masks: ``bool [G, Hp, Wp]`` masks over the padded input; ``(Hp, Wp)`` is the extent the
            grid divides (SOLO: 4 × the finest mask size, i.e. the padded image).
        num_grids, scale_ranges, sigma: as in
            :class:`~instseg_edu.models.configs.solo.SOLOHeadConfig`.
        has_mask: ``bool [G]``, False for box-only objects (default: all True).

    Returns:
        :class:`SOLOImageTargets`.
    """
    device = gt_labels.device
    g = gt_labels.shape[0]
    num_levels = len(num_grids)
    hp, wp = gt_masks.shape[-2:]
    boxes = gt_boxes.to(device=device, dtype=torch.float64)
    w = boxes[:, 2] - boxes[:, 0]  # [G]
    h = boxes[:, 3] - boxes[:, 1]  # [G]
    scale = torch.sqrt(w * h)  # [G]
    big_enough = gt_masks.flatten(1).sum(dim=1) >= MIN_MASK_AREA  # [G]
    centers = center_of_mass(gt_masks)  # [G, 2] (y, x)
    if has_mask is not None:  # box-only objects: the box's centre and area stand in
        has_mask = has_mask.to(device)
        box_centers = torch.stack(
            [(boxes[:, 1] + boxes[:, 3]) / 2 - 0.5, (boxes[:, 0] + boxes[:, 2]) / 2 - 0.5], dim=1
        )  # [G, 2] (y, x)
        centers = torch.where(has_mask[:, None], centers, box_centers)
        big_enough = torch.where(has_mask, big_enough, w * h >= MIN_MASK_AREA)
    cy, cx = centers[:, 0], centers[:, 1]
    region = center_region(centers, boxes, sigma)  # [G, 4] (x1, y1, x2, y2)
    order = torch.arange(g, device=device)  # [G]

    cate_labels, gt_index, levels, cells = [], [], [], []
    for num_grid, (lo, hi) in zip(num_grids, scale_ranges):
        hit = (scale >= lo) & (scale <= hi) & big_enough  # [G]
        coord_h = _grid_index(cy, hp, num_grid)  # [G] centre cell row
        coord_w = _grid_index(cx, wp, num_grid)  # [G] centre cell column
        # cells the centre region touches, clipped to the grid and to the centre cell ± 1
        top = torch.maximum(_grid_index(region[:, 1], hp, num_grid).clamp(min=0), coord_h - 1)
        down = torch.minimum(_grid_index(region[:, 3], hp, num_grid).clamp(max=num_grid - 1),
                             coord_h + 1)  # fmt: skip
        left = torch.maximum(_grid_index(region[:, 0], wp, num_grid).clamp(min=0), coord_w - 1)
        right = torch.minimum(_grid_index(region[:, 2], wp, num_grid).clamp(max=num_grid - 1),
                              coord_w + 1)  # fmt: skip
        ranges = torch.stack([top, down, left, right], dim=1)  # [G, 4]
        cells.append(torch.where(hit[:, None], ranges, torch.full_like(ranges, -1)))
        levels.append(hit)

        grid = torch.arange(num_grid, device=device)  # [S]
        in_rows = (grid >= top[:, None]) & (grid <= down[:, None])  # [G, S]
        in_cols = (grid >= left[:, None]) & (grid <= right[:, None])  # [G, S]
        cover = in_rows[:, :, None] & in_cols[:, None, :] & hit[:, None, None]  # [G, S, S]
        # Owner of a cell = the last object covering it (SOLO writes objects in order).
        owner = torch.where(cover, order[:, None, None], NO_GT)  # [G, S, S]
        owner = owner.amax(dim=0) if g > 0 else owner.new_full((num_grid, num_grid), NO_GT)
        labels = gt_labels[owner.clamp(min=0)] if g > 0 else owner  # [S, S]
        cate_labels.append(torch.where(owner >= 0, labels, BACKGROUND))
        gt_index.append(owner.reshape(-1))  # [S*S], row i*S + j is cell (i, j)

    return SOLOImageTargets(
        cate_labels=cate_labels,
        gt_index=gt_index,
        centers=centers,
        levels=torch.stack(levels, dim=1) if num_levels else torch.zeros(g, 0, dtype=torch.bool),
        cells=torch.stack(cells, dim=0),  # [L, G, 4]
    )
