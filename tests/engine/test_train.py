"""The training loop on a toy model (tests/engine/_engine_toy.py), independent of any detector."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch
from _engine_toy import ToyBoxModel, ToyDataset

from instseg_edu.data.transforms import collate
from instseg_edu.engine.checkpoint import load_checkpoint
from instseg_edu.engine.train import (
    History,
    NonFiniteLossError,
    TrainConfig,
    cpu_has_native_bf16,
    float32_for_one_wide_inputs,
    lr_at,
    make_loader,
    make_optimizer,
    train,
)


def _cfg(**kw):
    base = dict(max_steps=6, lr=0.05, optimizer="sgd", warmup_steps=2, warmup_ratio=0.1,
                milestones=(0.5,), progress=False, device="cpu", log_every=2, seed=3)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _loader(n=10, batch_size=4, seed=0):
    return make_loader(ToyDataset(n), batch_size=batch_size, shuffle=True, seed=seed)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return ToyBoxModel(**kw)


def test_loss_decreases():
    history = train(_model(), _loader(16), _cfg(max_steps=60, optimizer="adamw", lr=3e-3,
                                                 milestones=(0.9,)))  # fmt: skip
    _, losses = history.series("loss")
    assert len(losses) == 60
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.6 * first, (first, last)
    rec = history.steps[-1]
    assert {"step", "epoch", "lr", "img_s", "loss", "loss_box", "loss_aux", "num_pos"} <= set(rec)
    assert rec["loss"] == pytest.approx(rec["loss_box"] + rec["loss_aux"], rel=1e-5)
    assert rec["num_pos"] == 4.0 and rec["img_s"] > 0
    assert history.loss_keys() == ["loss", "loss_aux", "loss_box"]
    assert history.steps[-1]["epoch"] == 14  # 16 images / 4 per batch = 4 steps per epoch


class _SlowDataset(ToyDataset):
    """Every fourth item takes 0.2 s to load."""

    def __getitem__(self, i):
        if i % 4 == 3:
            time.sleep(0.2)
        return super().__getitem__(i)


def test_data_time_is_the_wait_for_each_batch():
    # Batches of one, in order: steps 4 and 8 wait 0.2 s for their image, the others do not.
    loader = make_loader(_SlowDataset(8), batch_size=1, shuffle=False, seed=0)
    history = train(_model(), loader, _cfg(max_steps=8, log_every=4))
    waits = [rec["data_time"] for rec in history.steps]
    assert all(w >= 0 for w in waits)
    assert waits[3] >= 0.19 and waits[7] >= 0.19, waits
    assert max(waits[:3] + waits[4:7]) < 0.1, waits


def test_resume_continues_identically(tmp_path):
    # 10 images, batches of 4 → 3 steps per epoch; the stop at step 4 is inside epoch 1, so the
    # resumed run must skip one batch of that epoch and restore momentum, RNG (dropout, flips).
    straight_model = _model()
    straight = train(straight_model, _loader(), _cfg())

    class StopAt:
        def on_step(self, state):
            if state.step == 4:
                state.request_stop()

    first = _model()
    part = train(first, _loader(), _cfg(checkpoint_dir=str(tmp_path)), callbacks=[StopAt()])
    assert part.stopped_early and len(part.steps) == 4
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["batch_in_epoch"] == 1

    resumed_model = _model(seed=123)  # different init: everything must come from the checkpoint
    resumed = train(resumed_model, _loader(), _cfg(checkpoint_dir=str(tmp_path)),
                    resume=tmp_path / "last.pt")  # fmt: skip
    assert [s["step"] for s in resumed.steps] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight.steps, resumed.steps):
        for key in ("loss", "loss_box", "loss_aux", "lr", "epoch"):
            assert a[key] == b[key], (a["step"], key)
    for (name, p), q in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().values()
    ):
        assert torch.equal(p, q), name


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _model(nan_at_call=5)
    cfg = _cfg(max_steps=8, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"'loss_box' is nan at step 5") as info:
        train(model, _loader(), cfg)
    err = info.value
    assert err.term == "loss_box" and err.step == 5 and math.isnan(err.value)
    assert len(err.history.steps) == 4
    assert err.checkpoint == str(tmp_path / "last.pt")
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # On the CPU the guard runs before the update: the model in memory is still good too.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_callbacks_hooks_and_stop():
    calls = []

    class Recorder:
        def on_start(self, state):
            calls.append(("start", state.step))

        def on_step(self, state):
            calls.append(("step", state.step))
            assert set(state.losses) == {"loss", "loss_box", "loss_aux"}
            assert all(isinstance(v, float) for v in state.losses.values())
            assert state.batch is not None and state.outputs.boxes.shape == (len(state.batch), 4)
            assert len(state.history.steps) == state.step  # reading history syncs it
            if state.step == 5:
                state.request_stop()

        def on_eval(self, state):
            calls.append(("eval", state.step, state.metrics["score"]))

        def on_epoch(self, state):
            calls.append(("epoch", state.step))

        def on_end(self, state):
            calls.append(("end", state.step))

    plain_calls = []
    history = train(
        _model(), _loader(), _cfg(max_steps=20, eval_every=2),
        callbacks=[Recorder(), plain_calls.append],
        evaluate_fn=lambda model: {"score": float(model.training)},
    )  # fmt: skip
    assert calls == [
        ("start", 0), ("step", 1), ("step", 2), ("eval", 2, 0.0), ("step", 3), ("epoch", 3),
        ("step", 4), ("eval", 4, 0.0), ("step", 5), ("eval", 5, 0.0), ("end", 5),
    ]  # fmt: skip
    assert len(plain_calls) == 5  # a plain function is an on_step hook
    assert history.stopped_early and not history.interrupted
    assert [e["step"] for e in history.evals] == [2, 4, 5]  # plus a final evaluation


def test_keyboard_interrupt_returns_a_usable_history(caplog):
    def interrupt(state):
        if state.step == 2:
            raise KeyboardInterrupt

    model = _model()
    history = train(model, _loader(), _cfg(max_steps=10), callbacks=[interrupt])
    assert history.interrupted
    assert [s["step"] for s in history.steps] == [1, 2]
    assert "interrupted at step 2" in caplog.text
    with torch.no_grad():  # the model still predicts
        images = torch.rand(1, 3, 32, 32)
        assert model.predict(model(images), [(32, 32)])[0].boxes.shape == (1, 4)


def test_history_is_plain_data(tmp_path):
    history = train(_model(), _loader(), _cfg(max_steps=3),
                    evaluate_fn=lambda m: {"bbox": {"AP": torch.tensor(0.5)}})  # fmt: skip
    d = history.to_dict()
    text = json.dumps(d)
    again = History.from_dict(json.loads(text))
    assert again.steps == history.steps
    # 3 steps = one epoch of 10 images in batches of 4; the final evaluation runs after it
    assert again.evals == [{"step": 3, "epoch": 1, "metrics": {"bbox": {"AP": 0.5}}}]
    assert again.config["max_steps"] == 3
    history.save_json(tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text()) == d


def test_lr_schedule_goldens():
    cfg = TrainConfig(max_steps=1000, lr=0.01, warmup_steps=500, warmup_ratio=0.001,
                      milestones=(0.5, 0.9), gamma=0.1)  # fmt: skip
    assert lr_at(0, cfg, 1000) == pytest.approx(1e-5)
    assert lr_at(250, cfg, 1000) == pytest.approx(0.01 * (0.001 + 0.999 * 0.5))
    assert lr_at(499, cfg, 1000) < 0.01
    assert lr_at(500, cfg, 1000) == pytest.approx(0.001)  # warm-up ended exactly at milestone 1
    assert lr_at(899, cfg, 1000) == pytest.approx(0.001)
    assert lr_at(900, cfg, 1000) == pytest.approx(0.0001)
    cos = TrainConfig(max_steps=100, lr=1.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cos, 100) == pytest.approx(1.0)
    assert lr_at(50, cos, 100) == pytest.approx(0.55)
    assert lr_at(100, cos, 100) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"max_steps": None}, "epochs"),
        ({"max_steps": 0}, "max_steps"),
        ({"lr": 0.0}, "lr"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"schedule": "poly"}, "schedule"),
        ({"milestones": (0.9, 0.5)}, "milestones"),
        ({"milestones": (8, 11)}, "milestones"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"warmup_ratio": 0.0}, "warmup_ratio"),
        ({"log_every": 0}, "log_every"),
        ({"device": "gpu7"}, "device"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{"max_steps": 10, **kw})


def test_make_loader_order_is_seeded():
    def order(seed):
        return [int(t.image_id) for b in _loader(10, 4, seed) for t in b.targets]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(1, 11))
    loader = make_loader(ToyDataset(4), batch_size=2, shuffle=False, collate_fn=collate)
    assert loader.pin_memory == torch.cuda.is_available()


def test_grad_clip_and_epochs():
    history = train(_model(), _loader(8), _cfg(max_steps=None, epochs=2, grad_clip=0.01,
                                                optimizer="adamw"))  # fmt: skip
    assert len(history.steps) == 4  # 2 epochs x 2 batches
    assert all("grad_norm" in s and s["grad_norm"] > 0 for s in history.steps)


class _FakeClock:
    """``time`` for the training loop: it stands still but for ``advance``."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float):
        self.now += seconds


