"""RetinaNet: shapes and anchor order, targets against the per-image assigner, the loss against
torchvision's focal loss, all-negative images, a few training steps, predict on hand-made outputs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torchvision
from torch import nn

from instseg_edu.engine.host_sync import count_host_syncs
from instseg_edu.models.backbone import FPNConfig, ResNetConfig
from instseg_edu.models.dense_heads import Float32GroupNorm
from instseg_edu.models.retinanet import (
    RETINANET_R18_SMALL,
    RETINANET_R50_FPN,
    AnchorGeneratorConfig,
    BBoxCoderConfig,
    FocalLossConfig,
    MaxIoUAssignerConfig,
    RetinaHead,
    RetinaHeadConfig,
    RetinaNetConfig,
    RetinaNetOutputs,
    RetinaTestConfig,
    RetinaTrainConfig,
    build_retinanet,
    to_B_HWA_K,
)
from instseg_edu.ops.anchors import AnchorGenerator
from instseg_edu.ops.assign import POSITIVE, max_iou_assign
from instseg_edu.ops.boxes import box_iou
from instseg_edu.ops.nms import NMSConfig
from instseg_edu.structures import Batch, Detections, Target

# A tiny RetinaNet: ResNet-18, 16-channel FPN, one conv per branch, 3 classes. Same anchors,
# assigner, losses and test procedure as the real one.
TINY = replace(
    RETINANET_R18_SMALL,
    neck=replace(RETINANET_R18_SMALL.neck, out_channels=16),
    bbox_head=replace(RETINANET_R18_SMALL.bbox_head, in_channels=16, feat_channels=16,
                      stacked_convs=1, num_classes=3),
)  # fmt: skip

# 64×96 input: levels (8, 12), (4, 6), (2, 3), (1, 2), (1, 1) -> 9 · 129 = 1161 anchors.
SIZES_64x96 = ((8, 12), (4, 6), (2, 3), (1, 2), (1, 1))
N_64x96 = 1161


def _target(boxes, labels, size, ignore=None) -> Target:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return Target(
        boxes=boxes,
        labels=torch.tensor(labels, dtype=torch.long),
        masks=torch.zeros(len(boxes), *size, dtype=torch.bool),
        ignore_boxes=torch.zeros(0, 4) if ignore is None else torch.tensor(ignore).reshape(-1, 4),
    )


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_retinanet(TINY)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


def test_to_B_HWA_K_order():
    b, a, k, h, w = 2, 3, 5, 2, 4
    x = torch.arange(b * a * k * h * w, dtype=torch.float32).reshape(b, a * k, h, w)
    out = to_B_HWA_K(x, k)
    assert out.shape == (b, h * w * a, k)
    for i, j, anchor, kk in [(0, 0, 0, 0), (1, 3, 2, 4), (0, 2, 1, 3), (1, 0, 2, 0)]:
        assert out[1, (i * w + j) * a + anchor, kk] == x[1, anchor * k + kk, i, j]
    assert torch.equal(to_B_HWA_K(x.contiguous(memory_format=torch.channels_last), k), out)


def test_forward_shapes_and_anchors(tiny_model):
    with torch.no_grad():
        out = tiny_model(torch.rand(2, 3, 64, 96))
    assert isinstance(out, RetinaNetOutputs)
    assert out.featmap_sizes == SIZES_64x96
    assert out.cls_logits.shape == (2, N_64x96, 3)
    assert out.bbox_deltas.shape == (2, N_64x96, 4)
    assert tiny_model.level_sizes(out.featmap_sizes) == [864, 216, 54, 18, 9]

    anchors = tiny_model.anchors(out.featmap_sizes, "cpu")
    gen = AnchorGenerator((8, 16, 32, 64, 128), (0.5, 1.0, 2.0), 4, 3)
    assert torch.equal(anchors, torch.cat(gen.grid_anchors(SIZES_64x96, "cpu")))
    assert tiny_model.anchors(list(map(list, SIZES_64x96)), "cpu") is anchors  # cached
    # Row (i * W + j) * A + a: anchor a = 4 (ratio 1, scale 4 · 2^(1/3)) of cell (3, 4) on P3.
    side = 8 * 4 * 2 ** (1 / 3)
    expected = torch.tensor([32 - side / 2, 24 - side / 2, 32 + side / 2, 24 + side / 2])
    torch.testing.assert_close(anchors[(3 * 12 + 4) * 9 + 4], expected)


def test_head_initialisation(tiny_model):
    head = tiny_model.bbox_head
    prior = -math.log(0.99 / 0.01)
    assert torch.allclose(head.retina_cls.bias, torch.full_like(head.retina_cls.bias, prior))
    assert torch.equal(head.retina_reg.bias, torch.zeros_like(head.retina_reg.bias))
    assert abs(head.retina_reg.weight.std().item() - 0.01) < 0.002
    with torch.no_grad():
        out = tiny_model.eval()(torch.rand(1, 3, 64, 96))
    tiny_model.train()
    # Every anchor starts near "1 % foreground": the focal-loss prior (Sec. 3.3).
    p = out.cls_logits.sigmoid()
    assert 0.005 < p.mean().item() < 0.02


def test_group_norm_in_the_head_follows_every_stacked_conv():
    plain = RetinaHead(replace(TINY.bbox_head, stacked_convs=2))
    assert [type(m).__name__ for m in plain.cls_convs] == ["Conv2d", "ReLU"] * 2
    cfg = replace(TINY.bbox_head, stacked_convs=2, norm_num_groups=8)
    head = RetinaHead(cfg)
    for branch in (head.cls_convs, head.reg_convs):
        assert [type(m).__name__ for m in branch] == ["Conv2d", "Float32GroupNorm", "ReLU"] * 2
        assert all(m.bias is None for m in branch if isinstance(m, nn.Conv2d))  # GN's beta instead
        assert all(m.num_groups == 8 for m in branch if isinstance(m, nn.GroupNorm))
    # The outputs keep the prior and the shapes of the plain head.
    assert torch.allclose(head.retina_cls.bias, plain.retina_cls.bias)
    features = tuple(torch.randn(2, cfg.in_channels, s, s) for s in (8, 4, 2, 1, 1))
    cls, reg = head(features)
    a = cfg.anchor_generator.num_base_anchors
    assert [c.shape for c in cls] == [(2, a * cfg.num_classes, s, s) for s in (8, 4, 2, 1, 1)]
    assert [r.shape for r in reg] == [(2, a * 4, s, s) for s in (8, 4, 2, 1, 1)]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_float32_group_norm_normalises_in_float32_under_cpu_autocast(memory_format):
    torch.manual_seed(0)
    norm = Float32GroupNorm(4, 16)
    plain = nn.GroupNorm(4, 16)
    with torch.no_grad():
        for p in (norm.weight, norm.bias):
            p.uniform_(-1, 1)
    plain.load_state_dict(norm.state_dict())  # the same parameters and keys as nn.GroupNorm
    x = (3 * torch.randn(2, 16, 6, 5) + 5).bfloat16().contiguous(memory_format=memory_format)
    with torch.autocast("cpu", torch.bfloat16):
        y = norm(x)
        y_bf16 = plain(x)  # CPU autocast leaves group_norm in bf16
    assert y.dtype == torch.float32 and y_bf16.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y, plain(x.float()), rtol=0, atol=0)
    # Outside autocast a float32 map goes through unchanged: nn.GroupNorm's own result.
    x32 = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(norm(x32), plain(x32), rtol=0, atol=0)
    # The gradient reaches a bf16 input in its own dtype.
    xg = x.detach().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        norm(xg).square().sum().backward()
    assert xg.grad.dtype == torch.bfloat16 and torch.isfinite(xg.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# targets and loss
# ---------------------------------------------------------------------------------------------


def _handmade_batch(anchor_box):
    """Image 0: 64×96, two objects, one exactly an anchor. Image 1: 40×56 inside the padding, one
    object and one ignore region."""
    t0 = _target([anchor_box.tolist(), [50.0, 5.0, 90.0, 60.0]], [2, 0], (64, 96))
    t1 = _target([[4.0, 4.0, 30.0, 36.0]], [1], (64, 96), ignore=[[30.0, 0.0, 56.0, 40.0]])
    return Batch(torch.rand(2, 3, 64, 96), [(64, 96), (40, 56)], [t0, t1])


def test_targets_match_per_image_assigner(tiny_model):
    model = build_retinanet(replace(TINY, train_cfg=RetinaTrainConfig(
        MaxIoUAssignerConfig(ignore_iof_thr=0.5))))  # fmt: skip
    anchors = model.anchors(SIZES_64x96, "cpu")
    exact = (3 * 12 + 4) * 9 + 4
    batch = _handmade_batch(anchors[exact])
    with torch.no_grad():
        outputs = model(batch.images)
    t = model.targets(outputs, batch)
    assert t.labels.shape == t.label_weights.shape == t.bbox_weights.shape == (2, N_64x96)
    assert t.bbox_targets.shape == (2, N_64x96, 4)

    # The anchor that *is* ground truth 0: positive, IoU 1, label 2, zero deltas.
    assert t.assignment.gt_inds[0, exact] == 1 and t.labels[0, exact] == 2
    assert t.assignment.reason[0, exact] == POSITIVE
    assert t.assignment.max_iou[0, exact] == pytest.approx(1.0)
    assert torch.equal(t.bbox_targets[0, exact], torch.zeros(4))

    gen = model.anchor_generator
    for i, target in enumerate(batch.targets):
        valid = torch.cat(gen.valid_flags(SIZES_64x96, batch.image_sizes[i]))  # [N]
        ref = max_iou_assign(
            anchors[valid], target.boxes, target.labels, pos_iou_thr=0.5, neg_iou_thr=0.4,
            min_pos_iou=0.0, ignore_iof_thr=0.5, gt_boxes_ignore=target.ignore_boxes,
        )  # fmt: skip
        assert torch.equal(t.assignment.gt_inds[i, valid], ref.gt_inds)
        assert torch.equal(t.assignment.gt_inds[i, ~valid], torch.full(((~valid).sum(),), -1))
        assert torch.equal(t.labels[i, valid], ref.labels)
        assert torch.equal(t.label_weights[i], (t.assignment.gt_inds[i] >= 0).float())
        pos = t.assignment.gt_inds[i] > 0
        assert t.num_pos[i] == pos.sum() > 0
        expected = model.bbox_coder.encode(
            anchors[pos], target.boxes[t.assignment.gt_inds[i, pos] - 1]
        )
        torch.testing.assert_close(t.bbox_targets[i, pos], expected)
        assert torch.equal(t.bbox_targets[i, ~pos], torch.zeros((~pos).sum(), 4))
    # Image 1 (40×56) has padding: its anchors at x >= 56 or y >= 40 are ignored.
    assert (~torch.cat(gen.valid_flags(SIZES_64x96, (40, 56)))).sum() > 0
    # ... and its ignore region kept some anchors out of the background.
    assert (t.assignment.gt_inds[1] == -1).sum() > (t.assignment.gt_inds[0] == -1).sum()


def test_loss_equals_torchvision_focal_and_l1(tiny_model):
    batch = _handmade_batch(tiny_model.anchors(SIZES_64x96, "cpu")[400])
    torch.manual_seed(1)
    outputs = tiny_model(batch.images)
    outputs = outputs._replace(cls_logits=outputs.cls_logits + torch.randn_like(outputs.cls_logits))
    losses = tiny_model.loss(outputs, batch)
    t = tiny_model.targets(outputs, batch)
    onehot = torch.nn.functional.one_hot(t.labels.clamp(min=0), 3).float()
    onehot = onehot * (t.labels >= 0)[..., None]
    focal = torchvision.ops.sigmoid_focal_loss(outputs.cls_logits, onehot, 0.25, 2.0, "none")
    num_pos = t.num_pos.sum()
    assert num_pos >= 3
    expected_cls = (focal * t.label_weights[..., None]).sum() / num_pos
    pos = t.bbox_weights > 0
    expected_bbox = (outputs.bbox_deltas[pos] - t.bbox_targets[pos]).abs().sum() / num_pos
    torch.testing.assert_close(losses["loss_cls"], expected_cls)
    torch.testing.assert_close(losses["loss_bbox"], expected_bbox)
    assert losses["num_pos"] == num_pos / 2 and not losses["num_pos"].requires_grad

    # loss_weight scales each term
    weighted = replace(TINY, bbox_head=replace(TINY.bbox_head, loss_cls=FocalLossConfig(
        loss_weight=2.0)))  # fmt: skip
    model2 = build_retinanet(weighted)
    model2.load_state_dict(tiny_model.state_dict())
    torch.testing.assert_close(model2.loss(outputs, batch)["loss_cls"], 2 * expected_cls)


def test_all_negative_images_give_finite_loss(tiny_model):
    empty = _target([], [], (64, 96))
    batch = Batch(torch.rand(2, 3, 64, 96), [(64, 96), (64, 80)], [empty, empty])
    outputs = tiny_model(batch.images)
    losses = tiny_model.loss(outputs, batch)
    assert losses["num_pos"] == 0
    assert losses["loss_bbox"] == 0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    (losses["loss_cls"] + losses["loss_bbox"]).backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny_model.zero_grad()

    # Mixed: one empty image next to one with an object.
    mixed = [_target([[8.0, 8.0, 40.0, 48.0]], [0], (64, 96)), empty]
    t = tiny_model.targets(outputs, Batch(batch.images, batch.image_sizes, mixed))
    assert t.num_pos[0] > 0 and t.num_pos[1] == 0
    assert (t.labels[1] == -1).all() and torch.isfinite(t.bbox_targets).all()
    valid1 = tiny_model.anchor_valid(SIZES_64x96, [(64, 80)], "cpu")[0]
    assert torch.equal(t.label_weights[1], valid1.float())  # all valid anchors are background


def _rectangles_batch() -> Batch:
    """Two 128² images with coloured rectangles on grey; the rectangles are the objects."""
    images = torch.full((2, 3, 128, 128), 0.5)
    objects = [
        [((16, 20, 70, 60), 0, (1.0, 0.1, 0.1)), ((80, 70, 120, 124), 1, (0.1, 0.2, 1.0))],
        [((30, 40, 110, 100), 1, (0.1, 0.2, 1.0)), ((4, 4, 36, 28), 0, (1.0, 0.1, 0.1))],
    ]
    targets = []
    for i, objs in enumerate(objects):
        for (x1, y1, x2, y2), _, colour in objs:
            images[i, :, y1:y2, x1:x2] = torch.tensor(colour)[:, None, None]
        targets.append(_target([o[0] for o in objs], [o[1] for o in objs], (128, 128)))
    return Batch(images, [(128, 128), (128, 128)], targets)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = replace(TINY, bbox_head=replace(TINY.bbox_head, num_classes=2, feat_channels=32))
    model = build_retinanet(cfg).train()
    batch = _rectangles_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(12):
        losses = model.loss(model(batch.images), batch)
        loss = losses["loss_cls"] + losses["loss_bbox"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((losses["loss_cls"].item(), losses["loss_bbox"].item()))
    first, last = history[0], history[-1]
    assert all(math.isfinite(c) and math.isfinite(b) for c, b in history)
    assert last[0] + last[1] < 0.6 * (first[0] + first[1]), history
    assert last[0] < first[0] and last[1] < first[1], history


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------


def _handmade_outputs(model, logits: dict[tuple[int, int], float], deltas=None) -> RetinaNetOutputs:
    """Image 0 has the given ``{(anchor, class): logit}``; everything else is -20 (p ≈ 2e-9)."""
    cls = torch.full((2, N_64x96, 3), -20.0)
    for (anchor, c), value in logits.items():
        cls[0, anchor, c] = value
    d = torch.zeros(2, N_64x96, 4) if deltas is None else deltas
    return RetinaNetOutputs(cls, d, SIZES_64x96)


def test_predict_handmade(tiny_model):
    anchors = tiny_model.anchors(SIZES_64x96, "cpu")
    a, b = (3 * 12 + 4) * 9 + 4, (3 * 12 + 4) * 9 + 5  # same cell, scales 2^(1/3) and 2^(2/3)
    assert box_iou(anchors[a : a + 1], anchors[b : b + 1]).item() > 0.5
    corner = 7  # cell (0, 0), ratio 2 (tall): sticks out of the image, gets clipped
    logits = {(a, 1): 3.0, (b, 1): 2.0, (b, 2): 1.0, (corner, 0): 0.5, (600, 0): -3.5}
    dets = tiny_model.predict(_handmade_outputs(tiny_model, logits), [(64, 96), (64, 96)])
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    d = dets[0]
    # (b, 1) is suppressed by (a, 1) — same class, IoU > 0.5; (b, 2) survives: another class.
    # (600, 0) has p = 0.029 < score_thr = 0.05.
    expected_scores = torch.sigmoid(torch.tensor([3.0, 1.0, 0.5]))
    torch.testing.assert_close(d.scores, expected_scores)
    assert d.labels.tolist() == [1, 2, 0]
    assert anchors[b, 1] < 0 and anchors[corner, 0] < 0  # both stick out at the top/left
    expected_boxes = torch.stack([anchors[a], anchors[b], anchors[corner]]).clamp(min=0)
    torch.testing.assert_close(d.boxes, expected_boxes)
    assert d.boxes.dtype == torch.float32 and d.labels.dtype == torch.int64
    assert d.masks is None
    # Image 1 has nothing above the threshold.
    assert dets[1].boxes.shape == (0, 4) and dets[1].scores.shape == (0,)
    assert dets[1].labels.dtype == torch.int64

    # Deltas move the box: dx = 0.5 shifts anchor a by half its width.
    deltas = torch.zeros(2, N_64x96, 4)
    deltas[0, a, 0] = 0.5
    moved = tiny_model.predict(_handmade_outputs(tiny_model, {(a, 1): 3.0}, deltas), [(64, 96)])[0]
    width = (anchors[a, 2] - anchors[a, 0]).item()
    torch.testing.assert_close(moved.boxes[0], anchors[a] + torch.tensor([0.5, 0, 0.5, 0]) * width)


def test_predict_respects_test_cfg():
    torch.manual_seed(0)
    test_cfg = RetinaTestConfig(score_thr=0.0, max_per_img=7, nms_pre=20)
    model = build_retinanet(replace(TINY, test_cfg=test_cfg))
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 96))
    dets = model.predict(outputs, [(64, 96), (50, 70)])
    for d, (h, w) in zip(dets, [(64, 96), (50, 70)]):
        assert len(d) == 7
        assert d.boxes.shape == (7, 4) and d.scores.shape == (7,) and d.labels.shape == (7,)
        assert torch.all(d.scores[:-1] >= d.scores[1:])
        assert torch.all((d.boxes[:, 0::2] >= 0) & (d.boxes[:, 0::2] <= w))
        assert torch.all((d.boxes[:, 1::2] >= 0) & (d.boxes[:, 1::2] <= h))
        assert torch.all((d.labels >= 0) & (d.labels < 3))

    # nms_pre=1 keeps one (anchor, class) per level: at most 5 candidates.
    model1 = build_retinanet(replace(TINY, test_cfg=RetinaTestConfig(score_thr=0.0, nms_pre=1)))
    model1.load_state_dict(model.state_dict())
    assert len(model1.predict(outputs, [(64, 96)])[0]) <= 5


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def test_presets_mirror_mmdetection():
    cfg = RETINANET_R50_FPN
    assert (cfg.backbone.depth, cfg.backbone.frozen_stages, cfg.backbone.norm_eval) == (50, 1, True)
    assert cfg.neck == FPNConfig()  # (256, 512, 1024, 2048) -> 256, start_level 1, on_input, 5
    head = cfg.bbox_head
    assert (head.num_classes, head.stacked_convs, head.feat_channels) == (80, 4, 256)
    gen = head.anchor_generator
    assert (gen.octave_base_scale, gen.scales_per_octave, gen.ratios) == (4, 3, (0.5, 1.0, 2.0))
    assert gen.strides == (8, 16, 32, 64, 128)
    a = cfg.train_cfg.assigner
    assert (a.pos_iou_thr, a.neg_iou_thr, a.min_pos_iou, a.match_low_quality) == (0.5, 0.4, 0, True)
    t = cfg.test_cfg
    assert (t.nms_pre, t.score_thr, t.nms.iou_threshold, t.max_per_img) == (1000, 0.05, 0.5, 100)
    assert (head.loss_cls.alpha, head.loss_cls.gamma) == (0.25, 2.0)
    assert RETINANET_R18_SMALL.with_num_classes(5).bbox_head.num_classes == 5
    # 512² image: (64² + 32² + 16² + 8² + 4²) · 9 anchors.
    model = build_retinanet(TINY)
    assert sum(model.level_sizes([(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)])) == 49104


def test_model_train_keeps_backbone_frozen():
    cfg = replace(TINY, backbone=ResNetConfig(depth=18, frozen_stages=1, norm_eval=True))
    model = build_retinanet(cfg).train()
    resnet = model.backbone.resnet
    assert model.training and model.bbox_head.training and resnet.layer4.training
    assert not resnet.layer1.training and not resnet.bn1.training
    assert not any(m.training for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any(p.requires_grad for p in resnet.layer1.parameters())
    assert all(p.requires_grad for p in model.bbox_head.parameters())


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: replace(TINY, bbox_head=replace(TINY.bbox_head, anchor_generator=(
            AnchorGeneratorConfig(strides=(8, 16, 32, 64))))), "strides"),
        (lambda: replace(TINY, bbox_head=replace(TINY.bbox_head, anchor_generator=(
            AnchorGeneratorConfig(strides=(8, 16, 32, 64, 256))))), "strides"),
        (lambda: replace(TINY, bbox_head=replace(TINY.bbox_head, in_channels=32)), "in_channels"),
        (lambda: replace(TINY, backbone=ResNetConfig(depth=50)), "in_channels"),
        (lambda: RetinaHeadConfig(num_classes=0), "num_classes"),
        (lambda: RetinaHeadConfig(stacked_convs=-1), "stacked_convs"),
        (lambda: RetinaHeadConfig(prior_prob=0.0), "prior_prob"),
        (lambda: RetinaHeadConfig(feat_channels=64, norm_num_groups=24), "norm_num_groups"),
        (lambda: RetinaHeadConfig(norm_num_groups=0), "norm_num_groups"),
        (lambda: MaxIoUAssignerConfig(neg_iou_thr=0.6), "neg_iou_thr"),
        (lambda: MaxIoUAssignerConfig(neg_iou_thr=(0.1, 0.7)), "neg_iou_thr"),
        (lambda: MaxIoUAssignerConfig(pos_iou_thr=1.5), "pos_iou_thr"),
        (lambda: AnchorGeneratorConfig(ratios=(0.0, 1.0)), "ratios"),
        (lambda: AnchorGeneratorConfig(scales_per_octave=0), "scales_per_octave"),
        (lambda: AnchorGeneratorConfig(octave_base_scale=-1), "octave_base_scale"),
        (lambda: BBoxCoderConfig(target_stds=(1.0, 1.0, 0.0, 1.0)), "target_stds"),
        (lambda: FocalLossConfig(alpha=2.0), "alpha"),
        (lambda: FocalLossConfig(gamma=-1.0), "gamma"),
        (lambda: RetinaTestConfig(score_thr=1.5), "score_thr"),
        (lambda: RetinaTestConfig(nms_pre=0), "nms_pre"),
        (lambda: RetinaTestConfig(max_per_img=0), "max_per_img"),
        (lambda: RetinaTestConfig(nms=NMSConfig(iou_threshold=0.0)), "iou_threshold"),
    ],
)  # fmt: skip
def test_invalid_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        make()


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        RETINANET_R50_FPN.bbox_head.num_classes = 3  # type: ignore[misc]
    assert isinstance(RetinaNetConfig().neck, FPNConfig)


def test_predict_waits_once_for_the_counts_and_once_per_image_for_nms():
    torch.manual_seed(0)
    cfg = replace(TINY, test_cfg=replace(TINY.test_cfg, score_thr=0.0))  # every candidate
    model = build_retinanet(cfg).eval()
    batch = _rectangles_batch()
    with torch.no_grad(), count_host_syncs() as syncs:
        detections = model.predict(model(batch.images), batch.image_sizes)
    ops = [e.op for e in syncs.events]
    assert ops == ["Tensor.tolist"] + ["torchvision.nms"] * len(batch), syncs.summary()
    assert all(len(d.boxes) == cfg.test_cfg.max_per_img for d in detections)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_targets_and_loss_do_not_synchronise_on_gpu():
    torch.manual_seed(0)
    model = build_retinanet(TINY).cuda()
    batch = _rectangles_batch().to("cuda")
    with torch.no_grad():
        outputs = model(batch.images)
    model.loss(outputs, batch)  # warm the anchor/valid-flag caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = model.loss(outputs, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = build_retinanet(TINY)
    cpu.load_state_dict(model.state_dict())
    expected = cpu.loss(RetinaNetOutputs(outputs.cls_logits.cpu(), outputs.bbox_deltas.cpu(),
                                         outputs.featmap_sizes), _rectangles_batch())  # fmt: skip
    for key in ("loss_cls", "loss_bbox", "num_pos"):
        torch.testing.assert_close(losses[key].cpu(), expected[key], rtol=1e-4, atol=1e-5)
