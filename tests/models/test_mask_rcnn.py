"""Mask R-CNN: shapes of every stage, mask targets and mask pasting against per-RoI references,
training on tiny synthetic images, empty images, predict/evaluate, config validation."""

from __future__ import annotations

import collections
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from instseg_edu.engine.host_sync import count_host_syncs
from instseg_edu.models.mask_rcnn import (
    MASK_RCNN_R18_CPU,
    MASK_RCNN_R18_SMALL,
    AnchorConfig,
    AssignerConfig,
    MaskHead,
    MaskRCNNConfig,
    ProposalConfig,
    RCNNTestConfig,
    RCNNTrainConfig,
    RoIHeadConfig,
    RPNHeadConfig,
    SamplerConfig,
    build_mask_rcnn,
    map_rois_to_levels,
    mask_targets,
    multiscale_roi_align,
    paste_masks,
)
from instseg_edu.models.roi_heads import mask_targets_reference, paste_masks_reference
from instseg_edu.ops.assign import POSITIVE
from instseg_edu.ops.nms import NMSConfig
from instseg_edu.structures import Batch, Detections, Target

NUM_CLASSES = 3
CFG = replace(MASK_RCNN_R18_SMALL, num_classes=NUM_CLASSES)


# ---- synthetic data ------------------------------------------------------------------------------


def _scene(gen: torch.Generator, size: tuple[int, int], pad: tuple[int, int], n: int):
    """An image with ``n`` flat-coloured rectangles (label 0), discs (1) and triangles (2)."""
    h, w = size
    hp, wp = pad
    img = torch.rand(3, 1, 1, generator=gen).expand(3, hp, wp).clone() * 0.3
    img[:, h:, :] = 0
    img[:, :, w:] = 0
    ys, xs = torch.meshgrid(torch.arange(hp) + 0.5, torch.arange(wp) + 0.5, indexing="ij")
    boxes, labels, masks = [], [], []
    for _ in range(n):
        side = float(torch.randint(24, 56, (1,), generator=gen))
        x0 = float(torch.randint(0, int(w - side), (1,), generator=gen))
        y0 = float(torch.randint(0, int(h - side), (1,), generator=gen))
        label = int(torch.randint(0, NUM_CLASSES, (1,), generator=gen))
        u, v = (xs - x0) / side, (ys - y0) / side
        if label == 0:
            m = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
        elif label == 1:
            m = (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25
        else:
            m = (v >= 0) & (v < 1) & (u >= 0.5 - v / 2) & (u < 0.5 + v / 2)
        img[:, m] = torch.rand(3, 1, generator=gen) * 0.5 + 0.5
        masks.append(m)
        yy, xx = torch.nonzero(m, as_tuple=True)
        boxes.append([xx.min(), yy.min(), xx.max() + 1, yy.max() + 1])
        labels.append(label)
    if n:
        target = Target(
            torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels), torch.stack(masks)
        )
    else:
        target = Target(
            torch.zeros(0, 4),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, hp, wp, dtype=torch.bool),
        )
    return img, target


def make_batch(seed=0, sizes=((128, 128), (96, 120)), objects=(2, 3)) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    pad = (128, 128)
    items = [_scene(gen, s, pad, n) for s, n in zip(sizes, objects)]
    return Batch(torch.stack([i for i, _ in items]), list(sizes), [t for _, t in items])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_mask_rcnn(CFG)


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: AssignerConfig(pos_iou_thr=0.5, neg_iou_thr=0.6), "neg_iou_thr"),
        (lambda: AnchorConfig(ratios=(0.5, 0.0)), "ratios"),
        (lambda: AnchorConfig(strides=(8, 4)), "strides"),
        (lambda: SamplerConfig(num=256, pos_fraction=0.0), "pos_fraction"),
        (lambda: ProposalConfig(nms_pre=0), "nms_pre"),
        (lambda: RCNNTestConfig(score_thr=1.5), "score_thr"),
        (lambda: replace(CFG, num_classes=0), "num_classes"),
        (lambda: replace(CFG, neck=MaskRCNNConfig().neck), "in_channels"),
        (
            lambda: replace(
                CFG,
                rpn_head=RPNHeadConfig(
                    feat_channels=64, anchor_generator=AnchorConfig(strides=(8, 16, 32, 64, 128))
                ),
            ),
            "strides",
        ),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize("mask_roi_size, mask_size", [(7, 28), (14, 14), (14, 27)])
