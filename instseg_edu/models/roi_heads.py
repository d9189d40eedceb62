"""The RoI stage pieces of Mask R-CNN: FPN level mapping, multi-scale RoIAlign, the box and mask
heads, mask targets and mask pasting.

Split from :mod:`instseg_edu.models.mask_rcnn` (which re-exports the model pieces) to keep each
file readable. :func:`mask_targets` and :func:`paste_masks` have readable one-RoI-at-a-time forms
beside them (``*_reference``).

Mask R-CNN (He et al., ICCV 2017) Sec. 3: RoIAlign reads a fixed ``O x O`` grid from one FPN level
per RoI; the box head classifies (``C + 1`` columns, ``C`` = background) and regresses
class-specific deltas; the mask head predicts one ``T x T`` mask per class, trained only on the
ground-truth class with a per-pixel sigmoid, against the ground-truth mask cropped to the RoI and
resized to ``T x T``. At test time the ``T x T`` masks are pasted back into the image.
Walkthrough: ``notebooks/06_mask_rcnn.py``; RoIAlign itself:
``notebooks/05_roipool_vs_roialign.py``.

Shape legend: ``R`` RoIs, ``F`` channels, ``O`` the RoIAlign output size (7 or 14), ``C``
classes, ``T`` the mask size (28), ``M`` positive RoIs, ``K`` detections, ``G`` ground-truth masks,
``Hp, Wp`` the padded input size, ``h, w`` an image's true size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from instseg_edu.ops.roi import prefers_roi_align_matmul, roi_align_matmul

__all__ = [
    "BoxHead",
    "MaskHead",
    "map_rois_to_levels",
    "mask_targets",
    "mask_targets_reference",
    "multiscale_roi_align",
    "paste_masks",
    "paste_masks_reference",
]

# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def map_rois_to_levels(boxes: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """FPN level index (0 = P2) of each RoI, by its scale (FPN paper, Lin et al. 2017, Eq. 1).

    The paper assigns ``k = floor(k0 + log2(sqrt(w h) / 224))`` with ``k0 = 4``: an RoI of
    ImageNet size (224 px) reads P4. Counting from P2 (index ``k - 2``) this is
    ``floor(log2(sqrt(w h) / 56))`` — MMDetection's ``finest_scale=56``, which we use, with its
    ``+ 1e-6`` inside the log (so that 112 / 56 lands on 1 even when rounding gives 1.9999999) and a
    clamp to ``[0, num_levels - 1]``. So sides ``< 112`` px read P2, ``[112, 224)`` P3,
    ``[224, 448)`` P4 and ``>= 448`` P5.

    Args:
        boxes: ``[R, 4]`` xyxy pixels.
    Returns:
        ``[R]`` int64 in ``0..num_levels-1``.
    """
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(0, num_levels - 1).long()


def multiscale_roi_align(
    features: tuple[Tensor, ...] | list[Tensor],
    rois: Tensor,
    strides: tuple[int, ...],
    output_size: int,
    sampling_ratio: int = 0,
    aligned: bool = True,
    finest_scale: float = 56.0,
) -> Tensor:
    """RoIAlign each RoI on the FPN level its size selects: one call per level, of torchvision's
    ``roi_align`` or, where :func:`~instseg_edu.ops.roi.prefers_roi_align_matmul` says it is faster
    (CPU training, small maps), of :func:`~instseg_edu.ops.roi.roi_align_matmul`.

    The RoIs are sorted by level and split by the per-level counts, read from the device once
    (one ``nonzero`` per level would wait for the device once per level).

    Args:
        features: at least ``len(strides)`` maps ``[B, F, H_l, W_l]``.
        rois: ``[R, 5]`` ``(batch_index, x1, y1, x2, y2)`` pixels.
    Returns:
        ``[R, F, output_size, output_size]``.
    """
    levels = map_rois_to_levels(rois[:, 1:], len(strides), finest_scale)  # [R]
    first = features[0]
    # Float32 throughout: RoI coordinates in bf16 would be off by up to 2 px at x = 500, and
    # torchvision's roi_align runs in float32 under autocast anyway.
    rois = rois.float()
    per_level = levels == torch.arange(len(strides), device=levels.device)[:, None]  # [L, R]
    counts = per_level.sum(1).tolist()  # L ints: the one host read
    by_level = torch.argsort(levels, stable=True).split(counts)  # L tensors [R_l]

    def align(level: int, level_rois: Tensor) -> Tensor:  # [R_l, 5] -> [R_l, F, O, O]
        # Training on the CPU with small maps: the same op as two matrix products, whose
        # backward pass is several times faster than torchvision's (ops.roi.roi_align_matmul).
        op = roi_align_matmul if prefers_roi_align_matmul(features[level]) else roi_align
        return op(
            features[level].float(),
            level_rois,
            output_size,
            spatial_scale=1.0 / strides[level],
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        ).float()

    if max(counts, default=0) == rois.shape[0] > 0:  # every RoI on one level: no scatter
        return align(counts.index(rois.shape[0]), rois)
    # Every RoI has exactly one level, so every row is written: no zero-fill needed.
    out = first.new_empty(
        rois.shape[0], first.shape[1], output_size, output_size, dtype=torch.float32
    )  # [R, F, O, O]
    for level, idx in enumerate(by_level):
        if idx.numel() > 0:
            out[idx] = align(level, rois[idx])  # [R_l, F, O, O]
    return out


def mask_targets(gt_masks: Tensor, rois: Tensor, gt_index: Tensor, mask_size: int = 28) -> Tensor:
    """Crop each positive RoI's ground-truth mask to the RoI and resize it to ``mask_size``².

    Readable form: :func:`mask_targets_reference` (one RoI at a time).

    One ``roi_align`` over the stack of ground-truth masks, each RoI pointing (through its "batch
    index") at the mask of its matched object: bin ``(i, j)`` averages the mask bilinearly sampled
    at ``ceil(h / T) x ceil(w / T)`` points inside it (``aligned=True``: pixel ``x`` covers
    ``[x, x + 1)``), then ``>= 0.5`` binarises, as MMDetection's ``BitmapMasks.crop_and_resize``.
    For an integer box whose sides are multiples of ``T`` this is exactly area (average-pool)
    resizing of the crop ``mask[y1:y2, x1:x2]``.

    Args:
        gt_masks: ``[G_total, Hp, Wp]`` bool/float masks of the batch, concatenated per image.
        rois: ``[M, 4]`` xyxy pixels (or ``[M, 5]``: the batch index is ignored).
        gt_index: ``[T]`` int64 row of ``gt_masks`` matched by each RoI.
    Returns:
        ``[M, T, T]`` float32 in ``{0, 1}``.
    """
    boxes = rois[:, -4:].float()
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0, mask_size, mask_size)
    index_and_box = torch.cat([gt_index[:, None].to(boxes.dtype), boxes], dim=1)  # [M, 5]
    with torch.autocast(device_type=boxes.device.type, enabled=False):
        sampled = roi_align(
            gt_masks[:, None].float(),
            index_and_box,
            mask_size,
            spatial_scale=1.0,
            sampling_ratio=0,
            aligned=True,
        )  # [M, 1, T, T]
    return (sampled[:, 0] >= 0.5).float()


def mask_targets_reference(
    gt_masks: Tensor, rois: Tensor, gt_index: Tensor, mask_size: int = 28, binarize: bool = True
) -> Tensor:
    """:func:`mask_targets` one RoI at a time, as MMDetection's ``BitmapMasks.crop_and_resize``
    describes it: split the RoI into ``T x T`` bins; in each, sample the ground-truth mask
    bilinearly at ``ceil(h / T) x ceil(w / T)`` evenly spaced points (pixel ``x`` covers
    ``[x, x + 1)``, so its centre is ``x + 0.5``; the border pixels extend outwards), average
    them, and binarise at 0.5. Computed in float64 with ``grid_sample``; equal to
    :func:`mask_targets` except where a bin's average is within float32 rounding of 0.5.

    Args:
        gt_masks, rois, gt_index, mask_size: as :func:`mask_targets`.
        binarize: False returns the bin averages (``float64``) before the 0.5 threshold.

    Returns:
        ``[M, T, T]`` float32 in ``{0, 1}`` (``float64`` averages when ``binarize`` is False).
    """
    m = mask_size
    hh, ww = gt_masks.shape[-2:]
    out = []
    for box, g in zip(rois[:, -4:].tolist(), gt_index.tolist()):
        x1, y1, x2, y2 = box
        h, w = y2 - y1, x2 - x1
        sy, sx = max(math.ceil(h / m), 1), max(math.ceil(w / m), 1)  # samples per bin
        # sample points in pixel-index coordinates (pixel x's centre at x + 0.5 -> index x)
        ys = y1 + (torch.arange(m * sy, dtype=torch.float64) + 0.5) * h / (m * sy) - 0.5
        xs = x1 + (torch.arange(m * sx, dtype=torch.float64) + 0.5) * w / (m * sx) - 0.5
        gy = (ys / (hh - 1) * 2 - 1)[:, None].expand(-1, len(xs))  # [T*sy, T*sx] in [-1, 1]
        gx = (xs / (ww - 1) * 2 - 1)[None, :].expand(len(ys), -1)  # [T*sy, T*sx]
        grid = torch.stack([gx, gy], dim=-1)[None].to(gt_masks.device)  # [1, T*sy, T*sx, 2]
        mask = gt_masks[g].double()[None, None]  # [1, 1, Hp, Wp]
        sampled = F.grid_sample(
            mask, grid, mode="bilinear", padding_mode="border", align_corners=True
        )  # [1, 1, T*sy, T*sx]
        out.append(F.avg_pool2d(sampled, (sy, sx))[0, 0])  # [T, T] bin averages
    averages = torch.stack(out) if out else gt_masks.new_zeros(0, m, m, dtype=torch.float64)
    return (averages >= 0.5).float() if binarize else averages


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Paste ``T x T`` mask probabilities into their boxes of an ``h x w`` image, all at once.

    Mask cell ``j`` covers ``[x1 + j bw / T, x1 + (j + 1) bw / T)`` of its box (the RoIAlign
    convention of the targets), and pixel ``x`` is sampled at its centre ``x + 0.5``, i.e. at cell
    coordinate ``u = (x + 0.5 - x1) / bw * T - 0.5``. Bilinear interpolation with zeros outside
    the mask is separable: the weight of cell ``j`` for pixel ``x`` is the "tent"
    ``max(0, 1 - |u - j|)``, so the paste is the batched matrix product
    ``Wy [K, h, T] @ masks [K, T, T] @ Wx^T [K, T, w]`` — the same numbers as
    ``F.grid_sample(align_corners=False)`` on a full-image grid per mask (detectron2's paste), with
    no ``[K, h, w, 2]`` grid in memory. Readable form: :func:`paste_masks_reference`.

    Args:
        masks: ``[K, T, T]`` float probabilities (or logits — any value is interpolated).
        boxes: ``[K, 4]`` xyxy pixels in the image.
        image_size: ``(h, w)``.
    Returns:
        ``[K, h, w]`` float32; pixels outside a box are 0.
    """
    h, w = image_size
    k, m = masks.shape[0], masks.shape[-1]
    if k == 0:
        return masks.new_zeros(0, h, w, dtype=torch.float32)
    with torch.autocast(device_type=masks.device.type, enabled=False):
        boxes = boxes.float()
        cells = torch.arange(m, device=masks.device, dtype=torch.float32)  # [T]
        xs = torch.arange(w, device=masks.device, dtype=torch.float32) + 0.5  # [w]
        ys = torch.arange(h, device=masks.device, dtype=torch.float32) + 0.5  # [h]
        bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)[:, None]  # [K, 1]
        bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)[:, None]  # [K, 1]
        u = (xs[None] - boxes[:, 0:1]) / bw * m - 0.5  # [K, w]
        v = (ys[None] - boxes[:, 1:2]) / bh * m - 0.5  # [K, h]
        wx = (1 - (u[:, :, None] - cells).abs()).clamp(min=0)  # [K, w, T]
        wy = (1 - (v[:, :, None] - cells).abs()).clamp(min=0)  # [K, h, T]
        return wy @ masks.float() @ wx.transpose(1, 2)  # [K, h, T] @ [K, T, T] @ [K, T, w]


