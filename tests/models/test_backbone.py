"""ResNet + FPN: shapes at odd sizes, freezing, style, torchvision weights, torchvision's FPN."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.feature_pyramid_network import (
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from instseg_edu.models.backbone import (
    FPN,
    FPNConfig,
    ResNet,
    ResNetConfig,
    build_backbone,
    fpn_strides,
    resnet_out_channels,
)

R18_CHANNELS = (64, 128, 256, 512)
RETINA_FPN = FPNConfig(in_channels=R18_CHANNELS, out_channels=16, start_level=1, num_outs=5)
MASKRCNN_FPN = FPNConfig(
    in_channels=R18_CHANNELS, out_channels=16, start_level=0, num_outs=5, add_extra_convs=False
)
R18 = ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False)


def _bn_modules(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms so a wrong key shows up."""
    g = torch.Generator().manual_seed(seed)
    for bn in _bn_modules(module):
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def _torchvision_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        outs.append(x)
    return outs


# ---------------------------------------------------------------------------------------------
# Strides and shapes
# ---------------------------------------------------------------------------------------------


def test_fpn_strides_golden():
    assert fpn_strides(ResNetConfig(), FPNConfig()) == (8, 16, 32, 64, 128)
    mask = FPNConfig(start_level=0, add_extra_convs=False)
    assert fpn_strides(ResNetConfig(), mask) == (4, 8, 16, 32, 64)
    # end_level=2 stops at C4 and allows no extra level: P3, P4.
    assert fpn_strides(ResNetConfig(), FPNConfig(start_level=1, end_level=2, num_outs=2)) == (8, 16)
    # Three inputs C3..C5 (out_indices 1..3), start_level=0 is C3.
    three = FPNConfig(in_channels=(512, 1024, 2048), start_level=0, num_outs=5)
    assert fpn_strides(ResNetConfig(out_indices=(1, 2, 3)), three) == (8, 16, 32, 64, 128)


@pytest.mark.parametrize("size", [(512, 512), (333, 500)])
@pytest.mark.parametrize(
    "fpn_cfg, strides", [(RETINA_FPN, (8, 16, 32, 64, 128)), (MASKRCNN_FPN, (4, 8, 16, 32, 64))]
)
def test_backbone_shapes(size, fpn_cfg, strides):
    torch.manual_seed(0)
    model = build_backbone(R18, fpn_cfg).eval()
    assert model.strides == strides
    h, w = size
    with torch.no_grad():
        outs = model(torch.rand(1, 3, h, w))
    expected = [(1, 16, math.ceil(h / s), math.ceil(w / s)) for s in strides]
    assert [tuple(o.shape) for o in outs] == expected
    if size == (333, 500) and strides[0] == 8:  # spelled out once: 333 -> 42, 21, 11, 6, 3
        assert [o.shape[-2] for o in outs] == [42, 21, 11, 6, 3]


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_stage_shapes_and_channels(depth):
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(depth=depth, out_indices=(0, 1, 2, 3))).eval()
    assert model.out_channels == resnet_out_channels(model.cfg)
    expected_channels = R18_CHANNELS if depth < 50 else (256, 512, 1024, 2048)
    assert model.out_channels == expected_channels
    with torch.no_grad():
        outs = model(torch.rand(2, 3, 65, 97))
    for i, (o, c) in enumerate(zip(outs, expected_channels)):
        s = 4 * 2**i
        assert tuple(o.shape) == (2, c, math.ceil(65 / s), math.ceil(97 / s))


