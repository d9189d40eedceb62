import math

import pytest
import torch

from instseg_edu.ops.anchors import AnchorGenerator

RETINA = dict(
    strides=(8, 16, 32, 64, 128), ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3
)

# MMDetection 3.x, RetinaNet, stride 8 (from the issue), ratio-major: wide, square, tall.
GOLDEN_STRIDE8 = torch.tensor(
    [
        [-22.627417, -11.313708, 22.627417, 11.313708],
        [-28.508759, -14.254379, 28.508759, 14.254379],
        [-35.918785, -17.959393, 35.918785, 17.959393],
        [-16.0, -16.0, 16.0, 16.0],
        [-20.158737, -20.158737, 20.158737, 20.158737],
        [-25.398417, -25.398417, 25.398417, 25.398417],
        [-11.313708, -22.627417, 11.313708, 22.627417],
        [-14.254379, -28.508759, 14.254379, 28.508759],
        [-17.959393, -35.918785, 17.959393, 35.918785],
    ]
)


def test_retinanet_base_anchors_golden():
    gen = AnchorGenerator(**RETINA)
    assert gen.num_base_anchors == [9] * 5
    base = gen.base_anchors()
    torch.testing.assert_close(base[0], GOLDEN_STRIDE8, atol=1e-6, rtol=0)
    # every level is the stride-8 level scaled by stride / 8
    for level, stride in enumerate(RETINA["strides"]):
        torch.testing.assert_close(base[level], GOLDEN_STRIDE8 * stride / 8, atol=2e-5, rtol=1e-6)


def test_legacy_base_anchors_golden():
    # v1 generator (as printed in the RetinaNet write-up): x1 = c - (w - 1) / 2, rounded.
    # ratio 0.5, scale 4: w = 8*sqrt(2)*4 = 45.25 -> (45.25 - 1)/2 = 22.13 -> 22;
    #                     h = 22.63 -> 10.81 -> 11
    # ratio 1, scale 4: w = 32 -> 15.5 -> 16 (round half to even);
    # ratio 1, scale 4*2^(1/3): w = 40.32 -> 19.66 -> 20
    gen = AnchorGenerator(**RETINA, legacy=True)
    expected = torch.tensor(
        [
            [-22.0, -11.0, 22.0, 11.0],
            [-28.0, -14.0, 28.0, 14.0],
            [-35.0, -17.0, 35.0, 17.0],
            [-16.0, -16.0, 16.0, 16.0],
            [-20.0, -20.0, 20.0, 20.0],
            [-25.0, -25.0, 25.0, 25.0],
            [-11.0, -22.0, 11.0, 22.0],
            [-14.0, -28.0, 14.0, 28.0],
            [-17.0, -35.0, 17.0, 35.0],
        ]
    )
    torch.testing.assert_close(gen.base_anchors()[0], expected)
    # legacy centre offset uses (base_size - 1): 0.5 * (16 - 1) = 7.5
    rpn = AnchorGenerator(
        strides=(16,), ratios=(1.0,), scales=(1.0,), center_offset=0.5, legacy=True
    )
    torch.testing.assert_close(rpn.base_anchors()[0], torch.tensor([[0.0, 0.0, 15.0, 15.0]]))


def test_center_offset_and_explicit_scales():
    gen = AnchorGenerator(strides=(4,), ratios=(1.0, 4.0), scales=(8,), center_offset=0.5)
    # centre 0.5 * 4 = 2; ratio 4: h = 4*2*8 = 64, w = 4*0.5*8 = 16
    torch.testing.assert_close(
        gen.base_anchors()[0],
        torch.tensor([[-14.0, -14.0, 18.0, 18.0], [-6.0, -30.0, 10.0, 34.0]]),
    )


