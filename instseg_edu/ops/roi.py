"""RoIPool and RoIAlign, rebuilt step by step in plain PyTorch.

A detector's second stage needs a fixed-size feature (say 7×7) for every region of interest (RoI),
whatever the RoI's size. Both ops cut the RoI into ``output_size`` bins and summarise each bin:

* **RoIPool** (Fast R-CNN, Girshick 2015, Sec. 2.1) snaps the RoI to the feature grid, then snaps
  every bin edge to the grid too, and takes the max over the cells of each bin. Two roundings: the
  pooled feature describes a slightly different box than the one asked for.
* **RoIAlign** (Mask R-CNN, He et al. 2017, Sec. 3) keeps every coordinate real, places
  ``sampling_ratio²`` points regularly inside each bin, reads the map at those points by bilinear
  interpolation and averages them. Nothing is rounded, so a mask predicted on the 28×28 grid
  lines up with the object pixel for pixel. ``aligned=True`` (Detectron2) also moves the RoI by
  half a cell, because a cell's value describes its centre, not its top-left corner.

``roi_pool_reference`` and ``roi_align_reference`` equal ``torchvision.ops.roi_pool`` and
``torchvision.ops.roi_align`` (CPU kernels) for every RoI — inside, straddling or outside the map,
tiny or huge, any ``spatial_scale`` — and are vectorized over RoIs, bins and sample points. The
models use torchvision's compiled ops; these exist to be read, drawn and tested against.
``roi_align_matmul`` is the same RoIAlign written as two small matrix products per RoI
(bilinear interpolation is separable); it is the models' RoIAlign when they train on the CPU
with small maps, where it is faster than torchvision's kernel. ``roi_pool_cells`` and
``roi_align_sampling_points`` return the geometry both ops compute (the
quantized cells, the sample points) for drawing, and ``roipool_misalignment`` measures, in image
pixels, what RoIPool's roundings cost. Walkthrough: ``notebooks/05_roipool_vs_roialign.py``.

Coordinates: ``rois`` are ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in image pixels, as in
torchvision (a list of per-image ``[L, 4]`` boxes is accepted too). ``spatial_scale`` maps image
pixels to feature cells (``1 / stride``). For drawing, feature cell ``(i, j)`` covers image pixels
``[j / s, (j + 1) / s) × [i / s, (i + 1) / s)``; its value sits at the cell's centre.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RoIAlignSamples",
    "RoIPoolCells",
    "RoIPoolMisalignment",
    "kernel_roi_align",
    "prefers_roi_align_matmul",
    "roi_align_matmul",
    "roi_align_reference",
    "roi_align_weights",
    "roi_align_sampling_points",
    "roi_pool_cells",
    "roi_pool_reference",
    "roipool_misalignment",
]

# torchvision's RoIPool starts every non-empty bin's running max at -FLT_MAX (for float and double
# alike), so a bin full of -inf pools to -FLT_MAX, not -inf.
FLT_MAX = 3.4028234663852886e38


class RoIPoolCells(NamedTuple):
    """The feature cells RoIPool reads (see ``roi_pool_cells``). ``PH, PW`` = ``output_size``."""

    batch_index: Tensor  # [K] int64
    roi_cells: Tensor  # [K, 4] int64 (x1, y1, x2, y2): rounded RoI, end cell included
    bins: Tensor  # [K, PH, PW, 4] int64 (x_start, y_start, x_end, y_end): half-open cell ranges
    empty: Tensor  # [K, PH, PW] bool: the bin holds no cell (pools to 0)
    roi_image: Tensor  # [K, 4] float: the rounded RoI in image pixels (x1, y1, x2, y2)
    bins_image: Tensor  # [K, PH, PW, 4] float: each bin's cells in image pixels (x1, y1, x2, y2)


class RoIAlignSamples(NamedTuple):
    """RoIAlign's bins and bilinear sample points (see ``roi_align_sampling_points``).

    ``G = GH * GW`` is the largest sample grid over the RoIs; RoIs with a smaller adaptive grid are
    padded, and ``real`` marks the points that exist.
    """

    batch_index: Tensor  # [K] int64
    points: Tensor  # [K, PH, PW, G, 2] float (x, y) in image pixels
    real: Tensor  # [K, PH, PW, G] bool: a sample of this RoI (not padding)
    inside: Tensor  # [K, PH, PW, G] bool: real and read from the map (else it contributes 0)
    grid: Tensor  # [K, 2] int64 (GW, GH): samples per bin along x and y for each RoI
    count: Tensor  # [K] float: the divisor of the bin average, max(GW * GH, 1)
    bins_image: Tensor  # [K, PH, PW, 4] float: real-valued bins in image pixels (x1, y1, x2, y2)


class RoIPoolMisalignment(NamedTuple):
    """How far RoIPool's pooled grid drifts from the RoI, per RoI (see ``roipool_misalignment``).

    All ``[K, 2]`` fields are ``(x, y)``, i.e. (width, height).
    """

    # The textbook account (Fast R-CNN as usually explained): floor the RoI's size on the map, then
    # floor the bin size; the grid of whole bins covers less than the RoI.
    roi_cells: Tensor  # [K, 2] the RoI's size on the map, in cells (600 px / 32 -> 18.75)
    floored_cells: Tensor  # [K, 2] first rounding: floor(roi_cells) (18)
    bin_cells: Tensor  # [K, 2] second rounding: floor(floored_cells / output_size) (2)
    first_rounding_px: Tensor  # [K, 2] (roi_cells - floored_cells) / spatial_scale (24 px)
    second_rounding_px: Tensor  # [K, 2] (floored_cells - bin_cells * output) / scale (128 px)
    lost_px: Tensor  # [K, 2] the sum: image pixels of the RoI outside the pooled grid (152 px)
    # What torchvision's RoIPool (and roi_pool_reference) really does: round the RoI's corners,
    # keep the end cell, and cover each bin with floor/ceil edges (neighbouring bins may overlap).
    boundary_px: Tensor  # [K, 4] signed shift of the read cells' outer edges (x1, y1, x2, y2)
    bin_edge_px: Tensor  # [K, 2] largest |cell-snapped bin edge - exact bin edge| over the bins


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    output_size = tuple(int(s) for s in output_size)
    if len(output_size) != 2 or min(output_size) <= 0:
        raise ValueError(f"output_size must be a positive int or (h, w) pair, got {output_size}")
    return output_size


def _as_rois(rois: Tensor | list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """``[K, 5]`` (batch_index, x1, y1, x2, y2); per-image ``[L, 4]`` box lists are converted."""
    if isinstance(rois, (list, tuple)):
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(rois)]
        )  # [K, 5]
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be [K, 5] (batch_index, x1, y1, x2, y2), got {rois.shape}")
    if dtype is None:
        dtype = rois.dtype if rois.is_floating_point() else torch.float32
    return rois.to(dtype)


def _check_scale(spatial_scale: float) -> float:
    if not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be > 0, got {spatial_scale}")
    return float(spatial_scale)


def _round_half_away_from_zero(x: Tensor) -> Tensor:
    """C's ``round``: 2.5 -> 3, -2.5 -> -3 (``torch.round`` gives 2 and -2, rounding to even).

    ``x - trunc(x)`` is exact in floating point, so this never misrounds 0.49999997 the way
    ``floor(x + 0.5)`` does.
    """
    whole = torch.trunc(x)
    frac = x - whole
    return whole + torch.where(frac.abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# RoIPool
# ----------------------------------------------------------------------------------------------


def roi_pool_cells(
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    featmap_size: tuple[int, int] | None = None,
) -> RoIPoolCells:
    """The feature cells each RoIPool bin max-pools over, exactly as torchvision computes them.

    Args:
        rois: ``[K, 5]`` (batch_index, x1, y1, x2, y2) in image pixels.
        output_size: ``PH`` (int) or ``(PH, PW)`` bins per RoI.
        spatial_scale: image pixels -> feature cells, e.g. ``1 / 32``.
        featmap_size: ``(H, W)`` of the map; when given, bins are clipped to it like the kernel
            does. ``None`` keeps the unclipped cells (useful for drawing RoIs near the border).

    Returns:
        ``RoIPoolCells``; cells are integer indices, ``*_image`` fields are image pixels.
    """
    ph_count, pw_count = _pair(output_size)
    scale = _check_scale(spatial_scale)
    rois = _as_rois(rois)
    dtype, device = rois.dtype, rois.device
    scale_t = torch.tensor(scale, dtype=dtype, device=device)  # the kernel's T spatial_scale

    # Stage 1 — scale the RoI to the map and round its corners to whole cells (first rounding).
    # Halves round away from zero, as C's round(): 18.5 -> 19.
    corners = _round_half_away_from_zero(rois[:, 1:] * scale_t).long()  # [K, 4] x1, y1, x2, y2
    x_first, y_first, x_last, y_last = corners.unbind(1)  # each [K]

    # Stage 2 — the RoI spans from the first to the last cell *inclusive* (Caffe's convention for
    # pixel boxes), and a malformed RoI (x2 < x1) is forced to one cell.
    roi_w = (x_last - x_first + 1).clamp(min=1)  # [K]
    roi_h = (y_last - y_first + 1).clamp(min=1)  # [K]
    bin_w = roi_w.to(dtype) / pw_count  # [K] real bin size in cells, e.g. 20 / 7 = 2.857
    bin_h = roi_h.to(dtype) / ph_count  # [K]

    # Stage 3 — snap every bin edge to the grid (second rounding): a bin starts at the floor and
    # ends at the ceil of its real edges, so bins cover the rounded RoI and may overlap by a cell.
    pw = torch.arange(pw_count, dtype=dtype, device=device)  # [PW]
    ph = torch.arange(ph_count, dtype=dtype, device=device)  # [PH]
    x_start = torch.floor(pw[None, :] * bin_w[:, None]).long() + x_first[:, None]  # [K, PW]
    x_end = torch.ceil((pw[None, :] + 1) * bin_w[:, None]).long() + x_first[:, None]  # [K, PW]
    y_start = torch.floor(ph[None, :] * bin_h[:, None]).long() + y_first[:, None]  # [K, PH]
    y_end = torch.ceil((ph[None, :] + 1) * bin_h[:, None]).long() + y_first[:, None]  # [K, PH]

    # Stage 4 — clip to the map; a bin left without cells is empty (it will pool to 0).
    if featmap_size is not None:
        height, width = featmap_size
        x_start, x_end = x_start.clamp(0, width), x_end.clamp(0, width)
        y_start, y_end = y_start.clamp(0, height), y_end.clamp(0, height)

    bins = torch.stack(
        torch.broadcast_tensors(
            x_start[:, None, :], y_start[:, :, None], x_end[:, None, :], y_end[:, :, None]
        ),
        dim=-1,
    )  # [K, PH, PW, 4]
    empty = (bins[..., 2] <= bins[..., 0]) | (bins[..., 3] <= bins[..., 1])  # [K, PH, PW]
    roi_cells = corners.clone()
    roi_cells[:, 2] = x_first + roi_w - 1  # the malformed-RoI rule applied to the end cell
    roi_cells[:, 3] = y_first + roi_h - 1
    # Cell c covers image pixels [c / s, (c + 1) / s): the end cell's right edge is (c + 1) / s.
    edges = roi_cells.to(dtype) + torch.tensor([0, 0, 1, 1], dtype=dtype, device=device)
    return RoIPoolCells(
        batch_index=rois[:, 0].long(),
        roi_cells=roi_cells,
        bins=bins,
        empty=empty,
        roi_image=edges / scale,
        bins_image=bins.to(dtype) / scale,
    )


def roi_pool_reference(
    features: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoIPool (Fast R-CNN Sec. 2.1): max over the grid cells of each quantized bin.

    Equals ``torchvision.ops.roi_pool`` (also for RoIs outside the map, whose empty bins give 0).

    Args:
        features: ``[B, C, H, W]`` float feature maps.
        rois: ``[K, 5]`` (batch_index, x1, y1, x2, y2) in image pixels.
        output_size: ``PH`` or ``(PH, PW)``.
        spatial_scale: image pixels -> feature cells (``1 / stride``).

    Returns:
        ``[K, C, PH, PW]`` pooled features.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [B, C, H, W], got {features.shape}")
    height, width = features.shape[-2:]
    rois = _as_rois(rois, features.dtype).to(features.device)

    # Stages 1-4 — the quantized cells of every bin (one truth with the drawings).
    cells = roi_pool_cells(rois, output_size, spatial_scale, featmap_size=(height, width))
    x_start, x_end = cells.bins[:, 0, :, 0], cells.bins[:, 0, :, 2]  # [K, PW]
    y_start, y_end = cells.bins[:, :, 0, 1], cells.bins[:, :, 0, 3]  # [K, PH]

    # Stage 5 — list each bin's cells. Bins differ in length, so pad every bin to the longest
    # (LH rows × LW columns) and remember which entries are real.
    len_h = max(int((y_end - y_start).max()), 1) if rois.shape[0] else 1
    len_w = max(int((x_end - x_start).max()), 1) if rois.shape[0] else 1
    rows = y_start[:, :, None] + torch.arange(len_h, device=features.device)  # [K, PH, LH]
    cols = x_start[:, :, None] + torch.arange(len_w, device=features.device)  # [K, PW, LW]
    row_ok = rows < y_end[:, :, None]  # [K, PH, LH]
    col_ok = cols < x_end[:, :, None]  # [K, PW, LW]

    # Stage 6 — gather: features[b, :, row, col] for every (RoI, bin, cell).
    b = cells.batch_index[:, None, None, None, None]  # [K, 1, 1, 1, 1]
    r = rows.clamp(0, height - 1)[:, :, :, None, None]  # [K, PH, LH, 1, 1]
    c = cols.clamp(0, width - 1)[:, None, None, :, :]  # [K, 1, 1, PW, LW]
    cells_last = features.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]: gathers copy C-vectors
    values = cells_last[b, r, c]  # [K, PH, LH, PW, LW, C]
    ok = (row_ok[:, :, :, None, None] & col_ok[:, None, None, :, :])[..., None]  # [K,PH,LH,PW,LW,1]

    # Stage 7 — max over each bin's cells. The kernel's running max starts at -FLT_MAX and ignores
    # NaN (NaN > m is false); an empty bin gives 0.
    values = values.masked_fill_(~ok, float("-inf"))  # in place: values is a fresh gather
    values = values.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    pooled = values.amax(dim=(2, 4)).clamp(min=-FLT_MAX)  # [K, PH, PW, C]
    pooled = torch.where(cells.empty[..., None], torch.zeros_like(pooled), pooled)
    return pooled.permute(0, 3, 1, 2).contiguous()  # [K, C, PH, PW]


# ----------------------------------------------------------------------------------------------
# RoIAlign
# ----------------------------------------------------------------------------------------------


class _SampleAxes(NamedTuple):
    """RoIAlign's sample grid is a product of a y-grid and an x-grid; each axis on its own."""

    ys: Tensor  # [K, PH, GH] sample y in feature coordinates (cell i's centre is at i)
    xs: Tensor  # [K, PW, GW]
    y_real: Tensor  # [K, 1, GH] bool: iy < this RoI's GH (not padding)
    x_real: Tensor  # [K, 1, GW]
    grid_h: Tensor  # [K] int64
    grid_w: Tensor  # [K] int64
    y_edges: Tensor  # [K, PH + 1] bin edges in feature coordinates
    x_edges: Tensor  # [K, PW + 1]