def test_mask_size_must_be_what_the_mask_head_predicts(mask_roi_size, mask_size):
    # The mask head's one 2x deconv turns an S x S RoI grid into 2S x 2S masks.
    with pytest.raises(ValueError, match=r"train_cfg\.rcnn\.mask_size=") as err:
        replace(
            CFG,
            roi_head=replace(CFG.roi_head, mask_roi_size=mask_roi_size),
            train_cfg=replace(CFG.train_cfg, rcnn=replace(CFG.train_cfg.rcnn, mask_size=mask_size)),
        )
    assert f"roi_head.mask_roi_size={mask_roi_size}" in str(err.value)
    assert f"= {2 * mask_roi_size}" in str(err.value)
    # The consistent pair builds.
    replace(
        CFG,
        roi_head=RoIHeadConfig(mask_roi_size=mask_roi_size, conv_out_channels=64),
        train_cfg=replace(CFG.train_cfg, rcnn=RCNNTrainConfig(mask_size=2 * mask_roi_size)),
    )


def test_cpu_preset_predicts_14x14_masks_and_trains():
    cfg = replace(MASK_RCNN_R18_CPU, num_classes=NUM_CLASSES)
    assert (cfg.roi_head.mask_roi_size, cfg.train_cfg.rcnn.mask_size) == (7, 14)
    sampler = cfg.train_cfg.rcnn.sampler
    assert (sampler.num, sampler.pos_fraction) == (32, 0.5)
    assert (cfg.roi_head.fc_out_channels, cfg.roi_head.num_convs) == (1024, 4)  # as the full model
    assert (cfg.backbone.depth, cfg.backbone.base_channels) == (18, 32)
    assert cfg.roi_head.loss_cls.loss_weight == 4.0  # the classifier weighed up (RESULTS.md)
    torch.manual_seed(0)
    model = build_mask_rcnn(cfg)
    batch = make_batch(seed=6)
    outputs = model(batch.images)
    targets = model.targets(outputs, batch)
    assert targets.mask.masks.shape[-2:] == (14, 14)
    assert len(targets.roi.labels) <= 32 * len(batch)
    hist = _train(model, batch, 2)
    assert all(math.isfinite(v) for h in hist for k, v in h.items() if k.startswith("loss_"))
    assert hist[-1]["loss_mask"] > 0
    model.eval()
    with torch.no_grad():
        dets = model.predict(model(batch.images), batch.image_sizes)
    for det, (h, w) in zip(dets, batch.image_sizes):
        assert det.masks.shape == (len(det), h, w)


def test_default_config_is_mmdetection_mask_rcnn_r50_fpn():
    cfg = MaskRCNNConfig()
    assert cfg.rpn_head.anchor_generator.strides == (4, 8, 16, 32, 64)
    assert (
        cfg.train_cfg.rpn.assigner.pos_iou_thr,
        cfg.train_cfg.rpn.assigner.neg_iou_thr,
        cfg.train_cfg.rpn.assigner.min_pos_iou,
    ) == (0.7, 0.3, 0.3)
    assert (cfg.train_cfg.rpn_proposal.nms_pre, cfg.train_cfg.rpn_proposal.max_per_img) == (
        2000,
        1000,
    )
    assert (cfg.train_cfg.rcnn.sampler.num, cfg.train_cfg.rcnn.sampler.pos_fraction) == (512, 0.25)
    assert not cfg.train_cfg.rcnn.assigner.match_low_quality
    assert cfg.roi_head.bbox_coder.target_stds == (0.1, 0.1, 0.2, 0.2)
    assert (cfg.test_cfg.rcnn.score_thr, cfg.test_cfg.rcnn.max_per_img) == (0.05, 100)


# ---- pure functions ------------------------------------------------------------------------------


