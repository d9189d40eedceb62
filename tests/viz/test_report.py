"""The static evaluation report: its figures hold the analysis' numbers, and summary.md and
analysis.json repeat COCO's numbers exactly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from pycocotools import mask as mask_util

pytest.importorskip("matplotlib")
pytest.importorskip("plotly")

from instseg_edu.engine.analysis import (  # noqa: E402
    COUNT_NAMES,
    error_analysis,
    match_coco,
    per_class_ap,
    precision_recall,
    rank_images,
)
from instseg_edu.engine.evaluate import METRIC_NAMES, evaluate_coco  # noqa: E402
from instseg_edu.viz.evaluation import CONFUSION_NOTE  # noqa: E402
from instseg_edu.viz.report import (  # noqa: E402
    compare_outcomes_plot,
    confusion_plot,
    error_counts_plot,
    error_gallery,
    pr_curves_plot,
    write_report,
)

H = W = 80


def _rle(x, y, w, h):
    m = np.zeros((H, W), dtype=np.uint8)
    m[y : y + h, x : x + w] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _scene():
    """Three images, two classes, hits, misses, a swap, a duplicate and a loose box."""
    objects = [(1, 1, 5, 5, 20, 20), (1, 2, 40, 40, 30, 30), (2, 1, 10, 30, 40, 40),
               (3, 2, 5, 5, 10, 10), (3, 1, 50, 10, 25, 25)]  # fmt: skip
    gt = {
        "images": [{"id": i, "height": H, "width": W, "file_name": f"im{i}.png"}
                   for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "star"}],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
             "iscrowd": 0, "segmentation": _rle(x, y, w, h)}
            for n, (i, c, x, y, w, h) in enumerate(objects)
        ],
    }  # fmt: skip
    dets = [(1, 1, 5, 5, 20, 20, 0.9), (1, 1, 6, 5, 20, 20, 0.7), (1, 1, 40, 40, 30, 30, 0.6),
            (2, 1, 12, 32, 40, 40, 0.8), (3, 2, 20, 20, 10, 10, 0.5), (3, 1, 50, 10, 12, 25, 0.4),
            (2, 2, 60, 0, 15, 15, 0.35)]  # fmt: skip
    results = [
        {"image_id": i, "category_id": c, "bbox": [x, y, w, h], "score": s,
         "segmentation": _rle(x, y, w, h)}
        for i, c, x, y, w, h, s in dets
    ]  # fmt: skip
    return gt, results


@pytest.fixture(scope="module")
def scene():
    gt, results = _scene()
    return gt, results, {t: match_coco(gt, results, t) for t in ("bbox", "segm")}


def test_figures_show_the_analysis(scene):
    _, _, matches = scene
    m = matches["bbox"]
    e = error_analysis(m, 0.5, score_thr=0.3)
    pr = precision_recall(m, 0.5)
    names = list(m.class_names)

    fig = confusion_plot(e, names)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), e.confusion)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == [str(v) for v in e.confusion.flatten()]

    fig = pr_curves_plot(pr, e, names)
    ax = fig.axes[0]
    steps = [line for line in ax.lines if line.get_label().startswith(("disc", "star"))]
    assert [line.get_label() for line in steps] == [
        f"{n}: AP {a:.3f}" for n, a in zip(names, pr.ap)
    ]
    np.testing.assert_array_equal(steps[0].get_ydata(), pr.precision[0])
    recall, precision = e.precision_recall_point()
    diamonds = [line for line in ax.lines if line.get_marker() == "D"]
    assert [(d.get_xdata()[0], d.get_ydata()[0]) for d in diamonds] == list(zip(recall, precision))

    fig = error_counts_plot(e, names)
    bars = fig.axes[0].containers
    assert len(bars) == len(COUNT_NAMES)
    for j, container in enumerate(bars):
        assert [b.get_width() for b in container] == e.counts.sum(axis=0)[:, j].tolist()

    fig = error_gallery(m, e, num_images=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    worst = rank_images(e)[:2]
    assert [t.split(":")[0] for t in titles] == [f"image {m.image_ids[i]}" for i in worst]
    (legend,) = fig.legends  # every colour and line style of the panels is named
    assert [t.get_text() for t in legend.get_texts()] == [*COUNT_NAMES[:5], *(
        f"{name} (ground truth)" for name in ("found", "missed", "ignored"))]  # fmt: skip


def test_compare_outcomes_plot_stacks_each_models_totals(scene):
    gt, results, matches = scene
    weaker = match_coco(gt, results[::2], "bbox")  # every other detection: a worse "model"
    errors = {
        "all detections": error_analysis(matches["bbox"], 0.5, score_thr=0.3),
        "half of them": error_analysis(weaker, 0.5, score_thr=0.3),
    }
    fig = compare_outcomes_plot(errors)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(errors)
    for j, container in enumerate(ax.containers):
        widths = [b.get_width() for b in container]
        assert widths == [list(e.totals().values())[j] for e in errors.values()]
    assert errors["all detections"].totals() != errors["half of them"].totals()
    assert "IoU 0.50, score ≥ 0.30" in ax.get_title()


class _Totals:
    """Stands in for an ErrorAnalysis in compare_outcomes_plot: hand-made totals."""

    iou_thr, score_thr = 0.5, 0.3

    def __init__(self, *counts):
        self.counts = dict(zip(COUNT_NAMES, counts))

    def totals(self, label=None):
        return self.counts


def test_compare_outcomes_plot_labels_only_the_bars_a_count_fits_in():
    # A weak model's row, as in a trial run: narrow "24" and "43" side by side read "2443".
    errors = {"RetinaNet": _Totals(300, 24, 43, 150, 400, 600),
              "YOLACT": _Totals(0, 0, 0, 1, 2, 1000)}  # fmt: skip
    fig = compare_outcomes_plot(errors)
    ax = fig.axes[0]
    fig.draw_without_rendering()
    shown = [t for t in ax.texts if t.get_text()]
    assert {t.get_text() for t in shown} == {"300", "150", "400", "600", "1000"}
    boxes = [t.get_window_extent() for t in shown]
    for n, a in enumerate(boxes):  # no two counts touch
        assert not any(a.overlaps(b) for b in boxes[n + 1 :])
    bars = [bar for container in ax.containers for bar in container]  # the order of ax.texts
    for bar, text in zip(bars, ax.texts):  # every count shown lies inside its own bar
        if text.get_text():
            b, t = bar.get_window_extent(), text.get_window_extent()
            assert b.x0 < t.x0 and t.x1 < b.x1, text.get_text()


def test_pr_legend_and_confusion_note_leave_the_data_readable(scene):
    _, _, matches = scene
    m = matches["bbox"]
    e = error_analysis(m, 0.5, score_thr=0.3)
    fig = pr_curves_plot(precision_recall(m, 0.5), e, list(m.class_names))
    fig.draw_without_rendering()
    (legend,) = fig.legends
    assert legend.get_window_extent().x0 >= fig.axes[0].get_window_extent().x1  # beside the axes
    assert [t.get_text() for t in legend.get_texts()][0].startswith("disc: AP")
    fig = confusion_plot(e, list(m.class_names))
    assert " ".join(fig.get_supxlabel().split()) == CONFUSION_NOTE
    # Row "star" holds one object; a wrong-class "disc" on it and its miss make the row add to 2.
    star = list(m.class_names).index("star")
    assert e.confusion[star].sum() == e.num_gt[star] + 1


def test_write_report_repeats_cocos_numbers(scene, tmp_path):
    gt, results, matches = scene
    files = write_report(tmp_path, matches, iou_thr=0.5, score_thr=0.3, num_images=3)
    for name in files:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    for t in ("bbox", "segm"):
        for kind in ("pr_curves", "confusion", "outcomes", "gallery"):
            assert f"{t}_{kind}.png" in files
    expected = evaluate_coco(gt, results)
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["metrics"] == expected  # exactly, every float
    summary = (tmp_path / "summary.md").read_text()
    # The COCO table: every metric and IoU type, printed to 3 decimals ("n/a" for -1).
    for name in METRIC_NAMES:
        row = re.search(rf"^\| {name} \| (.*) \|$", summary, re.M).group(1).split(" | ")
        want = [("n/a" if expected[t][name] < 0 else f"{expected[t][name]:.3f}")
                for t in ("bbox", "segm")]  # fmt: skip
        assert row == want, name
    # Per-class AP, AP50, AP75 equal the rebuilt curves; their mean is COCO's AP.
    for t in ("bbox", "segm"):
        ap = per_class_ap(matches[t])
        for k, name in enumerate(matches[t].class_names):
            assert data["per_class"][t][name]["AP"] == ap[k]
            assert data["per_class"][t][name]["AP50"] == precision_recall(matches[t], 0.5).ap[k]
        assert np.mean(ap[ap > -1]) == pytest.approx(expected[t]["AP"], abs=1e-12)
        e = error_analysis(matches[t], 0.5, score_thr=0.3)
        assert data["errors"][t]["all"] == e.totals()
        all_row = re.search(r"^\| \*\*all\*\* \| (.*) \|$", summary.split(f"### {t}")[1], re.M)
        assert [int(v.strip("*")) for v in all_row.group(1).split(" | ")] == list(
            e.totals().values()
        )
        assert data["worst_images"][t] == [int(matches[t].image_ids[i]) for i in rank_images(e)]
        assert f"]({t}_gallery.png)" in summary
    assert CONFUSION_NOTE in summary  # a row of the confusion matrix explained


def test_write_report_rejects_nothing(tmp_path):
    with pytest.raises(ValueError, match="nothing to report"):
        write_report(tmp_path, {})
