"""Reading an image file the way a careful reference reader does.

Two things go wrong with photos and exported images when a file is read naively:

- **EXIF orientation.** A camera stores the sensor's pixels as they came and writes an
  ``Orientation`` tag (values 1–8: 3 = upside down, 6 = rotate 90° clockwise to view, 8 = 90°
  counter-clockwise, 2/4/5/7 the mirrored variants). Viewers and annotation tools show the image
  turned, so boxes and polygons are drawn on the turned image, and the JSON's ``width`` and
  ``height`` are the turned ones. Reading the raw pixels puts every annotation on the wrong spot
  (upside down for 3, refused as a size mismatch for 6 and 8).
- **Modes and bit depths.** Grayscale, palette, gray+alpha, RGBA, CMYK and 16-bit files are all
  ordinary; each must become the same ``[3, H, W]`` RGB values in ``[0, 1]`` that the reader
  shows.

:func:`read_image` opens the file with Pillow, applies the orientation with
``PIL.ImageOps.exif_transpose`` (all eight values; ``torchvision.io.decode_image(...,
apply_exif_orientation=True)`` gives the same pixels for JPEG and PNG), and converts:

- 8-bit modes (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``, ...)
  with Pillow's ``convert("RGB")`` (alpha is dropped, not composited, as both Pillow and
  torchvision do), divided by 255;
- 16-bit grayscale (``I;16`` and its byte orders; a 16-bit PNG that an older Pillow opens as
  ``I``) as its integer values divided by 65535, repeated on the three channels;
- 32-bit integer (``I``, other than PNG) and floating-point (``F``) images have no fixed range to
  scale to ``[0, 1]`` and are refused, naming the file and the mode.

Pillow reads a 16-bit-per-channel RGB PNG as 8-bit RGB (the high byte of each value); that is
what you get here too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from instseg_edu.data.annotations import DataError, MissingFileError

#: The EXIF tag that holds the orientation (1 = as stored).
EXIF_ORIENTATION = 0x0112

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def exif_orientation(path: str | os.PathLike) -> int:
    """The file's EXIF orientation (1–8), 1 when it has none or cannot be read."""
    try:
        with Image.open(path) as pil:
            value = pil.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_image(path: str | os.PathLike, where: str = "") -> torch.Tensor:
    """An image file as ``float32 [3, H, W]`` in ``[0, 1]``, turned by its EXIF orientation.

    Args:
        path: any format Pillow reads (PNG, JPEG, BMP, TIFF, WebP, GIF: the first frame, ...).
        where: what error messages start with, e.g. ``"train.json: image 7"``.

    Returns:
        ``float32 [3, H, W]``; ``(H, W)`` is the size as a viewer shows it.

    Raises:
        MissingFileError: no such file.
        DataError: unreadable or truncated, or a mode without a fixed range (``I``, ``F``).
    """
    path = Path(path)
    prefix = f"{where}: " if where else ""
    if not path.is_file():
        raise MissingFileError(f"{prefix}file {path} not found")
    try:
        with Image.open(path) as pil:
            file_format = pil.format
            if pil.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
                pil = ImageOps.exif_transpose(pil)
            return _to_tensor(pil, file_format, path, prefix)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{prefix}cannot read {path}: {e}") from e


def _to_tensor(pil: Image.Image, file_format: str | None, path: Path, prefix: str) -> torch.Tensor:
    mode = pil.mode
    if mode in _SIXTEEN_BIT or (mode == "I" and file_format == "PNG"):  # PNG: at most 16 bits
        gray = np.asarray(pil).astype(np.float32) / 65535  # [H, W]
        return torch.from_numpy(gray)[None].expand(3, -1, -1).contiguous()  # [3, H, W]
    if mode in ("I", "F") or mode.startswith(("I;", "F;")):
        kind = "32-bit integer" if mode.startswith("I") else "floating-point"
        raise DataError(
            f"{prefix}{path} has mode {mode!r} ({kind} pixels), which has no fixed range to "
            "scale to [0, 1]; save it as 8- or 16-bit"
        )
    try:
        if mode in ("P", "PA"):  # palette transparency goes through RGBA without Pillow's warning
            pil = pil.convert("RGBA")
        rgb = np.asarray(pil.convert("RGB"))  # [H, W, 3] uint8
    except ValueError as e:
        raise DataError(
            f"{prefix}{path} has mode {mode!r}, which Pillow cannot turn into RGB: {e}"
        ) from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255)  # [3, H, W]
