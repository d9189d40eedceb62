"""RoIPool / RoIAlign references: torchvision equality, hand-made goldens, the seed's example."""

import math

import pytest
import torch
import torchvision.ops as tvo

from instseg_edu.ops.roi import (
    kernel_roi_align,
    prefers_roi_align_matmul,
    roi_align_matmul,
    roi_align_reference,
    roi_align_sampling_points,
    roi_pool_cells,
    roi_pool_reference,
    roipool_misalignment,
)

TOL = 1e-5


def ramp(height=4, width=4):
    """[1, 1, H, W] map whose value is 4 * y + x for width 4: 0..15 row by row."""
    return torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)


def random_case(seed):
    """Random maps and RoIs: inside, straddling, outside, tiny, inverted, on half-cell values."""
    g = torch.Generator().manual_seed(seed)
    b, c = int(torch.randint(1, 3, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
    h, w = int(torch.randint(1, 12, (), generator=g)), int(torch.randint(1, 12, (), generator=g))
    scale = [1.0, 0.5, 0.25, 1 / 3, 2.0, 0.125, 0.7][seed % 7]
    k = int(torch.randint(1, 20, (), generator=g))
    size = torch.tensor([w, h]) / scale
    xy = (torch.rand(k, 2, generator=g) * 1.6 - 0.3) * size
    wh = torch.rand(k, 2, generator=g) ** 3 * size * 1.5
    if seed % 5 == 0:
        wh = -0.1 * wh  # inverted boxes
    boxes = torch.cat([xy, xy + wh], dim=1)
    if seed % 3 == 0:
        boxes = torch.round(boxes * 2) / 2  # many coordinates land on half cells
    batch = torch.randint(0, b, (k, 1), generator=g).float()
    out = (int(torch.randint(1, 6, (), generator=g)), int(torch.randint(1, 6, (), generator=g)))
    return torch.randn(b, c, h, w, generator=g), torch.cat([batch, boxes], dim=1), out, scale


# ------------------------------------------------------------------ equality with torchvision


@pytest.mark.parametrize("seed", range(40))
def test_roi_align_equals_torchvision_random(seed):
    features, rois, out, scale = random_case(seed)
    for sampling_ratio in (-1, 0, 1, 2, 3):
        for aligned in (False, True):
            ours = roi_align_reference(features, rois, out, scale, sampling_ratio, aligned)
            theirs = tvo.roi_align(features, rois, out, scale, sampling_ratio, aligned)
            torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", range(40))
def test_roi_align_matmul_equals_torchvision_random(seed):
    """Values and gradients, every sampling mode, RoIs inside, straddling and off the map."""
    features, rois, out, scale = random_case(seed)
    for sampling_ratio in (-1, 0, 2):
        for aligned in (False, True):
            ours_in = features.clone().requires_grad_(True)
            theirs_in = features.clone().requires_grad_(True)
            ours = roi_align_matmul(ours_in, rois, out, scale, sampling_ratio, aligned)
            theirs = tvo.roi_align(theirs_in, rois, out, scale, sampling_ratio, aligned)
            torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
            grad = torch.randn_like(theirs)
            ours.backward(grad)
            theirs.backward(grad)
            # Sums of many terms in another order: relative float32 rounding.
            torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=TOL, rtol=1e-5)


def test_roi_align_matmul_golden_ramp():
    """On the ramp 4y + x every bilinear read is exact: a RoI covering cells 1..2 x 1..2
    (aligned=False, one sample per bin at its centre) pools the values at y, x = 1.5, 2.5."""
    rois = torch.tensor([[0.0, 1.0, 1.0, 3.0, 3.0]])
    pooled = roi_align_matmul(ramp(), rois, 2, 1.0, 1, False)
    expected = torch.tensor([[4 * 1.5 + 1.5, 4 * 1.5 + 2.5], [4 * 2.5 + 1.5, 4 * 2.5 + 2.5]])
    torch.testing.assert_close(pooled[0, 0], expected)
    assert roi_align_matmul(ramp(), rois[:0], 2).shape == (0, 1, 2, 2)


def test_prefers_roi_align_matmul_only_when_training_small_cpu_maps():
    small = torch.randn(2, 8, 32, 32, requires_grad=True)
    assert prefers_roi_align_matmul(small)
    assert not prefers_roi_align_matmul(small.detach())  # inference: torchvision's kernel
    with torch.no_grad():
        assert not prefers_roi_align_matmul(small)
    assert not prefers_roi_align_matmul(torch.randn(2, 8, 64, 64, requires_grad=True))
    with kernel_roi_align():  # what count_host_syncs counts: the GPU's path
        assert not prefers_roi_align_matmul(small)
    assert prefers_roi_align_matmul(small)


def test_multiscale_roi_align_takes_the_matmul_path_when_training_on_the_cpu(monkeypatch):
    """The Mask R-CNN heads read RoIs through either op; both give the same features."""
    from instseg_edu.models import roi_heads

    calls = []
    real = roi_heads.roi_align_matmul
    monkeypatch.setattr(
        roi_heads, "roi_align_matmul", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    torch.manual_seed(0)
    features = [torch.randn(2, 4, 16, 16, requires_grad=True), torch.randn(2, 4, 8, 8)]
    rois = torch.tensor(
        [[0, 2.0, 2.0, 20.0, 30.0], [1, 0.0, 4.0, 60.0, 50.0], [1, 5.0, 5.0, 9.0, 9.0]]
    )
    fast = roi_heads.multiscale_roi_align(features, rois, (4, 8), 7, 2, True, finest_scale=28.0)
    assert calls  # the level with a gradient took the matmul path
    with kernel_roi_align():
        plain = roi_heads.multiscale_roi_align(
            features, rois, (4, 8), 7, 2, True, finest_scale=28.0
        )
    torch.testing.assert_close(fast, plain, atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", range(40))
def test_roi_pool_equals_torchvision_random(seed):
    features, rois, out, scale = random_case(seed)
    torch.testing.assert_close(
        roi_pool_reference(features, rois, out, scale),
        tvo.roi_pool(features, rois, out, scale),
        atol=TOL,
        rtol=0,
    )


ADVERSARIAL_BOXES = [
    [-1.5, 0.0, -0.5, 1.0],  # a sample lands exactly on x = -1: still read (clamped to column 0)
    [-1.6, 0.0, -0.6, 1.0],  # a sample at x = -1.1: reads 0
    [4.5, 4.5, 5.5, 5.5],  # a sample exactly at x = W, y = H: read from the last cell
    [4.6, 4.6, 5.6, 5.6],  # just beyond: 0
    [-30.0, -30.0, -10.0, -10.0],  # fully outside, above-left
    [50.0, 50.0, 90.0, 70.0],  # fully outside, below-right
    [-30.0, -20.0, 30.0, 25.0],  # huge: 12× the map, adaptive sampling takes ~60 points per axis
    [2.0, 2.0, 2.0, 2.0],  # zero size
    [2.0, 2.0, 2.001, 2.0005],  # tiny
    [3.0, 3.0, 1.0, 0.5],  # inverted
    [0.5, 1.5, 2.5, 3.5],  # halves: C's round goes away from zero, torch.round to even
    [-0.5, -2.5, 4.5, 3.5],
    [-1.0, -1.0, 5.0, 5.0],  # the whole map and a margin
]


@pytest.mark.parametrize("scale", [1.0, 0.5, 1 / 3, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adversarial_rois_equal_torchvision(scale, dtype):
    torch.manual_seed(0)
    features = torch.randn(2, 3, 5, 5, dtype=dtype)
    boxes = torch.tensor(ADVERSARIAL_BOXES, dtype=dtype) / scale
    batch = (torch.arange(len(boxes)) % 2).to(dtype)[:, None]
    rois = torch.cat([batch, boxes], dim=1)  # [K, 5]
    for out in (1, 2, (3, 2), 7):
        for sampling_ratio in (-1, 1, 2):
            for aligned in (False, True):
                torch.testing.assert_close(
                    roi_align_reference(features, rois, out, scale, sampling_ratio, aligned),
                    tvo.roi_align(features, rois, out, scale, sampling_ratio, aligned),
                    atol=TOL,
                    rtol=0,
                )
        torch.testing.assert_close(
            roi_pool_reference(features, rois, out, scale),
            tvo.roi_pool(features, rois, out, scale),
            atol=TOL,
            rtol=0,
        )


def test_roi_pool_matches_kernel_on_infinities_and_nan():
    features = torch.randn(1, 2, 4, 4)
    features[0, 0, :2, :2] = float("-inf")  # a bin of -inf pools to -FLT_MAX in the kernel
    features[0, 1, 0, 0] = float("nan")  # NaN never wins the running max
    features[0, 1, 3, 3] = float("inf")
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0], [0, 0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(
        roi_pool_reference(features, rois, 2), tvo.roi_pool(features, rois, 2, 1.0)
    )


def test_list_of_boxes_and_no_rois():
    features = torch.randn(2, 3, 6, 6)
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 3.0]]), torch.tensor([[1.0, 1.0, 5.0, 5.0]] * 2)]
    torch.testing.assert_close(
        roi_align_reference(features, boxes, 2, 1.0, 2, True),
        tvo.roi_align(features, boxes, 2, 1.0, 2, True),
    )
    torch.testing.assert_close(
        roi_pool_reference(features, boxes, 2), tvo.roi_pool(features, boxes, 2)
    )
    none = torch.zeros(0, 5)
    assert roi_align_reference(features, none, (2, 3)).shape == (0, 3, 2, 3)
    assert roi_pool_reference(features, none, (2, 3)).shape == (0, 3, 2, 3)


def test_bad_arguments_name_the_field():
    features = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="output_size"):
        roi_align_reference(features, torch.zeros(1, 5), 0)
    with pytest.raises(ValueError, match="rois"):
        roi_pool_reference(features, torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_pool_cells(torch.zeros(1, 5), 2, 0.0)


# ------------------------------------------------------------------ hand-computed goldens


def test_roi_pool_golden_4x4():
    features = ramp()  # value = 4 * y + x
    # RoI = the whole map: 4×4 cells, two 2×2 bins per axis; each bin's max is its bottom-right.
    out = roi_pool_reference(features, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]]), 2)
    assert out[0, 0].tolist() == [[5.0, 7.0], [13.0, 15.0]]
    # Corners at 0.5 and 2.5 round away from zero to cells 1 and 3 (torch.round would give 0, 2):
    # 3 cells, bin size 1.5, bins [1, 3) and [2, 4) overlap on cell 2.
    rois = torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]])
    cells = roi_pool_cells(rois, 2, 1.0, featmap_size=(4, 4))
    assert cells.roi_cells.tolist() == [[1, 1, 3, 3]]
    assert cells.bins[0, 0, :, 0].tolist() == [1, 2]  # x starts
    assert cells.bins[0, 0, :, 2].tolist() == [3, 4]  # x ends (exclusive)
    assert cells.roi_image.tolist() == [[1.0, 1.0, 4.0, 4.0]]
    assert roi_pool_reference(features, rois, 2)[0, 0].tolist() == [[10.0, 11.0], [14.0, 15.0]]
    # Fully outside the map: every bin is empty and pools to 0.
    outside = torch.tensor([[0, 10.0, 10.0, 12.0, 12.0]])
    assert roi_pool_cells(outside, 2, 1.0, featmap_size=(4, 4)).empty.all()
    assert roi_pool_reference(features, outside, 2).abs().sum() == 0