def _roi_align_axes(
    rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> _SampleAxes:
    ph_count, pw_count = _pair(output_size)
    scale = _check_scale(spatial_scale)
    dtype, device = rois.dtype, rois.device
    scale_t = torch.tensor(scale, dtype=dtype, device=device)

    # Stage 1 — scale the RoI to the map, keeping real coordinates. With aligned=True, shift by
    # half a cell: cell i covers image pixels [i / s, (i + 1) / s) and its value sits at the
    # centre, so image position x is at x * s - 0.5 in coordinates where cell centres are integers.
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, 1:] * scale_t - offset).unbind(1)  # each [K]
    roi_w, roi_h = x2 - x1, y2 - y1  # [K]
    if not aligned:
        # The legacy op forces at least one cell, so tiny RoIs still get spread-out samples.
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)

    # Stage 2 — real-valued bins: no rounding anywhere.
    bin_w, bin_h = roi_w / pw_count, roi_h / ph_count  # [K]

    # Stage 3 — samples per bin: sampling_ratio along each axis, or adaptively
    # ceil(bin size in cells), i.e. about one sample per cell: a 18.75-cell wide RoI with 7 bins
    # gets ceil(2.68) = 3 samples per bin along x.
    if sampling_ratio > 0:
        grid_h = torch.full_like(x1, sampling_ratio, dtype=torch.long)  # [K]
        grid_w = torch.full_like(x1, sampling_ratio, dtype=torch.long)  # [K]
    else:
        grid_h = torch.ceil(roi_h / ph_count).long()  # [K]
        grid_w = torch.ceil(roi_w / pw_count).long()  # [K]
    # Adaptive grids differ per RoI: pad to the largest and mask the padding.
    max_gh = max(int(grid_h.max()), 0) if len(grid_h) else 0
    max_gw = max(int(grid_w.max()), 0) if len(grid_w) else 0
    iy = torch.arange(max_gh, device=device)  # [GH]
    ix = torch.arange(max_gw, device=device)  # [GW]
    y_real = (iy[None, :] < grid_h[:, None])[:, None, :]  # [K, 1, GH]
    x_real = (ix[None, :] < grid_w[:, None])[:, None, :]  # [K, 1, GW]

    # Stage 4 — place the samples at the centres of a GH×GW sub-grid of each bin:
    # y = y1 + ph * bin_h + (iy + 0.5) * bin_h / GH, with the kernel's order of float operations.
    ph = torch.arange(ph_count, dtype=dtype, device=device)  # [PH]
    pw = torch.arange(pw_count, dtype=dtype, device=device)  # [PW]
    div_h = grid_h.clamp(min=1).to(dtype)[:, None, None]  # [K, 1, 1]; padding only when GH <= 0
    div_w = grid_w.clamp(min=1).to(dtype)[:, None, None]
    ys = (y1[:, None, None] + ph[None, :, None] * bin_h[:, None, None]) + (
        (iy.to(dtype) + 0.5)[None, None, :] * bin_h[:, None, None]
    ) / div_h  # [K, PH, GH]
    xs = (x1[:, None, None] + pw[None, :, None] * bin_w[:, None, None]) + (
        (ix.to(dtype) + 0.5)[None, None, :] * bin_w[:, None, None]
    ) / div_w  # [K, PW, GW]
    y_edges = y1[:, None] + torch.arange(ph_count + 1, dtype=dtype, device=device) * bin_h[:, None]
    x_edges = x1[:, None] + torch.arange(pw_count + 1, dtype=dtype, device=device) * bin_w[:, None]
    return _SampleAxes(ys, xs, y_real, x_real, grid_h, grid_w, y_edges, x_edges)


