"""read_image against the reference readers: EXIF orientation, modes and bit depths, refusals."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from instseg_edu.data.annotations import DataError, MissingFileError
from instseg_edu.data.images import exif_orientation, read_image

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)  # 6 high, 9 wide: turns are visible


def _pillow_reference(path) -> torch.Tensor:
    """Pillow as a careful reader uses it: exif_transpose, convert("RGB"), / 255."""
    with Image.open(path) as pil:
        rgb = np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


def _torchvision_reference(path) -> torch.Tensor:
    """torchvision's reader (JPEG and PNG), scaled by its dtype's maximum."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders
        warnings.simplefilter("ignore", DeprecationWarning)
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB,
                             apply_exif_orientation=True)  # fmt: skip
    top = 65535 if image.dtype == torch.uint16 else 255
    return image.float() / top


def _with_orientation(path, orientation, fmt):
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(PIXELS).save(path, fmt, exif=exif, **kwargs)
    return path


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_eight_exif_orientations_match_both_reference_readers(tmp_path, fmt, orientation):
    path = _with_orientation(tmp_path / f"o{orientation}.{fmt.lower()}", orientation, fmt)
    image = read_image(path)
    turned = orientation >= 5  # 5..8 swap width and height
    assert image.shape == ((3, 9, 6) if turned else (3, 6, 9))
    torch.testing.assert_close(image, _pillow_reference(path), rtol=0, atol=0)
    # Pillow and torchvision may link different libjpeg builds (IDCT rounding): a JPEG may differ
    # by a level or two; a wrong turn or flip differs by up to 255 levels.
    tolerance = 2 / 255 if fmt == "JPEG" else 0
    torch.testing.assert_close(image, _torchvision_reference(path), rtol=0, atol=tolerance)
    assert exif_orientation(path) == orientation


def test_orientation_3_is_the_stored_image_upside_down(tmp_path):
    path = _with_orientation(tmp_path / "o3.png", 3, "PNG")
    stored = torch.from_numpy(PIXELS).permute(2, 0, 1).float() / 255  # [3, 6, 9]
    torch.testing.assert_close(read_image(path), stored.flip(1, 2), rtol=0, atol=0)


def _png_modes():
    gray = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    rgba = RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    palette_with_alpha = Image.fromarray(rgba[..., :3]).convert("P")
    palette_with_alpha.info["transparency"] = 3
    return {
        "L": Image.fromarray(gray),
        "LA": Image.fromarray(rgba[..., :2], "LA"),
        "1": Image.fromarray(gray).convert("1"),
        "P": Image.fromarray(rgba[..., :3]).convert("P"),
        "P+transparency": palette_with_alpha,
        "RGBA": Image.fromarray(rgba),
        "I;16": Image.fromarray(RNG.integers(0, 65536, (5, 7), dtype=np.uint16)),
    }


@pytest.mark.parametrize("mode", list(_png_modes()))
def test_png_modes_give_torchvisions_values(tmp_path, mode):
    path = tmp_path / "x.png"
    _png_modes()[mode].save(path)
    image = read_image(path)
    assert image.shape == (3, 5, 7) and image.dtype == torch.float32
    torch.testing.assert_close(image, _torchvision_reference(path), rtol=0, atol=0)


def test_sixteen_bit_gray_is_scaled_by_65535_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 65535]], dtype=np.uint16)
    for name in ("x.png", "x.tif"):
        Image.fromarray(values).save(tmp_path / name)
        expected = torch.tensor([0, 255, 256, 65535], dtype=torch.float32) / 65535
        torch.testing.assert_close(read_image(tmp_path / name)[:, 0], expected.expand(3, 4))


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "BMP"), ("RGB", "TIFF"), ("RGBA", "WEBP"),
     ("P", "GIF"), ("YCbCr", "JPEG")],
)  # fmt: skip
def test_other_modes_and_formats_give_pillows_values(tmp_path, mode, fmt):
    pixels = RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    pil = Image.fromarray(pixels, "RGBA").convert("RGB").convert(mode)
    if mode == "CMYK":
        pil = Image.fromarray(pixels, "CMYK")
    path = tmp_path / f"x.{fmt.lower()}"
    pil.save(path, fmt)
    image = read_image(path)
    assert image.shape == (3, 5, 7)
    torch.testing.assert_close(image, _pillow_reference(path), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("array", "mode"),
    [(np.ones((4, 5), dtype=np.float32), "F"), (np.full((4, 5), 70000, dtype=np.int32), "I")],
)
def test_modes_without_a_fixed_range_are_refused_naming_file_and_mode(tmp_path, array, mode):
    Image.fromarray(array).save(tmp_path / "x.tif")
    with pytest.raises(DataError, match=rf"img 3: .*x\.tif has mode '{mode}' .* no fixed range"):
        read_image(tmp_path / "x.tif", "img 3")


def test_truncated_and_missing_files_are_refused_naming_the_file(tmp_path):
    for fmt in ("PNG", "JPEG"):
        path = tmp_path / f"x.{fmt.lower()}"
        Image.fromarray(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path, fmt)
        path.write_bytes(path.read_bytes()[:-200])
        with pytest.raises(DataError, match=rf"^a\.json: image 4: cannot read .*x\.{fmt.lower()}"):
            read_image(path, "a.json: image 4")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read .*junk\.png"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(MissingFileError, match=r"file .*nope\.png not found") as info:
        read_image(tmp_path / "nope.png")
    assert isinstance(info.value, FileNotFoundError)
