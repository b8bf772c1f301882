"""Decode and validate slide images, and the pixel operations both stages share.

Every check raises :class:`InputError` naming the input, so a batch job can record it as an
error row instead of dying deep inside OpenCV.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from segpc.errors import InputError

IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
# The largest SegPC camera is 2560x1920 (4.9 MP); 50 MP leaves room for whole-field scans
# while refusing decompression bombs before any pixel buffer is allocated.
MAX_PIXELS = 50_000_000
# Anything smaller cannot hold a whole plasma cell at the cameras' magnification.
MIN_SIDE = 32


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the file header alone, without decoding the pixels."""
    from PIL import Image  # pillow reads headers lazily; OpenCV cannot

    Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit below, with a clearer message
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.UnidentifiedImageError:
        raise InputError(f"{name}: not an image in a known format (BMP, PNG, JPEG, TIFF)") from None
    except Exception as exc:  # pillow raises many types for bad headers
        raise InputError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from None


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array (H, W, 3), or raise InputError naming ``name``.

    Refuses what the models cannot take honestly: grayscale, alpha, more than 8 bits per
    channel, images too small to hold a cell, and images over ``max_pixels`` (checked from
    the header, before any pixel buffer is allocated). Pillow decodes, because unlike
    OpenCV it notices truncated files instead of returning a grey tail.
    """
    from PIL import Image

    if not data:
        raise InputError(f"{name}: empty file (0 bytes)")
    width, height = image_size(data, name)
    if width * height > max_pixels:
        raise InputError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    if min(width, height) < MIN_SIDE:
        raise InputError(f"{name}: {width}x{height} is too small to hold a cell")
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            if mode in _DEPTH:
                raise InputError(f"{name}: {_DEPTH.get(mode, mode)} pixels; expected 8-bit RGB")
            if _bits_per_sample(im, data) > 8:  # pillow would quietly cut these to 8 bits
                raise InputError(f"{name}: {_bits_per_sample(im, data)}-bit (uint16) pixels; expected 8-bit RGB")
            if mode in ("L", "LA"):
                raise InputError(f"{name}: grayscale image; expected 8-bit RGB (Jenner-Giemsa colour)")
            if mode in ("RGBA", "PA", "RGBa") or (mode == "P" and "transparency" in im.info):
                raise InputError(f"{name}: has an alpha channel ({mode}); expected 8-bit RGB")
            if mode not in ("RGB", "P"):
                raise InputError(f"{name}: {mode} pixels; expected 8-bit RGB")
            arr = np.asarray(im if mode == "RGB" else im.convert("RGB"))  # no copy for RGB
    except InputError:
        raise
    except Exception as exc:  # pillow raises OSError, SyntaxError, ValueError ... on bad data
        raise InputError(f"{name}: cannot be decoded, truncated or corrupt image data ({exc})") from None
    return np.ascontiguousarray(arr)


def _bits_per_sample(im, data: bytes) -> int:
    """Bits per channel from the TIFF tag or the PNG header (both may hold 16)."""
    tiff_bits = getattr(im, "tag_v2", {}).get(258) if hasattr(im, "tag_v2") else None
    if tiff_bits:
        return max(tiff_bits) if isinstance(tiff_bits, tuple) else int(tiff_bits)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        return data[24]
    return 8


_DEPTH = {"1": "1-bit", "I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I": "int32",
          "F": "float32"}


def read_image(path: str | Path) -> np.ndarray:
    """Read a local image file as RGB uint8."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror})") from None
    return decode_image(data, str(p))


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of an RGB or single-channel uint8 array."""
    if arr.ndim == 3:
        arr = arr[..., ::-1]
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise InputError(f"cannot encode array of shape {arr.shape} as PNG")
    return buf.tobytes()


def write_image(path: str | Path, arr: np.ndarray) -> None:
    """Write RGB (or single-channel) uint8 to any format OpenCV knows by the suffix."""
    p = Path(path)
    if arr.ndim == 3:
        arr = arr[..., ::-1]
    if not cv2.imwrite(str(p), np.ascontiguousarray(arr)):
        raise InputError(f"{p}: cannot write image")


def equalize(rgb: np.ndarray) -> np.ndarray:
    """Per-channel histogram equalisation (the published code meant this; it indexed rows)."""
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(rgb[..., c])) for c in range(3)], -1)