def test_roi_align_golden_4x4():
    features = ramp()
    # The map is linear (4y + x), so bilinear reads are exact and a bin's average is the value at
    # its centre. RoI [0.5, 2.5]², 2 bins of 1 cell: centres 1.0 and 2.0.
    rois = torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]])
    out = roi_align_reference(features, rois, 2, 1.0, 2, aligned=False)
    assert out[0, 0].tolist() == [[5.0, 6.0], [9.0, 10.0]]
    # aligned=True moves everything by -0.5 cell: centres 0.5 and 1.5.
    out = roi_align_reference(features, rois, 2, 1.0, 2, aligned=True)
    assert out[0, 0].tolist() == [[2.5, 3.5], [6.5, 7.5]]
    # Border rules: samples at 3.0 and 4.0 (= W) both read the last column/row: 4 * 3 + 3.
    out = roi_align_reference(features, torch.tensor([[0, 2.5, 2.5, 4.5, 4.5]]), 1, 1.0, 2)
    assert out.item() == 15.0
    # A sample at x = -1 exactly is clamped to column 0; y = 0.5 reads rows 0, 1 half each: 2.0.
    out = roi_align_reference(features, torch.tensor([[0, -1.5, 0.0, -0.5, 1.0]]), 1, 1.0, 1)
    assert out.item() == 2.0
    # x = -1.1 is off the map: 0.
    out = roi_align_reference(features, torch.tensor([[0, -1.6, 0.0, -0.6, 1.0]]), 1, 1.0, 1)
    assert out.item() == 0.0