def test_map_rois_to_levels_golden():
    sides = torch.tensor([8.0, 32.0, 111.0, 112.0, 223.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros(9), torch.zeros(9), sides, sides], 1)
    assert map_rois_to_levels(boxes, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    # A 64 x 256 box has sqrt(area) = 128: level 1 (P3).
    assert map_rois_to_levels(torch.tensor([[10.0, 10.0, 74.0, 266.0]]), 4).tolist() == [1]


def test_multiscale_roi_align_equals_per_roi_call_on_its_level():
    torch.manual_seed(1)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 5, 64 // s * 4, 64 // s * 4) for s in strides]  # 256² image
    xy = torch.rand(30, 2) * 150
    wh = torch.rand(30, 2) * 250 + 4
    rois = torch.cat([torch.randint(0, 2, (30, 1)).float(), xy, xy + wh], 1)
    out = multiscale_roi_align(feats, rois, strides, 7, sampling_ratio=2)
    levels = map_rois_to_levels(rois[:, 1:], 4)
    assert set(levels.tolist()) >= {0, 1, 2}
    for i in range(30):
        lvl = int(levels[i])
        ref = roi_align(feats[lvl], rois[i : i + 1], 7, 1.0 / strides[lvl], 2, aligned=True)
        torch.testing.assert_close(out[i : i + 1], ref)


def test_multiscale_roi_align_one_level_and_no_rois():
    # All RoIs under 112 px read P2: returned as roi_align gives them, no scatter; none: empty.
    torch.manual_seed(2)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 5, 64 // s * 4, 64 // s * 4) for s in strides]
    xy = torch.rand(12, 2) * 150
    rois = torch.cat([torch.randint(0, 2, (12, 1)).float(), xy, xy + 4 + torch.rand(12, 2) * 90], 1)
    assert (map_rois_to_levels(rois[:, 1:], 4) == 0).all()
    out = multiscale_roi_align(feats, rois, strides, 7, sampling_ratio=0)
    assert torch.equal(out, roi_align(feats[0], rois, 7, 0.25, 0, aligned=True))
    empty = multiscale_roi_align(feats, rois[:0], strides, 7)
    assert empty.shape == (0, 5, 7, 7) and empty.dtype == torch.float32


def test_mask_head_label_channel():
    # forward(x, labels) is forward(x)'s channel labels[r] of each RoI r, computed alone.
    torch.manual_seed(3)
    head = MaskHead(16, 32, 2, num_classes=5).eval()
    x = torch.randn(9, 16, 14, 14)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0, 4, 1])
    with torch.no_grad():
        every_class = head(x)  # [9, 5, 28, 28]
        own = head(x, labels)  # [9, 28, 28]
        # the channels-last deconvolution of this path gives the same bits as the NCHW one
        up = head.upsample(head.convs(x))
        up_cl = head.upsample(head.convs(x).contiguous(memory_format=torch.channels_last))
    assert own.shape == (9, 28, 28)
    torch.testing.assert_close(own, every_class[torch.arange(9), labels], rtol=1e-5, atol=1e-5)
    assert torch.equal(up, up_cl)
    assert head(x[:0], labels[:0]).shape == (0, 28, 28)


def _random_blobs(gen, g, h, w):
    """Random smooth binary masks (thresholded low-resolution noise)."""
    low = torch.rand(g, 1, 6, 7, generator=gen)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5


def test_mask_targets_equal_area_resize_of_the_crop_for_integer_boxes():
    # An integer box whose sides are k * 28 samples exactly the k x k pixel centres of each bin,
    # so the target is the crop averaged over k x k blocks (F.interpolate "area"), thresholded.
    gen = torch.Generator().manual_seed(2)
    masks = _random_blobs(gen, 4, 100, 120)
    rois, gt_index, refs = [], [], []
    for i, (k_h, k_w) in enumerate([(1, 1), (2, 3), (3, 2), (1, 4), (2, 2), (3, 4)]):
        g = i % 4
        y1, x1 = (
            int(torch.randint(0, 100 - 28 * k_h + 1, (1,), generator=gen)),
            int(torch.randint(0, 120 - 28 * k_w + 1, (1,), generator=gen)),
        )
        y2, x2 = y1 + 28 * k_h, x1 + 28 * k_w
        rois.append([x1, y1, x2, y2])
        gt_index.append(g)
        crop = masks[g, y1:y2, x1:x2].float()[None, None]
        refs.append((F.interpolate(crop, size=(28, 28), mode="area")[0, 0] >= 0.5).float())
    out = mask_targets(masks, torch.tensor(rois, dtype=torch.float32), torch.tensor(gt_index))
    assert out.shape == (6, 28, 28)
    torch.testing.assert_close(out, torch.stack(refs), rtol=0, atol=0)