def test_history_summary_golden():
    steps = [{"step": i + 1, "loss": float(v)} for i, v in enumerate([4, 2, 3, 1, 1, 0.5])]
    history = History(steps=steps, train_seconds=12.4, out_of_time=True)
    assert history.summary(window=2) == ("6 steps in 12 s; loss 3 (mean of the first 2 steps) "
                                         "-> 0.75 (the last 2); ended by the time limit "
                                         "(max_seconds)")  # fmt: skip
    # the window is at most half the steps, so the two means never share a step
    assert "mean of the first 3 steps) -> 0.833 (the last 3)" in history.summary()
    assert History().summary() == "0 steps in 0 s"
    assert History(steps=steps[:1], interrupted=True).summary().endswith("; interrupted")
    assert History(steps=steps, stopped_early=True).summary().endswith("early by a callback")


def test_max_seconds_ends_on_time_with_the_schedule_following_the_clock(monkeypatch, tmp_path):
    from instseg_edu.engine import train as train_module

    clock = _FakeClock()
    monkeypatch.setattr(train_module, "time", clock)
    every_step_takes_10_s = lambda state: clock.advance(10.0)  # noqa: E731

    def evaluate_for_100_s(model):  # evaluations do not count against the budget
        clock.advance(100.0)
        return {"bbox": {"AP": 0.0}}

    # Planned 50 steps in 60 s, but a step takes 10 s: the clock ends the run after 6 steps, and
    # the cosine is at t = 10 k / 60 for step k (the steps alone would say k / 50).
    cfg = _cfg(max_steps=50, max_seconds=60.0, schedule="cosine", warmup_steps=0, lr=0.1,
               eval_every=2, checkpoint_dir=str(tmp_path), checkpoint_every=2)  # fmt: skip
    seen = []  # what callbacks read: the training time when the step's callbacks start
    record = lambda state: seen.append(state.train_seconds)  # noqa: E731
    history = train(_model(), _loader(40), cfg, callbacks=[record, every_step_takes_10_s],
                    evaluate_fn=evaluate_for_100_s)  # fmt: skip
    assert seen == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    assert len(history.steps) == 6 and history.out_of_time and not history.stopped_early
    assert history.train_seconds == 60.0 and len(history.evals) == 3
    expected = [0.05 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert [s["lr"] for s in history.steps] == pytest.approx(expected)
    assert [lr_at(k, cfg, 50, 10.0 * k) for k in range(6)] == pytest.approx(expected)
    assert load_checkpoint(tmp_path / "last.pt")["history"]["train_seconds"] == 60.0

    # The progress bar of a run the clock ended ends full, saying why (not at 6 of 50 steps).
    import tqdm.auto

    bars = []

    class RecordedBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordedBar)
    with_bar = dataclasses.replace(cfg, checkpoint_dir=None, eval_every=None, progress=True)
    train(_model(), _loader(40), with_bar, callbacks=[every_step_takes_10_s])
    assert (bars[0].n, bars[0].total) == (6, 6) and "time limit" in bars[0].desc
    assert bars[0].mininterval == 30.0  # stderr is no terminal here: a line per half-minute

    # A machine faster than planned: the steps end it, the schedule at the larger fraction.
    fast = _cfg(max_steps=4, max_seconds=60.0, schedule="cosine", warmup_steps=0, lr=0.1)
    history = train(_model(), _loader(40), fast, callbacks=[every_step_takes_10_s])
    assert len(history.steps) == 4 and not history.out_of_time
    expected = [0.05 * (1 + math.cos(math.pi * max(k / 4, k / 6))) for k in range(4)]
    assert [s["lr"] for s in history.steps] == pytest.approx(expected)
    assert history.train_seconds == 40.0
    # Step decay: a milestone passes at the step fraction or the time fraction, whichever first.
    steps = _cfg(max_steps=100, max_seconds=60.0, warmup_steps=0, lr=1.0, milestones=(0.5,))
    assert lr_at(49, steps, 100, 29.0) == 1.0 and lr_at(50, steps, 100, 0.0) == 0.1
    assert lr_at(10, steps, 100, 30.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="max_seconds"):
        _cfg(max_seconds=0.0)


