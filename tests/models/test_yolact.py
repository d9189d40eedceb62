"""YOLACT: shapes, the linear combination against a loop, the crop and OHEM on hand cases, targets
against the per-image assigner, the losses against explicit loops, empty images, a few training
steps, predict on hand-made outputs and its host synchronisations (one per batch), configuration
errors.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from instseg_edu.engine.host_sync import count_host_syncs
from instseg_edu.losses import SmoothL1LossConfig
from instseg_edu.models.backbone import FPNConfig, ResNetConfig
from instseg_edu.models.yolact import (
    YOLACT_R18_SMALL,
    YOLACT_R50_FPN,
    YOLACTConfig,
    YOLACTHeadConfig,
    YOLACTOutputs,
    YOLACTProtonetConfig,
    YOLACTTestConfig,
    YOLACTTrainConfig,
    assemble_masks,
    build_yolact,
    crop_masks,
    linear_combination,
    ohem_negatives,
)
from instseg_edu.ops.anchors import AnchorGeneratorConfig
from instseg_edu.ops.assign import MaxIoUAssignerConfig, max_iou_assign
from instseg_edu.structures import BACKGROUND, Batch, Detections, Target, softmax_labels

# A tiny YOLACT: ResNet-18, 16-channel FPN and head, 8 prototypes from a 3-layer protonet, 2
# classes. Same anchors, assigner, OHEM, losses and test procedure as the real one.
TINY = replace(
    YOLACT_R18_SMALL,
    neck=replace(YOLACT_R18_SMALL.neck, out_channels=16),
    bbox_head=replace(YOLACT_R18_SMALL.bbox_head, in_channels=16, feat_channels=16, num_protos=8,
                      num_classes=2),
    mask_head=YOLACTProtonetConfig(in_channels=16, proto_channels=(16, None, 8),
                                   proto_kernel_sizes=(3, -2, 1), num_protos=8),
)  # fmt: skip

# 64×96 input: levels (8, 12), (4, 6), (2, 3), (1, 2), (1, 1) -> 3 · 129 = 387 anchors.
SIZES_64x96 = ((8, 12), (4, 6), (2, 3), (1, 2), (1, 1))
N_64x96 = 387


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_yolact(TINY)


def _target(boxes, labels, size) -> Target:
    """Boxes with rectangular masks filling them (integer boxes)."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), *size, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
        m[y1:y2, x1:x2] = True
    return Target(boxes=boxes, labels=torch.tensor(labels, dtype=torch.long), masks=masks)


# ---------------------------------------------------------------------------------------------
# forward and the three small ideas
# ---------------------------------------------------------------------------------------------


def test_forward_shapes_and_anchors(tiny_model):
    with torch.no_grad():
        out = tiny_model(torch.rand(2, 3, 64, 96))
    assert isinstance(out, YOLACTOutputs)
    assert out.featmap_sizes == SIZES_64x96
    assert out.cls_logits.shape == (2, N_64x96, 3)  # C + 1: background last
    assert out.bbox_deltas.shape == (2, N_64x96, 4)
    assert out.coeffs.shape == (2, N_64x96, 8)
    assert out.prototypes.shape == (2, 8, 16, 24)  # stride 4
    assert out.segm_logits is None
    assert out.coeffs.abs().max() <= 1.0  # tanh
    assert out.prototypes.min() >= 0.0  # ReLU
    assert tiny_model.proto_stride == 4
    # Anchor 1 of cell (0, 0) on P3: ratio 1, 3 · 8 = 24 pixels, centred at (4, 4).
    anchors = tiny_model.anchors(out.featmap_sizes, "cpu")
    assert anchors.shape == (N_64x96, 4)
    torch.testing.assert_close(anchors[1], torch.tensor([-8.0, -8.0, 16.0, 16.0]))
    # P7 (last anchor, ratio 2): 384 · (1/√2, √2) around the centre (64, 64).
    w, h = 384 / math.sqrt(2), 384 * math.sqrt(2)
    torch.testing.assert_close(anchors[-1], torch.tensor([64 - w / 2, 64 - h / 2, 64 + w / 2,
                                                          64 + h / 2]))  # fmt: skip