def test_sampling_points_golden():
    # RoI [0, 2] × [0, 1] with one 2-wide bin per axis and sampling_ratio 2, aligned: samples
    # at the centres of a 2×2 sub-grid: x in {0.5, 1.5}, y in {0.25, 0.75}, y-major.
    samples = roi_align_sampling_points(torch.tensor([[0, 0.0, 0.0, 2.0, 1.0]]), 1, 1.0, 2, True)
    assert samples.points[0, 0, 0].tolist() == [[0.5, 0.25], [1.5, 0.25], [0.5, 0.75], [1.5, 0.75]]
    assert samples.bins_image[0, 0, 0].tolist() == [0.0, 0.0, 2.0, 1.0]
    # Unaligned, the same points are read half a cell down-right of where the RoI is.
    legacy = roi_align_sampling_points(torch.tensor([[0, 0.0, 0.0, 2.0, 1.0]]), 1, 1.0, 2, False)
    assert torch.equal(legacy.points, samples.points + 0.5)


def test_sampling_points_count_adaptive_and_padding():
    # Adaptive grids differ per RoI: [3 × 1.5] cells with (1, 2) bins -> ceil(1.5) × ceil(1.5)
    # = 2 × 2 per bin; a 1×1 RoI gets 1 × 1; padding fills the rest.
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 1.5], [0, 0.0, 0.0, 1.0, 1.0]])
    samples = roi_align_sampling_points(rois, (1, 2), 1.0, 0, False, featmap_size=(4, 4))
    assert samples.grid.tolist() == [[2, 2], [1, 1]]
    assert samples.real.sum(dim=(1, 2, 3)).tolist() == [8, 2]
    assert samples.count.tolist() == [4.0, 1.0]
    assert samples.points.shape == (2, 1, 2, 4, 2)
    assert samples.inside.sum() == 10