def test_resume_keeps_the_time_used(monkeypatch, tmp_path):
    """Stopped at step 3 of a 60 s budget after 30 s, a resumed run has 30 s left, and its rates
    are those of the run that was not stopped."""
    from instseg_edu.engine import train as train_module

    clock = _FakeClock()
    monkeypatch.setattr(train_module, "time", clock)
    tick = lambda state: clock.advance(10.0)  # noqa: E731
    cfg = _cfg(max_steps=50, max_seconds=60.0, schedule="cosine", warmup_steps=0,
               checkpoint_dir=str(tmp_path))  # fmt: skip
    straight = train(_model(), _loader(40), cfg, callbacks=[tick])

    def stop_at_3(state):
        tick(state)
        if state.step == 3:
            state.request_stop()

    clock.now = 1000.0  # the clock's origin does not matter
    part = train(_model(), _loader(40), cfg, callbacks=[stop_at_3])
    assert part.stopped_early and not part.out_of_time and part.train_seconds == 30.0
    clock.advance(5000.0)  # time between the two runs does not count
    resumed = train(_model(seed=7), _loader(40), cfg, callbacks=[tick],
                    resume=tmp_path / "last.pt")  # fmt: skip
    assert len(resumed.steps) == 6 and resumed.out_of_time and resumed.train_seconds == 60.0
    assert [s["lr"] for s in resumed.steps] == [s["lr"] for s in straight.steps]
    # A budget already used up trains no more steps.
    again = train(_model(), _loader(40), cfg, resume=tmp_path / "last.pt")
    assert len(again.steps) == 6


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_equals_the_per_tensor_update(name):
    # make_optimizer uses the fused kernel; PyTorch's per-tensor loop (foreach=False) is the
    # readable reference. Five steps with decay and momentum agree to float rounding.
    cfg = _cfg(optimizer=name, lr=0.05, weight_decay=0.05)
    fast, slow = _model(1), _model(1)
    before = [p.detach().clone() for p in fast.parameters()]
    fused = make_optimizer(fast, cfg)
    assert fused.defaults["fused"] is True
    options = dict(lr=0.05, weight_decay=0.05, foreach=False)
    if name == "sgd":
        loop = torch.optim.SGD(slow.parameters(), momentum=cfg.momentum, **options)
    else:
        loop = torch.optim.AdamW(slow.parameters(), betas=cfg.betas, **options)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b, start in zip(fast.parameters(), slow.parameters(), before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, start)  # the steps did move it