@pytest.mark.parametrize("depth", [18, 50])
def test_base_channels_scales_every_stage_and_the_stem(depth):
    """MMDetection's ``base_channels``: stage i has base_channels * 2**i planes (x4 out of a
    Bottleneck), the stem base_channels; 64 is the ImageNet ResNet (the default)."""
    cfg = ResNetConfig(depth=depth, base_channels=32)
    model = ResNet(cfg).eval()
    expansion = 1 if depth < 50 else 4
    assert model.out_channels == tuple(32 * 2**i * expansion for i in range(4))
    assert model.conv1.out_channels == 32 and model.bn1.num_features == 32
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == list(model.out_channels)
    narrow = sum(p.numel() for p in model.parameters())
    full = sum(p.numel() for p in ResNet(ResNetConfig(depth=depth)).parameters())
    assert 0.24 < narrow / full < 0.26  # every conv has half the inputs and half the outputs
    for bad in (0, -8, 16.0):
        with pytest.raises(ValueError, match="base_channels"):
            ResNetConfig(base_channels=bad)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_state_dict_keys_match_torchvision(depth):
    ours = ResNet(ResNetConfig(depth=depth)).state_dict()
    theirs = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.startswith("fc.")}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_out_indices_and_num_stages():
    model = ResNet(ResNetConfig(depth=18, num_stages=3, out_indices=(1, 2), frozen_stages=-1))
    assert not hasattr(model, "layer4")
    assert model.out_channels == (128, 256)
    outs = model.eval()(torch.rand(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 8), (1, 256, 4, 4)]


# ---------------------------------------------------------------------------------------------
# Freezing and BatchNorm modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2])
def test_frozen_stages_survive_train(frozen_stages):
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(depth=18, frozen_stages=frozen_stages, norm_eval=False))
    model.train()
    frozen = (["conv1", "bn1"] if frozen_stages >= 0 else []) + [
        f"layer{k}" for k in range(1, frozen_stages + 1)
    ]
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.training == (name.split(".")[0] not in frozen), name

    # One SGD step on a loss: frozen weights and BN statistics do not move, the rest do.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = sum(o.square().mean() for o in model(torch.rand(2, 3, 64, 64)))
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        if k.endswith("num_batches_tracked"):
            continue
        if k.split(".")[0] in frozen:
            assert torch.equal(before[k], after[k]), k
    # (zero_init_residual leaves the residual branch's convs without gradient at step one)
    for k in ("layer4.0.downsample.0.weight", "layer4.0.bn2.weight"):
        assert not torch.equal(before[k], after[k]), k
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])

    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()  # and back again: still frozen
    assert model.layer4.training and (frozen_stages < 1 or not model.layer1.training)


def test_norm_eval_keeps_statistics_but_trains_affine():
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(depth=18, frozen_stages=-1, norm_eval=True)).train()
    assert model.training
    assert all(not bn.training for bn in _bn_modules(model))
    assert all(p.requires_grad for p in model.parameters())
    stats = [bn.running_mean.clone() for bn in _bn_modules(model)]
    model(torch.rand(2, 3, 64, 64))
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(stats, _bn_modules(model)))

    # Without norm_eval the same forward updates the statistics.
    model = ResNet(ResNetConfig(depth=18, frozen_stages=-1, norm_eval=False)).train()
    assert all(bn.training for bn in _bn_modules(model))
    before = model.layer1[0].bn1.running_mean.clone()
    model(torch.rand(2, 3, 64, 64))
    assert not torch.equal(before, model.layer1[0].bn1.running_mean)


# ---------------------------------------------------------------------------------------------
# style
# ---------------------------------------------------------------------------------------------


def test_caffe_and_pytorch_stride_placement():
    pytorch = ResNet(ResNetConfig(depth=50, style="pytorch"))
    caffe = ResNet(ResNetConfig(depth=50, style="caffe"))
    assert pytorch.layer1[0].conv1.stride == caffe.layer1[0].conv1.stride == (1, 1)
    assert pytorch.layer1[0].conv2.stride == caffe.layer1[0].conv2.stride == (1, 1)
    for name in ("layer2", "layer3", "layer4"):
        p0, c0 = getattr(pytorch, name)[0], getattr(caffe, name)[0]
        assert (p0.conv1.stride, p0.conv2.stride) == ((1, 1), (2, 2))
        assert (c0.conv1.stride, c0.conv2.stride) == ((2, 2), (1, 1))
        # Only the first block subsamples; the shortcut's projection is stride 2 in both.
        assert getattr(caffe, name)[1].conv1.stride == (1, 1)
        assert c0.downsample[0].stride == p0.downsample[0].stride == (2, 2)

    # Same weights, same output shapes, different numbers (the subsampling moved).
    caffe.load_state_dict(pytorch.state_dict())
    for m in (pytorch, caffe):
        _randomize_bn(m)  # zero-init residual BNs would hide the residual branch
        m.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        outs_p, outs_c = pytorch(x), caffe(x)
    assert [o.shape for o in outs_p] == [o.shape for o in outs_c]
    assert torch.equal(outs_p[0], outs_c[0])  # layer1 has stride 1: identical
    assert not torch.allclose(outs_p[1], outs_c[1])


