"""count_host_syncs: each kind of synchronising operation is caught, harmless ones are not, and the
fast paths it guards (batched assignment, sampling, RetinaNet and YOLACT losses) have none."""

from __future__ import annotations

import pytest
import torch
import torchvision

from instseg_edu.engine.host_sync import count_host_syncs
from instseg_edu.ops.assign import max_iou_assign_batched
from instseg_edu.ops.sampling import random_sample_batched

x = torch.tensor([0.5, -1.0, 2.0, 0.0])
mask = x > 0


@pytest.mark.parametrize(
    "code, op",
    [
        (lambda: x.sum().item(), "aten._local_scalar_dense"),
        (lambda: float(x.max()), "aten._local_scalar_dense"),
        (lambda: bool((x > 1).any()), "aten._local_scalar_dense"),
        (lambda: x.nonzero(), "aten.nonzero"),
        (lambda: torch.where(mask), "aten.nonzero"),
        (lambda: x[mask], "aten.index"),
        (lambda: x.clone().__setitem__(mask, 0.0), "aten.index_put_"),
        (lambda: torch.masked_select(x, mask), "aten.masked_select"),
        (lambda: x.unique(), "aten._unique2"),
        (lambda: torch.bincount(mask.long()), "aten.bincount"),
        (lambda: torch.repeat_interleave(torch.tensor([1, 2])), "aten.repeat_interleave"),
        (lambda: x.tolist(), "Tensor.tolist"),
        (lambda: x.numpy(), "Tensor.numpy"),
        (lambda: x.cpu(), "Tensor.cpu"),
        (lambda: torch.histc(x, bins=4), "aten.histc"),
        (lambda: torch.tensor([[4, 6]], device=x.device), "torch.tensor"),
        (lambda: torch.as_tensor([1.0, 2.0], device=x.device), "torch.as_tensor"),
        (lambda: x[[2, 0]], "aten.lift_fresh"),  # the list is copied to x's device
        (lambda: x.reshape(2, 2)[:, [1, 0]], "aten.lift_fresh"),
        (lambda: x.clone().__setitem__([0, 3], 1.0), "aten.lift_fresh"),
        (
            lambda: torchvision.ops.nms(torch.tensor([[0.0, 0, 1, 1]]), torch.ones(1), 0.5),
            "torchvision.nms",
        ),
    ],
)
def test_each_synchronising_operation_is_recorded_once(code, op):
    with count_host_syncs() as syncs:
        code()
    assert [e.op for e in syncs.events] == [op], syncs.summary()
    # The innermost caller outside torch: this file, or torchvision's Python wrapper.
    assert syncs.events[0].where.startswith(("test_host_sync.py:", "torchvision/ops/boxes.py:"))


def test_operations_that_stay_on_the_device_are_not_recorded():
    idx = torch.tensor([2, 0])
    with count_host_syncs() as syncs:
        y = x * 2 + 1
        y = y[idx]  # integer indexing: the size is known
        y = torch.where(mask, x, 0.0)  # three-argument where: elementwise
        y = x.topk(2).values.sum() / mask.sum().clamp(min=1)  # 0-d tensors stay tensors
        y = torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([1, 2]), output_size=3)
        y = torch.histc(x, bins=4, min=-1, max=2)
        y = torch.argsort(~mask, stable=True)[:2]  # static-size selection of the positives
        y = x.new_zeros(3).index_put_((idx,), torch.ones(2))
        _ = y.shape, y.numel(), y.dtype  # metadata is on the host already
        y = torch.full((), 3.0, device=x.device)  # a fill kernel, no copy
        y = torch.as_tensor(x, device=x.device)  # already a tensor there
        y = torch.tensor([4, 6]).to(x.device, non_blocking=True)  # host tensor, async copy
        z = x.clone()
        z[1:3] = True  # a Python scalar into a slice: a fill
        y = x.reshape(2, 2).flip(1)[(0, 1)]  # a tuple of ints: basic indexing, no index tensor
        y = torch.tensor([1, 2])  # host data kept on the host: no copy
    assert syncs.count == 0, syncs.summary()


def test_summary_groups_by_operator_and_line_and_patches_are_undone():
    with count_host_syncs() as syncs:
        for _ in range(3):
            x.nonzero()
    assert syncs.count == 3
    ((op, where), n), *rest = syncs.by_location().most_common()
    assert (op, n, rest) == ("aten.nonzero", 3, [])
    assert "3 × aten.nonzero" in syncs.summary()
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # restored on exit
    with count_host_syncs() as none:
        pass
    assert none.summary() == "no host synchronisation"


def test_library_lines_are_named_inside_instseg_edu():
    from instseg_edu.engine import host_sync

    def fake_library_call():
        return x.nonzero()

    # A function whose code object claims to live in the package directory.
    code = fake_library_call.__code__.replace(co_filename=host_sync._PACKAGE_DIR + "/ops/fake.py")
    fake_library_call.__code__ = code
    with count_host_syncs() as syncs:
        fake_library_call()
    assert syncs.events[0].where.startswith("instseg_edu/ops/fake.py:")
    assert syncs.events[0].where.endswith("in fake_library_call")


def test_batched_assignment_and_sampling_have_no_host_sync():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 500, 2, generator=gen) * 200
    anchors = torch.cat([xy, xy + 10 + 40 * torch.rand(2, 500, 2, generator=gen)], -1)
    gxy = torch.rand(2, 4, 2, generator=gen) * 150
    gt = torch.cat([gxy, gxy + 20 + 30 * torch.rand(2, 4, 2, generator=gen)], -1)
    labels = torch.randint(0, 3, (2, 4), generator=gen)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    with count_host_syncs() as syncs:
        a = max_iou_assign_batched(
            anchors, gt, labels, valid, pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0
        )
        pos, neg = random_sample_batched(a, num=64, pos_fraction=0.25, generator=gen)
    assert syncs.count == 0, syncs.summary()
    assert pos.shape == neg.shape == (2, 500) and bool(pos.any())