def test_lr_mult_scales_the_rate_of_the_parameters_it_names(tmp_path):
    """MMDetection's ``custom_keys`` ``lr_mult``: the longest key in a parameter's name decides;
    SGD without momentum or decay moves each parameter by exactly ``rate x mult x gradient``."""
    cfg = _cfg(lr_mult={"head": 0.2, "head.1.bias": 3.0}, optimizer="sgd", momentum=0.0,
               weight_decay=0.0, max_steps=1, warmup_steps=0)  # fmt: skip
    model = _model(dropout=0.0)
    groups = make_optimizer(model, cfg).param_groups
    sizes = sorted((g["lr_mult"], len(g["params"])) for g in groups)
    assert sizes == [(0.2, 1), (1.0, 4), (3.0, 1)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: grads.__setitem__(n, g.clone()))
    history = train(model, _loader(4), cfg)
    rate = history.steps[0]["lr"]
    assert rate == pytest.approx(0.05)  # the schedule's rate is what the history logs
    for n, p in model.named_parameters():
        mult = {"head.1.weight": 0.2, "head.1.bias": 3.0}.get(n, 1.0)
        torch.testing.assert_close(before[n] - p.detach(), rate * mult * grads[n])
    with pytest.raises(ValueError, match=r"no trainable parameter name contains \['bbox_head'\]"):
        make_optimizer(model, _cfg(lr_mult={"bbox_head": 0.2}))
    with pytest.raises(ValueError, match="multipliers > 0"):
        _cfg(lr_mult={"head": 0.0})
    # It travels with the checkpoint's config, and a resumed run keeps its groups.
    cfg = _cfg(lr_mult={"head": 0.2}, checkpoint_dir=str(tmp_path), max_steps=2)
    train(_model(), _loader(8), cfg)
    assert load_checkpoint(tmp_path / "last.pt")["config"]["lr_mult"] == {"head": 0.2}