def test_grid_order_row_column_anchor():
    gen = AnchorGenerator(**RETINA)
    sizes = [(3, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    grids = gen.grid_anchors(sizes, "cpu")
    base = gen.base_anchors()
    for level, ((h, w), stride) in enumerate(zip(sizes, RETINA["strides"])):
        assert grids[level].shape == (h * w * 9, 4)
        for i in range(h):
            for j in range(w):
                for a in range(9):
                    row = (i * w + j) * 9 + a
                    shift = torch.tensor([j * stride, i * stride] * 2, dtype=torch.float32)
                    torch.testing.assert_close(grids[level][row], base[level][a] + shift)


def test_retinanet_512_anchor_count():
    gen = AnchorGenerator(**RETINA)
    sizes = [(512 // s, 512 // s) for s in RETINA["strides"]]
    assert sum(g.shape[0] for g in gen.grid_anchors(sizes)) == 9 * (
        64**2 + 32**2 + 16**2 + 8**2 + 4**2
    )


def test_valid_flags_cell_starts_inside_image():
    gen = AnchorGenerator(strides=(8,), ratios=(0.5, 1.0), scales=(4,))
    # padded 4x4 cells (32x32), image 17 high, 9 wide: columns 0,1 (x=0,8) and rows 0..2 (y=0,8,16)
    flags = gen.valid_flags([(4, 4)], (17, 9))[0]
    assert flags.shape == (4 * 4 * 2,) and flags.dtype == torch.bool
    cells = flags.reshape(4, 4, 2)
    assert (cells[..., 0] == cells[..., 1]).all()
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:3, :2] = True
    assert torch.equal(cells[..., 0], expected)
    assert int(cells[0, :, 0].sum()) == math.ceil(9 / 8)
    # MMDetection's rule: column j valid iff j < ceil(w / stride), whatever the centre offset:
    # with offset 0.5 column 1's centre (x=12) lies past w=9, yet the column stays valid.
    for legacy in (False, True):
        half = AnchorGenerator(
            strides=(8,), ratios=(1.0,), scales=(4,), center_offset=0.5, legacy=legacy
        )
        assert half.valid_flags([(4, 4)], (17, 9))[0].reshape(4, 4)[0].tolist() == [
            True,
            True,
            False,
            False,
        ]


@pytest.mark.parametrize("legacy", [False, True])
def test_valid_flags_333x500_at_stride_16_in_a_512x640_batch(legacy):
    # The case where an anchor-centre rule and MMDetection's differ: with a centre offset of 0.5
    # (7.5 px legacy, 8 px otherwise) column 31's centre is at x = 503.5 / 504 > 500, but
    # 31 < ceil(500 / 16) = 32, so MMDetection (legacy generator included) keeps it: 21 rows
    # (ceil(333 / 16) = 21) x 32 columns x 9 anchors = 6048 of 32 x 40 x 9 = 11520 flags, where a
    # centre rule would give 21 x 31 x 9 = 5859 (189 fewer).
    gen = AnchorGenerator(**{**RETINA, "strides": (16,)}, center_offset=0.5, legacy=legacy)
    flags = gen.valid_flags([(32, 40)], (333, 500))[0]
    assert flags.shape == (11520,)
    assert int(flags.sum()) == 6048
    expected = torch.zeros(32, 40, dtype=torch.bool)
    expected[:21, :32] = True
    assert torch.equal(flags.reshape(32, 40, 9), expected[:, :, None].expand(32, 40, 9))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(strides=(8,), ratios=(0.0, 1.0), scales=(1,)), "ratios"),
        (dict(strides=(8,), ratios=(-1.0,), scales=(1,)), "ratios"),
        (dict(strides=(8,), ratios=(), scales=(1,)), "ratios"),
        (dict(strides=(), ratios=(1.0,), scales=(1,)), "strides"),
        (
            dict(
                strides=(8,), ratios=(1.0,), scales=(1,), octave_base_scale=4, scales_per_octave=3
            ),
            "scales",
        ),
        (dict(strides=(8,), ratios=(1.0,)), "scales"),
        (dict(strides=(8,), ratios=(1.0,), octave_base_scale=4), "scales_per_octave"),
        (
            dict(strides=(8,), ratios=(1.0,), octave_base_scale=4, scales_per_octave=0),
            "scales_per_octave",
        ),
        (dict(strides=(8, 16), ratios=(1.0,), scales=(1,), base_sizes=(8,)), "base_sizes"),
        (dict(strides=(8,), ratios=(1.0,), scales=(0,)), "scales"),
        (dict(strides=(8,), ratios=(1.0,), scales=(1,), center_offset=1.5), "center_offset"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AnchorGenerator(**kwargs)


def test_featmap_levels_must_match_strides():
    gen = AnchorGenerator(**RETINA)
    with pytest.raises(ValueError, match="featmap_sizes"):
        gen.grid_anchors([(4, 4)])