def test_mask_targets_equal_per_roi_crop_and_resize_reference_on_random_boxes():
    gen = torch.Generator().manual_seed(3)
    hp, wp = 96, 128
    masks = _random_blobs(gen, 5, hp, wp)
    n = 40
    xy1 = torch.rand(n, 2, generator=gen) * torch.tensor([wp - 10.0, hp - 10.0])
    wh = torch.rand(n, 2, generator=gen) * 90 + 2
    xy2 = torch.minimum(xy1 + wh, torch.tensor([float(wp), float(hp)]))
    boxes = torch.cat([xy1, xy2], 1)
    gt_index = torch.randint(0, 5, (n,), generator=gen)
    out = mask_targets(masks, boxes, gt_index, 28)
    assert out.shape == (n, 28, 28) and out.dtype == torch.float32
    averages = mask_targets_reference(masks, boxes, gt_index, 28, binarize=False)  # [n, 28, 28]
    assert torch.equal(
        mask_targets_reference(masks, boxes, gt_index, 28), (averages >= 0.5).float()
    )
    decided = (averages - 0.5).abs() > 1e-4  # exact ties may round either way in float32
    assert torch.equal(out[decided], (averages[decided] >= 0.5).float())
    assert int(decided.sum()) > 0.9 * n * 28 * 28


def test_paste_masks_equals_per_mask_reference():
    gen = torch.Generator().manual_seed(4)
    h, w, k = 37, 53, 12
    probs = torch.rand(k, 28, 28, generator=gen)
    xy1 = torch.rand(k, 2, generator=gen) * torch.tensor([60.0, 45.0]) - 8  # some stick out
    boxes = torch.cat([xy1, xy1 + torch.rand(k, 2, generator=gen) * 40 + 0.7], 1)
    out = paste_masks(probs, boxes, (h, w))
    assert out.shape == (k, h, w)
    # the same products summed in another order: equal to float32 rounding
    torch.testing.assert_close(out, paste_masks_reference(probs, boxes, (h, w)), rtol=0, atol=2e-6)


def test_paste_masks_golden_identity_and_outside_is_zero():
    m = torch.rand(1, 28, 28)
    out = paste_masks(m, torch.tensor([[0.0, 0.0, 28.0, 28.0]]), (28, 30))
    torch.testing.assert_close(out[0, :, :28], m[0])  # box = image: pixel (y, x) is cell (y, x)
    assert torch.all(out[0, :, 28:] == 0)
    assert paste_masks(m[:0], torch.zeros(0, 4), (5, 6)).shape == (0, 5, 6)


# ---- the model -----------------------------------------------------------------------------------


