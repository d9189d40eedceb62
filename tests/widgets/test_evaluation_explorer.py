"""EvaluationExplorer, headless: move a control, check what its FigureWidgets send to the browser
against the library's analysis, and its per-class AP against pycocotools."""

from __future__ import annotations

import contextlib
import html
import io
import statistics
import time

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")
pytest.importorskip("anywidget")

from instseg_edu.widgets import EvaluationExplorer  # noqa: E402
from widget_messages import sent_messages, sent_traces  # noqa: E402

from instseg_edu.engine.analysis import (  # noqa: E402
    DUPLICATE,
    POOR_LOCALISATION,
    error_analysis,
    match_coco,
    rank_images,
)
from instseg_edu.viz.anchors import boxes_to_path  # noqa: E402
from instseg_edu.viz.evaluation import IMAGE_TRACES, explorer_trace_names  # noqa: E402

H = W = 100
A, B = 1, 2


def _rle(x, y, w, h):
    m = np.zeros((H, W), dtype=np.uint8)
    m[int(y) : int(y + h), int(x) : int(x + w)] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _gt(objects, images):
    anns = [
        {"id": 10 + n, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
         "iscrowd": 0, "segmentation": _rle(x, y, w, h)}
        for n, (img, cat, x, y, w, h) in enumerate(objects)
    ]  # fmt: skip
    return {
        "images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in images],
        "annotations": anns,
        "categories": [{"id": A, "name": "a"}, {"id": B, "name": "b"}],
    }


def _det(img, cat, x, y, w, h, score):
    return {"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "score": score,
            "segmentation": _rle(x, y, w, h)}  # fmt: skip


# Image 1 holds one error of every kind (as in tests/engine/test_analysis.py); image 2 one hit;
# image 3 a hit and a miss.
GT = _gt(
    [(1, A, 10, 10, 30, 30), (1, B, 60, 10, 30, 30), (1, A, 10, 60, 30, 30),
     (2, B, 20, 20, 40, 40), (3, A, 5, 5, 50, 50), (3, B, 60, 60, 30, 30)],
    images=(1, 2, 3),
)  # fmt: skip
DT = [
    _det(1, A, 10, 10, 30, 30, 0.9),  # true positive
    _det(1, A, 12, 10, 30, 30, 0.8),  # duplicate at 0.5 (IoU 0.875), poor localisation at 0.9
    _det(1, A, 60, 10, 30, 30, 0.7),  # wrong class
    _det(1, A, 10, 60, 12, 30, 0.6),  # poor localisation (IoU 0.4)
    _det(1, B, 80, 80, 15, 15, 0.5),  # background
    _det(2, B, 22, 20, 40, 40, 0.65),  # true positive (IoU 0.905)
    _det(3, A, 8, 5, 50, 50, 0.55),  # true positive (IoU 0.887)
    _det(3, A, 70, 70, 20, 20, 0.2),  # background, below a 0.3 score threshold
]


def _path(matches, rows, gt=False):
    boxes = matches.gt_box if gt else matches.dt_box
    x, y = boxes_to_path(torch.from_numpy(boxes[np.asarray(rows, dtype=np.int64)]))
    return x, y


def _sent_xy(sent, name):
    t = sent[IMAGE_TRACES.index(name)]
    return np.asarray(t["x"], dtype=float), np.asarray(t["y"], dtype=float)


@pytest.fixture(scope="module")
def explorer_args():
    return {t: match_coco(GT, DT, t) for t in ("bbox", "segm")}


def test_iou_threshold_turns_the_duplicate_into_poor_localisation(explorer_args):
    ex = EvaluationExplorer(explorer_args["bbox"], score_thr=0.0)
    m = ex.matches
    assert ex.image_id == 1  # the image with the most errors comes first
    dup = np.flatnonzero(ex.errors.dt_outcome == DUPLICATE)
    assert len(dup) == 1
    np.testing.assert_array_equal(ex.figure.data[IMAGE_TRACES.index("duplicate")].x,
                                  _path(m, dup)[0])  # fmt: skip
    msgs = sent_messages(ex.figure)
    ex.iou_thr.value = 0.9
    sent = sent_traces(msgs)
    assert np.isnan(_sent_xy(sent, "duplicate")[0]).all()  # no duplicate left
    e = error_analysis(m, 0.9, score_thr=0.0)
    poor = np.flatnonzero((e.dt_outcome == POOR_LOCALISATION) & (m.dt_image == 0))
    assert dup[0] in poor and len(poor) == 2
    np.testing.assert_array_equal(_sent_xy(sent, "poor localisation")[0], _path(m, poor)[0])
    np.testing.assert_array_equal(_sent_xy(sent, "poor localisation")[1], _path(m, poor)[1])
    assert ex.errors.totals() == e.totals()
    assert "poor localisation" in ex.summary.value and "IoU 0.90" in ex.summary.value


