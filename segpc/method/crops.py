"""Multi-scale crop geometry (METHOD.md section 4) and its exact inverse.

Pure numpy. Boxes are ``(y0, x0, y1, x1)`` with exclusive ends, in image pixels. A crop
window may extend past the image; the part outside is zero-filled, and pasting back writes
only the in-image part, so ``paste(extract(x))`` recovers the in-image window exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from segpc.errors import InputError

Box = tuple[int, int, int, int]


def half_up(x: float) -> int:
    """round() half away from zero; Python's round() is banker's rounding."""
    return int(math.floor(x + 0.5))


def box_or_none(mask: np.ndarray) -> Box | None:
    """Tight box of a boolean mask, None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def mask_box(mask: np.ndarray) -> Box:
    """Tight box of a non-empty boolean mask."""
    box = box_or_none(mask)
    if box is None:
        raise InputError("mask_box: the mask is empty")
    return box


def crop_window(box: Box, scale: float) -> Box:
    """Pad a nucleus box by round(s*h/2) rows and round(s*w/2) columns on each side."""
    y0, x0, y1, x1 = box
    if y1 <= y0 or x1 <= x0:
        raise InputError(f"crop_window: empty box {box}")
    if scale < 0:
        raise InputError(f"crop_window: negative scale {scale}")
    py, px = half_up(scale * (y1 - y0) / 2), half_up(scale * (x1 - x0) / 2)
    return y0 - py, x0 - px, y1 + py, x1 + px


def clip_box(window: Box, shape: tuple[int, int]) -> Box:
    """The in-image part of a window (may be empty if the window lies outside)."""
    y0, x0, y1, x1 = window
    h, w = shape[:2]
    return max(y0, 0), max(x0, 0), min(max(y1, 0), h), min(max(x1, 0), w)


def extract(image: np.ndarray, window: Box) -> np.ndarray:
    """The window's pixels, zero where the window leaves the image. Keeps trailing axes."""
    y0, x0, y1, x1 = window
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], image.dtype)
    cy0, cx0, cy1, cx1 = clip_box(window, image.shape)
    if cy1 > cy0 and cx1 > cx0:
        out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = image[cy0:cy1, cx0:cx1]
    return out


