"""The "which one when" decision on hand-made numbers: a model that learned nothing is never
recommended, and a latency difference inside the noise is no trade-off."""

from __future__ import annotations

import math

import pytest

from instseg_edu.engine.compare import (
    MIN_USEFUL_AP50,
    SPEED_NOISE_RATIO,
    Measured,
    not_useful_reason,
    recommend,
)

NAN = math.nan


def test_reasons_for_leaving_a_model_out():
    assert not_useful_reason(Measured(0.1, 0.3, 0.08, 20.0, kept=50), score_thr=0.3) is None
    assert not_useful_reason(Measured(0.0, 0.0, 0.0, 9.0, kept=0), score_thr=0.3) == (
        "no detection scores ≥ 0.3: it has learned nothing useful yet"
    )
    weak = Measured(0.004, 0.016, 0.001, 9.0, kept=12)
    assert not_useful_reason(weak, score_thr=0.3) == (
        "box AP50 0.016 is below 0.05: too little learned to recommend it"
    )
    assert not_useful_reason(weak, score_thr=0.3, min_ap50=0.01) is None
    at_the_floor = Measured(0.01, MIN_USEFUL_AP50, 0.0, 9.0, kept=3)
    assert not_useful_reason(at_the_floor, score_thr=0.3) is None


def test_a_model_that_learned_nothing_is_not_the_fast_choice():
    # The trial run: YOLACT answered fastest but kept no detection at score 0.3.
    measured = {
        "RetinaNet": Measured(0.020, 0.060, NAN, 30.0, kept=300),
        "Mask R-CNN": Measured(0.030, 0.080, 0.017, 40.0, kept=250),
        "SOLO": Measured(0.002, 0.008, 0.001, 45.0, kept=40),
        "YOLACT": Measured(0.000, 0.000, 0.000, 36.0, kept=0),
    }
    r = recommend(measured, score_thr=0.3)
    assert set(r.not_useful) == {"SOLO", "YOLACT"}
    assert "learned nothing useful" in r.not_useful["YOLACT"]
    assert "below 0.05" in r.not_useful["SOLO"]
    assert r.best_boxes == r.best_masks == r.fastest_masks == "Mask R-CNN"
    assert not r.trade_off and r.latency_ratio == 1.0


def test_a_trade_off_needs_a_latency_ratio_beyond_the_noise():
    def two(fast_ms: float):
        return {
            "Mask R-CNN": Measured(0.20, 0.45, 0.18, 40.0, kept=900),
            "YOLACT": Measured(0.15, 0.40, 0.12, fast_ms, kept=800),
        }

    near = recommend(two(36.0), score_thr=0.3)  # 1.1x: a measurement can move that much
    assert (near.best_masks, near.fastest_masks) == ("Mask R-CNN", "YOLACT")
    assert near.latency_ratio == pytest.approx(40 / 36) and not near.trade_off
    far = recommend(two(40.0 / SPEED_NOISE_RATIO), score_thr=0.3)  # exactly 1.2x: a real one
    assert far.trade_off and far.latency_ratio == pytest.approx(SPEED_NOISE_RATIO)
    assert recommend(two(20.0), score_thr=0.3, noise_ratio=2.5).trade_off is False


def test_nothing_useful_recommends_nothing_and_ties_keep_the_given_order():
    nothing = recommend({"a": Measured(0.0, 0.0, 0.0, 5.0, kept=0)}, score_thr=0.5)
    assert nothing.best_boxes is nothing.best_masks is nothing.fastest_masks is None
    assert not nothing.trade_off and list(nothing.not_useful) == ["a"]
    boxes_only = recommend({"r": Measured(0.3, 0.6, NAN, 5.0, kept=9)}, score_thr=0.5)
    assert (boxes_only.best_boxes, boxes_only.best_masks) == ("r", None)
    same = Measured(0.3, 0.6, 0.2, 5.0, kept=9)
    assert recommend({"x": same, "y": same}, score_thr=0.5)[1:4] == ("x", "x", "x")