def test_score_threshold_moves_pr_points_and_confusion(explorer_args):
    ex = EvaluationExplorer(explorer_args["bbox"], score_thr=0.0)
    names = explorer_trace_names(ex.matches.class_names)
    msgs = sent_messages(ex.figure)
    before = ex.errors.confusion.copy()
    ex.score_thr.value = 0.6
    e = error_analysis(ex.matches, 0.5, score_thr=0.6)
    recall, precision = e.precision_recall_point()
    sent = sent_traces(msgs)
    marker = sent[names.index("score threshold")]
    np.testing.assert_allclose(marker["x"], recall[np.isfinite(recall) & np.isfinite(precision)])
    np.testing.assert_allclose(marker["y"], precision[np.isfinite(recall) & np.isfinite(precision)])
    z = np.asarray(sent[names.index("confusion")]["z"])
    np.testing.assert_array_equal(z, e.confusion)
    assert not np.array_equal(z, before)
    # Recall of "a" at score >= 0.6: the hits on image 1 (d0) and... image 3's hit scores 0.55.
    assert recall[0] == pytest.approx(1 / 3)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_explorer_ap_equals_pycocotools(explorer_args, iou_type):
    ex = EvaluationExplorer(explorer_args, score_thr=0.3)
    ex.results.value = iou_type
    coco = COCO()
    coco.dataset = GT
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in DT]), iou_type)
        ev.evaluate()
        ev.accumulate()
    msgs = sent_messages(ex.figure)
    curves = [explorer_trace_names(("a", "b")).index(f"{n}: curve") for n in ("a", "b")]
    for t, thr in enumerate(np.linspace(0.5, 0.95, 10)):
        ex.iou_thr.value = float(thr)
        expected = ev.eval["precision"][t, :, :, 0, 2].mean(axis=0)  # [C], area all, 100 dets
        np.testing.assert_allclose(ex.pr.ap, expected, rtol=1e-12)  # same curves, summed apart
        # ... and that is what the legend shows, and the curve drawn is COCO's.
        legend = [ex.figure.data[j].name for j in curves]
        assert legend == [f"{n}: AP {v:.3f}" for n, v in zip(("a", "b"), expected)]
        for k, j in enumerate(curves):
            np.testing.assert_array_equal(ex.figure.data[j].y, ev.eval["precision"][t, :, k, 0, 2])
    assert any(j in sent_traces(msgs) for j in curves), "the IoU moved, the curves were not sent"


def test_pager_class_filter_and_detection_selector(explorer_args):
    ex = EvaluationExplorer(explorer_args["bbox"], score_thr=0.3)
    m = ex.matches
    assert ex.ranking.tolist() == rank_images(ex.errors).tolist()
    msgs = sent_messages(ex.figure)
    ex.image.value = 2  # the least wrong image
    i = int(ex.ranking[2])
    assert ex.image_id == m.image_ids[i]
    assert ex.figure.layout.annotations[0].text.startswith(f"image {m.image_ids[i]}:")
    rows = [v for _, v in ex.detection.options if v >= 0]
    assert sorted(rows) == np.flatnonzero((m.dt_image == i) & (m.dt_score >= 0.3)).tolist()
    ex.detection.value = rows[0]
    sent = sent_traces(msgs)
    np.testing.assert_array_equal(_sent_xy(sent, "selected detection")[0], _path(m, rows)[0])
    g = int(ex.errors.dt_gt[rows[0]])
    np.testing.assert_array_equal(_sent_xy(sent, "its ground truth")[0], _path(m, [g], gt=True)[0])
    assert f"ground truth {m.gt_id[g]}" in ex.info.value
    assert f"IoU {ex.errors.dt_iou[rows[0]]:.2f}" in ex.info.value

    # Class "b" on the first-ranked image: only b's detections and ground truth are drawn.
    ex.image.value = 0
    ex.label.value = 1
    i = int(ex.ranking[ex.image.value])
    drawn = ex.figure.data[IMAGE_TRACES.index("detections")].customdata
    assert all(m.dt_label[r] == 1 for r in drawn)
    assert all(m.dt_label[v] == 1 for _, v in ex.detection.options if v >= 0)

    # Clicking a corner marker selects that detection.
    ex.label.value = -1
    trace = ex.figure.data[IMAGE_TRACES.index("detections")]

    class Points:
        point_inds = [len(trace.customdata) - 1]

    ex._on_click(trace, Points(), None)
    assert ex.detection.value == int(trace.customdata[-1])