def _linear_weights(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """1-D half of bilinear interpolation, with torchvision's border rules.

    A sample more than one cell outside the map (``coord < -1`` or ``coord > size``) reads 0.
    Within that margin it is clamped to the border cell: ``-0.7`` reads cell 0, ``size - 0.2``
    reads cell ``size - 1``. Returns ``(low, high, w_low, w_high, inside)``, shaped like ``coord``.
    """
    inside = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0, max=float(size))  # the upper clamp only touches outside samples
    low = torch.floor(coord).long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    coord = torch.where(at_edge, low.to(coord.dtype), coord)
    w_high = coord - low.to(coord.dtype)  # distance past the low cell
    w_low = 1.0 - w_high
    return low, high, w_low, w_high, inside


def roi_align_sampling_points(
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    featmap_size: tuple[int, int] | None = None,
) -> RoIAlignSamples:
    """RoIAlign's bins and sample points in image pixels, for drawing.

    A sample at feature coordinate ``u`` (cell centres at integers) is drawn at image coordinate
    ``(u + 0.5) / spatial_scale``, the place on the image whose feature it really reads. With
    ``aligned=True`` the points therefore sit exactly inside the RoI's bins; with ``aligned=False``
    they are all shifted by half a cell (``0.5 / spatial_scale`` pixels) down and to the right.

    Args:
        rois, output_size, spatial_scale, sampling_ratio, aligned: as ``roi_align_reference``.
        featmap_size: ``(H, W)``; when given, ``inside`` flags samples that read the map
            (otherwise every real sample counts as inside).

    Returns:
        ``RoIAlignSamples`` (``G`` = the largest ``GH * GW``; padding has ``real == False``).
    """
    rois = _as_rois(rois)
    axes = _roi_align_axes(rois, output_size, spatial_scale, sampling_ratio, aligned)
    k, ph_count, gh = axes.ys.shape
    pw_count, gw = axes.xs.shape[1:]
    to_image = 1.0 / _check_scale(spatial_scale)

    # Cartesian product of the y- and x-samples of every bin, y-major like the kernel's loops.
    ys = axes.ys[:, :, None, :, None].expand(k, ph_count, pw_count, gh, gw)  # [K,PH,PW,GH,GW]
    xs = axes.xs[:, None, :, None, :].expand(k, ph_count, pw_count, gh, gw)  # [K,PH,PW,GH,GW]
    points = torch.stack([xs, ys], dim=-1).reshape(k, ph_count, pw_count, gh * gw, 2)  # [..,G,2]
    real = (axes.y_real[:, :, None, :, None] & axes.x_real[:, :, None, None, :]).expand(
        k, ph_count, pw_count, gh, gw
    )  # [K, PH, PW, GH, GW]
    inside = real
    if featmap_size is not None:
        height, width = featmap_size
        y_in = (axes.ys >= -1.0) & (axes.ys <= height)  # [K, PH, GH]
        x_in = (axes.xs >= -1.0) & (axes.xs <= width)  # [K, PW, GW]
        inside = real & y_in[:, :, None, :, None] & x_in[:, None, :, None, :]

    edges = torch.stack(
        torch.broadcast_tensors(
            axes.x_edges[:, None, :-1],
            axes.y_edges[:, :-1, None],
            axes.x_edges[:, None, 1:],
            axes.y_edges[:, 1:, None],
        ),
        dim=-1,
    )  # [K, PH, PW, 4] in feature coordinates
    return RoIAlignSamples(
        batch_index=rois[:, 0].long(),
        points=(points + 0.5) * to_image,
        real=real.reshape(k, ph_count, pw_count, gh * gw),
        inside=inside.reshape(k, ph_count, pw_count, gh * gw),
        grid=torch.stack([axes.grid_w, axes.grid_h], dim=1),
        count=(axes.grid_h * axes.grid_w).clamp(min=1).to(rois.dtype),
        # same drawing convention; with aligned=True the bins tile the RoI's own box exactly
        bins_image=(edges + 0.5) * to_image,
    )