def test_linear_combination_equals_loop():
    torch.manual_seed(0)
    protos = torch.rand(2, 5, 6, 7)  # [B, P, Hm, Wm]
    coeffs = torch.rand(2, 3, 5) * 2 - 1  # [B, K, P]
    got = linear_combination(protos, coeffs)
    assert got.shape == (2, 3, 6, 7)
    for b in range(2):
        for k in range(3):
            expected = torch.zeros(6, 7)
            for p in range(5):
                expected += coeffs[b, k, p] * protos[b, p]
            torch.testing.assert_close(got[b, k], expected)
    # unbatched form, and assemble_masks = sigmoid of it
    torch.testing.assert_close(linear_combination(protos[1], coeffs[1]), got[1])
    torch.testing.assert_close(assemble_masks(protos[1], coeffs[1]), got[1].sigmoid())


def test_crop_masks_golden():
    masks = torch.ones(3, 4, 4)
    boxes = torch.tensor(
        [
            [1.0, 0.6, 3.0, 2.0],  # columns 1, 2 (centres 1.5, 2.5); row 1 only (0.5 < 0.6)
            [0.0, 0.0, 4.0, 4.0],  # everything
            [2.5, 2.5, 2.6, 2.6],  # just pixel (2, 2), whose centre (2.5, 2.5) is the corner
        ]
    )
    got = crop_masks(masks, boxes)
    expected = torch.zeros(3, 4, 4)
    expected[0, 1, 1:3] = 1
    expected[1] = 1
    expected[2, 2, 2] = 1
    assert torch.equal(got, expected)
    # values are kept, not binarised; batched boxes work
    vals = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = crop_masks(vals, boxes[None, :1])
    assert out[0, 0, 1, 1] == 5.0 and out[0, 0, 1, 2] == 6.0 and out.sum() == 11.0


