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
    except Exception as exc:  # pillow raises many types for bad headers
        raise InputError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from None


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array (H, W, 3), or raise InputError naming ``name``.

    Refuses what the models cannot take honestly: grayscale, alpha, more than 8 bits per
    channel, images too small to hold a cell, and images over ``max_pixels``.
    """
    if not data:
        raise InputError(f"{name}: empty file (0 bytes)")
    width, height = image_size(data, name)
    if width * height > max_pixels:
        raise InputError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InputError(f"{name}: cannot be decoded (truncated or corrupt image data)")
    if arr.dtype != np.uint8:
        raise InputError(f"{name}: {arr.dtype} pixels; expected 8-bit RGB")
    if arr.ndim == 2 or arr.shape[2] == 1:
        raise InputError(f"{name}: grayscale image; expected 8-bit RGB (Jenner-Giemsa colour)")
    if arr.shape[2] == 4:
        raise InputError(f"{name}: has an alpha channel (RGBA); expected 8-bit RGB")
    if arr.shape[2] != 3:
        raise InputError(f"{name}: {arr.shape[2]} channels; expected 3 (RGB)")
    if min(arr.shape[:2]) < MIN_SIDE:
        raise InputError(f"{name}: {arr.shape[1]}x{arr.shape[0]} is too small to hold a cell")
    _check_complete(data, name)
    return np.ascontiguousarray(arr[..., ::-1])


def _check_complete(data: bytes, name: str) -> None:
    """OpenCV decodes truncated PNG/JPEG/BMP files silently (grey tail); pillow notices."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:
        raise InputError(f"{name}: truncated or corrupt image data ({exc})") from None


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