def roi_align_reference(
    features: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (Mask R-CNN Sec. 3): average of bilinear samples on a real-valued grid of bins.

    Equals ``torchvision.ops.roi_align`` for finite features (also for RoIs straddling or outside
    the map, tiny or huge RoIs and adaptive sampling). Memory grows as ``K·C·PH·PW·GH·GW``.

    Args:
        features: ``[B, C, H, W]`` float feature maps.
        rois: ``[K, 5]`` (batch_index, x1, y1, x2, y2) in image pixels.
        output_size: ``PH`` or ``(PH, PW)``.
        spatial_scale: image pixels -> feature cells (``1 / stride``).
        sampling_ratio: samples per bin along each axis; ``<= 0`` means adaptive,
            ``ceil(roi_size / output_size)`` per RoI.
        aligned: shift the RoI by half a cell (Detectron2); ``False`` reproduces the original op.

    Returns:
        ``[K, C, PH, PW]`` pooled features.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [B, C, H, W], got {features.shape}")
    height, width = features.shape[-2:]
    rois = _as_rois(rois, features.dtype).to(features.device)

    # Stages 1-4 — real-valued bins and their sample points (shared with the drawings).
    axes = _roi_align_axes(rois, output_size, spatial_scale, sampling_ratio, aligned)

    # Stage 5 — bilinear interpolation, one axis at a time: each sample reads the two nearest
    # rows and the two nearest columns; its four weights are products of 1-D weights.
    y_lo, y_hi, wy_lo, wy_hi, y_in = _linear_weights(axes.ys, height)  # each [K, PH, GH]
    x_lo, x_hi, wx_lo, wx_hi, x_in = _linear_weights(axes.xs, width)  # each [K, PW, GW]
    # A padded or off-map sample contributes 0 (but still counts in the average).
    y_keep = (axes.y_real & y_in).to(features.dtype)  # [K, PH, GH]
    x_keep = (axes.x_real & x_in).to(features.dtype)  # [K, PW, GW]
    wy_lo, wy_hi = wy_lo * y_keep, wy_hi * y_keep
    wx_lo, wx_hi = wx_lo * x_keep, wx_hi * x_keep

    def to_rows(t: Tensor) -> Tensor:
        return t[:, :, :, None, None]  # [K, PH, GH] -> [K, PH, GH, 1, 1]

    def to_cols(t: Tensor) -> Tensor:
        return t[:, None, None, :, :]  # [K, PW, GW] -> [K, 1, 1, PW, GW]

    b = rois[:, 0].long()[:, None, None, None, None]  # [K, 1, 1, 1, 1]
    cells_last = features.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]: gathers copy C-vectors

    def neighbour(y_idx: Tensor, x_idx: Tensor) -> Tensor:
        return cells_last[b, to_rows(y_idx), to_cols(x_idx)]  # [K, PH, GH, PW, GW, C]

    def weight(wy: Tensor, wx: Tensor) -> Tensor:
        return (to_rows(wy) * to_cols(wx))[..., None]  # [K, PH, GH, PW, GW, 1]

    # The kernel's w1..w4 for the neighbours (lo, lo), (lo, hi), (hi, lo), (hi, hi).
    samples = (
        weight(wy_lo, wx_lo) * neighbour(y_lo, x_lo)
        + weight(wy_lo, wx_hi) * neighbour(y_lo, x_hi)
        + weight(wy_hi, wx_lo) * neighbour(y_hi, x_lo)
        + weight(wy_hi, wx_hi) * neighbour(y_hi, x_hi)
    )  # [K, PH, GH, PW, GW, C]

    # Stage 6 — average the samples of each bin (padding added zeros; divide by the real count).
    count = (axes.grid_h * axes.grid_w).clamp(min=1).to(features.dtype)  # [K]
    pooled = samples.sum(dim=(2, 4)) / count[:, None, None, None]  # [K, PH, PW, C]
    return pooled.permute(0, 3, 1, 2).contiguous()  # [K, C, PH, PW]


