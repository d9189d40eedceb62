"""What matters on a GPU, checked on the CPU for every family: the training recipe (bf16 autocast
and channels_last) and how often a training step makes the host wait for the device.

The training loop uses both only on CUDA, which CI does not have. Autocast behaves the same way on
the CPU (the same ops run in bf16, the same ones stay in float32), so dtype mismatches (a bf16
value written into a float32 buffer, bf16 RoI coordinates, a bf16 mask pasted with float32 boxes)
show up here too. Each family: one training step in fp32 and one under the recipe from the same
weights, the losses close, the gradients finite; then predict under autocast returns float32
boxes and scores and bool masks.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import test_mask_rcnn
import test_retinanet
import test_solo
import test_yolact
import torch

from instseg_edu.engine.host_sync import count_host_syncs
from instseg_edu.models.mask_rcnn import build_mask_rcnn
from instseg_edu.models.retinanet import build_retinanet
from instseg_edu.models.solo import build_solo
from instseg_edu.models.yolact import build_yolact

# family: (build, tiny config, batch, loss terms whose targets do not depend on the predictions)
FAMILIES = {
    "retinanet": (
        build_retinanet,
        test_retinanet.TINY,
        test_retinanet._rectangles_batch,
        ("loss_cls", "loss_bbox"),
    ),
    # Proposals come from the RPN's (bf16) scores: the RoIs, and so the RoI losses, differ.
    "mask_rcnn": (
        build_mask_rcnn,
        test_mask_rcnn.CFG,
        test_mask_rcnn.make_batch,
        ("loss_rpn_cls", "loss_rpn_bbox"),
    ),
    "solo": (build_solo, test_solo.TINY, test_solo._shapes_batch, ("loss_ins", "loss_cate")),
    # OHEM picks negatives by their (bf16) loss: only the box loss has fixed targets.
    "yolact": (build_yolact, test_yolact.TINY, test_yolact._shapes_batch, ("loss_bbox",)),
}

LENIENT = {
    "retinanet": dict(score_thr=0.001),
    # Category and mask logits both start at prior 0.01: masks need a threshold below it.
    "solo": dict(score_thr=0.001, update_thr=1e-6, mask_thr=0.005),
}


def _step(model, images, batch):
    torch.manual_seed(1)  # the samplers draw the same numbers on both sides
    losses = model.loss(model(images), batch)
    total = sum(v for k, v in losses.items() if k.startswith("loss_"))
    total.backward()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_autocast_and_channels_last(family):
    build, cfg, make_batch, fixed_targets = FAMILIES[family]
    if family in LENIENT:  # an untrained model scores below the usual thresholds: lower them
        cfg = replace(cfg, test_cfg=replace(cfg.test_cfg, **LENIENT[family]))
    torch.manual_seed(0)
    fp32 = build(cfg)
    recipe = copy.deepcopy(fp32).to(memory_format=torch.channels_last)
    batch = make_batch()
    expected = _step(fp32, batch.images, batch)

    images = batch.images.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _step(recipe, images, batch)
    for key, value in losses.items():
        assert torch.isfinite(value).all(), (key, value)
    for key in fixed_targets:  # bf16 keeps 8 bits of mantissa: about 2-3 significant digits
        torch.testing.assert_close(losses[key].float(), expected[key], rtol=0.05, atol=1e-3)
    for name, p in recipe.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name

    recipe.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = recipe.predict(recipe(images), batch.image_sizes)
    assert len(detections) == len(batch)
    assert sum(len(d.boxes) for d in detections) > 0  # decoding and NMS did run
    for det, (h, w) in zip(detections, batch.image_sizes):
        assert det.boxes.dtype == det.scores.dtype == torch.float32
        assert det.labels.dtype == torch.int64
        if det.masks is not None:
            assert det.masks.dtype == torch.bool and det.masks.shape[1:] == (h, w)


# Host waits per training step (forward + targets + loss) for a batch of 2: SOLO reads its
# positive-channel counts once; Mask R-CNN runs one RPN NMS per image and reads three counts.
HOST_WAITS = {"retinanet": 0, "mask_rcnn": 2 + 3, "solo": 1, "yolact": 0}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_host_waits_of_a_training_step(family):
    build, cfg, make_batch, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = build(cfg)
    batch = make_batch()
    assert len(batch) == 2
    with count_host_syncs() as syncs:
        losses = model.loss(model(batch.images), batch)
    total = sum(v for k, v in losses.items() if k.startswith("loss_"))
    total.backward()
    assert syncs.count == HOST_WAITS[family], syncs.summary()
    assert torch.isfinite(total)
