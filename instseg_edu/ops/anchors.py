"""Anchors: a fixed set of reference boxes tiled over every FPN level (RetinaNet, Lin et al. 2017,
Sec. 4 "Anchors"; Faster R-CNN, Ren et al. 2015, Sec. 3.1.1).

The numbers are those of MMDetection 3.x ``AnchorGenerator``:

1. **Base anchors** of one level sit on the cell at ``(0, 0)``. With ``base_size`` (the stride
   unless ``base_sizes`` is given), every ratio ``r = h / w`` and every scale ``s``::

       h_ratio = sqrt(r),  w_ratio = 1 / h_ratio
       w = base_size * w_ratio * s,  h = base_size * h_ratio * s
       centre = center_offset * base_size            (0 by default: the cell's top-left corner)
       anchor = (cx - w/2, cy - h/2, cx + w/2, cy + h/2)

   Scales are either explicit (``scales``) or an octave ladder
   ``octave_base_scale * 2 ** (i / scales_per_octave)``
   (RetinaNet: ``4 * (2^0, 2^(1/3), 2^(2/3))``).
   The order inside a cell is **ratio-major**: all scales of the first ratio, then the next ratio.
   RetinaNet's stride-8 level therefore starts with the wide anchor
   ``(-22.627417, -11.313708, 22.627417, 11.313708)``: ``w = 8 * sqrt(2) * 4 = 45.25``,
   ``h = 8 / sqrt(2) * 4 = 22.63``.

2. **Grid anchors** add the shift ``(x, y) = (column * stride, row * stride)`` of every cell. The
   flattened order is row, column, anchor: index ``(row * W + column) * A + a`` — the same order in
   which a head's ``[B, A*K, H, W]`` output is flattened after ``permute(0, 2, 3, 1)``.

3. **Valid flags**: in a padded batch, a cell that starts in the padding of this image — row
   ``i >= ceil(h / stride)`` or column ``j >= ceil(w / stride)`` for the image's true (un-padded)
   size ``(h, w)`` — is invalid (its anchors are ignored by the assigner).

``legacy=True`` reproduces MMDetection v1's generator (``LegacyAnchorGenerator``): centres at
``center_offset * (base_size - 1)``, half sizes ``(w - 1) / 2``, and the base anchors rounded to
whole pixels — e.g. the stride-8 wide anchor becomes ``(-22, -11, 22, 11)``.

A model configures its generator with :class:`AnchorGeneratorConfig` (MMDetection's
``anchor_generator`` keys), the one anchor config of every dense head (RetinaNet, YOLACT, the RPN).

Shape legend: ``A`` anchors per cell, ``H, W`` a level's feature-map size, ``h, w`` an image's
true size.

Taught in ``notebooks/02_anchors.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AnchorGenerator", "AnchorGeneratorConfig"]


def _as_positive_floats(name: str, values: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except TypeError as err:
        raise ValueError(f"{name}={values!r} must be a sequence of numbers") from err
    if len(out) == 0:
        raise ValueError(f"{name}={values!r} must not be empty")
    for v in out:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name}={values!r} must contain only finite values > 0")
    return out


class AnchorGenerator:
    """Anchors for every level of a feature pyramid, with MMDetection 3.x numbers.

    Args:
        strides: one stride (pixels per feature cell) per level, e.g. ``(8, 16, 32, 64, 128)``.
        ratios: aspect ratios ``h / w``, e.g. ``(0.5, 1.0, 2.0)``.
        octave_base_scale: base scale of the octave ladder (RetinaNet: 4). Give either this together
            with ``scales_per_octave``, or ``scales``.
        scales_per_octave: rungs per octave (RetinaNet: 3).
        scales: explicit scales, multiples of the base size (Mask R-CNN's RPN: ``(8,)``).
        base_sizes: base size per level; the strides when ``None``.
        center_offset: anchor centre as a fraction of the base size, in ``[0, 1]``.
        legacy: reproduce MMDetection v1's rounded ``(w - 1)`` anchors.

    Raises:
        ValueError: naming the field, for empty or non-positive ``strides``, ``ratios`` or
            ``scales``, both or neither of ``scales`` and ``octave_base_scale``,
            ``len(base_sizes) != len(strides)`` or ``center_offset`` outside ``[0, 1]``.

    Example:
        >>> gen = AnchorGenerator(strides=(8, 16, 32, 64, 128), ratios=(0.5, 1.0, 2.0),
        ...                       octave_base_scale=4, scales_per_octave=3)
        >>> gen.num_base_anchors
        [9, 9, 9, 9, 9]
        >>> [a.shape for a in gen.grid_anchors([(64, 64), (32, 32)], "cpu")][0]
        torch.Size([36864, 4])
    """

    def __init__(
        self,
        strides: Sequence[int],
        ratios: Sequence[float],
        octave_base_scale: float | None = None,
        scales_per_octave: int | None = None,
        scales: Sequence[float] | None = None,
        base_sizes: Sequence[float] | None = None,
        center_offset: float = 0.0,
        legacy: bool = False,
    ) -> None:
        self.strides = _as_positive_floats("strides", strides)
        self.ratios = _as_positive_floats("ratios", ratios)
        if octave_base_scale is not None and not float(octave_base_scale) > 0:
            raise ValueError(f"octave_base_scale={octave_base_scale!r} must be > 0")
        if scales_per_octave is not None and (
            int(scales_per_octave) != scales_per_octave or scales_per_octave < 1
        ):
            raise ValueError(f"scales_per_octave={scales_per_octave!r} must be an integer >= 1")
        if (scales is None) == (octave_base_scale is None):
            raise ValueError(
                "give exactly one of scales or octave_base_scale (with scales_per_octave), got "
                f"scales={scales!r}, octave_base_scale={octave_base_scale!r}"
            )
        if scales is not None:
            if scales_per_octave is not None:
                raise ValueError(
                    f"scales_per_octave={scales_per_octave!r} is only used with octave_base_scale"
                )
            self.scales = _as_positive_floats("scales", scales)
        else:
            if scales_per_octave is None:
                raise ValueError("scales_per_octave=None: give it with octave_base_scale")
            # As MMDetection: the ladder is computed in float64, then stored as float32.
            self.scales = tuple(
                float(octave_base_scale) * 2 ** (i / scales_per_octave)
                for i in range(int(scales_per_octave))
            )
        if base_sizes is None:
            self.base_sizes = self.strides
        else:
            self.base_sizes = _as_positive_floats("base_sizes", base_sizes)
            if len(self.base_sizes) != len(self.strides):
                raise ValueError(
                    f"base_sizes={base_sizes!r} has {len(self.base_sizes)} entries but strides has "
                    f"{len(self.strides)}; give one base size per level"
                )
        if not 0.0 <= float(center_offset) <= 1.0:
            raise ValueError(f"center_offset={center_offset!r} must be in [0, 1]")
        self.center_offset = float(center_offset)
        self.legacy = bool(legacy)
        self._base_anchors = [self._level_base_anchors(s) for s in self.base_sizes]

    # ----------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> list[int]:
        """Anchors per cell ``A`` on each level (``len(ratios) * len(scales)``)."""
        return [int(a.shape[0]) for a in self._base_anchors]

    def _center(self, base_size: float) -> float:
        """The anchor centre's offset from the cell's top-left corner, in pixels."""
        if self.legacy:
            return self.center_offset * (base_size - 1)
        return self.center_offset * base_size

    def _level_base_anchors(self, base_size: float) -> Tensor:
        # float32 throughout, like MMDetection, so the numbers agree to the last bit.
        ratios = torch.tensor(self.ratios, dtype=torch.float32)  # [R]
        scales = torch.tensor(self.scales, dtype=torch.float32)  # [S]
        h_ratios = torch.sqrt(ratios)  # ratio = h / w
        w_ratios = 1 / h_ratios
        ws = (base_size * w_ratios[:, None] * scales[None, :]).reshape(-1)  # [R*S], ratio-major
        hs = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)  # [R*S]
        c = self._center(base_size)
        if self.legacy:
            # v1: a box of width w covers pixels x1..x2 inclusive, so x2 - x1 = w - 1; then rounded.
            half_w, half_h = 0.5 * (ws - 1), 0.5 * (hs - 1)
            return torch.stack([c - half_w, c - half_h, c + half_w, c + half_h], dim=-1).round()
        return torch.stack([c - 0.5 * ws, c - 0.5 * hs, c + 0.5 * ws, c + 0.5 * hs], dim=-1)

    def base_anchors(self) -> list[Tensor]:
        """The anchors of the cell at ``(0, 0)`` on each level.

        Returns:
            One ``float32 [A, 4]`` tensor (xyxy pixels) per level, ratio-major: for ratios
            ``(r0, r1, r2)`` and scales ``(s0, s1, s2)`` the rows are
            ``r0s0, r0s1, r0s2, r1s0, ...``.
        """
        return [a.clone() for a in self._base_anchors]

    def _check_featmap_sizes(self, featmap_sizes: Sequence[tuple[int, int]]) -> None:
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(
                f"featmap_sizes has {len(featmap_sizes)} levels but strides has {self.num_levels}"
            )

    def grid_anchors(
        self, featmap_sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu"
    ) -> list[Tensor]:
        """Anchors of every cell of every level.

        Args:
            featmap_sizes: ``(H, W)`` of each level's feature map, finest first.
            device: where to build the anchors.

        Returns:
            One ``float32 [H*W*A, 4]`` tensor (xyxy pixels in the padded input image) per level,
            ordered row, column, anchor: row ``(i * W + j) * A + a`` is anchor ``a`` of cell
            ``(i, j)``, i.e. ``base_anchors()[level][a] + (j * stride, i * stride) * 2``.
        """
        self._check_featmap_sizes(featmap_sizes)
        out = []
        for base, stride, (feat_h, feat_w) in zip(self._base_anchors, self.strides, featmap_sizes):
            shift_x = torch.arange(int(feat_w), device=device, dtype=torch.float32) * stride  # [W]
            shift_y = torch.arange(int(feat_h), device=device, dtype=torch.float32) * stride  # [H]
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")  # [H, W] each
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)  # [H*W, 1, 4]
            anchors = shifts + base.to(device)[None, :, :]  # [H*W, A, 4]
            out.append(anchors.reshape(-1, 4))  # [H*W*A, 4]
        return out

    def valid_flags(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        image_size: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
        *,
        pad_shape: tuple[int, int] | None = None,
    ) -> list[Tensor]:
        """Which anchors belong to this image inside a padded batch.

        MMDetection's rule (``AnchorGenerator.single_level_valid_flags``, used unchanged by its
        legacy generator): cell ``(i, j)`` of a level is valid when ``i < ceil(h / stride)`` and
        ``j < ceil(w / stride)`` — the cell starts inside the image. It does not depend on
        ``center_offset`` or ``legacy``: with ``center_offset=0.5`` a cell whose centre falls just
        past the image edge is still valid (stride 16, ``w=500``: columns ``0..31``, although
        column 31's centre is at 504).

        Args:
            featmap_sizes: ``(H, W)`` of each level's feature map (of the padded batch).
            image_size: this image's true ``(h, w)`` inside the padded batch.
            device: where to build the flags.
            pad_shape: the former name of ``image_size`` (MMDetection's, where it is the size of
                the image padded alone); still accepted as a keyword.

        Returns:
            One ``bool [H*W*A]`` tensor per level, in the order of :meth:`grid_anchors`.
        """
        if (image_size is None) == (pad_shape is None):
            raise ValueError("give the image's true (h, w) as image_size (or pad_shape), once")
        self._check_featmap_sizes(featmap_sizes)
        h, w = (image_size if image_size is not None else pad_shape)[:2]
        out = []
        for level, (feat_h, feat_w) in enumerate(featmap_sizes):
            stride = self.strides[level]
            rows_ok = torch.arange(int(feat_h), device=device) < math.ceil(h / stride)  # [H]
            cols_ok = torch.arange(int(feat_w), device=device) < math.ceil(w / stride)  # [W]
            cell_ok = rows_ok[:, None] & cols_ok[None, :]  # [H, W]
            a = self.num_base_anchors[level]
            out.append(cell_ok[:, :, None].expand(-1, -1, a).reshape(-1))  # [H*W*A]
        return out

    def __repr__(self) -> str:
        return (
            f"AnchorGenerator(strides={self.strides}, ratios={self.ratios}, scales={self.scales}, "
            f"base_sizes={self.base_sizes}, center_offset={self.center_offset}, "
            f"legacy={self.legacy})"
        )


@dataclass(frozen=True)
class AnchorGeneratorConfig:
    """``anchor_generator``: the settings of an :class:`AnchorGenerator` (MMDetection keys).

    Scales are given one of two ways, as in MMDetection: an octave ladder
    ``octave_base_scale · 2**(i / scales_per_octave)`` times the stride (the default, RetinaNet's
    ``4, 3``; YOLACT ``3, 1``), or explicit ``scales`` (the RPN: ``(8,)``). Explicit ``scales``
    replace the ladder, whose two fields are then stored as ``None``, so the config always shows
    what the generator uses. Validated by the generator itself (``ValueError`` naming the field);
    ``strides`` must also increase — one per FPN level, finest first.

    Attributes:
        strides: pixels per feature cell of each level.
        ratios: aspect ratios ``h / w``.
        octave_base_scale, scales_per_octave: the octave ladder (``None`` with ``scales``).
        scales: explicit scales, or ``None`` for the ladder.
        center_offset: the anchor centre as a fraction of the stride (0: the cell's top-left
            corner, MMDetection 3.x; 0.5: its centre).
    """

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    octave_base_scale: float | None = 4.0
    scales_per_octave: int | None = 3
    scales: tuple[float, ...] | None = None
    center_offset: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", tuple(self.strides))
        object.__setattr__(self, "ratios", tuple(self.ratios))
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(self.scales))
            object.__setattr__(self, "octave_base_scale", None)
            object.__setattr__(self, "scales_per_octave", None)
        if not all(a < b for a, b in zip(self.strides, self.strides[1:])):
            raise ValueError(f"strides={self.strides} must increase (finest level first)")
        self.build()  # the generator checks every field

    @property
    def num_base_anchors(self) -> int:
        """``A``: anchors per feature-map cell (the same on every level)."""
        per_ratio = len(self.scales) if self.scales is not None else int(self.scales_per_octave)
        return len(self.ratios) * per_ratio

    def build(self) -> AnchorGenerator:
        """The :class:`AnchorGenerator` these settings describe (the fields are its arguments)."""
        return AnchorGenerator(**dataclasses.asdict(self))
