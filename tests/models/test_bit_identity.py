"""Bit-identity guard: the four families' losses and predictions on one fixed batch, compared with
numbers recorded from the code before a refactor.

A refactor that only moves code (a shared config, a reference function beside the fast form, a
renamed helper) must leave every number unchanged to the last bit. This test rebuilds each tiny
model from a fixed seed, runs one training-mode forward + ``loss`` and one eval-mode forward +
``predict`` on the batch of :func:`padded_batch`, and compares everything with
``tests/models/data/bit_identity.npz``.

The batch pads a 128×128 image into a 128×256 batch, so valid flags, padded masks and per-image
sizes all take part. Both true sizes are multiples of 128, the coarsest stride: there every
valid-flag rule in use (anchor centre inside the image, or cell index below
``ceil(size / stride)``) gives the same flags.

Exact equality holds on the platform that recorded the file (same torch version and CPU
instruction set): convolutions pick other kernels on other CPUs and round differently in the last
bit. Elsewhere the numbers are compared to within float32 rounding (``RELAXED``), with a warning
that names both platforms.

Re-record, only when a change is *meant* to alter the numbers (say why in the commit)::

    .venv/bin/python tests/models/test_bit_identity.py --record
"""

from __future__ import annotations

import platform
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import test_mask_rcnn
import test_retinanet
import test_solo
import test_yolact
import torch

from instseg_edu.models.mask_rcnn import build_mask_rcnn
from instseg_edu.models.retinanet import build_retinanet
from instseg_edu.models.solo import build_solo
from instseg_edu.models.yolact import build_yolact
from instseg_edu.structures import Batch, Target

FIXTURE = Path(__file__).with_name("data") / "bit_identity.npz"

# An untrained model scores below the usual thresholds: lower them so predict keeps detections,
# and keep few per image so the recorded masks stay small.
FAMILIES = {
    "retinanet": (
        build_retinanet,
        replace(
            test_retinanet.TINY,
            test_cfg=replace(test_retinanet.TINY.test_cfg, score_thr=0.0, max_per_img=8),
        ),
    ),
    "mask_rcnn": (
        build_mask_rcnn,
        replace(
            test_mask_rcnn.CFG,
            test_cfg=replace(
                test_mask_rcnn.CFG.test_cfg,
                rcnn=replace(test_mask_rcnn.CFG.test_cfg.rcnn, score_thr=0.0, max_per_img=8),
            ),
        ),
    ),
    # Category and mask probabilities start near the prior 0.01: score thresholds below it, the
    # mask threshold at it (so masks keep some shape).
    "solo": (
        build_solo,
        replace(
            test_solo.TINY,
            test_cfg=replace(
                test_solo.TINY.test_cfg,
                score_thr=0.001,
                update_thr=1e-6,
                mask_thr=0.01,
                max_per_img=8,
            ),
        ),
    ),
    "yolact": (
        build_yolact,
        replace(
            test_yolact.TINY,
            test_cfg=replace(test_yolact.TINY.test_cfg, score_thr=0.0, max_per_img=8),
        ),
    ),
}

# Only on another platform: float32 rounding of a few ulps through a network, and at most this
# fraction of mask pixels flipped at a threshold.
RELAXED = dict(rtol=1e-4, atol=1e-5)
RELAXED_MASK_PIXELS = 1e-3


def fingerprint() -> str:
    """What must match for bit-exact numbers: torch version, CPU instruction set, machine."""
    return f"{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{platform.machine()}"


def _object(hp: int, wp: int, kind: str, x1: int, y1: int, x2: int, y2: int):
    """A ``bool [hp, wp]`` mask of a rectangle, disc or right triangle inside ``(x1, y1, x2, y2)``,
    and its tight box (pixel edges, xyxy)."""
    ys, xs = torch.meshgrid(torch.arange(hp) + 0.5, torch.arange(wp) + 0.5, indexing="ij")
    inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    if kind == "disc":
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
        inside &= (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    elif kind == "triangle":
        inside &= (xs - x1) + (ys - y1) <= (x2 - x1)
    rows, cols = inside.any(1).nonzero()[:, 0], inside.any(0).nonzero()[:, 0]
    box = [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]
    return inside, box


def padded_batch() -> Batch:
    """Two images drawn without random numbers: a 128×256 one with four objects (the last one
    box-only) and a 128×128 one with two objects and a crowd region, padded into ``[2, 3, 128,
    256]``. Labels are 0 and 1 (the tiny YOLACT has two classes)."""
    hp, wp = 128, 256
    scenes = [
        (
            (128, 256),
            [
                ("rect", (20, 16, 90, 80), 0, True),
                ("disc", (130, 24, 210, 104), 1, True),
                ("triangle", (96, 88, 124, 116), 1, True),
                ("rect", (200, 96, 250, 126), 0, False),
            ],
            torch.zeros(0, 4),
        ),
        (
            (128, 128),
            [("disc", (20, 20, 60, 60), 1, True), ("rect", (60, 50, 120, 110), 0, True)],
            torch.tensor([[0.0, 90.0, 30.0, 128.0]]),
        ),
    ]
    colours = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.3, 0.9]])
    images = torch.zeros(2, 3, hp, wp)
    targets = []
    for i, ((h, w), objects, crowd) in enumerate(scenes):
        images[i, :, :h, :w] = 0.4
        masks, boxes, labels, has_mask = [], [], [], []
        for kind, corners, label, with_mask in objects:
            mask, box = _object(hp, wp, kind, *corners)
            images[i][:, mask] = colours[label][:, None]
            masks.append(mask if with_mask else torch.zeros_like(mask))
            boxes.append(box)
            labels.append(label)
            has_mask.append(with_mask)
        targets.append(
            Target(
                boxes=torch.tensor(boxes),
                labels=torch.tensor(labels),
                masks=torch.stack(masks),
                image_id=i + 1,
                ignore_boxes=crowd,
                has_mask=torch.tensor(has_mask),
            )
        )
    return Batch(images, [s[0] for s in scenes], targets)