def test_shapes_of_every_stage(model):
    batch = make_batch()
    model.train()
    out = model(batch.images)
    assert [tuple(f.shape) for f in out.features] == [
        (2, 64, 32, 32),
        (2, 64, 16, 16),
        (2, 64, 8, 8),
        (2, 64, 4, 4),
        (2, 64, 2, 2),
    ]
    n = 3 * (32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2)
    assert out.rpn_logits.shape == (2, n) and out.rpn_deltas.shape == (2, n, 4)
    assert out.anchors.shape == (n, 4) and out.anchor_levels.shape == (n,)
    # Base anchor of P2, ratio 1: 32 x 32 centred on (0, 0).
    torch.testing.assert_close(out.anchors[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))

    t = model.targets(out, batch)
    rpn = t.rpn
    assert rpn.pos_mask.shape == (2, n) and rpn.bbox_targets.shape == (2, n, 4)
    assert not (rpn.pos_mask & rpn.neg_mask).any()
    assert torch.all(rpn.pos_mask.sum(1) <= 64) and torch.all(
        (rpn.pos_mask | rpn.neg_mask).sum(1) == 128
    )
    assert torch.all(rpn.assignment.gt_inds[rpn.pos_mask] > 0)
    assert torch.all(rpn.assignment.gt_inds[rpn.neg_mask] == 0)
    assert not (rpn.pos_mask | rpn.neg_mask)[~rpn.anchor_valid].any()  # padding never sampled
    assert rpn.pos_mask.sum(1).min() > 0  # every object gets at least its best anchor

    p = t.proposals
    k = sum(min(300, 3 * s * s) for s in (32, 16, 8, 4, 2))
    assert p.pre_nms_boxes.shape == (2, k, 4) and p.boxes.shape == (2, 150, 4)
    assert p.valid.any(1).all()
    # Proposals lie inside their image and are sorted by score.
    assert torch.all(p.boxes[1, :, 2][p.valid[1]] <= 120) and torch.all(
        p.boxes[1, :, 3][p.valid[1]] <= 96
    )
    s0 = p.scores[0][p.valid[0]]
    assert torch.all(s0[:-1] >= s0[1:])

    roi = t.roi
    r = roi.rois.shape[0]
    assert (
        roi.rois.shape == (r, 5) and roi.labels.shape == (r,) and roi.bbox_targets.shape == (r, 4)
    )
    assert r <= 2 * 64
    pos = roi.labels >= 0  # BACKGROUND (-1) for negatives
    for b in range(2):
        in_b = roi.rois[:, 0] == b
        assert int((pos & in_b).sum()) <= 16
    # Ground-truth boxes were added as proposals: each is a positive candidate of IoU 1, and when an
    # image has no more positive candidates than its budget (16), all of them are sampled.
    assert torch.all(pos[roi.is_gt])
    for b, t_b in enumerate(batch.targets):
        if int((roi.assignment.gt_inds[b] > 0).sum()) <= 16:
            assert int((roi.is_gt & (roi.rois[:, 0] == b)).sum()) == len(t_b)
    assert roi.is_gt.any()
    torch.testing.assert_close(roi.bbox_targets[roi.is_gt], torch.zeros(5, 4))
    gt_labels = torch.cat([tt.labels for tt in batch.targets])
    assert torch.equal(roi.labels[pos], gt_labels[roi.gt_index[pos]])
    assert torch.all(roi.gt_index[~pos] == -1)
    assert torch.all(roi.assignment.reason[roi.pos_mask] == POSITIVE)

    mt = t.mask
    assert mt.masks.shape == (int(pos.sum()), 28, 28)
    # A ground-truth box's own mask target is the object's mask resized: mostly foreground.
    first = torch.nonzero(roi.is_gt[pos]).squeeze(1)
    assert mt.masks[first].mean() > 0.4

    losses = model.loss(out, batch)
    for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"):
        assert losses[key].dim() == 0 and torch.isfinite(losses[key]), key
    assert 0 < float(losses["num_pos"]) and 0 <= float(losses["acc"]) <= 100


def test_predict_returns_detections_with_masks_at_true_size(model):
    batch = make_batch(seed=5)
    model.eval()
    with torch.no_grad():
        dets = model.predict(model(batch.images), batch.image_sizes)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, batch.image_sizes):
        assert isinstance(d, Detections)
        k = len(d)
        assert k <= 50
        assert d.boxes.shape == (k, 4) and d.scores.shape == (k,) and d.labels.shape == (k,)
        assert d.masks.shape == (k, h, w) and d.masks.dtype == torch.bool
        assert torch.all(d.scores > 0.05) and torch.all(d.scores[:-1] >= d.scores[1:])
        assert torch.all((d.labels >= 0) & (d.labels < NUM_CLASSES))
        assert torch.all(d.boxes[:, 2] <= w) and torch.all(d.boxes[:, 3] <= h)
    # Nothing above the score threshold: empty detections, still with [0, h, w] masks.
    strict = build_mask_rcnn(
        replace(CFG, test_cfg=replace(CFG.test_cfg, rcnn=RCNNTestConfig(score_thr=0.999)))
    )
    strict.load_state_dict(model.state_dict())
    strict.eval()
    with torch.no_grad():
        empty = strict.predict(strict(batch.images), batch.image_sizes)
    assert [tuple(d.masks.shape) for d in empty] == [(0, 128, 128), (0, 96, 120)]