class _AutocastProbe(ToyBoxModel):
    """Records, at each forward, whether CPU bf16 autocast is on and the images' memory format."""

    def __init__(self):
        super().__init__(dropout=0.0)
        self.seen = []

    def forward(self, images):
        cl = images.is_contiguous(memory_format=torch.channels_last)
        self.seen.append((torch.is_autocast_enabled("cpu"), cl))
        return super().forward(images)


@pytest.mark.parametrize(("native_bf16", "cpu_amp", "amp", "bf16"), [
    (True, True, True, True),  # asked for, on a CPU with bf16 instructions: bf16 autocast
    (True, False, True, False),  # the default: float32 on the CPU
    (False, True, True, False),  # emulated bf16 would be slower: float32
    (True, True, False, False),  # amp=False: float32 wherever it runs
])  # fmt: skip
def test_cpu_precision_follows_the_cpu(monkeypatch, native_bf16, cpu_amp, amp, bf16):
    import instseg_edu.engine.train as engine_train

    monkeypatch.setattr(engine_train, "cpu_has_native_bf16", lambda: native_bf16)
    torch.manual_seed(0)
    model = _AutocastProbe()
    history = train(model, _loader(8), _cfg(max_steps=2, amp=amp, cpu_amp=cpu_amp))
    # Channels-last with bf16 (oneDNN's fastest bf16 layout), else NCHW; the weights float32,
    # and back in the default layout when training ends.
    assert model.seen == [(bf16, bf16), (bf16, bf16)]
    assert all(math.isfinite(s["loss"]) for s in history.steps)
    conv = model.features[0].weight
    assert conv.is_contiguous() and conv.dtype == torch.float32


def _strided_conv_grads(x, bf16, guarded):
    """Output dtype and weight gradient of a 3x3 stride-2 conv on ``x`` (autocast when bf16)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, stride=2, padding=1))
    handles = float32_for_one_wide_inputs(net) if guarded else []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = net(x)
        still_on = torch.is_autocast_enabled("cpu")
    y.float().square().sum().backward()
    for handle in handles:
        handle.remove()
    assert not net[0]._forward_pre_hooks and not net[0]._forward_hooks  # removed
    return y.dtype, net[0].weight.grad, still_on


@pytest.mark.parametrize("hw", [(1, 1), (5, 1), (1, 4)])
def test_one_wide_inputs_of_strided_convs_train_in_float32_under_cpu_autocast(hw):
    """oneDNN's bf16 weight gradient of a stride-2 3x3 conv on a one-pixel-wide input is wrong
    (errors up to 1e37: benchmarks/RESULTS.md, "bf16 on the CPU"); the guard runs that call in
    float32, so its gradient is float32's, and autocast is on again for what follows."""
    x = torch.randn(2, 64, *hw, generator=torch.Generator().manual_seed(1))
    dtype, grad, still_on = _strided_conv_grads(x, bf16=True, guarded=True)
    _, reference, _ = _strided_conv_grads(x, bf16=False, guarded=False)
    assert dtype == torch.float32 and still_on
    torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