def compute(family: str) -> dict[str, np.ndarray]:
    """The numbers of one family: every loss term, then each image's detections (masks packed
    to bits)."""
    build, cfg = FAMILIES[family]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order
    try:
        torch.manual_seed(0)
        model = build(cfg)
        batch = padded_batch()
        torch.manual_seed(1)  # the samplers' draws
        losses = model.loss(model(batch.images), batch)
        model.eval()
        with torch.no_grad():
            detections = model.predict(model(batch.images), batch.image_sizes)
    finally:
        torch.set_num_threads(threads)
    out = {f"loss/{k}": v.detach().numpy() for k, v in losses.items()}
    for i, det in enumerate(detections):
        out[f"det{i}/boxes"] = det.boxes.numpy()
        out[f"det{i}/scores"] = det.scores.numpy()
        out[f"det{i}/labels"] = det.labels.numpy()
        if det.masks is not None:
            out[f"det{i}/masks_shape"] = np.array(det.masks.shape)
            out[f"det{i}/masks_bits"] = np.packbits(det.masks.numpy().reshape(-1))
    return out


def record(path: Path = FIXTURE) -> None:
    arrays = {"fingerprint": np.array(fingerprint())}
    for family in FAMILIES:
        arrays.update({f"{family}/{k}": v for k, v in compute(family).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def in_recorded_order(actual: dict, expected: dict) -> dict:
    """``actual`` with each image's detections put in the recorded order. On another platform two
    detections whose scores differ by a rounding can leave the sort the other way round; each
    recorded detection takes the unused one nearest to it in box and score, so the comparison
    that follows is of values, not of the order of near-ties."""
    out = dict(actual)
    for key in [k for k in expected if k.endswith("/scores")]:
        image = key[: -len("scores")]
        got = np.concatenate([actual[image + "boxes"], actual[key][:, None]], axis=1)
        want = np.concatenate([expected[image + "boxes"], expected[key][:, None]], axis=1)
        if got.shape != want.shape:
            continue  # the comparison reports it
        # only near-ties may swap: the scores, in the order they came, are the recorded ones
        np.testing.assert_allclose(actual[key], expected[key], **RELAXED, err_msg=key)
        distance = np.abs(want[:, None] - got[None]).sum(-1)  # [recorded, actual]
        order, free = [], set(range(len(got)))
        for row in distance:
            nearest = min(free, key=lambda j: row[j])
            free.remove(nearest)
            order.append(nearest)
        for name in ("boxes", "scores", "labels"):
            out[image + name] = actual[image + name][order]
        if image + "masks_bits" in actual:
            shape = tuple(actual[image + "masks_shape"])
            bits = np.unpackbits(actual[image + "masks_bits"])[: int(np.prod(shape))]
            out[image + "masks_bits"] = np.packbits(bits.reshape(shape)[order].reshape(-1))
    return out


def _recorded(family: str) -> tuple[dict[str, np.ndarray], str]:
    with np.load(FIXTURE) as data:
        prefix = f"{family}/"
        arrays = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
        return arrays, str(data["fingerprint"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_losses_and_predictions_are_bit_identical_to_the_recording(family):
    expected, recorded_on = _recorded(family)
    assert expected, f"{FIXTURE.name} has no entry for {family}: re-record (see module docstring)"
    actual = compute(family)
    assert sorted(actual) == sorted(expected)
    exact = recorded_on == fingerprint()
    if not exact:
        warnings.warn(
            f"recorded on {recorded_on}, running on {fingerprint()}: compared to within float32 "
            "rounding, not bit for bit",
            stacklevel=1,
        )
        actual = in_recorded_order(actual, expected)
    for key, want in expected.items():
        got = actual[key]
        assert got.dtype == want.dtype and got.shape == want.shape, (key, got.shape, want.shape)
        if exact or want.dtype.kind in "biu" and not key.endswith("masks_bits"):
            np.testing.assert_array_equal(got, want, err_msg=key)
        elif key.endswith("masks_bits"):
            flipped = np.unpackbits(got ^ want).sum() / max(1, 8 * want.size)
            assert flipped <= RELAXED_MASK_PIXELS, (key, flipped, recorded_on, fingerprint())
        else:
            np.testing.assert_allclose(got, want, **RELAXED, err_msg=f"{key} ({recorded_on})")


def test_the_batch_keeps_true_sizes_at_multiples_of_the_coarsest_stride():
    # Away from the edge where valid-flag rules differ (see the module docstring).
    batch = padded_batch()
    assert tuple(batch.images.shape) == (2, 3, 128, 256)
    assert all(h % 128 == 0 and w % 128 == 0 for h, w in batch.image_sizes)
    assert batch.image_sizes[0] != batch.image_sizes[1]  # one image is padded


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(f"usage: python {Path(__file__).name} --record  (rewrites {FIXTURE.name})")
    record()
    print(f"recorded {FIXTURE} on {fingerprint()}")