def test_predict_equals_a_per_image_reference_with_torchvision_batched_nms(model):
    """Box-stage predict against the textbook order: valid proposals only, softmax, decode, clip,
    per-class NMS with torchvision's batched_nms, the best max_per_img; masks per detection."""
    from torchvision.ops import batched_nms

    batch = make_batch(seed=5)
    model.eval()
    cfg = model.cfg.test_cfg.rcnn
    with torch.no_grad():
        out = model(batch.images)
        dets = model.predict(out, batch.image_sizes)
        props = model.proposals(out, batch.image_sizes, model.cfg.test_cfg.rpn)
        for i, (h, w) in enumerate(batch.image_sizes):
            boxes = props.boxes[i][props.valid[i]]  # [R_i, 4]
            rois = torch.cat([torch.full((len(boxes), 1), float(i)), boxes], 1)
            logits, deltas = model.box_forward(out.features, rois)
            scores = logits.softmax(1)[:, :NUM_CLASSES]  # [R_i, C]
            decoded = model.bbox_coder.decode(
                boxes[:, None].expand(-1, NUM_CLASSES, 4), deltas.view(-1, NUM_CLASSES, 4)
            )
            decoded[..., 0::2] = decoded[..., 0::2].clamp(0, w)
            decoded[..., 1::2] = decoded[..., 1::2].clamp(0, h)
            labels = torch.arange(NUM_CLASSES).expand_as(scores)
            ok = scores > cfg.score_thr
            b, sc, lb = decoded[ok], scores[ok], labels[ok]
            keep = batched_nms(b, sc, lb, cfg.nms.iou_threshold)[: cfg.max_per_img]
            assert len(keep) > 0
            torch.testing.assert_close(dets[i].scores, sc[keep])
            torch.testing.assert_close(dets[i].boxes, b[keep])
            assert torch.equal(dets[i].labels, lb[keep])
            probs = model.mask_forward(out.features, torch.cat([rois[:1, :1].expand(len(keep), 1),
                                                                b[keep]], 1))  # fmt: skip
            probs = probs[torch.arange(len(keep)), lb[keep]].sigmoid()
            expected = paste_masks(probs, b[keep], (h, w)) >= cfg.mask_thr_binary
            assert torch.equal(dets[i].masks, expected)