def test_sampling_points_are_what_roi_align_averages():
    # Reading the map at the drawn points (back in feature coordinates) and averaging gives the op.
    torch.manual_seed(0)
    features = torch.randn(1, 1, 6, 7)
    rois = torch.tensor([[0, 3.0, 2.0, 13.0, 11.0]])  # inside the map
    samples = roi_align_sampling_points(rois, 3, 0.5, 2, True)
    uv = samples.points * 0.5 - 0.5  # image -> feature coordinates, cell centres at integers
    grid = torch.stack([(uv[..., 0] + 0.5) / 7 * 2 - 1, (uv[..., 1] + 0.5) / 6 * 2 - 1], dim=-1)
    read = torch.nn.functional.grid_sample(
        features, grid.reshape(1, 9, 4, 2), align_corners=False, padding_mode="border"
    )  # [1, 1, 9, 4]
    torch.testing.assert_close(
        read.mean(-1).reshape(3, 3), roi_align_reference(features, rois, 3, 0.5, 2, True)[0, 0]
    )


# ------------------------------------------------------------------ the seed's worked example


def test_seed_worked_example_800_image_stride_32():
    # An 800×800 image at stride 32 gives a 25×25 map; a 600×500 RoI is 18.75×15.625 cells.
    rois = torch.tensor([[0, 0.0, 0.0, 600.0, 500.0]])
    mis = roipool_misalignment(rois, 7, 1 / 32)
    assert mis.roi_cells.tolist() == [[18.75, 15.625]]
    assert mis.floored_cells.tolist() == [[18.0, 15.0]]  # first rounding
    assert mis.bin_cells.tolist() == [[2.0, 2.0]]  # 18/7, 15/7 floored: a 14×14 grid
    assert mis.first_rounding_px.tolist() == [[0.75 * 32, 0.625 * 32]]  # 24, 20 px
    assert mis.second_rounding_px.tolist() == [[4 * 32, 1 * 32]]  # 128, 32 px
    assert (mis.lost_px / 32).tolist() == [[4.75, 1.625]]  # the write-up's errors, in cells
    assert mis.lost_px.tolist() == [[152.0, 52.0]]
    # torchvision's RoIPool instead rounds 18.75 -> 19 and 15.625 -> 16 and keeps the end cell:
    # it reads cells 0..19 × 0..16, i.e. image [0, 640) × [0, 544): 40 and 44 px too far.
    assert mis.boundary_px.tolist() == [[0.0, 0.0, 40.0, 44.0]]
    # 20 cells in 7 bins: bin 5 ends at ceil(6 * 20/7) = 18 cells = 576 px, exactly 6/7 of 600 px.
    assert mis.bin_edge_px[0, 0].item() == pytest.approx(576 - 6 * 600 / 7, abs=1e-3)
    # RoIAlign keeps 18.75 × 15.625: adaptive sampling puts ceil(18.75/7) × ceil(15.625/7) = 3 × 3
    # points in each of the 49 bins, and the bins tile the RoI exactly.
    samples = roi_align_sampling_points(rois, 7, 1 / 32, 0, True, featmap_size=(25, 25))
    assert samples.grid.tolist() == [[3, 3]]
    assert int(samples.real.sum()) == 49 * 9 == 441
    assert samples.bins_image[0, 0, 0].tolist() == pytest.approx([0, 0, 600 / 7, 500 / 7])
    assert samples.bins_image[0, -1, -1, 2:].tolist() == pytest.approx([600, 500])
    assert int(roi_align_sampling_points(rois, 7, 1 / 32, 2, True).real.sum()) == 196
    features = torch.randn(1, 4, 25, 25)
    torch.testing.assert_close(
        roi_pool_reference(features, rois, 7, 1 / 32), tvo.roi_pool(features, rois, 7, 1 / 32)
    )


def test_misalignment_is_zero_when_everything_divides():
    # A 224×224 RoI at the origin, stride 16: 14 cells, 7 bins of 2 — no textbook loss. Only the
    # end-cell convention of torchvision remains: one extra cell (16 px) on the right and bottom.
    mis = roipool_misalignment(torch.tensor([[0, 0.0, 0.0, 224.0, 224.0]]), 7, 1 / 16)
    assert mis.lost_px.tolist() == [[0.0, 0.0]]
    assert mis.boundary_px.tolist() == [[0.0, 0.0, 16.0, 16.0]]
    assert math.isclose(mis.bin_edge_px[0, 0].item(), 16.0)


@pytest.mark.gpu
def test_equal_to_torchvision_on_cuda():
    for seed in range(10):
        features, rois, out, scale = random_case(seed)
        features, rois = features.cuda(), rois.cuda()
        for aligned in (False, True):
            torch.testing.assert_close(
                roi_align_reference(features, rois, out, scale, 2, aligned),
                tvo.roi_align(features, rois, out, scale, 2, aligned),
                atol=1e-4,
                rtol=0,
            )
        torch.testing.assert_close(
            roi_pool_reference(features, rois, out, scale), tvo.roi_pool(features, rois, out, scale)
        )
