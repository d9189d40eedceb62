"""SOLO: config validation, split_feats / CoordConv / output shapes, hand-computed target goldens
(levels, cells, channels i·S+j, centre of mass), the loss against a hand computation, an empty
image, a few training steps, the batched mask targets against a per-image loop, host
synchronisations of a training step (one) and of predict (two), predict on hand-made outputs and
against a per-image boolean-indexing reference.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision

from instseg_edu.engine.host_sync import count_host_syncs
from instseg_edu.losses import dice_loss
from instseg_edu.models.backbone import FPNConfig
from instseg_edu.models.solo import (
    BACKGROUND,
    SOLO_R18_SMALL,
    SOLO_R50_FPN,
    SOLO_R50_FPN_SCRATCH,
    SOLOConfig,
    SOLOHeadConfig,
    SOLOOutputs,
    SOLOTestConfig,
    build_solo,
    center_of_mass,
    coord_features,
    masks_to_boxes,
    solo_target_single,
    split_feats,
)
from instseg_edu.structures import Batch, Detections, Target

# A tiny SOLO: ResNet-18, 16-channel FPN and head, two stacked convs, 3 classes, grids
# (12, 10, 8, 6, 4). Same scale ranges, sigma, losses and test procedure as the real one.
TINY = replace(
    SOLO_R18_SMALL,
    neck=replace(SOLO_R18_SMALL.neck, out_channels=16),
    bbox_head=replace(SOLO_R18_SMALL.bbox_head, in_channels=16, feat_channels=16, stacked_convs=2,
                      norm_num_groups=8, num_classes=3),
)  # fmt: skip
GRIDS = (12, 10, 8, 6, 4)


def _target(boxes, labels, masks) -> Target:
    return Target(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.long),
        masks=masks,
    )


def _box_mask(size, y1, y2, x1, x2) -> torch.Tensor:
    """A [H, W] bool mask with rows y1..y2-1 and columns x1..x2-1 set."""
    m = torch.zeros(size, dtype=torch.bool)
    m[y1:y2, x1:x2] = True
    return m


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_solo(TINY)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def test_presets_are_valid_and_match_mmdetection():
    head = SOLO_R50_FPN.bbox_head
    assert head.strides == (8, 8, 16, 32, 32)
    assert head.num_grids == (40, 36, 24, 16, 12)
    assert head.scale_ranges == ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    assert (head.sigma, head.stacked_convs, head.cate_down_pos) == (0.2, 7, 0)
    assert head.loss_ins.loss_weight == 3.0
    assert (head.loss_cate.gamma, head.loss_cate.alpha, head.loss_cate.loss_weight) == (2, 0.25, 1)
    t = SOLO_R50_FPN.test_cfg
    assert (t.nms_pre, t.score_thr, t.mask_thr, t.update_thr, t.kernel, t.sigma, t.max_per_img) == (
        500, 0.1, 0.5, 0.05, "gaussian", 2.0, 100)  # fmt: skip
    assert SOLO_R50_FPN.neck.start_level == 0 and SOLO_R50_FPN.neck.add_extra_convs is False
    assert SOLO_R50_FPN_SCRATCH.backbone.frozen_stages == -1
    assert SOLO_R18_SMALL.with_num_classes(7).bbox_head.num_classes == 7


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: SOLOHeadConfig(num_grids=(40, 36, 24, 16)), "num_grids"),
        (lambda: SOLOHeadConfig(scale_ranges=((1, 96),) * 4), "scale_ranges"),
        (lambda: SOLOHeadConfig(scale_ranges=((96, 1),) * 5), "scale_ranges"),
        (lambda: SOLOHeadConfig(sigma=0.0), "sigma"),
        (lambda: SOLOHeadConfig(stacked_convs=2, cate_down_pos=2), "cate_down_pos"),
        (lambda: SOLOHeadConfig(feat_channels=48), "norm_num_groups"),
        (lambda: SOLOTestConfig(kernel="box"), "kernel"),
        (lambda: SOLOTestConfig(mask_thr=1.5), "mask_thr"),
        (lambda: SOLOTestConfig(max_per_img=0), "max_per_img"),
        (lambda: SOLOConfig(bbox_head=SOLOHeadConfig(strides=(4, 8, 16, 32, 64))), "strides"),
        (lambda: SOLOConfig(bbox_head=SOLOHeadConfig(in_channels=64)), "in_channels"),
        (
            lambda: SOLOConfig(
                neck=FPNConfig(start_level=0, num_outs=4, add_extra_convs=False),
                bbox_head=SOLOHeadConfig(
                    strides=(8, 8, 16, 32), num_grids=(4,) * 4, scale_ranges=((1, 9),) * 4
                ),
            ),
            "strides",
        ),  # fmt: skip
    ],
)
def test_invalid_config_raises_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


# ---------------------------------------------------------------------------------------------
# forward: split_feats, CoordConv, shapes
# ---------------------------------------------------------------------------------------------


def test_coord_features_golden():
    c = coord_features(torch.zeros(2, 7, 5, 3))
    assert c.shape == (2, 2, 5, 3)
    assert torch.equal(c[1, 0, 4], torch.tensor([-1.0, 0.0, 1.0]))  # x along a row
    assert torch.equal(c[0, 1, :, 2], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))  # y down a column


def test_split_feats_sizes_and_values():
    feats = [torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)] + [
        torch.rand(1, 2, s, s) for s in (4, 2, 1)
    ]
    out = split_feats(feats)
    assert [tuple(f.shape[-2:]) for f in out] == [(2, 3), (4, 4), (2, 2), (2, 2)]
    assert out[1] is feats[1] and out[2] is feats[2]
    # Halving bilinearly samples between pixel pairs: output (0, 0) = mean of the 2×2 block.
    assert out[0][0, 0, 0, 0] == pytest.approx((0 + 1 + 6 + 7) / 4)
    assert torch.allclose(out[3], feats[3].expand(1, 2, 2, 2))  # a 1×1 map resized to 2×2


def test_forward_shapes_at_160x224(tiny_model):
    x = torch.rand(2, 3, 160, 224)
    with torch.no_grad():
        feats = tiny_model.features(x)
        out = tiny_model(x)
    # P2..P6 are 40×56, 20×28, 10×14, 5×7, 3×4; split_feats: P2 halved, P6 resized to P5.
    assert [tuple(f.shape[-2:]) for f in feats] == [(20, 28), (20, 28), (10, 14), (5, 7), (5, 7)]
    assert all(f.shape[:2] == (2, 16) for f in feats)
    assert isinstance(out, SOLOOutputs) and out.input_size == (160, 224)
    # Mask branch: S² channels at twice the level's size (mask strides 4, 4, 8, 16, 16).
    sizes = [(40, 56), (40, 56), (20, 28), (10, 14), (10, 14)]
    assert [tuple(m.shape) for m in out.mask_logits] == [
        (2, s * s, *hw) for s, hw in zip(GRIDS, sizes)
    ]
    assert [tuple(c.shape) for c in out.cate_logits] == [(2, 3, s, s) for s in GRIDS]
    # Both output layers start at probability 0.01.
    assert torch.allclose(tiny_model.bbox_head.solo_cate.bias, torch.tensor(-math.log(99.0)))


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------


def test_center_of_mass_golden():
    masks = torch.zeros(2, 6, 12, dtype=torch.bool)
    masks[0, 2:5, 10:12] = True  # rows 2..4, columns 10..11
    masks[1, 0, 0:3] = True  # an L: (0,0) (0,1) (0,2) (1,0)
    masks[1, 1, 0] = True
    com = center_of_mass(masks)
    assert com.dtype == torch.float64
    assert torch.equal(com, torch.tensor([[3.0, 10.5], [0.25, 0.75]], dtype=torch.float64))


def _tgt_single(target, size=(128, 128), sigma=0.2, grids=GRIDS):
    return solo_target_single(
        target.boxes, target.labels, target.masks,
        num_grids=grids, scale_ranges=TINY.bbox_head.scale_ranges, sigma=sigma,
    )  # fmt: skip


def test_target_golden_one_level():
    # 128×128, a 64×32 rectangle: rows 40..71, columns 24..87; scale sqrt(64·32) = 45.25 → level 0
    # only. Centre of mass (55.5, 55.5): cell (55.5/128 // (1/12), ...) = (5, 5). Centre region
    # ±3.2 rows, ±6.4 columns: rows 52.3·12/128 = 4.90 → 4 .. 58.7·12/128 = 5.50 → 5, columns
    # 49.1·12/128 = 4.60 → 4 .. 61.9·12/128 = 5.80 → 5. Cells (4..5, 4..5): channels 52, 53, 64, 65.
    t = _target([24, 40, 88, 72], [2], _box_mask((128, 128), 40, 72, 24, 88)[None])
    out = _tgt_single(t)
    assert torch.equal(out.centers, torch.tensor([[55.5, 55.5]], dtype=torch.float64))
    assert out.levels.tolist() == [[True, False, False, False, False]]
    assert out.cells[0, 0].tolist() == [4, 5, 4, 5]
    assert (out.cells[1:] == -1).all()
    assert (out.gt_inds[0] >= 0).nonzero().flatten().tolist() == [52, 53, 64, 65]
    expected = torch.full((12, 12), BACKGROUND)
    expected[4:6, 4:6] = 2
    assert torch.equal(out.cate_labels[0], expected)
    for level in range(1, 5):
        assert (out.cate_labels[level] == BACKGROUND).all() and (out.gt_inds[level] == -1).all()


def test_targets_two_levels_exact_cells_channels_and_masks(tiny_model):
    # An 80×80 square (rows/columns 24..103): scale 80 lies in (1, 96) AND (48, 192) → levels 0, 1.
    # Centre of mass (63.5, 63.5), half region 0.2 · 80 / 2 = 8.
    # Level 0 (S=12): centre 63.5·12/128 = 5.95 → 5; rows 55.5·12/128 = 5.20 → 5 ..
    #   71.5·12/128 = 6.70 → 6: cells (5..6, 5..6) → channels 65, 66, 77, 78.
    # Level 1 (S=10): centre 4.96 → 4; 55.5·10/128 = 4.34 → 4 .. 71.5·10/128 = 5.59 → 5:
    #   cells (4..5, 4..5) → channels 44, 45, 54, 55.
    t0 = _target([24, 24, 104, 104], [1], _box_mask((128, 128), 24, 104, 24, 104)[None])
    t1 = _target([], [], torch.zeros(0, 128, 128, dtype=torch.bool))
    batch = Batch(torch.rand(2, 3, 128, 128), [(128, 128), (100, 120)], [t0, t1])
    with torch.no_grad():
        outputs = tiny_model(batch.images)
    t = tiny_model.targets(outputs, batch)
    assert t.ins_ind[0][0].nonzero().flatten().tolist() == [65, 66, 77, 78]
    assert t.ins_ind[1][0].nonzero().flatten().tolist() == [44, 45, 54, 55]
    assert not t.ins_ind[0][1].any() and not t.ins_ind[1][1].any()  # the empty image
    assert [int(i.sum()) for i in t.ins_ind] == [4, 4, 0, 0, 0] and int(t.num_pos) == 8
    assert t.cate_labels[0][0, 5:7, 5:7].eq(1).all() and int(t.cate_labels[0].ne(-1).sum()) == 4
    assert t.cate_labels[1][0, 4:6, 4:6].eq(1).all() and int(t.cate_labels[1].ne(-1).sum()) == 4
    assert t.gt_inds[0][0, 65] == 0 and t.gt_inds[0][0, 0] == -1
    # Mask targets at the level's mask resolution (stride 4: 32×32): rows/columns 24..103 → 6..25.
    expected = _box_mask((32, 32), 6, 26, 6, 26).float()
    for level in (0, 1):
        assert t.ins_masks[level].shape == (4, 32, 32)
        assert all(torch.equal(m, expected) for m in t.ins_masks[level])
    assert [tuple(m.shape) for m in t.ins_masks[2:]] == [(0, 16, 16), (0, 8, 8), (0, 8, 8)]


def test_scale_on_two_range_borders_trains_three_levels():
    # A 96×96 square: 96 is the upper bound of (1, 96) and the lower bound of (96, 384), both
    # inclusive, and inside (48, 192): levels 0, 1 and 2. Level 2 (S=8): centre 63.5·8/128 = 3.97
    # → 3, region 53.9·8/128 = 3.37 → 3 .. 73.1·8/128 = 4.57 → 4: channels 27, 28, 35, 36.
    t = _target([16, 16, 112, 112], [0], _box_mask((128, 128), 16, 112, 16, 112)[None])
    out = _tgt_single(t)
    assert out.levels.tolist() == [[True, True, True, False, False]]
    assert (out.gt_inds[2] >= 0).nonzero().flatten().tolist() == [27, 28, 35, 36]


def test_centre_region_clamped_to_centre_cell_plus_minus_one():
    # sigma = 1: the region is the whole 96-pixel box, cells 16·12/128 = 1 .. 112·12/128 = 10.5,
    # but SOLO keeps at most the centre cell (5, 5) ± 1: rows and columns 4..6, nine cells.
    t = _target([16, 16, 112, 112], [0], _box_mask((128, 128), 16, 112, 16, 112)[None])
    out = _tgt_single(t, sigma=1.0)
    assert out.cells[0, 0].tolist() == [4, 6, 4, 6]
    assert (out.gt_inds[0] >= 0).nonzero().flatten().tolist() == [
        52, 53, 54, 64, 65, 66, 76, 77, 78]  # fmt: skip


def test_later_object_wins_shared_cells_and_tiny_masks_are_skipped():
    m = _box_mask((128, 128), 40, 72, 24, 88)
    tiny = _box_mask((128, 128), 0, 3, 0, 3)  # 9 pixels < MIN_MASK_AREA = 10
    t = _target([[24, 40, 88, 72], [24, 40, 88, 72], [0, 0, 3, 3]], [0, 2, 1],
                torch.stack([m, m, tiny]))  # fmt: skip
    out = _tgt_single(t)
    assert out.levels[:, 0].tolist() == [True, True, False]
    assert set(out.gt_inds[0][out.gt_inds[0] >= 0].tolist()) == {1}
    assert set(out.cate_labels[0][out.cate_labels[0] >= 0].tolist()) == {2}


def test_docstring_worked_example():
    t = _target([8, 8, 40, 40], [0], _box_mask((64, 64), 8, 40, 8, 40)[None])
    out = solo_target_single(t.boxes, t.labels, t.masks, num_grids=(4,), scale_ranges=((1, 96),),
                             sigma=0.2)  # fmt: skip
    assert out.centers.tolist() == [[23.5, 23.5]]
    assert (out.gt_inds[0] >= 0).nonzero().flatten().tolist() == [5]


def test_loss_matches_hand_computation(tiny_model):
    m0 = _box_mask((128, 128), 16, 112, 16, 112)
    m1 = _box_mask((128, 128), 40, 72, 24, 88)
    t0 = _target([[16, 16, 112, 112], [24, 40, 88, 72]], [1, 2], torch.stack([m0, m1]))
    batch = Batch(torch.rand(1, 3, 128, 128), [(128, 128)], [t0])
    outputs = tiny_model(batch.images)
    losses = tiny_model.loss(outputs, batch)
    t = tiny_model.targets(outputs, batch)
    num_pos = int(t.num_pos)
    # The 96-square trains levels 0-2 (4 cells each), the rectangle level 0 (cells (4..5, 4..5));
    # they share cell (5, 5) of level 0, which the rectangle (the later object) takes.
    assert num_pos == (4 + 4 - 1) + 4 + 4 and losses["num_pos"] == num_pos
    assert t.gt_inds[0][0, 5 * 12 + 5] == 1 and t.cate_labels[0][0, 5, 5] == 2

    dice = []
    for level, logits in enumerate(outputs.mask_logits):
        for ch in t.ins_ind[level][0].nonzero().flatten().tolist():
            k = t.gt_inds[level][0, ch]
            target = (
                torch.nn.functional.interpolate(
                    t0.masks[k][None, None].float(), size=logits.shape[-2:], mode="bilinear"
                )[0, 0]
                .ge(0.5)
                .float()
            )
            dice.append(dice_loss(logits[0, ch][None].sigmoid(), target[None]))
    expected_ins = 3.0 * torch.cat(dice).mean()
    torch.testing.assert_close(losses["loss_ins"], expected_ins)

    cate = torch.cat([c[0].permute(1, 2, 0).reshape(-1, 3) for c in outputs.cate_logits])
    labels = torch.cat([c[0].reshape(-1) for c in t.cate_labels])
    onehot = torch.zeros_like(cate)
    onehot[labels >= 0, labels[labels >= 0]] = 1.0
    focal = torchvision.ops.sigmoid_focal_loss(cate, onehot, alpha=0.25, gamma=2.0, reduction="sum")
    torch.testing.assert_close(losses["loss_cate"], focal / (num_pos + 1))


def test_empty_image_is_all_background_and_finite(tiny_model):
    t = _target([], [], torch.zeros(0, 128, 128, dtype=torch.bool))
    batch = Batch(torch.rand(1, 3, 128, 128), [(128, 128)], [t])
    outputs = tiny_model(batch.images)
    targets = tiny_model.targets(outputs, batch)
    assert all((c == BACKGROUND).all() for c in targets.cate_labels)
    assert not any(i.any() for i in targets.ins_ind) and int(targets.num_pos) == 0
    losses = tiny_model.loss(outputs, batch)
    assert losses["loss_ins"] == 0 and losses["num_pos"] == 0
    assert torch.isfinite(losses["loss_cate"]) and losses["loss_cate"] > 0
    (losses["loss_ins"] + losses["loss_cate"]).backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny_model.zero_grad()


def _shapes_batch() -> Batch:
    """Two 128² images: a rectangle and a disc, and two rectangles, drawn with their masks."""
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    disc = (yy - 80) ** 2 + (xx - 40) ** 2 <= 22**2
    rect_a = _box_mask((128, 128), 10, 50, 60, 120)
    rect_b = _box_mask((128, 128), 70, 120, 70, 110)
    rect_c = _box_mask((128, 128), 8, 40, 8, 56)
    images = torch.full((2, 3, 128, 128), 0.2)
    red, green, blue = (0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.1, 0.2, 0.9)
    for i, masks, colours in [
        (0, [rect_a, disc], [red, green]),
        (1, [rect_b, rect_c], [blue, red]),
    ]:
        for m, col in zip(masks, colours):
            images[i][:, m] = torch.tensor(col)[:, None]
    t0 = _target([[60, 10, 120, 50], [18, 58, 63, 103]], [0, 1], torch.stack([rect_a, disc]))
    t1 = _target([[70, 70, 110, 120], [8, 8, 56, 40]], [2, 0], torch.stack([rect_b, rect_c]))
    return Batch(images, [(128, 128), (128, 128)], [t0, t1])


def test_loss_decreases_in_a_few_adamw_steps():
    torch.manual_seed(0)
    model = build_solo(TINY)
    batch = _shapes_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(15):
        losses = model.loss(model(batch.images), batch)
        total = losses["loss_ins"] + losses["loss_cate"]
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append((losses["loss_ins"].item(), losses["loss_cate"].item()))
    assert all(math.isfinite(a) and math.isfinite(b) for a, b in history)
    first, last = sum(history[0]), sum(history[-1])
    assert last < 0.8 * first, history
    assert history[-1][0] < history[0][0]  # the dice term itself learns


def _batch_with_an_empty_image() -> Batch:
    """Three 128² images: the two of :func:`_shapes_batch` with an image without objects between
    them, so the second image's objects are rows 2..3 of the batch's objects, not 0..1."""
    shapes = _shapes_batch()
    empty = _target([], [], torch.zeros(0, 128, 128, dtype=torch.bool))
    images = torch.stack([shapes.images[0], torch.full((3, 128, 128), 0.2), shapes.images[1]])
    return Batch(images, [(128, 128)] * 3, [shapes.targets[0], empty, shapes.targets[1]])


@pytest.mark.parametrize("make_batch", [_shapes_batch, _batch_with_an_empty_image])
def test_batched_mask_targets_and_dice_equal_the_per_image_loop(tiny_model, make_batch):
    # The reference: for each level, image and positive channel in turn (boolean-mask order),
    # resize that channel's object mask and compute its dice loss.
    batch = make_batch()
    with torch.no_grad():
        outputs = tiny_model(batch.images)
        t = tiny_model.targets(outputs, batch)
        losses = tiny_model.loss(outputs, batch)
    dice = []
    for level, logits in enumerate(outputs.mask_logits):
        ind = t.ins_ind[level]
        assert torch.equal(t.pos_inds[level], ind.flatten().nonzero()[:, 0])
        assert torch.equal(
            logits.flatten(0, 1)[t.pos_inds[level]], logits.flatten(0, 1)[ind.flatten()]
        )
        expected_masks = []
        for b, target in enumerate(batch.targets):
            for ch in ind[b].nonzero().flatten().tolist():
                k = int(t.gt_inds[level][b, ch])
                m = (
                    torch.nn.functional.interpolate(
                        target.masks[k][None, None].float(), size=logits.shape[-2:], mode="bilinear"
                    )[0, 0]
                    .ge(0.5)
                    .float()
                )  # [h, w]
                expected_masks.append(m)
                dice.append(dice_loss(logits[b, ch][None].sigmoid(), m[None]))
        assert t.ins_masks[level].shape == (len(expected_masks), *logits.shape[-2:])
        if expected_masks:
            assert torch.equal(t.ins_masks[level], torch.stack(expected_masks))
    # Level 0 (S=12, centre region ±0.1 of the box): rect_a rows 2..3 × columns 7..8, the disc
    # row 7 × columns 3..4, rect_b rows 8..9 × column 8, rect_c rows 1..2 × columns 2..3; level 1
    # (S=10): rect_a (scale sqrt(60·40) = 49 >= 48) rows 1..2 × columns 6..7.
    assert [int(i.sum()) for i in t.ins_ind] == [4 + 2 + 2 + 4, 4, 0, 0, 0]
    assert int(t.num_pos) == len(dice) == 16
    torch.testing.assert_close(losses["loss_ins"], 3.0 * torch.cat(dice).mean(), rtol=1e-6, atol=0)
    assert losses["num_pos"] == 16 / len(batch)


def test_targets_need_masks_padded_like_the_images(tiny_model):
    shapes = _shapes_batch()
    t1 = shapes.targets[1]
    unpadded = _target(t1.boxes.tolist(), t1.labels.tolist(), t1.masks[:, :96, :120])
    batch = Batch(shapes.images, [(128, 128), (96, 120)], [shapes.targets[0], unpadded])
    with torch.no_grad():
        outputs = tiny_model(batch.images)
    with pytest.raises(ValueError, match="masks"):
        tiny_model.targets(outputs, batch)


@pytest.mark.parametrize("make_batch", [_shapes_batch, _batch_with_an_empty_image])
def test_a_training_step_has_one_host_sync(tiny_model, make_batch):
    """Forward, targets and loss wait for the device once: the number of positive channels per
    level (``.tolist()`` in ``targets``), the size of the dice-loss tensors. With a boolean-mask
    index per level and image the 2-image batch had 18 (checked on any device with
    ``count_host_syncs``)."""
    batch = make_batch()
    with count_host_syncs() as syncs:
        losses = tiny_model.loss(tiny_model(batch.images), batch)
    assert syncs.count <= 1, f"{syncs.count} host syncs:\n{syncs.summary()}"
    assert all("solo.py" in e.where and "in targets" in e.where for e in syncs.events), (
        syncs.summary()
    )
    assert torch.isfinite(losses["loss_ins"] + losses["loss_cate"])


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_a_training_step_synchronises_once_on_gpu():
    torch.manual_seed(0)
    model = build_solo(TINY).cuda()
    batch = _shapes_batch().to("cuda")
    model.loss(model(batch.images), batch)  # warm up cuDNN and the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs = model(batch.images)
            losses = model.loss(outputs, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs
    # The same targets and loss on the CPU, from the same head outputs.
    cpu = build_solo(TINY)
    cpu.load_state_dict(model.state_dict())
    cpu_outputs = SOLOOutputs(
        [m.detach().cpu() for m in outputs.mask_logits],
        [c.detach().cpu() for c in outputs.cate_logits],
        outputs.input_size,
    )
    expected = cpu.loss(cpu_outputs, _shapes_batch())
    for key in ("loss_ins", "loss_cate", "num_pos"):
        torch.testing.assert_close(losses[key].cpu(), expected[key], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------


def test_masks_to_boxes_golden():
    masks = torch.zeros(2, 4, 8, dtype=torch.bool)
    masks[0, 1:3, 3:6] = True  # rows 1..2, columns 3..5
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.float32
    assert torch.equal(boxes, torch.tensor([[3.0, 1.0, 6.0, 3.0], [0.0, 0.0, 0.0, 0.0]]))


def test_predict_on_handmade_outputs(tiny_model):
    # Padded input 128×128 (mask sizes 32, 32, 16, 8, 8), true image size 100×120.
    neg, pos = -10.0, 10.0
    masks = [torch.full((1, s * s, h, h), neg) for s, h in zip(GRIDS, (32, 32, 16, 8, 8))]
    cates = [torch.full((1, 3, s, s), neg) for s in GRIDS]
    # A: level-0 cell (3, 4), class 1, logit 5; its channel 3·12+4 = 40 paints rows 5..14, columns
    # 6..19 (stride 4) → rows 20..59, columns 24..79 in the input (bilinear, threshold 0.5).
    cates[0][0, 1, 3, 4] = 5.0
    masks[0][0, 40, 5:15, 6:20] = pos
    # Its right neighbour (3, 5) scores 4 with a big mask, but points NMS removes it (2×2 peak).
    cates[0][0, 1, 3, 5] = 4.0
    masks[0][0, 41, 0:30, 0:30] = pos
    # B: level-0 cell (8, 2), class 0, logit 3; mask rows 20..31, columns 0..7 → rows 80..127 and
    # columns 0..31 in the input, cropped to the true height 100: rows 80..99.
    cates[0][0, 0, 8, 2] = 3.0
    masks[0][0, 8 * 12 + 2, 20:32, 0:8] = pos
    # C: level-2 cell (1, 1) (channel 9), class 2, logit 6, a 1×2 mask at stride 8 = 8 pixels at
    # stride 4, not above the level's stride 16: dropped.
    cates[2][0, 2, 1, 1] = 6.0
    masks[2][0, 9, 3, 3:5] = pos
    outputs = SOLOOutputs(masks, cates, (128, 128))

    (det,) = tiny_model.predict(outputs, [(100, 120)])
    assert isinstance(det, Detections) and len(det) == 2
    s10 = torch.sigmoid(torch.tensor(10.0))  # maskness: every pixel inside has logit 10
    expected_scores = (
        torch.stack([torch.sigmoid(torch.tensor(5.0)), torch.sigmoid(torch.tensor(3.0))]) * s10
    )
    torch.testing.assert_close(det.scores, expected_scores)
    assert det.labels.tolist() == [1, 0]
    assert det.masks.shape == (2, 100, 120) and det.masks.dtype == torch.bool
    # Bilinear upsampling rounds the corners: at a corner pixel only 0.625² of the weight lies
    # inside, sigmoid-probability ≈ 0.39 < 0.5. B's left corners sit on the image border (clamped
    # sampling, fully inside) and its bottom ones are cropped away: only (80, 31) goes.
    expected_a = _box_mask((100, 120), 20, 60, 24, 80)
    expected_a[[20, 20, 59, 59], [24, 79, 24, 79]] = False
    expected_b = _box_mask((100, 120), 80, 100, 0, 32)
    expected_b[80, 31] = False
    assert torch.equal(det.masks[0], expected_a)
    assert torch.equal(det.masks[1], expected_b)
    assert torch.equal(det.boxes, torch.tensor([[24.0, 20, 80, 60], [0.0, 80, 32, 100]]))


def test_predict_nothing_above_threshold_gives_empty_detections(tiny_model):
    x = torch.rand(2, 3, 128, 128)
    tiny_model.eval()
    with torch.no_grad():
        dets = tiny_model.predict(tiny_model(x), [(128, 128), (96, 64)])
    tiny_model.train()
    # Fresh head: every cell starts at probability 0.01 < score_thr = 0.1.
    assert [len(d) for d in dets] == [0, 0]
    assert dets[1].masks.shape == (0, 96, 64) and dets[1].boxes.shape == (0, 4)


# Thresholds low enough for a fresh head, whose category and mask probabilities all start near the
# prior 0.01: hundreds of candidates per image.
LOW_THRESHOLDS = SOLOTestConfig(score_thr=0.001, update_thr=1e-6, mask_thr=0.005)
PREDICT_SIZES = [(110, 160), (128, 91), (64, 64)]  # true sizes inside a padded 128×160 batch


@pytest.fixture(scope="module")
def low_threshold_outputs():
    torch.manual_seed(0)
    model = build_solo(replace(TINY, test_cfg=LOW_THRESHOLDS)).eval()
    with torch.no_grad():
        outputs = model(torch.rand(3, 3, 128, 160))
    return model, outputs


def test_predict_waits_for_the_device_twice_per_batch(low_threshold_outputs):
    """Predict reads two counts from the device, once each for the whole batch: the candidates
    per image and level (they size the mask tensors) and the detections per image (they size the
    output). With boolean-mask indexing it was 10 per image — 30 for these 3 images."""
    model, outputs = low_threshold_outputs
    with count_host_syncs() as syncs:
        dets = model.predict(outputs, PREDICT_SIZES)
    assert [len(d) for d in dets] == [100, 100, 100]
    assert syncs.count <= 2, f"{syncs.count} host syncs:\n{syncs.summary()}"
    assert all("solo.py" in e.where and "in predict" in e.where for e in syncs.events), (
        syncs.summary()
    )


# ---------------------------------------------------------------------------------------------
# box-only objects
# ---------------------------------------------------------------------------------------------


def test_a_box_only_object_is_placed_by_its_box_like_a_mask_filling_it():
    # The golden rectangle of test_target_golden_one_level without its mask: the box centre
    # ((40 + 72) / 2 - 0.5, (24 + 88) / 2 - 0.5) = (55.5, 55.5) is the filled mask's centre of mass,
    # so the cells, channels and labels are the same.
    masked = _target([24, 40, 88, 72], [2], _box_mask((128, 128), 40, 72, 24, 88)[None])
    golden = _tgt_single(masked)
    out = solo_target_single(
        masked.boxes, masked.labels, torch.zeros(1, 128, 128, dtype=torch.bool),
        num_grids=GRIDS, scale_ranges=TINY.bbox_head.scale_ranges, sigma=0.2,
        has_mask=torch.tensor([False]),
    )  # fmt: skip
    assert torch.equal(out.centers, torch.tensor([[55.5, 55.5]], dtype=torch.float64))
    assert torch.equal(out.cells, golden.cells) and torch.equal(out.levels, golden.levels)
    for level in range(5):
        assert torch.equal(out.cate_labels[level], golden.cate_labels[level])
        assert torch.equal(out.gt_inds[level], golden.gt_inds[level])
    # A box-only object under MIN_MASK_AREA (3 x 3 = 9 px) is skipped like a tiny mask.
    tiny = solo_target_single(
        torch.tensor([[10.0, 10.0, 13.0, 13.0]]), torch.tensor([0]),
        torch.zeros(1, 128, 128, dtype=torch.bool), num_grids=GRIDS,
        scale_ranges=TINY.bbox_head.scale_ranges, sigma=0.2, has_mask=torch.tensor([False]),
    )  # fmt: skip
    assert not tiny.levels.any()


def test_box_only_objects_train_their_cells_category_but_no_mask_channel(tiny_model):
    """test_loss_matches_hand_computation's scene with the 96-square box-only: the same category
    targets and loss; the dice loss only over the rectangle's channels."""
    from _box_only import without_masks

    m0 = _box_mask((128, 128), 16, 112, 16, 112)
    m1 = _box_mask((128, 128), 40, 72, 24, 88)
    t0 = _target([[16, 16, 112, 112], [24, 40, 88, 72]], [1, 2], torch.stack([m0, m1]))
    batch = Batch(torch.rand(1, 3, 128, 128), [(128, 128)], [t0])
    mixed = without_masks(batch, [[0]])
    outputs = tiny_model(batch.images)
    full, part = tiny_model.loss(outputs, batch), tiny_model.loss(outputs, mixed)
    t_full, t = tiny_model.targets(outputs, batch), tiny_model.targets(outputs, mixed)
    assert int(t.num_pos) == int(t_full.num_pos) == 15 and part["num_pos"] == 15
    for level in range(5):
        assert torch.equal(t.cate_labels[level], t_full.cate_labels[level])
        assert torch.equal(t.gt_inds[level], t_full.gt_inds[level])
        assert torch.equal(t.ins_ind[level], t_full.ins_ind[level] & (t.gt_inds[level] == 1))
    assert torch.equal(part["loss_cate"], full["loss_cate"])

    dice = []
    for level, logits in enumerate(outputs.mask_logits):
        for ch in (t.gt_inds[level][0] == 1).nonzero().flatten().tolist():  # the rectangle's
            target = F.interpolate(m1[None, None].float(), size=logits.shape[-2:],
                                   mode="bilinear")[0, 0].ge(0.5).float()  # fmt: skip
            dice.append(dice_loss(logits[0, ch][None].sigmoid(), target[None]))
    assert len(dice) == 4
    torch.testing.assert_close(part["loss_ins"], 3.0 * torch.cat(dice).mean())

    everything_box_only = tiny_model.loss(outputs, without_masks(batch, [[0, 1]]))
    assert everything_box_only["loss_ins"] == 0 and everything_box_only["loss_ins"].requires_grad
    assert torch.equal(everything_box_only["loss_cate"], full["loss_cate"])
