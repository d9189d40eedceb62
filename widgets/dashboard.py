"""TrainingDashboard: live curves and prediction thumbnails while a model trains.

Pass it to the training loop as a callback::

    dash = TrainingDashboard(class_names=dataset.classes)
    display(dash)
    train(model, loader, cfg, callbacks=[dash])

It draws every loss term, the learning rate, img/s and positives per image (the loss dict's
``num_pos`` statistic) from the loop's :class:`~instseg_edu.engine.train.History`, and every
``thumbnails_every`` steps the model's current predictions on the first images of the batch.

Cheap by design: ``on_step`` first compares the clock with the last redraw and returns at once
when less than ``redraw_every`` seconds have passed — before touching ``state.losses`` or
``state.history``, whose first read syncs pending values from the GPU. ``overhead_s`` adds up the
time spent inside the callbacks, so a run can report what the dashboard cost.

Taught in ``notebooks/04_retinanet.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import ipywidgets as W
import plotly.graph_objects as go
import torch
from instseg_edu.widgets.controls import slider

from instseg_edu.viz.training import (
    detection_thumbnail,
    ema,
    history_columns,
    panel_of,
    series_trace,
    training_figure,
)

__all__ = ["TrainingDashboard"]


class TrainingDashboard:
    """A training-loop callback that draws the run as it goes.

    Args:
        redraw_every: at most one redraw per this many seconds (initial value of the control).
        thumbnails_every: steps between prediction thumbnails (0 disables them).
        num_thumbnails: images of the batch shown.
        score_thr: predictions above this score are drawn on the thumbnails.
        class_names: label names for the thumbnails.
        smoothing: EMA smoothing of the loss curves (0: raw).
        log_loss: log-scale loss axis.

    Attributes (controls): ``redraw_every``, ``smoothing``, ``log_loss``, ``score_thr``,
    ``thumbnails_every``. ``figure`` is the ``FigureWidget``, ``thumbnails`` the row of
    ``ipywidgets.Image``, ``status`` an HTML line, ``widget`` the container. ``columns`` holds
    ``{key: (steps, values)}`` of everything drawn so far; ``overhead_s`` the time spent in
    callbacks; ``redraws`` how many redraws happened.
    """

    def __init__(
        self,
        *,
        redraw_every: float = 0.5,
        thumbnails_every: int = 50,
        num_thumbnails: int = 3,
        score_thr: float = 0.3,
        class_names: Sequence[str] | None = None,
        smoothing: float = 0.0,
        log_loss: bool = True,
        thumbnail_size: int = 192,
    ) -> None:
        self.class_names = class_names
        self.thumbnail_size = thumbnail_size
        style = {"description_width": "110px"}
        self.redraw_every = slider("redraw every (s)", redraw_every, 0.0, 5.0, 0.1, width=None)
        self.smoothing = slider("smoothing", smoothing, 0.0, 0.99, 0.01, width=None)
        self.log_loss = W.Checkbox(value=log_loss, description="log-scale losses")
        self.score_thr = slider("score_thr", score_thr, 0.0, 1.0, 0.05, width=None)
        self.thumbnails_every = W.IntText(
            value=thumbnails_every,
            description="thumbnails every",
            style=style,
            layout=W.Layout(width="220px"),
        )
        self.status = W.HTML("waiting for the first step…")
        self.figure = go.FigureWidget(training_figure(log_loss=log_loss))
        self.thumbnails = W.HBox(
            [
                W.Image(format="png", layout=W.Layout(width=f"{thumbnail_size}px", display="none"))
                for _ in range(num_thumbnails)
            ]
        )
        self.widget = W.VBox(
            [
                W.HBox([self.redraw_every, self.smoothing, self.log_loss]),
                W.HBox([self.score_thr, self.thumbnails_every]),
                self.status,
                self.figure,
                self.thumbnails,
            ]
        )
        self.widget.add_class("instseg-training-dashboard")
        self.smoothing.observe(lambda _: self.redraw(), names="value")
        self.log_loss.observe(self._on_log_loss, names="value")
        self.score_thr.observe(lambda _: self._draw_thumbnails(), names="value")
        self.reset()

    # ---- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the run drawn so far (called by ``on_start``)."""
        self.columns: dict[str, tuple[list[int], list[float]]] = {}
        self._rows_seen = 0
        self._last_draw = -math.inf
        self._last_thumb_step = 0
        self._thumb_data: list[tuple] = []
        self.overhead_s = 0.0
        self.redraws = 0
        self._total_steps = None
        self._metrics = None
        with self.figure.batch_update():
            self.figure.data = ()

    def _ingest(self, rows: Sequence[dict]) -> None:
        """Append the history rows not seen yet to ``columns``."""
        new = history_columns(rows[self._rows_seen :])
        self._rows_seen = len(rows)
        for key, (steps, values) in new.items():
            old_steps, old_values = self.columns.setdefault(key, ([], []))
            old_steps.extend(steps)
            old_values.extend(values)

    def redraw(self) -> None:
        """Push ``columns`` into the figure (one batched message)."""
        names = [t.name for t in self.figure.data]
        with self.figure.batch_update():
            for key in sorted(self.columns, key=lambda k: (panel_of(k), k)):
                steps, values = self.columns[key]
                if panel_of(key) == 0:
                    values = ema(values, float(self.smoothing.value))
                if key in names:
                    trace = self.figure.data[names.index(key)]
                    trace.x, trace.y = steps, values
                else:
                    self.figure.add_trace(series_trace(key, steps, values))
        self.redraws += 1

    def _status_html(self, state) -> str:
        parts = [f"step <b>{state.step}</b>"]
        budget = self._budget_s(state)
        if budget:  # a time budget: the clock ends the run, the steps are only its bound
            seconds = getattr(state, "train_seconds", 0.0)
            parts[0] += f" (at most {self._total_steps})" if self._total_steps else ""
            parts.append(f"{seconds / 60:.1f} / {budget / 60:g} min")
        elif self._total_steps:
            parts[0] += f" / {self._total_steps}"
        parts.append(f"epoch {state.epoch}")
        for key in ("loss", "img_s", "num_pos", "lr"):
            if key in self.columns and self.columns[key][1]:
                v = self.columns[key][1][-1]
                parts.append(f"{key} {v:.3g}")
        if self._metrics:
            flat = {
                f"{k}/{kk}": vv
                for k, v in self._metrics.items()
                if isinstance(v, dict)
                for kk, vv in v.items()
                if kk in ("AP", "AP50")
            }
            parts += [f"{k} {v:.3f}" for k, v in flat.items()]
        return " · ".join(parts)

    @staticmethod
    def _budget_s(state) -> float | None:
        """The run's time budget in seconds (``TrainConfig.max_seconds``), or ``None``."""
        return getattr(getattr(state, "config", None), "max_seconds", None)

    def _refresh(self, state) -> None:
        self._ingest(state.history.steps)
        self.redraw()
        self.status.value = self._status_html(state)
        self._last_draw = time.perf_counter()

    # ---- thumbnails ----------------------------------------------------------------------------
    def _capture_thumbnails(self, state) -> None:
        batch, outputs, model = state.batch, state.outputs, state.model
        if batch is None or outputs is None or not hasattr(model, "predict"):
            return
        n = len(self.thumbnails.children)
        with torch.no_grad():
            dets = model.predict(outputs, batch.image_sizes)
        self._thumb_data = []
        for i in range(min(n, len(batch))):
            h, w = batch.image_sizes[i]
            d = dets[i]
            self._thumb_data.append(
                (batch.images[i, :, :h, :w], d.boxes, d.scores, d.labels, batch.targets[i].boxes)
            )
        self._last_thumb_step = state.step
        self._draw_thumbnails()

    def _draw_thumbnails(self) -> None:
        for i, image_widget in enumerate(self.thumbnails.children):
            # A batch smaller than the row leaves slots empty: hide them (an Image without a
            # value draws as a broken-image icon).
            image_widget.layout.display = None if i < len(self._thumb_data) else "none"
        for image_widget, (image, boxes, scores, labels, gt) in zip(
            self.thumbnails.children, self._thumb_data
        ):
            image_widget.value = detection_thumbnail(
                image,
                boxes,
                scores,
                labels,
                gt,
                size=self.thumbnail_size,
                score_thr=float(self.score_thr.value),
                class_names=self.class_names,
            )

    # ---- callbacks -----------------------------------------------------------------------------
    def on_start(self, state) -> None:
        start = time.perf_counter()
        self.reset()
        self._total_steps = getattr(state, "total_steps", None)
        budget = self._budget_s(state)
        self.status.value = (f"training: step 0, for {budget / 60:g} min" if budget
                             else f"training: step 0 / {self._total_steps}")  # fmt: skip
        self.overhead_s += time.perf_counter() - start

    def on_step(self, state) -> None:
        start = time.perf_counter()
        every = int(self.thumbnails_every.value)
        if every > 0 and state.step - self._last_thumb_step >= every:
            self._capture_thumbnails(state)
        # The clock check comes before any read of state.losses/history (which sync the GPU).
        if start - self._last_draw >= float(self.redraw_every.value):
            self._refresh(state)
        self.overhead_s += time.perf_counter() - start

    def on_eval(self, state) -> None:
        start = time.perf_counter()
        self._metrics = getattr(state, "metrics", None)
        self._refresh(state)
        self.overhead_s += time.perf_counter() - start

    def on_end(self, state) -> None:
        start = time.perf_counter()
        self._refresh(state)  # always draw the final state
        self.overhead_s += time.perf_counter() - start

    def _on_log_loss(self, change) -> None:
        self.figure.layout.yaxis.type = "log" if change["new"] else "linear"

    # ---- display -------------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