def _train(model, batch, steps, lr=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    history = []
    for _ in range(steps):
        losses = model.loss(model(batch.images), batch)
        total = sum(v for k, v in losses.items() if k.startswith("loss_"))
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return history


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_mask_rcnn(CFG)
    batch = make_batch(seed=6)
    hist = _train(model, batch, 14)
    total = [sum(v for k, v in h.items() if k.startswith("loss_")) for h in hist]
    first, last = sum(total[:2]) / 2, sum(total[-2:]) / 2
    assert last < 0.7 * first, total
    assert hist[-1]["loss_rpn_cls"] < hist[0]["loss_rpn_cls"]
    assert hist[-1]["loss_mask"] < hist[0]["loss_mask"]


def test_training_and_inference_wait_for_the_device_only_for_nms_and_three_counts():
    """On a GPU every host synchronisation stalls the queue. A training step needs one per RPN NMS
    call (one per image: greedy NMS finishes on the host) and three small reads: the number of
    sampled RoIs and positives, and the RoIs per FPN level for the box and mask heads.
    torchvision's Mask R-CNN needs 109 for two 512² images (benchmarks/host_syncs.py)."""
    torch.manual_seed(0)
    model = build_mask_rcnn(CFG)
    batch = make_batch(seed=6)
    with count_host_syncs() as syncs:
        losses = model.loss(model(batch.images), batch)
    ops = collections.Counter(e.op for e in syncs.events)
    assert ops == {"torchvision.nms": len(batch), "Tensor.tolist": 3}, syncs.summary()
    assert float(losses["num_pos"]) > 0

    # Inference: the RPN's NMS, one count of the candidates, one class-aware NMS per image, and
    # the RoIs per level for the box and mask heads (torchvision's pastes each mask in a loop).
    model.eval()
    with torch.no_grad(), count_host_syncs() as syncs:
        dets = model.predict(model(batch.images), batch.image_sizes)
    ops = collections.Counter(e.op for e in syncs.events)
    assert ops == {"torchvision.nms": 2 * len(batch), "Tensor.tolist": 3}, syncs.summary()
    assert all(len(d) > 0 for d in dets)


def test_images_without_objects_train_without_nan():
    torch.manual_seed(0)
    model = build_mask_rcnn(CFG)
    empty = make_batch(seed=7, objects=(0, 0))
    losses = model.loss(model(empty.images), empty)
    assert float(losses["num_pos"]) == 0
    assert float(losses["loss_mask"].detach()) == 0 and float(losses["loss_bbox"].detach()) == 0
    total = sum(v for k, v in losses.items() if k.startswith("loss_"))
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # And a mixed batch (one empty image) as well.
    mixed = make_batch(seed=8, objects=(0, 2))
    hist = _train(model, mixed, 2)
    assert all(math.isfinite(v) for h in hist for v in h.values())


def test_predict_then_evaluate_runs(model):
    from instseg_edu.engine.evaluate import detections_to_coco, evaluate_coco

    batch = make_batch(seed=9)
    for i, t in enumerate(batch.targets):
        t.image_id = i + 1
        t.orig_size = batch.image_sizes[i]
    model.eval()
    with torch.no_grad():
        dets = model.predict(model(batch.images), batch.image_sizes)
    results = detections_to_coco(dets, batch.targets, batch.image_sizes, [1, 2, 3])
    images, anns = [], []
    for t, (h, w) in zip(batch.targets, batch.image_sizes):
        images.append({"id": t.image_id, "file_name": f"{t.image_id}.png", "height": h, "width": w})
        for box, label in zip(t.boxes.tolist(), t.labels.tolist()):
            x1, y1, x2, y2 = box
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": t.image_id,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                }
            )
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": str(i)} for i in range(3)],
    }
    metrics = evaluate_coco(gt, results)
    assert "bbox" in metrics


