"""ResNet and the Feature Pyramid Network: the feature extractor every model family shares.

A ResNet (He et al., 2016, "Deep Residual Learning") is a *stem* — a 7×7 stride-2 convolution,
BatchNorm, ReLU and a stride-2 max-pool — followed by four *stages* (``layer1..layer4``) of residual
blocks. Stage ``i`` (0-based) outputs a map of stride ``4 · 2**i``: C2..C5 at strides 4, 8, 16, 32.
ResNet-18/34 use two-conv :class:`~torchvision.models.resnet.BasicBlock` s, ResNet-50/101 three-conv
:class:`~torchvision.models.resnet.Bottleneck` s (1×1 reduce, 3×3, 1×1 expand ×4). We build the
network from torchvision's own blocks with torchvision's attribute names, so an ImageNet state dict
from torchvision loads without renaming any key.

Three knobs come from detection practice (MMDetection's ``ResNet``):

- ``frozen_stages``: a pretrained stem and first stage see generic edges and textures; detection
  fine-tuning leaves them alone. ``-1`` freezes nothing, ``0`` the stem, ``k`` the stem and stages
  ``1..k``. Frozen means ``requires_grad=False`` *and* BatchNorm in eval mode, even after
  ``model.train()``.
- ``norm_eval``: detection batches are small (2–16 images), too small for good BatchNorm
  statistics, so every BatchNorm keeps the running mean/var it was trained with (its affine
  ``weight`` and ``bias`` still learn). This only makes sense with pretrained weights; a network
  trained from scratch wants ``norm_eval=False`` and ``frozen_stages=-1``.
- ``style``: where a Bottleneck's stride-2 downsampling happens. ``"pytorch"`` (torchvision, the
  "ResNet v1.5" of most modern checkpoints) puts it on the 3×3 convolution; ``"caffe"`` (the
  original MSRA release, Detectron's checkpoints) on the first 1×1. A BasicBlock has no 1×1,
  so style does not change it.

The FPN (Lin et al., 2017, "Feature Pyramid Networks for Object Detection", Sec. 3) turns
C2..C5 into maps P2..P5 that all have ``out_channels`` channels: a 1×1 *lateral* convolution per
level, a *top-down* pathway that adds the nearest-upsampled coarser level, and a 3×3 convolution on
each sum to smooth the aliasing of the upsampling. Extra coarser levels come either from a stride-2
max-pool of the last output (Mask R-CNN's P6) or from stride-2 3×3 convolutions (RetinaNet's P6 and
P7, RetinaNet paper Sec. 4, "computed on C5"). The names (``in_channels, out_channels, num_outs,
start_level, end_level, add_extra_convs, relu_before_extra_convs``) are MMDetection's.

Two settings you will meet:

- RetinaNet: ``start_level=1, num_outs=5, add_extra_convs="on_input"`` → P3–P7, strides 8..128.
- Mask R-CNN: ``start_level=0, num_outs=5, add_extra_convs=False`` → P2–P6, strides 4..64.

Shape legend: ``B`` images, ``Hp, Wp`` the (padded) input height and width; a stride-``s`` map is
``ceil(Hp / s) × ceil(Wp / s)`` for the convolutions here (each halves ``n`` to ``ceil(n / 2)``).

Used by every model family; its walkthroughs are in ``notebooks/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from instseg_edu.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ResNetConfig",
    "FPNConfig",
    "ImageNormalize",
    "ResNet",
    "FPN",
    "BackboneWithFPN",
    "build_backbone",
    "check_backbone_and_heads",
    "fpn_p2_p6",
    "fpn_strides",
    "resnet_out_channels",
    "RESNET_STAGE_BLOCKS",
]

# depth -> (block class, number of blocks in each of the four stages); He et al. 2016, Table 1.
RESNET_STAGE_BLOCKS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
_STAGE_WIDTHS = (1, 2, 4, 8)  # planes of each stage / base_channels; a Bottleneck outputs 4× that
_EXTRA_CONVS = ("on_input", "on_lateral", "on_output")


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResNetConfig:
    """A ResNet backbone, with MMDetection's ``backbone=dict(type='ResNet', ...)`` keys.

    Attributes:
        depth: 18, 34, 50, 101 or 152.
        num_stages: how many of the four stages to build (1..4).
        out_indices: which stages' outputs ``forward`` returns (0 = ``layer1``, stride 4).
        frozen_stages: ``-1`` nothing frozen, ``0`` the stem, ``k`` the stem and stages ``1..k``.
        norm_eval: keep every BatchNorm in eval mode (frozen running statistics) during training.
        style: ``"pytorch"`` (stride on the 3×3) or ``"caffe"`` (stride on the first 1×1).
        base_channels: width of the stem and of the first stage; stage ``i`` has
            ``base_channels · 2**i`` planes (MMDetection's ``base_channels``; 64 in every ImageNet
            ResNet, which pretrained weights need). The CPU tier's Mask R-CNN uses 32: a quarter
            of the convolution work for the small shapes images.
        zero_init_residual: start each residual branch's last BatchNorm at ``weight=0`` so every
            block begins as the identity (Goyal et al., 2017); MMDetection's default.
        pretrained: ``None``; a torchvision weights enum or its name such as
            ``"ResNet50_Weights.IMAGENET1K_V1"`` (downloaded by torchvision on first use); or the
            path of a local ``.pth`` state dict with torchvision's key names.
    """

    depth: int = 50
    num_stages: int = 4
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    frozen_stages: int = 1
    norm_eval: bool = True
    style: str = "pytorch"
    base_channels: int = 64
    zero_init_residual: bool = True
    pretrained: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_indices", tuple(self.out_indices))
        if self.depth not in RESNET_STAGE_BLOCKS:
            raise ValueError(f"depth={self.depth} must be one of {sorted(RESNET_STAGE_BLOCKS)}")
        if not 1 <= self.num_stages <= 4:
            raise ValueError(f"num_stages={self.num_stages} must be in 1..4")
        if not self.out_indices:
            raise ValueError("out_indices=() must name at least one stage")
        if list(self.out_indices) != sorted(set(self.out_indices)):
            raise ValueError(f"out_indices={self.out_indices} must be increasing and unique")
        if self.out_indices[0] < 0 or self.out_indices[-1] >= self.num_stages:
            raise ValueError(
                f"out_indices={self.out_indices} must lie in 0..num_stages-1={self.num_stages - 1}"
            )
        if not -1 <= self.frozen_stages <= self.num_stages:
            raise ValueError(
                f"frozen_stages={self.frozen_stages} must be in -1..num_stages={self.num_stages}"
            )
        if self.style not in ("pytorch", "caffe"):
            raise ValueError(f"style={self.style!r} must be 'pytorch' or 'caffe'")
        if not isinstance(self.base_channels, int) or self.base_channels < 1:
            raise ValueError(f"base_channels={self.base_channels!r} must be a positive int")
        if self.pretrained is not None and not isinstance(self.pretrained, (str, os.PathLike)):
            from torchvision.models import WeightsEnum

            if not isinstance(self.pretrained, WeightsEnum):
                raise ValueError(
                    f"pretrained={self.pretrained!r} must be None, a torchvision weights enum "
                    "(or its name) or a file path"
                )


@dataclass(frozen=True)
class FPNConfig:
    """A Feature Pyramid Network, with MMDetection's ``neck=dict(type='FPN', ...)`` keys.

    Attributes:
        in_channels: channels of every backbone map the FPN receives (C2..C5 of a ResNet-50:
            ``(256, 512, 1024, 2048)``).
        out_channels: channels of every output level.
        num_outs: number of output levels; those beyond the backbone's are "extra" levels.
        start_level: index into ``in_channels`` of the first backbone map used (1 = C3).
        end_level: index of the last backbone map used, inclusive; ``-1`` = the last. When it is not
            the last, no extra level is allowed (``num_outs == end_level - start_level + 1``).
        add_extra_convs: ``False`` — extra levels by max-pool (kernel 1, stride 2) of the previous
            output; ``"on_input"`` — the first extra level is a stride-2 3×3 conv on the last used
            backbone map (C5); ``"on_lateral"`` — on the last lateral (before its 3×3);
            ``"on_output"`` — on the last FPN output (P5). Later extra levels convolve the previous
            extra level. ``True`` means ``"on_input"`` (as in MMDetection).
        relu_before_extra_convs: apply ReLU before the 2nd, 3rd, ... extra convolution (RetinaNet
            paper: "P7 is computed by applying ReLU followed by a 3×3 stride-2 conv on P6").
    """

    in_channels: tuple[int, ...] = (256, 512, 1024, 2048)
    out_channels: int = 256
    num_outs: int = 5
    start_level: int = 1
    end_level: int = -1
    add_extra_convs: bool | str = "on_input"
    relu_before_extra_convs: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_channels", tuple(self.in_channels))
        if self.add_extra_convs is True:
            object.__setattr__(self, "add_extra_convs", "on_input")
        num_ins = len(self.in_channels)
        if num_ins == 0 or any(int(c) <= 0 for c in self.in_channels):
            raise ValueError(
                f"in_channels={self.in_channels} must be a non-empty tuple of ints > 0"
            )
        if self.out_channels <= 0:
            raise ValueError(f"out_channels={self.out_channels} must be > 0")
        if not 0 <= self.start_level < num_ins:
            raise ValueError(
                f"start_level={self.start_level} must be in 0..len(in_channels)-1={num_ins - 1}"
            )
        if self.add_extra_convs is not False and self.add_extra_convs not in _EXTRA_CONVS:
            raise ValueError(
                f"add_extra_convs={self.add_extra_convs!r} must be False, True or one of "
                f"{_EXTRA_CONVS}"
            )
        if self.end_level == -1 or self.end_level == num_ins - 1:
            used = num_ins - self.start_level
            if self.num_outs < used:
                raise ValueError(
                    f"num_outs={self.num_outs} must be >= the {used} backbone levels used "
                    f"(len(in_channels)={num_ins} - start_level={self.start_level})"
                )
        else:
            if not self.start_level <= self.end_level < num_ins:
                raise ValueError(
                    f"end_level={self.end_level} must be -1 or in "
                    f"start_level={self.start_level}..{num_ins - 1}"
                )
            if self.num_outs != self.end_level - self.start_level + 1:
                raise ValueError(
                    f"num_outs={self.num_outs} must equal end_level - start_level + 1 = "
                    f"{self.end_level - self.start_level + 1} when end_level is not the last level"
                )

    @property
    def backbone_end_level(self) -> int:
        """One past the last backbone map used (an exclusive index into ``in_channels``)."""
        if self.end_level == -1:
            return len(self.in_channels)
        return self.end_level + 1


def resnet_out_channels(cfg: ResNetConfig) -> tuple[int, ...]:
    """Channels of the maps ``ResNet(cfg)`` returns: ``(256, 512, 1024, 2048)`` for C2..C5 of a
    ResNet-50, ``(64, 128, 256, 512)`` for a ResNet-18."""
    block, _ = RESNET_STAGE_BLOCKS[cfg.depth]
    return tuple(cfg.base_channels * _STAGE_WIDTHS[i] * block.expansion for i in cfg.out_indices)


def fpn_strides(resnet_cfg: ResNetConfig, fpn_cfg: FPNConfig) -> tuple[int, ...]:
    """Stride (in input pixels) of each FPN output level.

    Backbone stage ``i`` has stride ``4 · 2**i``; every extra level halves the previous one.

    >>> fpn_strides(ResNetConfig(), FPNConfig())  # RetinaNet: P3..P7
    (8, 16, 32, 64, 128)
    >>> fpn_strides(ResNetConfig(), FPNConfig(start_level=0, add_extra_convs=False))  # Mask R-CNN
    (4, 8, 16, 32, 64)
    """
    backbone = [4 * 2**i for i in resnet_cfg.out_indices]
    used = backbone[fpn_cfg.start_level : fpn_cfg.backbone_end_level]
    extra = fpn_cfg.num_outs - len(used)
    return tuple(used + [used[-1] * 2 ** (k + 1) for k in range(extra)])


def fpn_p2_p6(in_channels=(256, 512, 1024, 2048), out_channels: int = 256) -> FPNConfig:
    """Mask R-CNN's and SOLO's FPN: P2-P5 from C2-C5 and P6 by max-pooling P5 (strides 4..64)."""
    return FPNConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        start_level=0,
        num_outs=5,
        add_extra_convs=False,
    )


def check_backbone_and_heads(
    backbone: ResNetConfig, neck: FPNConfig, anchor_strides=None, **head_channels: int
) -> tuple[int, ...]:
    """The cross-checks of every family config; returns the FPN strides.

    ``neck.in_channels`` must be the ResNet's output channels, each head's ``in_channels``
    (given by name, e.g. ``bbox_head=cfg.bbox_head.in_channels``) must be ``neck.out_channels``,
    and ``anchor_strides`` (a dense head's ``anchor_generator.strides``), when given, must be the
    strides of the FPN levels.

    Raises:
        ValueError: naming the field that does not fit.
    """
    channels = resnet_out_channels(backbone)
    if tuple(neck.in_channels) != channels:
        raise ValueError(
            f"neck.in_channels={neck.in_channels} must equal the ResNet-{backbone.depth} output "
            f"channels {channels}"
        )
    for name, in_channels in head_channels.items():
        if in_channels != neck.out_channels:
            raise ValueError(
                f"{name}.in_channels={in_channels} must equal neck.out_channels={neck.out_channels}"
            )
    strides = fpn_strides(backbone, neck)
    if anchor_strides is not None and tuple(anchor_strides) != strides:
        raise ValueError(
            f"anchor_generator.strides={tuple(anchor_strides)} must be the strides {strides} of "
            f"the neck.num_outs={neck.num_outs} FPN levels"
        )
    return strides


# --------------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------------


class ResNet(nn.Module):
    """ResNet feature extractor made of torchvision blocks (no ``avgpool``/``fc``).

    Attribute names are torchvision's (``conv1, bn1, layer1..layer4``, blocks ``layerK.i.conv1``,
    ``layerK.0.downsample.0/1``), so ``torchvision.models.resnet50().state_dict()`` minus ``fc.*``
    loads with ``strict=True``.

    ``forward(x)``: ``x`` float ``[B, 3, Hp, Wp]`` (already normalised) → a tuple with one map per
    ``out_indices`` entry; stage ``i`` is ``[B, out_channels[i], ceil(H / 2**(i+2)),
    ceil(W / 2**(i+2))]``.
    """

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        block, stage_blocks = RESNET_STAGE_BLOCKS[cfg.depth]
        self.out_channels = resnet_out_channels(cfg)

        # Stem (S = base_channels, 64 in ImageNet ResNets):
        # [B, 3, Hp, Wp] -> [B, S, Hp/2, Wp/2] -> max-pool -> [B, S, Hp/4, Wp/4]
        width = cfg.base_channels
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.inplanes = width
        for i in range(cfg.num_stages):
            stride = 1 if i == 0 else 2  # layer1 keeps stride 4; each later stage halves
            planes = cfg.base_channels * _STAGE_WIDTHS[i]
            layer = self._make_layer(block, planes, stage_blocks[i], stride)
            self.add_module(f"layer{i + 1}", layer)

        self._init_weights()
        if cfg.pretrained is not None:
            self.load_pretrained(cfg.pretrained)
        self._freeze_stages()

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """One stage; the first block changes resolution/width, with a 1×1 projection shortcut."""
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        if self.cfg.style == "caffe" and block is Bottleneck and stride != 1:
            # torchvision puts the stride on conv2 (3×3); the original Caffe ResNet on conv1 (1×1).
            # Both convs keep their weights' shapes, only where the subsampling happens moves.
            layers[0].conv1.stride = (stride, stride)
            layers[0].conv2.stride = (1, 1)
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He (Kaiming) normal convs, BatchNorm at identity: both MMDetection's and torchvision's.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def load_pretrained(self, pretrained: Any) -> None:
        """Load ImageNet weights: a torchvision weights enum (or its name), or a local file.

        Keys must be torchvision's; ``fc.*`` (the classifier) and stages beyond ``num_stages`` are
        dropped; every other key must match exactly (``strict=True``): a wrong depth fails loudly.
        Only the enum path downloads (through torchvision's cache, on first use).
        """
        is_path = isinstance(pretrained, (str, os.PathLike))
        if is_path and os.path.exists(pretrained):
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
        elif is_path and str(pretrained).endswith((".pth", ".pt")):
            raise FileNotFoundError(f"pretrained weights file {str(pretrained)!r} does not exist")
        else:
            from torchvision.models import WeightsEnum, get_weight

            weights = pretrained if isinstance(pretrained, WeightsEnum) else get_weight(pretrained)
            state = weights.get_state_dict(progress=False)
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # a checkpoint wrapping the weights
        built = {f"layer{i + 1}." for i in range(self.cfg.num_stages)}
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith("fc.")
            and not (k.startswith("layer") and k[: k.index(".") + 1] not in built)
        }
        self.load_state_dict(state, strict=True)

    def _frozen_modules(self) -> list[nn.Module]:
        stem = [self.conv1, self.bn1] if self.cfg.frozen_stages >= 0 else []
        return stem + [getattr(self, f"layer{k}") for k in range(1, self.cfg.frozen_stages + 1)]

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def freeze(self) -> ResNet:
        """Freeze every stage and keep every BatchNorm's statistics, from now on and after any
        later ``train()``: ``frozen_stages=num_stages, norm_eval=True``. For a ResNet loaded from
        a model that has already learned (:func:`~instseg_edu.engine.checkpoint.load_backbone`'s
        ``freeze``): no backward pass runs through it and nothing in it changes."""
        self.cfg = replace(self.cfg, frozen_stages=self.cfg.num_stages, norm_eval=True)
        self._freeze_stages()
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> ResNet:
        """Switch to train mode, then put frozen stages (and, with ``norm_eval``, every BatchNorm)
        back into eval mode — ``nn.Module.train`` alone would silently unfreeze their statistics."""
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                m.eval()
            if self.cfg.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, 64, Hp/4, Wp/4]
        outs = []
        for i in range(self.cfg.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)  # [B, C_i, H / 2**(i+2), W / 2**(i+2)]
            if i in self.cfg.out_indices:
                outs.append(x)
        return tuple(outs)


# --------------------------------------------------------------------------------------------------
# FPN
# --------------------------------------------------------------------------------------------------


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al. 2017, Sec. 3), MMDetection semantics.

    ``forward(inputs)``: a tuple of ``len(in_channels)`` backbone maps, finest first →
    a tuple of ``num_outs`` maps ``[B, out_channels, h_l, w_l]``, finest first, each level half the
    size of the previous one (``ceil``).

    Convolutions have a bias and no norm/activation; they start from Xavier-uniform weights and zero
    bias, as in MMDetection (torchvision's ``FeaturePyramidNetwork`` uses Caffe2's ``XavierFill``,
    ``kaiming_uniform_(a=1)``; only the initial values differ).
    """

    def __init__(self, cfg: FPNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        out = cfg.out_channels
        used = range(cfg.start_level, cfg.backbone_end_level)
        self.lateral_convs = nn.ModuleList(nn.Conv2d(cfg.in_channels[i], out, 1) for i in used)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out, out, 3, padding=1) for _ in used)

        # Extra levels beyond the backbone (RetinaNet's P6, P7) get their own stride-2 convs.
        num_extra = cfg.num_outs - len(used)
        self.extra_convs = nn.ModuleList()
        if cfg.add_extra_convs and num_extra > 0:
            for k in range(num_extra):
                in_ch = out
                if k == 0 and cfg.add_extra_convs == "on_input":
                    in_ch = cfg.in_channels[cfg.backbone_end_level - 1]  # C5's channels
                self.extra_convs.append(nn.Conv2d(in_ch, out, 3, stride=2, padding=1))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
        cfg = self.cfg
        if len(inputs) != len(cfg.in_channels):
            raise ValueError(
                f"FPN got {len(inputs)} feature maps, but in_channels={cfg.in_channels} "
                f"expects {len(cfg.in_channels)}"
            )
        # 1×1 laterals bring every used level to out_channels: L_l [B, out, h_l, w_l]
        laterals = [conv(inputs[cfg.start_level + i]) for i, conv in enumerate(self.lateral_convs)]

        # Top-down: coarse to fine, L_{l-1} += upsample(L_l). Upsampling to the exact size (not ×2)
        # handles odd sizes: a 333-pixel input gives 42 and 21 at strides 8 and 16, and 21×2 = 42,
        # but a 42 -> 21 -> 11 chain needs 11 -> 21, not 22.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]  # 3×3 smoothing

        num_extra = cfg.num_outs - len(outs)
        if num_extra > 0 and not cfg.add_extra_convs:
            # Mask R-CNN's P6: subsample P5 (kernel 1, stride 2 = take every other pixel).
            for _ in range(num_extra):
                outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        elif num_extra > 0:
            source = {
                "on_input": inputs[cfg.backbone_end_level - 1],  # C5
                "on_lateral": laterals[-1],
                "on_output": outs[-1],  # P5
            }[cfg.add_extra_convs]
            outs.append(self.extra_convs[0](source))
            for conv in self.extra_convs[1:]:
                outs.append(conv(F.relu(outs[-1]) if cfg.relu_before_extra_convs else outs[-1]))
        return tuple(outs)


