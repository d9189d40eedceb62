"""The readable references of instseg_edu.models.references equal the fast forms exactly: SOLO's
targets (one image and a batch) and predict, RetinaNet's and YOLACT's predict, the RPN's proposals.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import test_mask_rcnn
import test_retinanet
import test_solo
import test_yolact
import torch
from _box_only import without_masks

from instseg_edu.models.mask_rcnn import ProposalConfig, build_mask_rcnn
from instseg_edu.models.references import (
    retinanet_predict_reference,
    rpn_proposals_reference,
    solo_predict_reference,
    solo_target_single_reference,
    solo_targets_reference,
    yolact_predict_reference,
)
from instseg_edu.models.retinanet import RetinaNetOutputs, RetinaTestConfig, build_retinanet
from instseg_edu.models.solo import SOLOTestConfig, build_solo, solo_target_single
from instseg_edu.models.yolact import YOLACTTestConfig, build_yolact
from instseg_edu.ops.nms import NMSConfig
from instseg_edu.structures import Target


def assert_same_detections(got, expected):
    assert len(got) == len(expected)
    for i, (d, e) in enumerate(zip(got, expected)):
        for field in ("boxes", "scores", "labels", "masks"):
            a, b = getattr(d, field), getattr(e, field)
            assert (a is None) == (b is None), (i, field)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), (i, field)


# ---- SOLO targets --------------------------------------------------------------------------------


def _random_objects(seed: int, h: int = 96, w: int = 128):
    """1-7 ellipses (maybe clipped by the border) with tight boxes and labels in 0..2."""
    gen = torch.Generator().manual_seed(seed)
    g = int(torch.randint(1, 8, (1,), generator=gen))
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks, boxes = [], []
    for _ in range(g):
        cy, cx = (
            int(torch.randint(0, h, (1,), generator=gen)),
            int(torch.randint(0, w, (1,), generator=gen)),
        )
        ry, rx = torch.randint(1, 40, (2,), generator=gen).tolist()
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        ys, xs = m.nonzero(as_tuple=True)
        masks.append(m)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    labels = torch.randint(0, 3, (g,), generator=gen)
    has_mask = torch.rand(g, generator=gen) > 0.3
    return torch.tensor(boxes, dtype=torch.float32), labels, torch.stack(masks), has_mask


def assert_same_image_targets(got, expected):
    for field in ("cate_labels", "gt_inds"):
        for a, b in zip(getattr(got, field), getattr(expected, field)):
            assert a.dtype == b.dtype and torch.equal(a, b), field
    for field in ("centers", "levels", "cells"):
        a, b = getattr(got, field), getattr(expected, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("box_only", [False, True])
def test_solo_target_single_equals_the_reference_loop(seed, box_only):
    boxes, labels, masks, has_mask = _random_objects(seed)
    masks = masks & has_mask[:, None, None] if box_only else masks
    ranges = ((1, 24), (12, 48), (24, 96), (48, 192), (96, 384))
    sigma = (0.2, 0.5, 1.0)[seed % 3]
    target = Target(boxes, labels, masks, has_mask=has_mask if box_only else None)
    fast = solo_target_single(
        boxes,
        labels,
        masks,
        num_grids=test_solo.GRIDS,
        scale_ranges=ranges,
        sigma=sigma,
        has_mask=has_mask if box_only else None,
    )
    reference = solo_target_single_reference(target, test_solo.GRIDS, ranges, sigma)
    assert_same_image_targets(fast, reference)
    assert any(bool((inds >= 0).any()) for inds in fast.gt_inds)  # some cell is positive


@pytest.mark.parametrize(
    "make_batch",
    [
        test_solo._shapes_batch,
        test_solo._batch_with_an_empty_image,
        lambda: without_masks(test_solo._shapes_batch(), [[1], []]),
    ],
)
def test_solo_targets_equal_the_per_image_per_level_reference(make_batch):
    torch.manual_seed(0)
    model = build_solo(test_solo.TINY)
    batch = make_batch()
    with torch.no_grad():
        outputs = model(batch.images)
    fast = model.targets(outputs, batch)
    reference = solo_targets_reference(model, outputs, batch)
    for field in ("cate_labels", "ins_ind", "gt_inds", "ins_masks", "pos_inds"):
        for a, b in zip(getattr(fast, field), getattr(reference, field)):
            assert a.dtype == b.dtype and torch.equal(a, b), field
    assert torch.equal(fast.num_pos, reference.num_pos) and int(fast.num_pos) > 0
    for a, b in zip(fast.per_image, reference.per_image):
        assert_same_image_targets(a, b)


# ---- SOLO predict --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def solo_outputs():
    torch.manual_seed(0)
    model = build_solo(replace(test_solo.TINY, test_cfg=test_solo.LOW_THRESHOLDS)).eval()
    with torch.no_grad():
        outputs = model(torch.rand(3, 3, 128, 160))
    return model, outputs


LOW = test_solo.LOW_THRESHOLDS


@pytest.mark.parametrize(
    "test_cfg",
    [
        LOW,  # 100 detections per image (max_per_img)
        replace(LOW, update_thr=5e-5),  # a few survive Matrix NMS
        replace(LOW, nms_pre=7, max_per_img=3),
        # mask_thr just above the prior: some masks are too small for their level's stride, so
        # the fast form's candidates parked at score -inf do go through Matrix NMS (nms_pre > K)
        replace(LOW, mask_thr=0.0100005),
        replace(LOW, mask_thr=0.0100005, kernel="linear"),
        SOLOTestConfig(),  # nothing above score_thr = 0.1
    ],
)
def test_solo_predict_equals_the_per_image_reference(solo_outputs, test_cfg):
    trained, outputs = solo_outputs
    model = build_solo(replace(test_solo.TINY, test_cfg=test_cfg))
    model.load_state_dict(trained.state_dict())
    sizes = test_solo.PREDICT_SIZES
    got = model.predict(outputs, sizes)
    assert_same_detections(got, solo_predict_reference(model, outputs, sizes))
    counts = [len(d) for d in got]
    assert counts == [0, 0, 0] if test_cfg == SOLOTestConfig() else all(counts)


# ---- RetinaNet and YOLACT predict ----------------------------------------------------------------


@pytest.mark.parametrize(
    "test_cfg",
    [
        RetinaTestConfig(nms_pre=40, max_per_img=30),
        RetinaTestConfig(nms_pre=-1, score_thr=0.3, min_bbox_size=4.0),
        RetinaTestConfig(score_thr=0.99),  # nothing
    ],
)
def test_retinanet_predict_equals_the_per_level_reference(test_cfg):
    torch.manual_seed(0)
    model = build_retinanet(replace(test_retinanet.TINY, test_cfg=test_cfg))
    n = test_retinanet.N_64x96
    outputs = RetinaNetOutputs(
        torch.randn(2, n, 3) * 2 - 2, torch.randn(2, n, 4) * 0.3, test_retinanet.SIZES_64x96
    )
    sizes = [(64, 96), (41, 77)]  # the second has boxes outside its true size: flattened, dropped
    got = model.predict(outputs, sizes)
    assert_same_detections(got, retinanet_predict_reference(model, outputs, sizes))
    assert all(len(d) > 0 for d in got) == (test_cfg.score_thr < 0.99)


@pytest.mark.parametrize(
    "test_cfg",
    [
        YOLACTTestConfig(),  # max_per_img each
        YOLACTTestConfig(nms_pre=20, score_thr=0.5, iou_thr=0.3, top_k=15),
        YOLACTTestConfig(score_thr=0.999),  # nothing
    ],
)
def test_yolact_predict_equals_the_per_level_reference(test_cfg):
    torch.manual_seed(0)
    model = build_yolact(replace(test_yolact.TINY, test_cfg=test_cfg)).eval()
    with torch.no_grad():
        outputs = model(torch.rand(3, 3, 64, 96))
    outputs = outputs._replace(cls_logits=outputs.cls_logits + torch.randn_like(outputs.cls_logits))
    sizes = [(64, 96), (41, 77), (64, 50)]
    got = model.predict(outputs, sizes)
    assert_same_detections(got, yolact_predict_reference(model, outputs, sizes))
    assert all(len(d) > 0 for d in got) == (test_cfg.score_thr < 0.999)


# ---- RPN proposals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        ProposalConfig(nms_pre=100, max_per_img=60, nms=NMSConfig(0.7), min_bbox_size=2.0),
        ProposalConfig(nms_pre=1000, max_per_img=1000, nms=NMSConfig(0.5)),
    ],
)
def test_rpn_proposals_equal_the_per_image_per_level_reference(cfg):
    torch.manual_seed(11)
    model = build_mask_rcnn(test_mask_rcnn.CFG).eval()
    batch = test_mask_rcnn.make_batch(seed=11)
    with torch.no_grad():
        outputs = model(batch.images)
    # Random logits spread the scores, so NMS has plenty to suppress.
    outputs = outputs._replace(rpn_logits=torch.randn_like(outputs.rpn_logits) * 3)
    got = model.proposals(outputs, batch.image_sizes, cfg)
    expected = rpn_proposals_reference(model, outputs, batch.image_sizes, cfg)
    for b, (boxes, scores, levels) in enumerate(expected):
        n = len(boxes)
        assert 0 < n <= cfg.max_per_img
        assert int(got.valid[b].sum()) == n and not got.valid[b, n:].any()
        assert torch.equal(got.boxes[b, :n], boxes)
        assert torch.equal(got.scores[b, :n], scores)
        assert torch.equal(got.levels[b, :n], levels)
