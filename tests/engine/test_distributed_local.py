"""The data-parallel helpers in one process (no torchrun): what must not change without it, and
the errors a user meets when a torchrun-only piece is used outside torchrun."""

from __future__ import annotations

import pytest
import torch

from instseg_edu.cli import build_parser, main
from instseg_edu.engine import distributed
from instseg_edu.engine.train import make_loader, resolve_device, scaled_lr, train

TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}  # fmt: skip


def test_linear_scaling_rule():
    # MMDetection's RetinaNet: 0.01 for 16 images; 4 GPUs x 8 images = 32 -> 0.02; 2 x 2 -> 0.0025
    assert scaled_lr(0.01, 32, 16) == pytest.approx(0.02)
    assert scaled_lr(0.01, 4, 16) == pytest.approx(0.0025)
    with pytest.raises(ValueError, match="reference_batch_size=0"):
        scaled_lr(0.01, 4, 0)


def test_one_process_is_not_distributed(monkeypatch):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched_by_torchrun() and not distributed.is_distributed()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.claim_failure()  # one process: every failure is shown
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(3) == 3
    with distributed.process_group("cpu") as device:  # a no-op without torchrun
        assert device == torch.device("cpu") and not distributed.is_distributed()
    assert resolve_device("cpu") == torch.device("cpu")
    loader = make_loader(list(range(6)), 2, collate_fn=list)
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler)
    with pytest.raises(RuntimeError, match="RANK, LOCAL_RANK, WORLD_SIZE"):
        distributed.init_process_group("cpu")


def test_cli_options_and_commands_under_torchrun(monkeypatch, capsys):
    args = build_parser().parse_args(["train", "--scale-lr", "16", "--sync-bn"])
    assert args.scale_lr == 16 and args.sync_bn
    assert build_parser().parse_args(["train"]).scale_lr is None
    for key, value in TORCHRUN.items():  # as if started by torchrun
        monkeypatch.setenv(key, value)
    assert main(["predict", "--checkpoint", "x.pt", "image.png"]) == 2
    assert "runs in one process; start it without torchrun" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_world_of_one_process_trains_and_evaluates_as_without_one(device, monkeypatch, tmp_path):
    # The process-group code path (DDP, reduced loss divisors and logs, agreed stops, gathered
    # evaluation; on CUDA also NCCL, the device of LOCAL_RANK and SyncBatchNorm) in this very
    # process, with one member: it must change no number. Two processes: test_distributed.py.
    import _ddp_worker as worker

    ds, val = worker.dataset(tmp_path), worker.dataset(tmp_path, split="val")
    cfg = worker.config(device=device)

    def run(cfg):
        model = worker.build("retinanet", len(ds.classes), frozen_bn=False)
        history = train(model, make_loader(ds, worker.PER_PROCESS_BATCH, shuffle=False), cfg)
        return history, model.state_dict(), worker.evaluate(model, val)

    alone = run(cfg)
    env = {**TORCHRUN, "WORLD_SIZE": "1", "MASTER_PORT": str(distributed._free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with distributed.process_group(device) as own_device:
        assert distributed.is_distributed() and distributed.get_world_size() == 1
        grouped = run(worker.config(device=str(own_device), sync_bn=device == "cuda"))
    assert not distributed.is_distributed()  # the group is gone after the block
    exact = device == "cpu"  # cuDNN may pick other algorithms from one run to the next
    for one, other in zip(alone[0].steps, grouped[0].steps, strict=True):
        for key in ("loss", "loss_cls", "loss_bbox"):
            assert other[key] == pytest.approx(one[key], rel=1e-6 if exact else 1e-3), key
    for name, value in alone[1].items():
        torch.testing.assert_close(grouped[1][name], value, rtol=1e-5, atol=1e-6 if exact else 1e-4)
    if exact:
        assert grouped[2] == alone[2]
    else:
        assert grouped[2]["bbox"]["AR100"] == pytest.approx(alone[2]["bbox"]["AR100"], abs=0.05)


@pytest.mark.parametrize("family", ["retinanet", "mask_rcnn", "solo", "yolact"])
def test_every_loss_reaches_every_trainable_parameter(family, tmp_path):
    """DistributedDataParallel runs with ``find_unused_parameters=False``: every parameter must
    get a gradient on every step, also from a batch without masks or without any object (where
    a term with nothing to train adds its prediction times 0: same value, same graph)."""
    import dataclasses

    import _ddp_worker as worker

    from instseg_edu.data.transforms import collate
    from instseg_edu.structures import Batch

    ds = worker.dataset(tmp_path)
    full = collate([ds[i] for i in range(worker.PER_PROCESS_BATCH)])
    box_only = Batch(full.images, list(full.image_sizes), [
        dataclasses.replace(t, masks=torch.zeros_like(t.masks),
                            has_mask=torch.zeros_like(t.has_mask))
        for t in full.targets
    ])  # fmt: skip
    empty = Batch(full.images, list(full.image_sizes), [
        dataclasses.replace(t, boxes=t.boxes[:0], labels=t.labels[:0], masks=t.masks[:0],
                            has_mask=t.has_mask[:0])
        for t in full.targets
    ])  # fmt: skip
    model = worker.build(family, len(ds.classes))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, batch in (("objects", full), ("no masks", box_only), ("no objects", empty)):
        model.zero_grad(set_to_none=True)
        losses = model.loss(model(batch.images), batch)
        sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
        reached = {n for n, p in model.named_parameters() if p.grad is not None}
        assert trainable - reached == set(), (name, sorted(trainable - reached)[:4])