class ImageNormalize(nn.Module):
    """``(x - mean) / std`` per channel with ImageNet statistics, the first step of every model.

    Images arrive as ``float [B, 3, Hp, Wp]`` in ``[0, 1]``; a ResNet (pretrained or not) expects
    inputs centred the way ImageNet training centred them. The statistics are buffers, so they
    move with the model to the GPU once instead of being copied there on every call.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


class BackboneWithFPN(nn.Module):
    """``resnet`` followed by ``fpn``: ``[B, 3, Hp, Wp]`` → a tuple of ``num_outs`` maps
    ``[B, out_channels, ceil(H / s), ceil(W / s)]`` for the strides ``self.strides``."""

    def __init__(self, resnet_cfg: ResNetConfig, fpn_cfg: FPNConfig) -> None:
        super().__init__()
        channels = resnet_out_channels(resnet_cfg)
        if tuple(fpn_cfg.in_channels) != channels:
            raise ValueError(
                f"in_channels={fpn_cfg.in_channels} of the FPN must equal the ResNet-"
                f"{resnet_cfg.depth} channels {channels} of out_indices={resnet_cfg.out_indices}"
            )
        self.resnet = ResNet(resnet_cfg)
        self.fpn = FPN(fpn_cfg)
        self.strides = fpn_strides(resnet_cfg, fpn_cfg)
        self.out_channels = fpn_cfg.out_channels

    def freeze(self, fpn: bool = True) -> BackboneWithFPN:
        """Freeze the ResNet (:meth:`ResNet.freeze`) and, with ``fpn``, the FPN's convolutions
        (``requires_grad=False``; the FPN has no BatchNorm): only the heads then learn, and a
        training step skips the backbone's backward pass."""
        self.resnet.freeze()
        if fpn:
            self.fpn.requires_grad_(False)
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.fpn(self.resnet(x))


def build_backbone(resnet_cfg: ResNetConfig, fpn_cfg: FPNConfig) -> BackboneWithFPN:
    """ResNet + FPN as one module whose ``forward`` returns the FPN levels (finest first).

    Raises ``ValueError`` naming ``in_channels`` when the FPN does not fit the ResNet's outputs.
    """
    return BackboneWithFPN(resnet_cfg, fpn_cfg)
