"""TrainingDashboard, headless: a real (tiny, CPU) training run feeds it; its figure must equal the
loop's History, its controls must change what reaches the browser, and it must stay cheap."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from instseg_edu.widgets.dashboard import TrainingDashboard  # noqa: E402
from widget_messages import sent_messages, sent_traces  # noqa: E402

from instseg_edu.data.coco import CocoDataset  # noqa: E402
from instseg_edu.data.shapes import CLASSES, make_shapes_dataset  # noqa: E402
from instseg_edu.data.transforms import eval_transforms  # noqa: E402
from instseg_edu.engine.train import TrainConfig, make_loader, train  # noqa: E402
from instseg_edu.models.retinanet import RETINANET_R18_SMALL, build_retinanet  # noqa: E402
from instseg_edu.viz.training import detection_thumbnail, ema  # noqa: E402


def _train_with_dashboard(root, steps: int, thumbnails_every: int):
    """``steps`` CPU steps of the small RetinaNet on 64 px shapes images, the dashboard attached."""
    ann = make_shapes_dataset(root, 4, image_size=64)
    ds = CocoDataset(ann, root / "train", eval_transforms(64))
    loader = make_loader(ds, 2, seed=0)
    torch.manual_seed(0)
    cfg = RETINANET_R18_SMALL.with_num_classes(len(CLASSES))
    # predict keeps every candidate (score_thr 0), so the thumbnails always have boxes to filter
    model = build_retinanet(replace(cfg, test_cfg=replace(cfg.test_cfg, score_thr=0.0)))
    cfg = TrainConfig(max_steps=steps, device="cpu", progress=False, warmup_steps=2, log_every=2)
    dash = TrainingDashboard(
        thumbnails_every=thumbnails_every, num_thumbnails=3, class_names=CLASSES
    )
    start = time.perf_counter()
    history = train(model, loader, cfg, callbacks=[dash])
    wall = time.perf_counter() - start
    return dash, history, model, wall


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six steps with thumbnails every 3 steps: every feature fires in a short run."""
    return _train_with_dashboard(tmp_path_factory.mktemp("shapes"), 6, thumbnails_every=3)


def test_figure_equals_history(run):
    dash, history, _, _ = run
    for key in ("loss", "loss_cls", "loss_bbox", "lr", "img_s", "num_pos"):
        steps, values = history.series(key)
        assert dash.columns[key] == (list(steps), list(values)), key
        trace = next(t for t in dash.figure.data if t.name == key)
        np.testing.assert_allclose(np.asarray(trace.y, dtype=float), values, rtol=1e-6)
        assert list(trace.x) == list(steps)
    assert dash.columns["loss"][0] == [1, 2, 3, 4, 5, 6]


def test_smoothing_reaches_browser_as_ema_of_history(run):
    dash, history, _, _ = run
    msgs = sent_messages(dash.figure)
    dash.smoothing.value = 0.5
    _, values = history.series("loss_cls")
    expected = ema(values, 0.5)
    trace_index = next(i for i, t in enumerate(dash.figure.data) if t.name == "loss_cls")
    np.testing.assert_allclose(np.asarray(dash.figure.data[trace_index].y), expected)
    np.testing.assert_allclose(np.asarray(sent_traces(msgs)[trace_index]["y"]), expected)
    assert not np.allclose(expected, values)
    dash.smoothing.value = 0.0


def test_ema_golden():
    # s1 = 0.5·1 / (1 - 0.5) = 1;  s2 = (0.25 + 0.5·2) / (1 - 0.25) = 5/3
    np.testing.assert_allclose(ema([1.0, 2.0], 0.5), [1.0, 5 / 3])
    np.testing.assert_allclose(ema([3.0, 1.0], 0.0), [3.0, 1.0])


def test_thumbnails_show_model_predictions(run):
    dash, _, model, _ = run
    assert dash._last_thumb_step == 6
    shown, spare = dash.thumbnails.children[:2], dash.thumbnails.children[2]
    # Batches of 2 images: the third slot stays hidden rather than showing a broken image.
    assert [w.layout.display for w in dash.thumbnails.children] == [None, None, "none"]
    assert bytes(spare.value) == b""
    before = [bytes(w.value) for w in shown]
    assert all(len(b) > 100 and b[:4] == b"\x89PNG" for b in before)
    # An untrained model scores around prior_prob = 0.01: nothing above 0.3, everything above 0.
    dash.score_thr.value = 0.0
    after = [bytes(w.value) for w in shown]
    assert after != before
    image, boxes, scores, labels, gt = dash._thumb_data[0]
    assert len(boxes) > 0
    assert after[0] == detection_thumbnail(
        image,
        boxes,
        scores,
        labels,
        gt,
        size=dash.thumbnail_size,
        score_thr=0.0,
        class_names=CLASSES,
    )
    dash.score_thr.value = 0.3


def test_log_loss_toggles_axis(run):
    dash, _, _, _ = run
    msgs = sent_messages(dash.figure)
    dash.log_loss.value = False
    assert dash.figure.layout.yaxis.type == "linear"
    assert any(m.get("relayout_data", {}).get("yaxis.type") == "linear" for m in msgs)
    dash.log_loss.value = True


def test_overhead_is_small(tmp_path):
    # 24 CPU steps, a redraw at most every 0.5 s, thumbnails every 12 steps (the default is 50).
    # The 6-step run above is too short to measure: its one-off first draw (about 17 ms of
    # figure setup) and a thumbnail every 3 steps alone are about 5% of its second of training.
    dash, history, _, wall = _train_with_dashboard(tmp_path, 24, thumbnails_every=12)
    assert len(history.steps) == 24 and dash._last_thumb_step == 24
    assert dash.overhead_s < 0.05 * wall, (dash.overhead_s, wall)


class _FakeState:
    """Counts reads of ``history`` (each read syncs the GPU in the real loop)."""

    def __init__(self):
        self.step, self.epoch, self.total_steps = 0, 0, 100
        self.batch = self.outputs = self.model = None
        self.reads = 0
        self._rows = []

    @property
    def history(self):
        self.reads += 1
        return self

    @property
    def steps(self):
        return self._rows


def test_status_of_a_time_budget_gives_minutes_and_the_steps_as_a_bound():
    from types import SimpleNamespace

    dash = TrainingDashboard(thumbnails_every=0)
    state = _FakeState()
    dash.on_start(state)  # no budget: steps out of the total
    assert dash.status.value == "training: step 0 / 100"
    state.config = SimpleNamespace(max_seconds=270.0)
    dash.on_start(state)
    assert dash.status.value == "training: step 0, for 4.5 min"
    state.step, state.train_seconds = 40, 135.0
    state._rows.append({"step": 40, "loss": 0.5, "lr": 0.01})
    dash.on_end(state)
    assert dash.status.value.startswith("step <b>40</b> (at most 100) · 2.2 / 4.5 min · epoch 0")


def test_redraws_are_throttled():
    dash = TrainingDashboard(redraw_every=60.0, thumbnails_every=0)
    state = _FakeState()
    dash.on_start(state)
    for step in range(1, 101):
        state.step = step
        state._rows.append({"step": step, "loss": 1.0 / step, "lr": 0.01})
        dash.on_step(state)
    assert state.reads == 1 and dash.redraws == 1  # only the first step drew
    dash.on_end(state)
    assert dash.columns["loss"][0] == list(range(1, 101))