def test_style_does_not_change_basic_blocks():
    caffe = ResNet(ResNetConfig(depth=18, style="caffe"))
    assert caffe.layer2[0].conv1.stride == (2, 2)  # a BasicBlock's first conv is the 3×3


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 50])
def test_local_torchvision_state_dict_gives_torchvision_features(tmp_path, depth):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")()
    _randomize_bn(reference)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(reference.state_dict(), path)  # includes fc.*, which must be ignored

    ours = ResNet(ResNetConfig(depth=depth, pretrained=str(path), frozen_stages=-1)).eval()
    reference.eval()
    x = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        expected = _torchvision_features(reference, x)
        got = ours(x)
    assert len(got) == 4
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_local_file_partial_stages_and_errors(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    three = ResNet(ResNetConfig(depth=18, num_stages=3, out_indices=(2,), pretrained=path))
    assert torch.equal(three.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        ResNet(ResNetConfig(depth=34, pretrained=str(path)))  # strict: wrong depth fails
    with pytest.raises(FileNotFoundError):
        ResNet(ResNetConfig(depth=18, pretrained=str(tmp_path / "missing.pth")))


@pytest.mark.parametrize("as_name", [True, False])
def test_torchvision_weights_enum_path(monkeypatch, as_name):
    """The weights-API path, with torchvision's download replaced by a local state dict."""
    reference = torchvision.models.resnet18()
    _randomize_bn(reference)
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return reference.state_dict()

    weights_cls = torchvision.models.ResNet18_Weights
    monkeypatch.setattr(weights_cls, "get_state_dict", fake_get_state_dict)
    pretrained = "ResNet18_Weights.IMAGENET1K_V1" if as_name else weights_cls.IMAGENET1K_V1
    ours = ResNet(ResNetConfig(depth=18, pretrained=pretrained))
    assert calls == [weights_cls.IMAGENET1K_V1]
    assert torch.equal(ours.bn1.running_var, reference.bn1.running_var)
    assert torch.equal(ours.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


# ---------------------------------------------------------------------------------------------
# FPN against torchvision.ops.FeaturePyramidNetwork
# ---------------------------------------------------------------------------------------------


def _copy_fpn_weights(ours: FPN, theirs: FeaturePyramidNetwork) -> None:
    for lateral, inner in zip(ours.lateral_convs, theirs.inner_blocks):
        inner[0].load_state_dict(lateral.state_dict())
    for conv, layer in zip(ours.fpn_convs, theirs.layer_blocks):
        layer[0].load_state_dict(conv.state_dict())
    if isinstance(theirs.extra_blocks, LastLevelP6P7):
        theirs.extra_blocks.p6.load_state_dict(ours.extra_convs[0].state_dict())
        theirs.extra_blocks.p7.load_state_dict(ours.extra_convs[1].state_dict())


_MODES = ("on_input", "on_lateral", "on_output")


def _pyramid_inputs(channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(25, 33), (13, 17), (7, 9), (4, 5)]  # an odd 97×130 input at strides 4..32
    return tuple(torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes))


@pytest.mark.parametrize(
    "cfg, extra, first",
    [
        # Mask R-CNN: P2..P5 + max-pooled P6  ==  torchvision FPN + LastLevelMaxPool
        (
            FPNConfig(in_channels=(8, 16, 24, 32), out_channels=12, start_level=0,
                      num_outs=5, add_extra_convs=False),
            lambda: LastLevelMaxPool(),
            0,
        ),
        # RetinaNet as torchvision builds it: P6 from C5, ReLU, P7  ==  LastLevelP6P7(C5, out)
        (
            FPNConfig(in_channels=(8, 16, 24, 32), out_channels=12, start_level=1,
                      num_outs=5, add_extra_convs="on_input", relu_before_extra_convs=True),
            lambda: LastLevelP6P7(32, 12),
            1,
        ),
        # in_channels == out_channels: torchvision takes P6 from P5, i.e. 'on_output'
        (
            FPNConfig(in_channels=(8, 16, 24, 12), out_channels=12, start_level=1,
                      num_outs=5, add_extra_convs="on_output", relu_before_extra_convs=True),
            lambda: LastLevelP6P7(12, 12),
            1,
        ),
    ],
)  # fmt: skip
def test_fpn_equals_torchvision(cfg, extra, first):
    torch.manual_seed(0)
    ours = FPN(cfg).eval()
    theirs = FeaturePyramidNetwork(list(cfg.in_channels[first:]), cfg.out_channels, extra()).eval()
    _copy_fpn_weights(ours, theirs)
    inputs = _pyramid_inputs(cfg.in_channels)
    with torch.no_grad():
        got = ours(inputs)
        expected = theirs(OrderedDict((str(i), x) for i, x in enumerate(inputs[first:])))
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fpn_extra_sources_differ_and_end_level():
    torch.manual_seed(0)
    inputs = _pyramid_inputs((8, 16, 24, 32))
    base = dict(in_channels=(8, 16, 24, 32), out_channels=12, start_level=1, num_outs=5)
    models = {mode: FPN(FPNConfig(**base, add_extra_convs=mode)).eval() for mode in _MODES}
    assert models["on_input"].extra_convs[0].in_channels == 32  # C5
    models["on_output"].load_state_dict(models["on_lateral"].state_dict())
    with torch.no_grad():
        outs = {mode: model(inputs) for mode, model in models.items()}
        lateral = models["on_lateral"].lateral_convs[-1](inputs[-1])
        p6 = {
            "on_input": models["on_input"].extra_convs[0](inputs[-1]),
            "on_lateral": models["on_lateral"].extra_convs[0](lateral),
            "on_output": models["on_output"].extra_convs[0](outs["on_output"][2]),
        }
    for mode in _MODES:
        sizes = [tuple(o.shape[-2:]) for o in outs[mode]]
        assert sizes == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]
        torch.testing.assert_close(outs[mode][3], p6[mode])
    # Same weights, P3..P5 identical, P6 differs only through its source.
    for level in range(3):
        assert torch.equal(outs["on_lateral"][level], outs["on_output"][level])
    assert not torch.allclose(outs["on_lateral"][3], outs["on_output"][3])
    assert FPNConfig(**base, add_extra_convs=True).add_extra_convs == "on_input"

    model = FPN(FPNConfig(**{**base, "num_outs": 2}, end_level=2, add_extra_convs=False))
    outs = model(inputs)
    assert [tuple(o.shape) for o in outs] == [(2, 12, 13, 17), (2, 12, 7, 9)]
    with pytest.raises(ValueError, match="4 expects|expects 4"):
        model(inputs[:3])


# ---------------------------------------------------------------------------------------------
# Invalid configurations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ResNetConfig(depth=20), "depth"),
        (lambda: ResNetConfig(num_stages=5), "num_stages"),
        (lambda: ResNetConfig(out_indices=(0, 4)), "out_indices"),
        (lambda: ResNetConfig(num_stages=2, out_indices=(0, 2)), "out_indices"),
        (lambda: ResNetConfig(out_indices=(2, 1)), "out_indices"),
        (lambda: ResNetConfig(out_indices=()), "out_indices"),
        (lambda: ResNetConfig(frozen_stages=5), "frozen_stages"),
        (lambda: ResNetConfig(frozen_stages=-2), "frozen_stages"),
        (lambda: ResNetConfig(style="tf"), "style"),
        (lambda: ResNetConfig(pretrained=3), "pretrained"),
        (lambda: FPNConfig(in_channels=()), "in_channels"),
        (lambda: FPNConfig(out_channels=0), "out_channels"),
        (lambda: FPNConfig(num_outs=2), "num_outs"),
        (lambda: FPNConfig(start_level=4), "start_level"),
        (lambda: FPNConfig(add_extra_convs="on_top"), "add_extra_convs"),
        (lambda: FPNConfig(end_level=0), "end_level"),
        (lambda: FPNConfig(end_level=2, num_outs=5), "num_outs"),
        (lambda: build_backbone(ResNetConfig(depth=18), FPNConfig()), "in_channels"),
    ],
)
def test_invalid_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        make()