def roi_align_weights(
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    featmap_size: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """RoIAlign as two small matrices per RoI: ``pooled[k] = Wy[k] @ feature @ Wx[k].T``.

    Bilinear interpolation is separable: a sample's four corner weights are products of a
    y-weight and an x-weight, and the bin's average over its ``GH x GW`` sample grid is the
    product of an average over the ``GH`` y-samples and one over the ``GW`` x-samples. So row ``i``
    of ``Wy[k]`` holds, for every map row ``h``, the summed (and ``1 / GH``-scaled) y-weights with
    which bin row ``i`` of RoI ``k`` reads row ``h``; ``Wx`` likewise for columns. Samples off the
    map (more than one cell outside) and the padding of adaptive grids get weight 0, exactly as in
    :func:`roi_align_reference`.

    Args:
        rois: ``[K, 5]`` (batch_index, x1, y1, x2, y2) image pixels.
        output_size, spatial_scale, sampling_ratio, aligned: as :func:`roi_align_reference`.
        featmap_size: ``(H, W)`` of the map the RoIs are read from.

    Returns:
        ``(Wy, Wx)``: ``[K, PH, H]`` and ``[K, PW, W]``, in ``rois``' dtype.
    """
    height, width = featmap_size
    axes = _roi_align_axes(rois, output_size, spatial_scale, sampling_ratio, aligned)

    def one_axis(coord: Tensor, real: Tensor, count: Tensor, size: int) -> Tensor:
        low, high, w_low, w_high, inside = _linear_weights(coord, size)  # each [K, P, G]
        keep = (real & inside).to(coord.dtype) / count.clamp(min=1).to(coord.dtype)[:, None, None]
        weights = coord.new_zeros(coord.shape[0], coord.shape[1], size)  # [K, P, size]
        weights.scatter_add_(2, low, w_low * keep)
        weights.scatter_add_(2, high, w_high * keep)
        return weights

    wy = one_axis(axes.ys, axes.y_real, axes.grid_h, height)  # [K, PH, H]
    wx = one_axis(axes.xs, axes.x_real, axes.grid_w, width)  # [K, PW, W]
    return wy, wx


ROI_ALIGN_MATMUL_MAX_CELLS = 2048
"""Largest map (``H * W`` cells) :func:`prefers_roi_align_matmul` accepts: P2 of a 128 px image
(32x32) and coarser. Measured on 2 CPU cores (``benchmarks/RESULTS.md``): forward + backward of 256
RoIs on a 32x32 map, 3-4x faster than torchvision's kernel; on 64x64 maps with 256 channels the
kernel is already ahead."""


_matmul_allowed = True


@contextlib.contextmanager
def kernel_roi_align() -> Iterator[None]:
    """Inside the block :func:`prefers_roi_align_matmul` says no: every RoIAlign is
    torchvision's kernel, the code path a GPU runs (``count_host_syncs`` counts that path)."""
    global _matmul_allowed
    before, _matmul_allowed = _matmul_allowed, False
    try:
        yield
    finally:
        _matmul_allowed = before


def prefers_roi_align_matmul(features: Tensor) -> bool:
    """Whether :func:`roi_align_matmul` is the faster RoIAlign for ``features`` ``[B, C, H, W]``:
    on the CPU, when a gradient will flow back into the map (training; torchvision's backward
    scatters sample by sample on one thread) and the map has at most
    :data:`ROI_ALIGN_MATMUL_MAX_CELLS` cells. Inference keeps torchvision's kernel, whose
    forward pass is as fast. Always ``False`` inside :func:`kernel_roi_align`."""
    return (
        _matmul_allowed
        and features.device.type == "cpu"
        and features.requires_grad
        and torch.is_grad_enabled()
        and features.shape[-2] * features.shape[-1] <= ROI_ALIGN_MATMUL_MAX_CELLS
    )


def roi_align_matmul(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign by two batched matrix products per image (:func:`roi_align_weights`).

    Equals ``torchvision.ops.roi_align`` (to float rounding) and is differentiable through
    autograd. Its work grows with the map's area (``K·PH·H·W·C`` multiply-adds) rather than with
    the sample count, but it runs as dense BLAS products: on the CPU, for the small maps of the
    CPU tier (128 px images, P2 = 32x32), it is several times faster than torchvision's kernel,
    whose backward pass scatters one sample at a time on one thread. :func:`roi_align` picks it
    there; on a GPU or for large maps torchvision's kernel is used.

    Args:
        features: ``[B, C, H, W]`` float (computed in its dtype; autocast is off inside).
        rois: ``[K, 5]`` (batch_index, x1, y1, x2, y2) image pixels.
        output_size, spatial_scale, sampling_ratio, aligned: as ``torchvision.ops.roi_align``.

    Returns:
        ``[K, C, PH, PW]`` in the features' dtype.
    """
    with torch.autocast(features.device.type, enabled=False):  # in the features' own dtype
        return _roi_align_matmul(
            features, rois, output_size, spatial_scale, sampling_ratio, aligned
        )


def _roi_align_matmul(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    batch, channels, height, width = features.shape
    rois = _as_rois(rois, features.dtype).to(features.device)
    wy, wx = roi_align_weights(rois, output_size, spatial_scale, sampling_ratio, aligned,
                               (height, width))  # fmt: skip
    k, ph_count, pw_count = rois.shape[0], wy.shape[1], wx.shape[1]
    image = rois[:, 0].long()
    order = torch.argsort(image, stable=True)  # the RoIs of each image together
    counts = torch.bincount(image, minlength=batch).tolist()  # B ints (a host read: CPU path)
    # Rows then columns: [B, H, C*W] so that one product reads every row of an image's map.
    rows_first = features.permute(0, 2, 1, 3).reshape(batch, height, channels * width)
    pooled = []
    for b, idx in enumerate(order.split(counts)):  # one pair of products per image, not per RoI
        if idx.numel() == 0:
            continue
        n = idx.numel()
        by_rows = wy[idx].reshape(n * ph_count, height) @ rows_first[b]  # [n*PH, C*W]
        by_rows = by_rows.reshape(n, ph_count * channels, width)  # [n, PH*C, W]
        pooled.append((by_rows @ wx[idx].transpose(1, 2)).reshape(n, ph_count, channels, pw_count))
    out = features.new_empty(k, ph_count, channels, pw_count)
    if pooled:
        out[order] = torch.cat(pooled)  # back to the order of ``rois``
    return out.permute(0, 2, 1, 3)  # [K, C, PH, PW]


# ----------------------------------------------------------------------------------------------
# What RoIPool's roundings cost
# ----------------------------------------------------------------------------------------------


def roipool_misalignment(
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> RoIPoolMisalignment:
    """Measure RoIPool's quantization error in image pixels, per RoI (RoIAlign's is zero).

    Two accounts are returned (see ``RoIPoolMisalignment``):

    * the textbook floor model — an 800×800 image at stride 32 gives a 25×25 map; a 600×500 RoI
      is 18.75×15.625 cells, floored to 18×15 (first rounding, 24 and 20 px lost), cut into 7×7
      bins of floor(18/7)×floor(15/7) = 2×2 cells, i.e. a 14×14 grid (second rounding, 128 and
      32 px): 4.75 and 1.625 cells, 152 and 52 px of the RoI are not pooled;
    * torchvision's real RoIPool (round the corners, keep the end cell, floor/ceil bin edges):
      how far the read cells' outer edges and the snapped bin edges are from the exact ones.

    Args:
        rois: ``[K, 5]`` (batch_index, x1, y1, x2, y2) in image pixels.
        output_size: ``PH`` or ``(PH, PW)``.
        spatial_scale: image pixels -> feature cells.

    Returns:
        ``RoIPoolMisalignment`` (``[K, 2]`` fields are (x, y); ``boundary_px`` is ``[K, 4]``).
    """
    ph_count, pw_count = _pair(output_size)
    scale = _check_scale(spatial_scale)
    rois = _as_rois(rois)
    dtype, device = rois.dtype, rois.device
    boxes = rois[:, 1:]  # [K, 4]
    out = torch.tensor([pw_count, ph_count], dtype=dtype, device=device)  # (x, y)

    # The textbook account: floor the size, then floor the bin size.
    roi_cells = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0) * scale  # [K, 2] (w, h) in cells
    floored = torch.floor(roi_cells)  # [K, 2]
    bin_cells = torch.floor(floored / out)  # [K, 2]
    first = (roi_cells - floored) / scale  # [K, 2]
    second = (floored - bin_cells * out) / scale  # [K, 2]

    # torchvision's account: the cells RoIPool actually reads, unclipped, against exact geometry.
    cells = roi_pool_cells(rois, (ph_count, pw_count), scale)
    boundary = cells.roi_image - boxes  # [K, 4]
    frac = torch.arange(pw_count + 1, dtype=dtype, device=device) / pw_count  # [PW + 1]
    x_exact = boxes[:, 0:1] + frac * (boxes[:, 2:3] - boxes[:, 0:1])  # [K, PW + 1]
    frac = torch.arange(ph_count + 1, dtype=dtype, device=device) / ph_count  # [PH + 1]
    y_exact = boxes[:, 1:2] + frac * (boxes[:, 3:4] - boxes[:, 1:2])  # [K, PH + 1]
    x_start, x_end = cells.bins_image[:, 0, :, 0], cells.bins_image[:, 0, :, 2]  # [K, PW]
    y_start, y_end = cells.bins_image[:, :, 0, 1], cells.bins_image[:, :, 0, 3]  # [K, PH]
    x_err = torch.maximum((x_start - x_exact[:, :-1]).abs(), (x_end - x_exact[:, 1:]).abs())
    y_err = torch.maximum((y_start - y_exact[:, :-1]).abs(), (y_end - y_exact[:, 1:]).abs())
    bin_edge = torch.stack([x_err.amax(dim=1), y_err.amax(dim=1)], dim=1)  # [K, 2]
    return RoIPoolMisalignment(
        roi_cells=roi_cells,
        floored_cells=floored,
        bin_cells=bin_cells,
        first_rounding_px=first,
        second_rounding_px=second,
        lost_px=first + second,
        boundary_px=boundary,
        bin_edge_px=bin_edge,
    )
