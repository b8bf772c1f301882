"""Stain normalisation: every image recoloured to the training images' stain before both stages.

Labs stain aspirates differently (Jenner-Giemsa, May-Grünwald-Giemsa, each batch of dye), so a
bundle trained in one lab sees other colours in another. ``--stain-normalize`` fits a reference
on the training split (:func:`fit_reference`) and the bundle keeps it in its configuration
(``config.stain``); training and inference then recolour each image to it right after decoding
(:func:`normalize_stain`), so the networks see the training colours wherever they run.

The colour maths is torchstain's numpy backend (no torch or TensorFlow needed): Macenko
(estimate each image's two stain vectors and concentrations in optical density, rebuild with the
reference's) or Reinhard (match the mean and spread of each LAB channel). torchstain assumes
stained pixels are plentiful; an image with too few (mostly background, blank, saturated) is
left unchanged rather than failing the job, with a warning and a count
(:attr:`StainNormalizer.unchanged`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from functools import lru_cache

import numpy as np

from segpc.errors import InputError

METHODS = ("macenko", "reinhard")
IO = 240  # transmitted light, torchstain's default: OD = -log((I + 1) / IO)
BETA = 0.15  # optical density below which a pixel counts as background (torchstain's default)
MIN_STAINED = 200  # Macenko needs at least this many stained pixels to estimate two stain vectors
ESTIMATE_PIXELS = 1 << 19  # pixels an image's own stain is estimated on (640x480 = 307,200: all)
PIXELS_PER_IMAGE = 200_000
log = logging.getLogger(__name__)


def _macenko():
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

    return NumpyMacenkoNormalizer()


def _reinhard():
    from torchstain.numpy.normalizers.reinhard import NumpyReinhardNormalizer

    return NumpyReinhardNormalizer()


def _check_rgb(image: np.ndarray, name: str = "image") -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"{name}: expected RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")


def stained_od(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) optical density of the pixels above :data:`BETA` in every channel (Macenko's test)."""
    od = -np.log((rgb.reshape(-1, 3).astype(np.float32) + 1) / IO)
    return od[(od >= BETA).all(axis=1)]


