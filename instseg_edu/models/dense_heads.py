"""The anchor plumbing of a dense head, as plain functions: RetinaNet, YOLACT and the RPN share it.

A dense head predicts the same things for every anchor of every FPN level. Around its convolutions
the three heads do the same few steps, each written once here:

1. **Flatten** each level's ``[B, A*K, H, W]`` map to ``[B, H*W*A, K]`` (:func:`to_B_HWA_K`) and
   concatenate the levels: row ``n`` of the result is anchor ``n`` of
   :meth:`~instseg_edu.ops.anchors.AnchorGenerator.grid_anchors`, levels one after the other
   (:func:`level_sizes` says where each level starts).
2. **Anchors and valid flags** of those rows (:func:`all_anchors`, :func:`anchor_valid`), built once
   per feature-map size (and per image size) and kept in the model's small cache
   (:func:`cached`): evaluation sees a handful of sizes, training usually one.
3. **Targets**: the assigner gives each anchor a ground truth; the regression target of a positive
   anchor is the delta from the anchor to that box (:func:`encode_matched`).
4. **Prediction**: the best ``k`` candidates of each level, levels side by side
   (:func:`topk_per_level`, MMDetection's ``nms_pre``), then decoding and NMS.

Their towers of 3×3 convs are built from one block, :func:`conv3x3_norm_relu` (RetinaNet's and
SOLO's: a GroupNorm between conv and ReLU when the config asks for one, which normalises in
float32 under autocast: :class:`Float32GroupNorm`).

No base class: a head calls the functions it needs.

Shape legend: ``B`` images, ``N`` anchors of all levels, ``A`` anchors per cell, ``K`` values per
anchor (or candidates), ``G`` ground truths (padded), ``H, W`` a level's feature-map size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.ops.coder import DeltaXYWHBBoxCoder

__all__ = [
    "CACHE_SIZE",
    "Float32GroupNorm",
    "all_anchors",
    "anchor_levels",
    "anchor_valid",
    "cached",
    "conv3x3_norm_relu",
    "encode_matched",
    "level_sizes",
    "to_B_HWA_K",
    "topk_per_level",
]

#: Entries a model's anchor cache keeps (anchor sets and valid flags per size and device).
CACHE_SIZE = 16


class Float32GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that always normalises in float32 and returns float32, also under bf16 /
    fp16 autocast: ``[B, C, H, W]`` of any float dtype → float32 ``[B, C, H, W]``, same memory
    format.

    This is what CUDA's autocast does with ``group_norm`` anyway (it is on that autocast's float32
    list, with the other normalisations and reductions). CPU autocast leaves it in bf16, and
    there, on channels-last maps, PyTorch's kernel took 3.9 times float32's time for a
    ``[4, 64, 16, 16]`` map, forward and backward (torch 2.14.1, 2 threads;
    ``benchmarks/RESULTS.md``, twenty-seventh round). The next convolution casts back to bf16
    under autocast. Parameters and state-dict keys are ``nn.GroupNorm``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float())


def conv3x3_norm_relu(in_ch: int, out_ch: int, norm_num_groups: int | None) -> list[nn.Module]:
    """One layer of a head's tower: a 3×3 conv (padding 1), GroupNorm with ``norm_num_groups``
    groups when given (in float32: :class:`Float32GroupNorm`), and a ReLU (MMDetection's
    ``ConvModule`` with ``norm_cfg=dict(type='GN')``).

    With GroupNorm after it the conv has no bias (``bias="auto"``): the norm's shift replaces it.
    Returns the layers as a list, to be put into the caller's ``nn.Sequential``; the caller
    initialises the conv's weight.
    """
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=norm_num_groups is None)
    if norm_num_groups is None:
        return [conv, nn.ReLU(inplace=True)]
    return [conv, Float32GroupNorm(norm_num_groups, out_ch), nn.ReLU(inplace=True)]


def to_B_HWA_K(x: Tensor, k: int) -> Tensor:
    """``[B, A*K, H, W]`` head map → ``[B, H*W*A, K]``, rows in (row, column, anchor) order.

    Channel ``a * K + k`` holds value ``k`` of anchor ``a``, as in MMDetection and detectron2
    (``permute_to_N_HWA_K``), which is what makes row ``(i * W + j) * A + a`` of the result line up
    with the anchor generator's row for anchor ``a`` of cell ``(i, j)``.
    """
    b = x.shape[0]
    x = x.permute(0, 2, 3, 1)  # [B, H, W, A*K] (free for channels_last tensors)
    return x.reshape(b, -1, k)  # [B, H*W*A, K]


def level_sizes(generator: AnchorGenerator, featmap_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Anchors per level, ``H_l · W_l · A``: how to split the ``N`` axis into levels."""
    a = generator.num_base_anchors
    return [int(h) * int(w) * a_l for (h, w), a_l in zip(featmap_sizes, a)]