def test_masks_are_painted_for_segm_and_next_button_pages(explorer_args):
    ex = EvaluationExplorer(explorer_args, score_thr=0.3)
    box_image = ex.figure.data[0].source
    ex.results.value = "segm"
    assert ex.figure.data[0].source != box_image  # the masks are drawn on the canvas
    first = ex.image_id
    ex.next.click()
    assert ex.image.value == 1 and ex.image_id != first
    ex.previous.click()
    ex.previous.click()
    assert ex.image.value == 0 and ex.image_id == first


def test_results_dropdown_switches_between_models(explorer_args):
    better = explorer_args["bbox"]
    worse = match_coco(GT, DT[1:], "bbox")  # without the first, best detection
    ex = EvaluationExplorer({"model A": better, "model B": worse}, score_thr=0.3)
    assert ex.results.options == ("model A", "model B") and ex.results.layout.display is None
    assert ex.errors.totals() == error_analysis(better, 0.5, score_thr=0.3).totals()
    msgs = sent_messages(ex.figure)
    ex.results.value = "model B"
    assert ex.errors.totals() == error_analysis(worse, 0.5, score_thr=0.3).totals()
    # Without the best box on a0, its former duplicate (IoU 0.875) is the hit.
    assert (ex.errors.totals()["true positive"], ex.errors.totals()["duplicate"]) == (3, 0)
    assert sent_traces(msgs), "switching models sent nothing to the browser"
    with pytest.raises(ValueError, match="other images or classes"):
        EvaluationExplorer({"a": better, "b": match_coco(_gt([], images=(1,)), [], "bbox")})


def test_a_selected_detection_survives_a_threshold_but_not_another_model(explorer_args):
    # Detection rows index one model's matches: row r of model B is another detection than row r
    # of model A, so switching models must not carry the selection over (the IoU slider may).
    better = explorer_args["bbox"]
    worse = match_coco(GT, DT[1:], "bbox")
    ex = EvaluationExplorer({"model A": better, "model B": worse}, score_thr=0.0)
    row = min(v for _, v in ex.detection.options if v >= 0)
    ex.detection.value = row
    ex.iou_thr.value = 0.55
    assert ex.detection.value == row and f"{better.dt_score[row]:.2f}" in ex.info.value
    ex.results.value = "model B"
    assert row in [v for _, v in ex.detection.options]  # still a row of the image shown...
    assert ex.detection.value == -1  # ...but of another detection: nothing is selected


def test_from_model_draws_the_dataset_images(tmp_path):
    from instseg_edu.data.coco import CocoDataset
    from instseg_edu.data.shapes import make_shapes_dataset
    from instseg_edu.data.transforms import eval_transforms
    from instseg_edu.structures import Detections

    class FixedDetector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, images):
            return images.mean(dim=(1, 2, 3)) * self.w

        def predict(self, outputs, image_sizes):
            return [Detections(torch.tensor([[4.0, 4.0, 20.0, 20.0]]), torch.tensor([0.8]),
                               torch.tensor([0])) for _ in image_sizes]  # fmt: skip

    ann = make_shapes_dataset(tmp_path, 3, image_size=64, seed=2)
    dataset = CocoDataset(ann, tmp_path / "train", eval_transforms(32))
    ex = EvaluationExplorer.from_model(FixedDetector(), dataset, batch_size=2, device="cpu")
    assert set(ex.matches_by_name) == {"bbox"}
    image = ex.figure.data[0]
    assert image.source.startswith("data:image/png;base64,")
    assert image.dx == pytest.approx(2.0)  # a 32 px dataset item over the 64 px file
    box = ex.matches.dt_box[0]
    np.testing.assert_allclose(box, [8, 8, 40, 40], atol=1e-3)  # in the file's pixels