def estimation_pixels(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) pixels an image's stain is estimated on: all of them up to :data:`ESTIMATE_PIXELS`,
    else every k-th (a stain is a property of the whole image, not of each pixel)."""
    flat = rgb.reshape(-1, 3)
    return flat[:: -(-len(flat) // ESTIMATE_PIXELS)]


def stained_pixels(rgb: np.ndarray) -> int:
    return len(stained_od(rgb))


def mosaic(images: Iterable[np.ndarray], pixels_per_image: int = PIXELS_PER_IMAGE, seed: int = 0) -> np.ndarray:
    """Up to ``pixels_per_image`` random pixels of each image, as one (N, 1, 3) uint8 image: a
    reference fitted on it weighs every image alike, whatever its size."""
    rng = np.random.default_rng(seed)
    parts = []
    for n, image in enumerate(images):
        _check_rgb(image, f"reference image {n}")
        flat = image.reshape(-1, 3)
        if len(flat) > pixels_per_image:
            flat = flat[rng.choice(len(flat), pixels_per_image, replace=False)]
        parts.append(flat)
    if not parts:
        raise InputError("stain reference: no training images to fit it on")
    return np.concatenate(parts)[:, None, :]


def fit_reference(images: Iterable[np.ndarray], method: str) -> dict:
    """The JSON-serialisable reference of ``method`` fitted on a mosaic of ``images`` (several
    training images: one image's stain is one batch of dye). Macenko: the stain matrix
    ``HERef`` (3 x 2, optical density per RGB channel of hematoxylin- and eosin-like stains) and
    ``maxCRef`` (99th-percentile concentration of each); Reinhard: LAB ``means`` and ``stds``."""
    if method not in METHODS:
        raise InputError(f"stain normalisation {method!r}: choose one of {', '.join(METHODS)}")
    pixels = mosaic(images)
    if method == "macenko":
        if stained_pixels(pixels) < MIN_STAINED:
            raise InputError(f"stain reference: the training images have fewer than {MIN_STAINED} stained "
                             "pixels, too few to fit a Macenko reference")
        norm = _macenko()
        norm.fit(pixels, Io=IO, beta=BETA)
        ref = {"HERef": norm.HERef.tolist(), "maxCRef": norm.maxCRef.tolist()}
    else:
        norm = _reinhard()
        norm.fit(pixels)
        ref = {"means": [float(v) for v in norm.target_means], "stds": [float(v) for v in norm.target_stds]}
    values = np.array([v for vs in ref.values() for v in np.ravel(vs)], np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"stain reference: the {method} fit on the training images is not finite")
    return ref


class StainNormalizer:
    """``__call__(rgb)``: HxWx3 uint8 RGB in, the same shape and dtype out, in the reference's
    stain. An image it cannot estimate a stain for comes back unchanged and is counted."""

    def __init__(self, method: str, reference: dict):
        if method not in METHODS:
            raise InputError(f"stain normalisation {method!r}: choose one of {', '.join(METHODS)}")
        self.method, self.unchanged = method, 0
        try:
            if method == "macenko":
                self._norm = _macenko()
                self._norm.HERef = np.array(reference["HERef"], np.float64).reshape(3, 2)
                self._norm.maxCRef = np.array(reference["maxCRef"], np.float64).reshape(2)
            else:
                self._norm = _reinhard()
                self._norm.target_means = np.array(reference["means"], np.float32).reshape(3)
                self._norm.target_stds = np.array(reference["stds"], np.float32).reshape(3)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"stain reference for {method}: invalid ({type(exc).__name__}: {exc})") from None

    def __call__(self, rgb: np.ndarray, name: str = "image") -> np.ndarray:
        _check_rgb(rgb, name)
        why = self._unusable(rgb)
        out = None
        if why is None:
            try:  # a division by zero or a NaN (cast to uint8 inside torchstain) raises, not passes
                with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
                    out = self._normalize(rgb)
            except (np.linalg.LinAlgError, ValueError, IndexError, FloatingPointError) as exc:
                why = f"{type(exc).__name__}: {exc}"
        if out is None:
            self.unchanged += 1
            log.warning("%s: stain not normalised, left unchanged (%s)", name, why or "no finite result")
            return rgb
        return out

    def _unusable(self, rgb: np.ndarray) -> str | None:
        """Why this image has no stain to estimate, or None."""
        if self.method == "macenko":
            od = stained_od(estimation_pixels(rgb))
            if len(od) < MIN_STAINED:
                return f"{len(od)} stained pixels, fewer than {MIN_STAINED}"
            # two stain vectors need the stained colours to spread over a plane, not one point
            # (a black or saturated frame) or one line
            if np.linalg.eigvalsh(np.cov(od[:: max(1, len(od) // 100_000)].T))[1] < 1e-6:
                return "the stained pixels hold fewer than two stain colours"
            return None
        spread = rgb.reshape(-1, 3).std(axis=0)
        return None if (spread > 0.5).all() else "a colour channel is flat"

    def _normalize(self, rgb: np.ndarray) -> np.ndarray:
        return self._macenko(rgb) if self.method == "macenko" else self._reinhard(rgb)

    def _reinhard(self, rgb: np.ndarray) -> np.ndarray:
        """torchstain's Reinhard normalisation (each LAB channel standardised, then given the
        reference's mean and spread, in CIE units: L 0-100, a and b about 0) with OpenCV's
        colour conversions instead of its numpy ones: the same formulas (sRGB, D65), faster,
        and out-of-gamut colours clipped where torchstain's uint8 cast wraps them around."""
        import cv2

        lab = cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
        flat = lab.reshape(-1, 3)
        mean, std = flat.mean(axis=0, dtype=np.float64), flat.std(axis=0, dtype=np.float64)
        gain = self._norm.target_stds / std
        lab = lab * gain.astype(np.float32) + (self._norm.target_means - mean * gain).astype(np.float32)
        out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        return (np.clip(out, 0, 1) * 255).astype(np.uint8)

    def _macenko(self, rgb: np.ndarray) -> np.ndarray:
        """torchstain's Macenko normalisation, with this image's stain matrix and 99th-percentile
        concentrations estimated on :func:`estimation_pixels` (every pixel up to
        :data:`ESTIMATE_PIXELS`, so field images of SegPC's size get torchstain's own result)
        and the per-pixel unmixing as two float32 matrix products instead of a least-squares
        solve over every pixel: 3.7x faster on a 2040x1536 image (benchmarks/stain_speed.py)."""
        image = _macenko()
        image.fit(estimation_pixels(rgb)[:, None, :], Io=IO, beta=BETA)  # this image's HE and maxC
        od = -np.log((rgb.reshape(-1, 3).astype(np.float32) + 1) / IO)
        unmix = np.linalg.pinv(image.HERef).T  # (3, 2): the least-squares concentrations of a full-rank HE
        scale = self._norm.maxCRef / image.maxCRef
        out = od @ (unmix * scale).astype(np.float32) @ (-self._norm.HERef.T).astype(np.float32)
        np.exp(out, out=out)
        out *= IO
        np.minimum(out, 255, out=out)
        return out.astype(np.uint8).reshape(rgb.shape)


@lru_cache(maxsize=4)
def _cached(method: str, reference_json: str) -> StainNormalizer:
    return StainNormalizer(method, json.loads(reference_json))


def normalizer(stain) -> StainNormalizer | None:
    """The process's normaliser for a ``StainConfig`` (one per reference), or None for "none"."""
    if stain is None or stain.method == "none":
        return None
    return _cached(stain.method, json.dumps(stain.reference, sort_keys=True))


def normalize_stain(image: np.ndarray, stain, name: str = "image") -> np.ndarray:
    """``image`` in the bundle's reference stain (``config.stain``); unchanged without one."""
    norm = normalizer(stain)
    return image if norm is None else norm(image, name)