def paste_masks_reference(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """:func:`paste_masks` one mask at a time, as detectron2's ``paste_masks_in_image`` does it:
    map every pixel centre of the image into the box's ``[-1, 1]`` coordinates and sample the
    ``T x T`` mask there with ``grid_sample`` (bilinear, zeros outside). Equal to
    :func:`paste_masks` to float32 rounding (it sums the same products in another order).

    Returns:
        ``[K, h, w]`` float32.
    """
    h, w = image_size
    out = []
    for mask, (x1, y1, x2, y2) in zip(masks.float(), boxes.float().tolist()):
        xs = torch.arange(w, dtype=torch.float32, device=masks.device) + 0.5  # pixel centres
        ys = torch.arange(h, dtype=torch.float32, device=masks.device) + 0.5
        gx = ((xs - x1) / (x2 - x1) * 2 - 1)[None, :].expand(h, w)  # [h, w], box edges at ±1
        gy = ((ys - y1) / (y2 - y1) * 2 - 1)[:, None].expand(h, w)  # [h, w]
        grid = torch.stack([gx, gy], dim=-1)[None]  # [1, h, w, 2]
        pasted = F.grid_sample(
            mask[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [1, 1, h, w]
        out.append(pasted[0, 0])
    return torch.stack(out) if out else masks.new_zeros(0, h, w, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


class BoxHead(nn.Module):
    """``Shared2FCBBoxHead``: flatten the 7x7 RoI features, two fc + ReLU, then scores and deltas.

    Scores have ``C + 1`` columns (``C`` = background); deltas are class-specific ``[R, 4C]``.
    """

    def __init__(self, in_channels: int, roi_size: int, fc_out_channels: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * roi_size * roi_size, fc_out_channels)
        self.fc2 = nn.Linear(fc_out_channels, fc_out_channels)
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, 4 * num_classes)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # In place: a Linear's backward needs its input, not its output, so the ReLU may overwrite
        # the output (ReLU's own backward reads its result, which it keeps).
        x = F.relu(self.fc1(x.flatten(1)), inplace=True)  # [R, F*7*7] -> [R, fc]
        x = F.relu(self.fc2(x), inplace=True)
        return self.fc_cls(x), self.fc_reg(x)  # [R, C+1], [R, 4C]


class MaskHead(nn.Module):
    """``FCNMaskHead``: ``num_convs`` 3x3 convs + ReLU, 2x deconv + ReLU, 1x1 conv to C masks.

    ``forward(x)``: ``[R, F, O, O]`` RoI features -> ``[R, C, T, T]`` logits, one mask per
    class (training: the loss picks the ground-truth class's). ``forward(x, labels)`` (inference:
    only the predicted class's mask is pasted) -> ``[R, T, T]``, each RoI's ``labels[r]``
    channel alone: the 1x1 conv's row of that class, ``C`` times less work than all ``C``
    channels and the same numbers up to float rounding (``test_mask_head_label_channel``).
    """

    def __init__(self, in_channels: int, conv_out_channels: int, num_convs: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [
                nn.Conv2d(
                    in_channels if i == 0 else conv_out_channels, conv_out_channels, 3, padding=1
                ),
                nn.ReLU(inplace=True),
            ]
        self.convs = nn.Sequential(*layers)
        last = conv_out_channels if num_convs > 0 else in_channels
        self.upsample = nn.ConvTranspose2d(last, conv_out_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_out_channels, num_classes, 1)
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(mod.bias)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        x = self.convs(x)  # [R, F', O, O]
        if labels is None:
            x = F.relu(self.upsample(x), inplace=True)  # [R, F', T, T]
            return self.conv_logits(x)  # [R, C, T, T]
        # oneDNN's CPU deconvolution reads channels-last input about 1.8x faster, with bit-identical
        # results (a no-op where the model already runs channels-last). Its output stays
        # channels-last: permuted to [R, T, T, F'] it is contiguous, ready for one bmm.
        x = self.upsample(x.contiguous(memory_format=torch.channels_last))  # [R, F', T, T]
        x = F.relu(x, inplace=True).permute(0, 2, 3, 1)  # [R, T, T, F']
        weight = self.conv_logits.weight[labels, :, 0, 0]  # [R, F']: each RoI's class row
        bias = self.conv_logits.bias[labels]  # [R]
        r, h, w, f = x.shape
        logits = torch.bmm(x.reshape(r, h * w, f), weight[:, :, None])  # [R, T*T, 1]
        return logits.view(r, h, w) + bias[:, None, None]  # [R, T, T]