def test_images_missing_from_a_mapping_are_drawn_grey(explorer_args):
    m = explorer_args["bbox"]
    white = {int(m.image_ids[0]): torch.ones(3, H, W)}  # pixels for the first image only
    ex, grey = EvaluationExplorer(m, images=white), EvaluationExplorer(m)
    for position in range(m.num_images):
        ex.image.value = grey.image.value = position
        same = ex.figure.data[0].source == grey.figure.data[0].source
        assert same == (ex.image_id not in white), ex.image_id


def test_updates_are_interactive(explorer_args):
    ex = EvaluationExplorer(explorer_args, score_thr=0.3)
    times = []
    for i in range(6):
        start = time.perf_counter()
        ex.score_thr.value = 0.1 * i
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.3  # target < 100 ms; room for a loaded machine
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()


def test_iou_set_from_code_snaps_to_cocos_nearest_threshold(explorer_args):
    ex = EvaluationExplorer(explorer_args["bbox"], score_thr=0.0)
    ex.iou_thr.value = 0.62  # between 0.60 and 0.65
    assert ex.iou_thr.value == 0.6 and ex.errors.iou_thr == pytest.approx(0.6)
    assert "IoU 0.60" in ex.summary.value
    ex.iou_thr.value = 0.93
    assert ex.iou_thr.value == 0.95 and ex.pr.iou_thr == pytest.approx(0.95)
    with pytest.raises(ValueError, match="must be one of COCO's thresholds"):
        EvaluationExplorer(explorer_args["bbox"], iou_thr=0.62)  # an argument is not a slider


def test_a_new_filter_starts_at_its_worst_image_and_the_score_keeps_the_image(explorer_args):
    ex = EvaluationExplorer(explorer_args["bbox"], score_thr=0.3)
    m = ex.matches
    ex.image.value = 2  # the least wrong image of all classes
    ex.label.value = 1  # class "b": its own ranking, from its worst image
    expected = rank_images(error_analysis(m, 0.5, score_thr=0.3), 1)
    assert ex.ranking.tolist() == expected.tolist()
    assert ex.image.value == 0 and ex.image_id == m.image_ids[expected[0]]
    assert ex.caption.value.startswith(f"rank 1 of {m.num_images} by errors")

    ex.label.value = -1
    ex.image.value = 2
    ex.iou_thr.value = 0.9  # the duplicate becomes poor localisation, image 3's hit a miss
    expected = rank_images(error_analysis(m, 0.9, score_thr=0.3))
    assert ex.ranking.tolist() == expected.tolist()
    assert ex.image.value == 0 and ex.image_id == m.image_ids[expected[0]]

    ex.image.value = 2
    shown = ex.image_id
    ex.score_thr.value = 0.75  # watch this image's detections go: it stays
    assert ex.image_id == shown and ex.ranking[ex.image.value] == m.image_index(shown)
    assert ex.caption.value.startswith(f"rank {ex.image.value + 1} of")


def test_pr_legend_sits_in_the_right_margin_and_the_confusion_note_is_shown(explorer_args):
    from instseg_edu.viz.evaluation import CONFUSION_NOTE, pr_legend_width

    ex = EvaluationExplorer(explorer_args["bbox"], score_thr=0.3)
    legend, margin = ex.figure.layout.legend2, ex.figure.layout.margin
    # At the figure's right edge, in a margin as wide as its longest entry: off the curves.
    assert (legend.xref, legend.x, legend.xanchor) == ("container", 1, "right")
    assert margin.r >= pr_legend_width(ex.matches.class_names) >= 6 * len("a: AP 0.000")
    assert "Confusion matrix:" in ex.summary.value
    assert html.escape(CONFUSION_NOTE) in ex.summary.value
    # The stand-alone figures: the legend in a margin kept for it, the note under the title.
    from instseg_edu.viz.evaluation import confusion_figure, pr_figure

    fig = pr_figure(ex.pr, ex.errors, ex.matches.class_names)
    assert fig.layout.legend.xref == "container"
    assert fig.layout.margin.r >= pr_legend_width(ex.matches.class_names)
    subtitle = confusion_figure(ex.errors, ex.matches.class_names).layout.title.subtitle.text
    assert " ".join(subtitle.split("<br>")) == CONFUSION_NOTE