def test_ohem_keeps_hardest_negatives_hand_case():
    loss = torch.tensor(
        [
            [0.1, 2.0, 0.5, 0.7, 9.0, 0.3, 0.2],  # 1 positive (index 4) -> quota 3 of 5 negatives
            [0.1, 2.0, 0.5, 0.7, 9.0, 0.3, 0.2],  # 2 positives -> quota 6 > the 3 negatives
            [0.1, 2.0, 0.5, 0.7, 9.0, 0.3, 0.2],  # no positive -> nothing
        ]
    )
    pos = torch.tensor(
        [[0, 0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    ignored = torch.zeros_like(pos)
    ignored[0, 5] = True  # between the thresholds: neither positive nor negative
    ignored[1, 2:4] = True
    neg = ~pos & ~ignored
    kept = ohem_negatives(loss, neg, pos.sum(dim=1), neg_pos_ratio=3)
    expected = torch.tensor(
        [[0, 1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(kept, expected)
    counts = torch.minimum(3 * pos.sum(dim=1), neg.sum(dim=1))
    assert torch.equal(kept.sum(dim=1), counts)


# ---------------------------------------------------------------------------------------------
# targets and loss
# ---------------------------------------------------------------------------------------------


def _handmade_batch() -> Batch:
    """Image 0: 64×96, two objects. Image 1: 48×64 inside the padding, one object."""
    t0 = _target([[16.0, 8.0, 44.0, 40.0], [50.0, 20.0, 90.0, 60.0]], [1, 0], (64, 96))
    t1 = _target([[4.0, 4.0, 36.0, 40.0]], [1], (64, 96))
    return Batch(torch.rand(2, 3, 64, 96), [(64, 96), (48, 64)], [t0, t1])


def test_targets_match_per_image_assigner(tiny_model):
    batch = _handmade_batch()
    torch.manual_seed(3)
    outputs = tiny_model(batch.images)
    t = tiny_model.targets(outputs, batch)
    anchors = tiny_model.anchors(SIZES_64x96, "cpu")
    gen = tiny_model.anchor_generator
    for i, target in enumerate(batch.targets):
        valid = torch.cat(gen.valid_flags(SIZES_64x96, batch.image_sizes[i]))  # [N]
        ref = max_iou_assign(
            anchors[valid], target.boxes, target.labels, pos_iou_thr=0.5, neg_iou_thr=0.4,
            min_pos_iou=0.0, gt_max_assign_all=False,
        )  # fmt: skip
        assert torch.equal(t.assignment.gt_inds[i, valid], ref.gt_inds)
        pos = t.pos[i]
        neg = t.assignment.gt_inds[i] == 0
        assert pos.sum() == t.num_pos[i] > 0
        assert torch.equal(t.gt_inds[i, valid], torch.where(ref.gt_inds > 0, ref.gt_inds - 1, -1))
        assert torch.equal(t.labels[i, pos], target.labels[t.gt_inds[i, pos]])
        assert (t.labels[i, neg] == BACKGROUND).all()  # the loss moves it to column C
        assert (t.labels[i, ~pos & ~neg] == -1).all()
        expected = tiny_model.bbox_coder.encode(anchors[pos], target.boxes[t.gt_inds[i, pos]])
        torch.testing.assert_close(t.bbox_targets[i, pos], expected)
        # OHEM: exactly min(3 · pos, neg) negatives, and they are the hardest ones.
        kept = t.ohem_neg[i]
        assert kept.sum() == min(3 * int(pos.sum()), int(neg.sum()))
        assert not (kept & ~neg).any()
        bg_loss = F.cross_entropy(outputs.cls_logits[i].detach(), torch.full((N_64x96,), 2),
                                  reduction="none")  # fmt: skip
        assert bg_loss[kept].min() >= bg_loss[neg & ~kept].max()
        assert torch.equal(t.cls_weights[i], (pos | kept).float())
        # Every positive is trained for masks (fewer than max_masks_to_train), with its GT's mask.
        valid_k = t.mask_valid[i]
        assert valid_k.sum() == pos.sum()
        anchor_ids = t.mask_anchor_inds[i, valid_k]
        assert pos[anchor_ids].all() and len(set(anchor_ids.tolist())) == len(anchor_ids)
        gts = t.gt_inds[i, anchor_ids]
        torch.testing.assert_close(t.mask_boxes[i, valid_k], target.boxes[gts] / 4)
        small = F.interpolate(target.masks[None].float(), size=(16, 24), mode="bilinear") > 0.5
        assert torch.equal(t.mask_targets[i, valid_k], small[0, gts].float())
    assert t.mask_anchor_inds.shape == (2, 100) and t.mask_targets.shape == (2, 100, 16, 24)


def test_max_masks_to_train_caps_positives(tiny_model):
    cfg = replace(TINY, mask_head=replace(TINY.mask_head, max_masks_to_train=3))
    model = build_yolact(cfg)
    batch = _handmade_batch()
    with torch.no_grad():
        outputs = model(batch.images)
    t = model.targets(outputs, batch)
    assert t.mask_anchor_inds.shape == (2, 3)
    assert torch.equal(t.mask_valid.sum(dim=1), t.num_pos.clamp(max=3).long())
    assert torch.gather(t.pos, 1, t.mask_anchor_inds)[t.mask_valid].all()


def test_losses_equal_explicit_loops(tiny_model):
    batch = _handmade_batch()
    torch.manual_seed(1)
    outputs = tiny_model(batch.images)
    torch.manual_seed(2)  # the mask subset's random keys
    losses = tiny_model.loss(outputs, batch)
    torch.manual_seed(2)
    t = tiny_model.targets(outputs, batch)
    num_pos = t.num_pos.sum()

    ce = 0.0
    for i in range(2):
        sel = t.pos[i] | t.ohem_neg[i]
        labels = softmax_labels(t.labels[i, sel], 2)  # background: column C = 2
        ce = ce + F.cross_entropy(outputs.cls_logits[i, sel], labels, reduction="sum")
    torch.testing.assert_close(losses["loss_cls"], ce / num_pos)
    pos = t.pos
    diff = (outputs.bbox_deltas[pos] - t.bbox_targets[pos]).abs()
    sl1 = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).sum()
    torch.testing.assert_close(losses["loss_bbox"], 1.5 * sl1 / num_pos)

    # Mask loss: per positive, BCE inside its GT box (in prototype pixels) / the box's area.
    total, count = 0.0, 0
    for i, target in enumerate(batch.targets):
        for n in pos[i].nonzero().flatten().tolist():
            g = int(t.gt_inds[i, n])
            logits = torch.einsum("p,phw->hw", outputs.coeffs[i, n], outputs.prototypes[i])
            x1, y1, x2, y2 = (target.boxes[g] / 4).tolist()  # integers here: 4-pixel aligned...
            cx = torch.arange(24) + 0.5
            cy = torch.arange(16) + 0.5
            inside = ((cy >= y1) & (cy < y2))[:, None] & ((cx >= x1) & (cx < x2))[None, :]
            small = F.interpolate(target.masks[None, g : g + 1].float(), size=(16, 24),
                                  mode="bilinear") > 0.5  # fmt: skip
            bce = F.binary_cross_entropy_with_logits(logits, small[0, 0].float(), reduction="none")
            total = total + bce[inside].sum() / ((x2 - x1) * (y2 - y1))
            count += 1
    torch.testing.assert_close(losses["loss_mask"], 6.125 * total / count)
    assert losses["num_pos"] == num_pos / 2 and not losses["num_pos"].requires_grad


def test_empty_images_give_finite_losses(tiny_model):
    empty = _target([], [], (64, 96))
    batch = Batch(torch.rand(2, 3, 64, 96), [(64, 96), (64, 80)], [empty, empty])
    outputs = tiny_model(batch.images)
    losses = tiny_model.loss(outputs, batch)
    assert losses["num_pos"] == 0
    for key in ("loss_cls", "loss_bbox", "loss_mask"):
        assert torch.isfinite(losses[key]) and losses[key] == 0, key
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)
    tiny_model.zero_grad()

    mixed = Batch(
        batch.images, batch.image_sizes, [_target([[8, 8, 40, 48]], [0], (64, 96)), empty]
    )
    losses = tiny_model.loss(tiny_model(batch.images), mixed)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls"] > 0 and losses["loss_mask"] > 0
    t = tiny_model.targets(tiny_model(batch.images), mixed)
    assert t.num_pos[1] == 0 and not t.ohem_neg[1].any() and not t.mask_valid[1].any()


def _shapes_batch() -> Batch:
    """Two 128² images: rectangles and circles on grey, with their masks."""
    images = torch.full((2, 3, 128, 128), 0.5)
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    objects = [
        [("rect", (16, 20, 70, 60), 0), ("circle", (96, 92, 24), 1)],
        [("circle", (50, 60, 34), 1), ("rect", (84, 8, 124, 40), 0)],
    ]
    colours = {0: (1.0, 0.1, 0.1), 1: (0.1, 0.2, 1.0)}
    targets = []
    for i, objs in enumerate(objects):
        boxes, labels, masks = [], [], []
        for kind, geom, label in objs:
            if kind == "rect":
                x1, y1, x2, y2 = geom
                m = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
                boxes.append([x1, y1, x2, y2])
            else:
                cx, cy, r = geom
                m = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
                boxes.append([cx - r, cy - r, cx + r, cy + r])
            images[i, :, m] = torch.tensor(colours[label])[:, None]
            labels.append(label)
            masks.append(m)
        targets.append(Target(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels),
                              torch.stack(masks)))  # fmt: skip
    return Batch(images, [(128, 128), (128, 128)], targets)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = replace(TINY, bbox_head=replace(TINY.bbox_head, feat_channels=32))
    model = build_yolact(cfg).train()
    batch = _shapes_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(15):
        losses = model.loss(model(batch.images), batch)
        loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    total = [sum(v for k, v in h.items() if k.startswith("loss_")) for h in history]
    assert all(math.isfinite(x) for x in total)
    assert total[-1] < 0.6 * total[0], total
    for key in ("loss_cls", "loss_bbox", "loss_mask"):
        assert last[key] < first[key], (key, history)


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------


def _handmade_outputs(scores: dict[tuple[int, int], float]) -> YOLACTOutputs:
    """Image 0: the given ``{(anchor, class): logit}`` against background logit 0; elsewhere the
    background wins (logit 10). Prototype 0 is 10 everywhere, coefficient 1 for every anchor, so
    every assembled mask is sigmoid(10) ≈ 1 before cropping."""
    cls = torch.full((2, N_64x96, 3), -10.0)
    cls[..., 2] = 10.0
    for (anchor, c), value in scores.items():
        cls[0, anchor, 2] = 0.0
        cls[0, anchor, c] = value
    coeffs = torch.zeros(2, N_64x96, 8)
    coeffs[..., 0] = 1.0
    protos = torch.zeros(2, 8, 16, 24)
    protos[:, 0] = 10.0
    return YOLACTOutputs(cls, torch.zeros(2, N_64x96, 4), coeffs, protos, SIZES_64x96)


def test_predict_handmade(tiny_model):
    anchors = tiny_model.anchors(SIZES_64x96, "cpu")
    a = (3 * 12 + 4) * 3 + 1  # P3 cell (3, 4), ratio 1: box (24, 16, 48, 40)
    b = (3 * 12 + 5) * 3 + 1  # its right neighbour, 8 px further: (32, 16, 56, 40)
    torch.testing.assert_close(anchors[a], torch.tensor([24.0, 16.0, 48.0, 40.0]))
    dets = tiny_model.predict(_handmade_outputs({(a, 1): 5.0, (b, 1): 4.0, (b, 0): 3.0}),
                              [(64, 96), (50, 70)])  # fmt: skip
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    d = dets[0]
    # (b, 1) overlaps (a, 1) with IoU 16·24 / (2·576 - 384) = 0.5, not > 0.5: both kept; (b, 0)
    # is another class. Scores are a softmax over the C + 1 logits of each anchor:
    # a: (-10, 5, 0); b: (3, 4, 0).
    za, zb = math.exp(-10) + math.exp(5) + 1, math.exp(3) + math.exp(4) + 1
    expected_scores = torch.tensor([math.exp(5) / za, math.exp(4) / zb, math.exp(3) / zb])
    torch.testing.assert_close(d.scores, expected_scores)
    assert d.labels.tolist() == [1, 1, 0]
    torch.testing.assert_close(d.boxes, anchors[[a, b, b]])
    assert d.masks.dtype == torch.bool and d.masks.shape == (3, 64, 96)
    expected = torch.zeros(64, 96, dtype=torch.bool)
    expected[16:40, 24:48] = True  # cropped with the predicted box (4-pixel aligned) ...
    # ... then upsampled ×4 bilinearly: the first pixel inside an edge gets 0.625 (kept), a corner
    # pixel 0.625² ≈ 0.39 (below mask_thr = 0.5): the box with its 4 corner pixels cut.
    expected[[16, 16, 39, 39], [24, 47, 24, 47]] = False
    assert torch.equal(d.masks[0], expected)
    # Image 1 (true size 50×70) has nothing; its empty masks have the true size.
    assert dets[1].boxes.shape == (0, 4) and dets[1].masks.shape == (0, 50, 70)

    # A stricter iou_thr suppresses (b, 1): Fast NMS per class.
    strict = build_yolact(replace(TINY, test_cfg=YOLACTTestConfig(iou_thr=0.4)))
    d2 = strict.predict(_handmade_outputs({(a, 1): 5.0, (b, 1): 4.0, (b, 0): 3.0}), [(64, 96)])[0]
    assert d2.labels.tolist() == [1, 0]


def test_predict_masks_at_true_size():
    torch.manual_seed(0)
    model = build_yolact(replace(TINY, test_cfg=YOLACTTestConfig(score_thr=0.0, max_per_img=5)))
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 96))
    dets = model.predict(outputs, [(64, 96), (41, 77)])
    for d, (h, w) in zip(dets, [(64, 96), (41, 77)]):
        assert 0 < len(d) <= 5
        assert d.masks.shape == (len(d), h, w) and d.masks.dtype == torch.bool
        assert torch.all(d.scores[:-1] >= d.scores[1:])
        assert torch.all((d.boxes[:, 0::2] >= 0) & (d.boxes[:, 0::2] <= w))
        assert torch.all((d.boxes[:, 1::2] >= 0) & (d.boxes[:, 1::2] <= h))
        # nothing outside the (4-pixel padded) box survives the crop
        for box, mask in zip(d.boxes, d.masks):
            ys, xs = mask.nonzero(as_tuple=True)
            if len(ys):
                assert xs.min() >= box[0] - 4 and xs.max() < box[2] + 4
                assert ys.min() >= box[1] - 4 and ys.max() < box[3] + 4


def _three_image_outputs(test_cfg: YOLACTTestConfig):
    torch.manual_seed(0)
    model = build_yolact(replace(TINY, test_cfg=test_cfg)).eval()
    with torch.no_grad():
        outputs = model(torch.rand(3, 3, 64, 96))
    return model, outputs


SIZES_3 = [(64, 96), (41, 77), (64, 50)]


@pytest.mark.parametrize(
    "test_cfg",
    [
        YOLACTTestConfig(),  # the fresh head scores every class ≈ 1/3: max_per_img = 100 each
        YOLACTTestConfig(score_thr=0.34, iou_thr=0.3),  # a different number in each image
        YOLACTTestConfig(score_thr=0.9),  # nothing
    ],
)
def test_predict_of_a_batch_equals_predict_image_by_image(test_cfg):
    """The batched Fast NMS and the one count read per batch give each image what predicting it
    alone gives (image by image, this is what ``predict`` did before)."""
    model, outputs = _three_image_outputs(test_cfg)
    dets = model.predict(outputs, SIZES_3)
    for i, size in enumerate(SIZES_3):
        one = YOLACTOutputs(*(o[i : i + 1] if torch.is_tensor(o) else o for o in outputs))
        (alone,) = model.predict(one, [size])
        for field in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(getattr(dets[i], field), getattr(alone, field)), (i, field)
    counts = [len(d) for d in dets]
    if test_cfg.score_thr == 0.9:
        assert counts == [0, 0, 0]
    else:
        assert all(n > 0 for n in counts)


def test_predict_waits_for_the_device_once_per_batch():
    """The only host synchronisation of predict is reading how many detections each image kept,
    once for the batch (Fast NMS's boolean-mask indexes made it 4 per image before)."""
    model, outputs = _three_image_outputs(YOLACTTestConfig(score_thr=0.34, iou_thr=0.3))
    with count_host_syncs() as syncs:
        dets = model.predict(outputs, SIZES_3)
    assert all(len(d) > 0 for d in dets)
    assert syncs.count <= 1, f"{syncs.count} host syncs:\n{syncs.summary()}"
    # the count is read in kept_detections, predict's Fast NMS step
    assert all("yolact.py" in e.where and "in kept_detections" in e.where for e in syncs.events), (
        syncs.summary()
    )


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def test_presets_mirror_mmdetection():
    cfg = YOLACT_R50_FPN
    head, mask, test = cfg.bbox_head, cfg.mask_head, cfg.test_cfg
    gen = head.anchor_generator
    assert (gen.octave_base_scale, gen.scales_per_octave, gen.ratios) == (3, 1, (0.5, 1.0, 2.0))
    assert gen.strides == (8, 16, 32, 64, 128)
    assert head.bbox_coder.target_stds == (0.1, 0.1, 0.2, 0.2)
    assert (head.num_classes, head.num_protos, head.num_head_convs) == (80, 32, 1)
    assert (head.loss_cls.loss_weight, head.loss_bbox.loss_weight, mask.loss_mask_weight) == (
        1, 1.5, 6.125)  # fmt: skip
    assert head.loss_bbox.beta == 1.0
    assert mask.max_masks_to_train == 100 and mask.with_seg_branch
    a = cfg.train_cfg.assigner
    assert (a.pos_iou_thr, a.neg_iou_thr, a.min_pos_iou, a.match_low_quality) == (0.5, 0.4, 0, True)
    assert cfg.train_cfg.neg_pos_ratio == 3
    assert (test.nms_pre, test.score_thr, test.iou_thr, test.top_k, test.max_per_img,
            test.mask_thr) == (1000, 0.05, 0.5, 200, 100, 0.5)  # fmt: skip
    assert cfg.proto_stride == 4 and YOLACT_R18_SMALL.proto_stride == 4
    assert YOLACT_R18_SMALL.with_num_classes(5).bbox_head.num_classes == 5


def test_semantic_branch_loss():
    cfg = replace(TINY, mask_head=replace(TINY.mask_head, with_seg_branch=True))
    torch.manual_seed(0)
    model = build_yolact(cfg)
    batch = _handmade_batch()
    outputs = model(batch.images)
    assert outputs.segm_logits.shape == (2, 2, 8, 12)
    losses = model.loss(outputs, batch)
    t = model.targets(outputs, batch)
    # class 1 of image 0 is the union of its object's mask at 1/8 of the input
    assert t.segm_targets.shape == (2, 2, 8, 12) and t.segm_targets[0, 1].sum() > 0
    expected = F.binary_cross_entropy_with_logits(outputs.segm_logits, t.segm_targets,
                                                  reduction="sum") / (2 * 8 * 12)  # fmt: skip
    torch.testing.assert_close(losses["loss_segm"], expected)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: replace(TINY, bbox_head=replace(TINY.bbox_head, anchor_generator=(
            AnchorGeneratorConfig(strides=(8, 16, 32, 64))))), "strides"),
        (lambda: replace(TINY, bbox_head=replace(TINY.bbox_head, in_channels=32)), "in_channels"),
        (lambda: replace(TINY, mask_head=replace(TINY.mask_head, in_channels=32)), "in_channels"),
        (lambda: replace(TINY, bbox_head=replace(TINY.bbox_head, num_protos=4)), "num_protos"),
        (lambda: replace(TINY, backbone=ResNetConfig(depth=50)), "in_channels"),
        (lambda: YOLACTHeadConfig(num_classes=0), "num_classes"),
        (lambda: YOLACTHeadConfig(num_protos=0), "num_protos"),
        (lambda: YOLACTHeadConfig(loss_bbox=SmoothL1LossConfig(loss_weight=-1)), "loss_weight"),
        (lambda: YOLACTProtonetConfig(proto_channels=(256, 32), proto_kernel_sizes=(3,)),
         "proto_channels"),
        (lambda: YOLACTProtonetConfig(proto_channels=(256, 16), proto_kernel_sizes=(3, 1)),
         "proto_channels"),
        (lambda: YOLACTProtonetConfig(proto_channels=(256, 32), proto_kernel_sizes=(0, 1)),
         "proto_kernel_sizes"),
        (lambda: YOLACTProtonetConfig(max_masks_to_train=0), "max_masks_to_train"),
        (lambda: YOLACTProtonetConfig(loss_mask_weight=-1.0), "loss_mask_weight"),
        (lambda: YOLACTTrainConfig(neg_pos_ratio=-1), "neg_pos_ratio"),
        (lambda: MaxIoUAssignerConfig(neg_iou_thr=0.6), "neg_iou_thr"),
        (lambda: YOLACTTestConfig(score_thr=1.5), "score_thr"),
        (lambda: YOLACTTestConfig(iou_thr=0.0), "iou_thr"),
        (lambda: YOLACTTestConfig(top_k=0), "top_k"),
        (lambda: YOLACTTestConfig(nms_pre=0), "nms_pre"),
        (lambda: YOLACTTestConfig(max_per_img=0), "max_per_img"),
        (lambda: YOLACTTestConfig(mask_thr=1.0), "mask_thr"),
    ],
)  # fmt: skip
def test_invalid_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        make()


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        YOLACT_R50_FPN.bbox_head.num_classes = 3  # type: ignore[misc]
    assert isinstance(YOLACTConfig().neck, FPNConfig)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_targets_and_loss_do_not_synchronise_on_gpu():
    torch.manual_seed(0)
    model = build_yolact(TINY).cuda()
    batch = _shapes_batch().to("cuda")
    with torch.no_grad():
        outputs = model(batch.images)
    model.loss(outputs, batch)  # warm the anchor / valid-flag caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.manual_seed(1)
        losses = model.loss(outputs, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = build_yolact(TINY)
    cpu.load_state_dict(model.state_dict())
    cpu_outputs = YOLACTOutputs(*(o.cpu() if torch.is_tensor(o) else o for o in outputs))
    expected = cpu.loss(cpu_outputs, _shapes_batch())  # few positives: the mask subset is all
    for key in ("loss_cls", "loss_bbox", "loss_mask", "num_pos"):
        torch.testing.assert_close(losses[key].cpu(), expected[key], rtol=1e-4, atol=1e-4)
    dets = model.predict(outputs, batch.image_sizes)
    assert dets[0].masks.is_cuda and dets[0].masks.shape[1:] == (128, 128)


# ---------------------------------------------------------------------------------------------
# box-only objects
# ---------------------------------------------------------------------------------------------


def test_box_only_objects_train_class_and_box_but_no_mask():
    from _box_only import without_masks

    cfg = replace(TINY, mask_head=replace(TINY.mask_head, with_seg_branch=True))
    torch.manual_seed(0)
    model = build_yolact(cfg)
    batch = _handmade_batch()
    outputs = model(batch.images)

    def run(b):
        torch.manual_seed(1)  # the same random subset keys for every variant
        losses = model.loss(outputs, b)
        torch.manual_seed(1)
        return losses, model.targets(outputs, b)

    (full, t_full), (part, t) = run(batch), run(without_masks(batch, [[0], []]))
    none, _ = run(without_masks(batch, [[0, 1], [0]]))
    for key in ("loss_cls", "loss_bbox", "num_pos"):
        assert torch.equal(full[key], part[key]) and torch.equal(full[key], none[key]), key
    assert full["loss_mask"] > 0 and none["loss_mask"] == 0

    # Image 0's object 0 is box-only: none of its positives is in the trained mask subset; the
    # subset holds every positive of the other objects (fewer than max_masks_to_train).
    trained_gt = t.assignment.gt_inds.gather(1, t.mask_anchor_inds) - 1  # [B, K]
    assert not (t.mask_valid[0] & (trained_gt[0] == 0)).any()
    assert int(t.mask_valid[0].sum()) == int((t.gt_inds[0] == 1).sum())
    assert int(t.mask_valid[1].sum()) == int(t.pos[1].sum()) == int(t_full.mask_valid[1].sum())

    # Semantic branch: no target inside the box-only object's box in its class's channel (1),
    # weight 1 elsewhere. At stride 8 the box (16, 8, 44, 40) is x 2..5.5, y 1..5: the cells whose
    # centres lie inside are columns 2..4 (centres 2.5..4.5) and rows 1..4.
    assert t_full.segm_weights.eq(1).all()
    expected = torch.ones(2, 2, 8, 12)
    expected[0, 1, 1:5, 2:5] = 0
    assert torch.equal(t.segm_weights, expected)
    bce = F.binary_cross_entropy_with_logits(outputs.segm_logits, t.segm_targets, reduction="none")
    torch.testing.assert_close(part["loss_segm"], (bce * expected).sum() / (2 * 8 * 12))