def cached(cache: dict, key, make: Callable[[], object], max_size: int = CACHE_SIZE):
    """``cache[key]``, made by ``make()`` the first time; the oldest entry goes when it is full."""
    if key not in cache:
        if len(cache) >= max_size:
            cache.pop(next(iter(cache)))  # forget the oldest
        cache[key] = make()
    return cache[key]


def _sizes(featmap_sizes) -> tuple[tuple[int, int], ...]:
    return tuple((int(h), int(w)) for h, w in featmap_sizes)


def all_anchors(
    generator: AnchorGenerator, featmap_sizes, device: torch.device | str, cache: dict
) -> Tensor:
    """All anchors, ``float32 [N, 4]`` xyxy pixels of the padded input, levels concatenated."""
    sizes = _sizes(featmap_sizes)
    key = ("anchors", sizes, str(torch.device(device)))
    return cached(cache, key, lambda: torch.cat(generator.grid_anchors(sizes, device), dim=0))


def anchor_levels(
    generator: AnchorGenerator, featmap_sizes, device: torch.device | str, cache: dict
) -> Tensor:
    """``int64 [N]``: the FPN level (0 = the finest) of each anchor."""
    sizes = _sizes(featmap_sizes)
    key = ("levels", sizes, str(torch.device(device)))
    return cached(
        cache,
        key,
        lambda: torch.cat(
            [
                torch.full((n,), level, dtype=torch.long, device=device)
                for level, n in enumerate(level_sizes(generator, sizes))
            ]
        ),
    )


def anchor_valid(
    generator: AnchorGenerator,
    featmap_sizes,
    image_sizes: Sequence[tuple[int, int]],
    device: torch.device | str,
    cache: dict,
) -> Tensor:
    """``bool [B, N]``: anchors whose cell lies inside each image's true size (not the padding).

    Flags are made once per distinct image size
    (:meth:`~instseg_edu.ops.anchors.AnchorGenerator.valid_flags`); a batch of equal sizes costs
    one ``stack`` of cached tensors.
    """
    sizes, dev = _sizes(featmap_sizes), str(torch.device(device))
    flags = []
    for h, w in image_sizes:
        hw = (int(h), int(w))
        flags.append(
            cached(
                cache,
                ("valid", sizes, hw, dev),
                lambda hw=hw: torch.cat(generator.valid_flags(sizes, hw, device)),
            )
        )  # [N]
    return torch.stack(flags, dim=0)  # [B, N]


def topk_per_level(scores: Tensor, sizes: Sequence[int], k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` highest scores of each level (all of them for ``k = -1``), levels side by side.

    Args:
        scores: ``[B, X]`` with the levels one after another along dim 1, ``sizes[l]`` entries
            for level ``l`` (anchors, or (anchor, class) pairs flattened anchor-major).
        sizes: entries per level.
        k: MMDetection's ``nms_pre``.

    Returns:
        ``(values, index)``, ``[B, K]`` each with ``K = Σ_l min(k, sizes[l])``: each level's best
        first, ``index`` into dim 1 of ``scores``.
    """
    values, index, start = [], [], 0
    for n in sizes:
        v, i = scores[:, start : start + n].topk(n if k == -1 else min(k, n), dim=1)  # [B, k_l]
        values.append(v)
        index.append(i + start)
        start += n
    return torch.cat(values, dim=1), torch.cat(index, dim=1)


def encode_matched(
    coder: DeltaXYWHBBoxCoder, anchors: Tensor, gt_boxes: Tensor, gt_index: Tensor, pos: Tensor
) -> Tensor:
    """Regression targets: each positive anchor's deltas to its matched box, zeros elsewhere.

    The matched box is gathered from the padded ground truth; an anchor that is not positive is
    encoded against itself (finite deltas, then replaced by zeros — it has no box target).

    Args:
        coder: the head's box coder.
        anchors: ``float [N, 4]`` xyxy, shared by the batch.
        gt_boxes: ``float [B, G, 4]`` padded ground truth.
        gt_index: ``int64 [B, N]`` the matched row of ``gt_boxes`` (``NO_GT`` where none).
        pos: ``bool [B, N]`` the anchors that get a box target.

    Returns:
        ``float [B, N, 4]`` encoded deltas.
    """
    b, n = gt_index.shape
    anchors_b = anchors.expand(b, n, 4)  # [B, N, 4]
    matched = anchors_b
    if gt_boxes.shape[1] > 0:
        index = gt_index.clamp(min=0)[..., None].expand(b, n, 4)  # [B, N, 4]
        matched = torch.where(pos[..., None], torch.gather(gt_boxes, 1, index), anchors_b)
    deltas = coder.encode(anchors_b, matched)  # [B, N, 4]
    return torch.where(pos[..., None], deltas, torch.zeros_like(deltas))