def paste(crop: np.ndarray, window: Box, shape: tuple[int, int],
          out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`extract`: write the crop's in-image part into a (H, W, ...) array."""
    y0, x0, y1, x1 = window
    if crop.shape[:2] != (y1 - y0, x1 - x0):
        raise InputError(f"paste: crop {crop.shape[:2]} does not match window {window}")
    if out is None:
        out = np.zeros(tuple(shape[:2]) + crop.shape[2:], crop.dtype)
    cy0, cx0, cy1, cx1 = clip_box(window, shape)
    if cy1 > cy0 and cx1 > cx0:
        out[cy0:cy1, cx0:cx1] = crop[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


@dataclass(frozen=True)
class Fit:
    """How a (h, w) crop sits in the network input: resized by ``factor``; centred in a
    square of side ``size`` (:func:`plan_fit`), or at the top left of an input whose longer
    side is ``size`` (:func:`fit_at_factor`)."""

    h: int
    w: int
    size: int
    factor: float  # 1.0 when the crop fits and is only zero-padded
    top: int
    left: int
    inner_h: int
    inner_w: int


def plan_fit(h: int, w: int, size: int) -> Fit:
    """Aspect-preserving fit: pad a crop that fits, shrink one that does not, centre both."""
    factor = min(1.0, size / max(h, w))
    ih, iw = (h, w) if factor == 1.0 else (max(1, half_up(h * factor)), max(1, half_up(w * factor)))
    ih, iw = min(ih, size), min(iw, size)
    return Fit(h, w, size, factor, (size - ih) // 2, (size - iw) // 2, ih, iw)


def fit_to_input(crop: np.ndarray, size: int, interpolation: int = cv2.INTER_AREA) -> tuple[np.ndarray, Fit]:
    """Place a (h, w[, C]) crop into a zero (size, size[, C]) input; return it with its Fit."""
    fit = plan_fit(crop.shape[0], crop.shape[1], size)
    inner = crop
    if fit.factor != 1.0:
        inner = cv2.resize(crop, (fit.inner_w, fit.inner_h), interpolation=interpolation)
        if crop.ndim == 3 and inner.ndim == 2:  # OpenCV drops a single channel axis
            inner = inner[..., None]
    out = np.zeros((size, size) + crop.shape[2:], crop.dtype)
    out[fit.top:fit.top + fit.inner_h, fit.left:fit.left + fit.inner_w] = inner
    return out, fit


def fit_at_factor(image: np.ndarray, factor: float, multiple: int = 32,
                  interpolation: int = cv2.INTER_AREA) -> tuple[np.ndarray, Fit]:
    """Resize a (h, w, C) image by ``factor`` and zero-pad it right and below to multiples of
    ``multiple`` (what a U-Net's strides need): a whole-slide tile larger than the training
    fields, seen at the scale a field is (:func:`fit_to_input` would shrink it further)."""
    h, w = image.shape[:2]
    # by the factor itself, not by an output size (whose rounding would change the scale a
    # little with the image's size): tiles that start on one grid are resampled on it
    inner = image if factor == 1.0 else cv2.resize(image, None, fx=factor, fy=factor, interpolation=interpolation)
    ih, iw = inner.shape[:2]
    ph, pw = -(-ih // multiple) * multiple, -(-iw // multiple) * multiple
    out = np.zeros((ph, pw) + image.shape[2:], image.dtype)
    out[:ih, :iw] = inner.reshape((ih, iw) + image.shape[2:])
    return out, Fit(h, w, max(ph, pw), factor, 0, 0, ih, iw)


def cut_and_fit(source: np.ndarray, origin: tuple[int, int], window: Box, image_shape: tuple[int, int],
                out: np.ndarray, fit: Fit, interpolation: int = cv2.INTER_AREA) -> None:
    """:func:`extract` and :func:`fit_to_input` in one step, without the zero-filled window.

    ``source`` holds image pixels (or a per-pixel mask) from ``origin`` = (y, x) on, covering
    at least the in-image part of ``window``; that part alone is resized to its place in the
    fitted input ``out`` (``fit`` = ``plan_fit`` of the window), whose rest stays zero, as the
    window's outside would. When the window fits unresized this equals the two-step way
    exactly; otherwise only the edge of the in-image part may differ by the resampling.
    """
    y0, x0, y1, x1 = window
    cy0, cx0, cy1, cx1 = clip_box(window, image_shape)
    if cy1 <= cy0 or cx1 <= cx0:
        return
    sy, sx = fit.inner_h / fit.h, fit.inner_w / fit.w
    ty0, ty1 = fit.top + half_up((cy0 - y0) * sy), fit.top + half_up((cy1 - y0) * sy)
    tx0, tx1 = fit.left + half_up((cx0 - x0) * sx), fit.left + half_up((cx1 - x0) * sx)
    if ty1 <= ty0 or tx1 <= tx0:
        return
    oy, ox = origin
    region = source[cy0 - oy:cy1 - oy, cx0 - ox:cx1 - ox]
    if region.shape[:2] != (ty1 - ty0, tx1 - tx0):
        region = cv2.resize(region, (tx1 - tx0, ty1 - ty0), interpolation=interpolation)
        if out.ndim == 3 and region.ndim == 2:  # OpenCV drops a single channel axis
            region = region[..., None]
    out[ty0:ty1, tx0:tx1] = region


def unfit(arr: np.ndarray, fit: Fit, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Inverse of :func:`fit_to_input` for a (size, size) map: back to the crop's (h, w)."""
    inner = arr[fit.top:fit.top + fit.inner_h, fit.left:fit.left + fit.inner_w]
    if fit.factor == 1.0:
        return inner.copy()
    return cv2.resize(inner, (fit.w, fit.h), interpolation=interpolation)


def input_size_for(scale: float, small: int, large: int, switch: float = 1.25) -> int:
    """Per-scale network input: ``small`` below ``switch`` (256 at paper size), else ``large`` (384)."""
    return small if scale < switch else large
