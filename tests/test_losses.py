import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from instseg_edu.losses import (
    binary_cross_entropy_with_logits,
    cross_entropy,
    dice_loss,
    global_avg_factor,
    l1_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_reference,
    smooth_l1_loss,
    weight_reduce_loss,
)


def test_focal_golden():
    # logit 0 -> p = 0.5, CE = log 2, modulating factor (1 - 0.5)^2 = 0.25
    logits = torch.zeros(1, 2)
    targets = torch.tensor([[1.0, 0.0]])
    pos = 0.25 * 0.25 * math.log(2)  # alpha_t = 0.25 for the positive
    neg = 0.75 * 0.25 * math.log(2)  # alpha_t = 0.75 for the negative
    out = sigmoid_focal_loss(logits, targets, reduction="none")
    torch.testing.assert_close(out, torch.tensor([[pos, neg]]))
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), torch.tensor(pos + neg))
    # an easy negative (p = sigmoid(-3) ~ 0.047) is down-weighted by p^2 ~ 0.0022 vs plain BCE
    easy = sigmoid_focal_loss(torch.tensor([-3.0]), torch.tensor([0.0]), alpha=-1, reduction="sum")
    p = torch.sigmoid(torch.tensor(-3.0))
    torch.testing.assert_close(easy, -(p**2) * torch.log(1 - p))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_focal_equals_torchvision(reduction, alpha, gamma):
    torch.manual_seed(0)
    logits = torch.randn(50, 7) * 3
    targets = F.one_hot(torch.randint(0, 8, (50,)), 8)[:, :7].float()
    ours = sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
    ref = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_focal_sign_flip_equals_eq5_term_by_term_with_gradients(alpha, gamma):
    # Logits up to +-60: both forms stay finite where sigmoid saturates in float32.
    torch.manual_seed(2)
    logits = torch.cat([torch.randn(200, 5) * 4, torch.tensor([[60.0, -60.0, 30.0, -30.0, 0.0]])])
    targets = (torch.rand(201, 5) > 0.7).float()
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    fast = sigmoid_focal_loss(x1, targets, alpha, gamma, reduction="none")
    ref = sigmoid_focal_loss_reference(x2, targets, alpha, gamma)
    torch.testing.assert_close(fast, ref)
    fast.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(x1.grad).all()
    torch.testing.assert_close(x1.grad, x2.grad)
    # int and bool one-hot targets give the same as float ones
    for other in (targets.long(), targets.bool()):
        torch.testing.assert_close(sigmoid_focal_loss(logits, other, alpha, gamma, "none"), ref)


def test_focal_avg_factor_and_weight():
    torch.manual_seed(1)
    logits, targets = torch.randn(10, 3), (torch.rand(10, 3) > 0.8).float()
    weight = (torch.rand(10, 1) > 0.3).float()  # broadcast over classes: drop some anchors
    elementwise = torchvision.ops.sigmoid_focal_loss(logits, targets)
    out = sigmoid_focal_loss(logits, targets, weight=weight, avg_factor=4.0)
    torch.testing.assert_close(out, (elementwise * weight).sum() / 4.0)
    out_t = sigmoid_focal_loss(logits, targets, weight=weight, avg_factor=torch.tensor(4.0))
    torch.testing.assert_close(out_t, out)


def test_smooth_l1_golden_and_torch():
    pred = torch.tensor([0.5, 2.0, -0.4, 0.0])
    target = torch.zeros(4)
    torch.testing.assert_close(
        smooth_l1_loss(pred, target, reduction="none"), torch.tensor([0.125, 1.5, 0.08, 0.0])
    )
    torch.testing.assert_close(
        smooth_l1_loss(pred, target, beta=0.5, reduction="none"),
        torch.tensor([0.25, 1.75, 0.16, 0.0]),
    )
    torch.testing.assert_close(
        smooth_l1_loss(pred, target, beta=0.0, reduction="sum"), torch.tensor(2.9)
    )
    x, y = torch.randn(30, 4), torch.randn(30, 4)
    for beta in (1.0, 1 / 9, 0.0):
        torch.testing.assert_close(smooth_l1_loss(x, y, beta), F.smooth_l1_loss(x, y, beta=beta))
    with pytest.raises(ValueError, match="beta"):
        smooth_l1_loss(x, y, beta=-1.0)