def test_the_float32_guard_leaves_other_convs_in_bf16():
    x = torch.randn(2, 64, 6, 6)
    dtype, grad, still_on = _strided_conv_grads(x, bf16=True, guarded=True)
    assert dtype == torch.bfloat16 and still_on  # two or more pixels wide: autocast's bf16
    _, reference, _ = _strided_conv_grads(x, bf16=False, guarded=False)
    assert (grad - reference).abs().max() <= 0.05 * reference.abs().max()  # bf16's rounding
    dtype, _, _ = _strided_conv_grads(torch.randn(2, 64, 3, 1), bf16=False, guarded=True)
    assert dtype == torch.float32  # without autocast the hooks do nothing
    torch.manual_seed(0)
    stride_1 = torch.nn.Conv2d(64, 64, 3, padding=1)
    downsample = torch.nn.Conv2d(64, 64, 1, stride=2)
    assert float32_for_one_wide_inputs(torch.nn.Sequential(stride_1, downsample)) == []


def test_the_float32_guard_turns_autocast_back_on_when_the_forward_raises():
    conv = torch.nn.Conv2d(64, 64, 3, stride=2, padding=1)
    float32_for_one_wide_inputs(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            conv(torch.randn(2, 3, 4, 1))  # 3 channels, not 64
        assert torch.is_autocast_enabled("cpu")


class _OneWide(ToyBoxModel):
    """The toy model with a last strided conv whose input is one pixel wide."""

    def __init__(self):
        super().__init__(dropout=0.0)
        self.narrow = torch.nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.guarded = []

    def forward(self, images):
        self.guarded.append(bool(self.narrow._forward_pre_hooks))
        x = self.narrow(images[..., :1])  # [B, 3, H, 1]
        return super().forward(images + 0 * x.float().mean())


@pytest.mark.parametrize(("native_bf16", "guarded"), [(True, True), (False, False)])
def test_train_guards_one_wide_convs_in_cpu_bf16_only(monkeypatch, native_bf16, guarded):
    import instseg_edu.engine.train as engine_train

    monkeypatch.setattr(engine_train, "cpu_has_native_bf16", lambda: native_bf16)
    torch.manual_seed(0)
    model = _OneWide()
    history = train(model, _loader(8), _cfg(max_steps=2, cpu_amp=True))
    assert model.guarded == [guarded, guarded]
    assert not model.narrow._forward_pre_hooks and not model.narrow._forward_hooks
    assert all(math.isfinite(s["loss"]) for s in history.steps)


def test_cpu_has_native_bf16_asks_torch():
    # The check reads two of torch.cpu's feature tests; were torch to rename them, every CPU
    # would silently train in float32.
    assert callable(torch.cpu._is_avx512_bf16_supported)
    assert callable(torch.cpu._is_amx_tile_supported)
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() is bool(expected)


@pytest.mark.gpu
def test_cuda_bf16_channels_last_and_deferred_sync():
    model = _model()
    history = train(model, _loader(16), _cfg(max_steps=12, device="cuda", log_every=5))
    assert len(history.steps) == 12 and all(math.isfinite(s["loss"]) for s in history.steps)
    assert next(model.parameters()).device.type == "cuda"
    with pytest.raises(NonFiniteLossError):
        train(_model(nan_at_call=3), _loader(16), _cfg(max_steps=12, device="cuda", log_every=5))


def test_step_log_defers_syncs_and_finds_the_first_bad_step():
    # The CUDA path keeps a window of steps on the device; flushing it must append the good
    # steps, then name the first non-finite term and its step.
    from instseg_edu.engine.train import _StepLog

    history, shown = History(), []
    log = _StepLog(history, shown.append)
    for step, box in [(1, 1.0), (2, float("inf")), (3, float("nan"))]:
        losses = {"loss_box": torch.tensor(box), "loss_cls": torch.tensor(0.5), "num_pos": 3}
        log.add({"step": step, "epoch": 0, "lr": 0.1}, losses, losses["loss_box"] + 0.5, 2)
    assert history.steps == [] and shown == []  # nothing synced yet
    log.checkpoint = "ckpt/last.pt"
    with pytest.raises(NonFiniteLossError, match="'loss_box' is inf at step 2") as info:
        log.flush()
    assert info.value.checkpoint == "ckpt/last.pt"
    assert [s["step"] for s in history.steps] == [1]
    assert history.steps[0]["loss"] == 1.5 and history.steps[0]["num_pos"] == 3.0