def test_bf16_autocast_keeps_roi_coordinates_in_float32(model):
    # Under autocast the features are bf16; the RoIs must not be rounded to bf16 (at x ~ 500 that
    # is a 2-pixel grid), so the pooled features equal float32 RoIAlign on the same features.
    feats = [torch.randn(1, 4, 160, 160).to(torch.bfloat16)]
    rois = torch.tensor([[0.0, 301.3, 401.7, 303.9, 404.1], [0.0, 501.1, 2.2, 503.3, 5.5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multiscale_roi_align(feats, rois, (4,), 7, sampling_ratio=2)
    ref = roi_align(feats[0].float(), rois, 7, 0.25, 2, aligned=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    # And a whole training step under bf16 autocast gives finite losses.
    batch = make_batch(seed=10, sizes=((128, 128),), objects=(2,))  # bf16 convs are slow on CPU
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(model(batch.images), batch)
    assert all(torch.isfinite(v) for v in losses.values())


def test_trimmed_proposals_drop_only_padding_slots(model):
    torch.manual_seed(11)
    batch = make_batch(seed=11)
    model.eval()
    with torch.no_grad():
        out = model(batch.images)
    out = out._replace(rpn_logits=torch.randn_like(out.rpn_logits) * 3)
    # NMS leaves fewer than max_per_img, and a different number in each image
    cfg = ProposalConfig(nms_pre=100, max_per_img=400, nms=NMSConfig(0.5))
    full = model.proposals(out, batch.image_sizes, cfg)
    trimmed = model.proposals(out, batch.image_sizes, cfg, trim=True)
    counts = full.valid.sum(1).tolist()
    assert max(counts) < 400 and counts[0] != counts[1]
    p = trimmed.boxes.shape[1]
    # kept by NMS: the valid proposals and boxes too small to keep (zeros, invalid), in order
    assert max(counts) <= p < 400
    for name in ("boxes", "scores", "levels", "valid"):
        assert torch.equal(getattr(trimmed, name), getattr(full, name)[:, :p]), name
        assert not getattr(full, name)[:, p:].any(), name  # what was cut: zeros, invalid
    for name in ("pre_nms_boxes", "pre_nms_scores", "pre_nms_levels", "pre_nms_valid"):
        assert torch.equal(getattr(trimmed, name), getattr(full, name)), name


def test_predict_on_trimmed_proposals_equals_predict_on_all_slots(model, monkeypatch):
    batch = make_batch(seed=5)
    model.eval()
    # Up to 2000 proposals per image: NMS leaves fewer, so trimming drops padding slots.
    lenient = replace(
        model.cfg.test_cfg,
        rpn=ProposalConfig(nms_pre=1000, max_per_img=2000),
        rcnn=replace(model.cfg.test_cfg.rcnn, score_thr=0.0),
    )
    monkeypatch.setattr(model, "cfg", replace(model.cfg, test_cfg=lenient))
    with torch.no_grad():
        out = model(batch.images)
        props = model.proposals(out, batch.image_sizes, lenient.rpn, trim=True)
        assert props.boxes.shape[1] < 2000 and not props.valid.all()
        trimmed = model.predict(out, batch.image_sizes)
        untrimmed_proposals = model.proposals
        monkeypatch.setattr(
            model, "proposals", lambda o, sizes, cfg, trim: untrimmed_proposals(o, sizes, cfg)
        )
        every_slot = model.predict(out, batch.image_sizes)
    assert [len(d) for d in trimmed] == [len(d) for d in every_slot]
    assert all(len(d) > 0 for d in trimmed)
    for got, ref in zip(trimmed, every_slot):
        torch.testing.assert_close(got.boxes, ref.boxes)
        torch.testing.assert_close(got.scores, ref.scores)
        assert torch.equal(got.labels, ref.labels)
        assert torch.equal(got.masks, ref.masks)


# ---- box-only objects ----------------------------------------------------------------------------


def test_box_only_objects_train_rpn_box_and_class_terms_but_no_mask(model):
    from _box_only import without_masks

    batch = make_batch(seed=3)
    outputs = model(batch.images)

    def losses(b):
        torch.manual_seed(1)  # the same RPN and RoI samples for every variant
        return model.loss(outputs, b)

    full = losses(batch)
    box_only = losses(without_masks(batch, [[0, 1], [0, 1, 2]]))
    mixed = losses(without_masks(batch, [[0], []]))
    for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "num_pos"):
        assert torch.equal(full[key], box_only[key]) and torch.equal(full[key], mixed[key]), key
    assert full["loss_mask"] > 0 and box_only["loss_mask"] == 0
    model.zero_grad()
    box_only["loss_mask"].backward()  # still in the graph, with nothing to learn
    assert all(p.grad is None or not p.grad.any() for p in model.mask_head.parameters())

    # Mixed: the mask head trains exactly the positives of the objects that have masks, in order.
    torch.manual_seed(1)
    t = model.targets(outputs, without_masks(batch, [[0], []]))
    positives = t.roi.gt_index[t.roi.pos_index].tolist()  # object 0 of image 0 is row 0
    assert 0 in positives
    assert t.mask.gt_index.tolist() == [g for g in positives if g != 0]
    assert t.mask.masks.shape == (len(positives) - positives.count(0), 28, 28)
    torch.testing.assert_close(
        mixed["loss_mask"],
        F.binary_cross_entropy_with_logits(
            model.mask_forward(outputs.features, t.mask.rois)[
                torch.arange(len(t.mask.labels)), t.mask.labels
            ],
            t.mask.masks,
        ),
    )