def test_l1_weight_avg_factor_golden():
    pred = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    target = torch.tensor([[0.0, 0.0], [1.0, 0.5]])
    weight = torch.tensor([[1.0], [0.5]])  # per box, broadcast over coordinates
    # |d| = [[1, 2], [2, 0]] -> weighted [[1, 2], [1, 0]]
    assert l1_loss(pred, target).item() == pytest.approx(5 / 4)
    assert l1_loss(pred, target, weight=weight, reduction="sum").item() == pytest.approx(4.0)
    assert l1_loss(pred, target, weight=weight).item() == pytest.approx(1.0)
    assert l1_loss(pred, target, weight=weight, avg_factor=2).item() == pytest.approx(2.0)
    torch.testing.assert_close(
        l1_loss(pred, target, weight=weight, reduction="none"),
        torch.tensor([[1.0, 2.0], [1.0, 0.0]]),
    )


def test_cross_entropy_golden():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([1, 0])
    ce0, ce1 = math.log(2), math.log(1 + math.exp(-2))
    torch.testing.assert_close(
        cross_entropy(logits, labels, reduction="none"), torch.tensor([ce0, ce1])
    )
    torch.testing.assert_close(cross_entropy(logits, labels), torch.tensor((ce0 + ce1) / 2))
    w = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(
        cross_entropy(logits, labels, weight=w, avg_factor=4), torch.tensor(2 * ce1 / 4)
    )


def test_bce_with_logits_golden_and_torch():
    logits = torch.tensor([0.0, 0.0])
    targets = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(
        binary_cross_entropy_with_logits(logits, targets), torch.tensor(math.log(2))
    )
    x, t = torch.randn(4, 28, 28), (torch.rand(4, 28, 28) > 0.5).float()
    torch.testing.assert_close(
        binary_cross_entropy_with_logits(x, t), F.binary_cross_entropy_with_logits(x, t)
    )
    w = torch.rand(4, 1, 1)
    torch.testing.assert_close(
        binary_cross_entropy_with_logits(x, t, weight=w, reduction="sum"),
        F.binary_cross_entropy_with_logits(x, t, weight=w, reduction="sum"),
    )


def test_dice_golden():
    probs = torch.tensor(
        [[[1.0, 0.5], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]
    )
    targets = torch.tensor([[[1, 1], [0, 0]]] * 3, dtype=torch.bool)
    # 1: Σpt = 1.5, Σp² = 1.25, Σt² = 2 -> 1 - 3 / 3.252
    # 2: perfect -> 1 - 4 / 4.002;  3: disjoint -> 1
    expected = torch.tensor([1 - 3 / 3.252, 1 - 4 / 4.002, 1.0])
    out = dice_loss(probs, targets)
    assert out.shape == (3,)
    torch.testing.assert_close(out, expected)
    # empty prediction and empty target: 1 - 0 / 0.002 = 1 (eps keeps it finite)
    torch.testing.assert_close(dice_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)), torch.ones(1))
    with pytest.raises(ValueError, match="same shape"):
        dice_loss(probs, targets[:, :1])


def test_reduction_errors():
    with pytest.raises(ValueError, match="reduction"):
        l1_loss(torch.zeros(2), torch.zeros(2), reduction="avg")
    with pytest.raises(ValueError, match="avg_factor"):
        weight_reduce_loss(torch.zeros(2), "none", avg_factor=2.0)
    # zero avg_factor with zero loss gives 0, not NaN (MMDetection's eps)
    assert weight_reduce_loss(torch.zeros(3), "sum", avg_factor=0).item() == 0.0


def test_global_avg_factor_in_one_process_is_the_local_divisor():
    # No process group: the count itself, clamped and offset as one process would; same type, so
    # a host number stays a number and a device count stays a (0-d) tensor. With processes it is
    # (max(sum over processes, clamp_min) + offset) / world_size: tests/engine/test_distributed.py
    # checks that two processes then train exactly like one.
    assert global_avg_factor(5) == 5 and global_avg_factor(0, clamp_min=1) == 1
    assert global_avg_factor(3, offset=1) == 4 and isinstance(global_avg_factor(3), int)
    count = torch.tensor(0.0)
    assert global_avg_factor(count) is count  # unchanged, not copied
    torch.testing.assert_close(global_avg_factor(count, clamp_min=1.0), torch.tensor(1.0))
    solo = global_avg_factor(torch.tensor(7), offset=1)  # SOLO's num_pos + 1, int64 stays int64
    assert solo.dtype == torch.int64 and solo.item() == 8
