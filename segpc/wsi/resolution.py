"""The slide at the pixel size a bundle was trained at: pyramid level and resampling.

The method is tuned to a magnification (nucleus diameter, crop sizes), so a slide is read at
the pyramid level nearest the target from the fine side and resampled the rest of the way
(:func:`choose_level`). :class:`SlideView` is that resampled slide as one image: the grid
tiles, cells and areas are measured on ("analysis pixels").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from segpc.errors import InputError
from segpc.method.crops import Box
from segpc.wsi.slide import Slide

TOLERANCE = 0.02  # pixel sizes within 2% are the same: no resampling for scanner rounding


def choose_level(slide_mpp: float | None, target_mpp: float | None, downsamples: list[float],
                 tolerance: float = TOLERANCE) -> tuple[int, float]:
    """(level, factor): read ``level``, then resize by ``factor`` (analysis px per level px).

    The coarsest level whose pixels are not coarser than ``target_mpp`` (within
    ``tolerance``), so resampling only ever shrinks (``factor`` <= 1) and no detail the
    target needs is lost; 1.0 when that level matches. A target finer than level 0 gives
    level 0 and ``factor`` > 1 (upsampling: the best the scan allows). Either pixel size
    unknown: level 0 as it is.
    """
    if slide_mpp is None or target_mpp is None:
        return 0, 1.0
    if not (slide_mpp > 0 and target_mpp > 0):
        raise InputError(f"pixel sizes must be > 0, got slide {slide_mpp} and target {target_mpp} µm")
    fine = [i for i, d in enumerate(downsamples) if slide_mpp * d <= target_mpp * (1 + tolerance)]
    by_size = downsamples.__getitem__
    level = max(fine, key=by_size) if fine else min(range(len(downsamples)), key=by_size)
    factor = slide_mpp * downsamples[level] / target_mpp
    return level, 1.0 if abs(factor - 1) <= tolerance else factor


@dataclass
class SlideView:
    """The slide's ``level`` resized by ``factor``: what tiles are cut from.

    ``mpp`` is the pixel size of this view (None when unknown); ``to_level0`` converts its
    pixels to level-0 pixels (multiply coordinates).
    """

    slide: Slide
    level: int
    factor: float
    mpp: float | None

    @classmethod
    def at(cls, slide: Slide, target_mpp: float | None = None, mpp: float | None = None) -> "SlideView":
        """The view at ``target_mpp``; ``mpp`` stands in for a slide whose metadata lacks it
        (the file's own value wins when present)."""
        slide_mpp = slide.mpp or mpp
        if target_mpp is not None and slide_mpp is None:
            raise InputError(f"{slide.uri}: the slide does not record its pixel size; pass mpp "
                             "(µm per level-0 pixel)")
        level, factor = choose_level(slide_mpp, target_mpp, slide.downsamples)
        view_mpp = target_mpp if target_mpp is not None and factor != 1.0 else (
            None if slide_mpp is None else slide_mpp * slide.downsamples[level])
        return cls(slide, level, factor, view_mpp)

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.slide.level_shapes[self.level]
        return int(h * self.factor), int(w * self.factor)

    @property
    def to_level0(self) -> float:
        return self.slide.downsamples[self.level] / self.factor

    def read(self, box: Box) -> np.ndarray:
        """RGB uint8 of ``box`` (view pixels, inside :attr:`shape`).

        Resampled with one global mapping (pixel centres: level = (view + 0.5) / factor - 0.5),
        after an anti-aliasing blur when shrinking, from a level region padded by the filters'
        reach: a pixel comes out the same whichever tile reads it, so tiles agree on seams.
        """
        y0, x0, y1, x1 = box
        h, w = self.shape
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise InputError(f"{self.slide.uri}: box {box} leaves the view of shape {(h, w)}")
        if self.factor == 1.0:
            return self.slide.read_region(self.level, box)
        f = self.factor
        sigma = 0.5 * math.sqrt(max(1 / f**2 - 1, 0.0))  # ~ the area filter of a 1/f shrink
        pad = 2 + math.ceil(3 * sigma)
        lh, lw = self.slide.level_shapes[self.level]
        ly0, lx0 = max(0, math.floor((y0 + 0.5) / f - 0.5) - pad), max(0, math.floor((x0 + 0.5) / f - 0.5) - pad)
        ly1, lx1 = min(lh, math.ceil((y1 + 0.5) / f - 0.5) + pad + 1), min(lw, math.ceil((x1 + 0.5) / f - 0.5) + pad + 1)
        region = self.slide.read_region(self.level, (ly0, lx0, ly1, lx1)).astype(np.float32)
        if sigma > 0:
            region = cv2.GaussianBlur(region, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        # dst = f * src + (0.5 f - 0.5), in global coordinates, shifted to both origins
        m = np.array([[f, 0, f * lx0 + 0.5 * f - 0.5 - x0], [0, f, f * ly0 + 0.5 * f - 0.5 - y0]], np.float64)
        out = cv2.warpAffine(region, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
