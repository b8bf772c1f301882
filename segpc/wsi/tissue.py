"""Which tiles hold stained material: a cheap test before any network runs.

Glass is bright and grey; stained cells (nuclei, cytoplasm, red cells) are saturated. A
pixel is *stained* when its HSV saturation ``(max - min) / max`` is at least
``min_saturation``; a tile is analysed when at least ``min_fraction`` of its core is stained.
A plasma cell owned by a tile has its nucleus centre in the core, and a nucleus is among the
most saturated things on a slide, so the default fraction (0.1%, a few dozen pixels of a
field-sized core) skips empty glass without losing cells. On a slide with a small pyramid
level the test reads that level once for all tiles (:func:`tile_fractions`), so empty tiles
are never read at full resolution.
"""

from __future__ import annotations

import math

import numpy as np

from segpc.wsi.resolution import SlideView
from segpc.wsi.tiles import Tile

MIN_SATURATION = 0.15  # glass and its illumination tint stay under ~0.08 on aspirate scans
MIN_FRACTION = 0.001
MIN_CORE_PX = 16  # a core must span this many pixels of the level the test reads
MAX_LEVEL_PX = 16_000_000  # the largest level read whole for the test (48 MB of RGB)


def stained(rgb: np.ndarray, min_saturation: float = MIN_SATURATION) -> np.ndarray:
    """Bool (H, W): pixels whose saturation is at least ``min_saturation``."""
    hi = rgb.max(axis=2).astype(np.int32)
    lo = rgb.min(axis=2).astype(np.int32)
    return (hi - lo) >= min_saturation * np.maximum(hi, 1)


def tissue_fraction(rgb: np.ndarray, min_saturation: float = MIN_SATURATION) -> float:
    """Share of stained pixels in an RGB image."""
    return float(stained(rgb, min_saturation).mean()) if rgb.size else 0.0


def coarse_level(view: SlideView, core: tuple[int, int]) -> int | None:
    """The coarsest pyramid level on which a ``core`` of the view still spans
    :data:`MIN_CORE_PX` pixels and that is small enough to read whole; None if none is."""
    slide, best = view.slide, None
    for level, (d, (h, w)) in enumerate(zip(slide.downsamples, slide.level_shapes)):
        px_per_view = view.to_level0 / d  # level pixels per view pixel
        if min(core) * px_per_view >= MIN_CORE_PX and h * w <= MAX_LEVEL_PX:
            if best is None or d > slide.downsamples[best]:
                best = level
    return best


def tile_fractions(view: SlideView, tiles: list[Tile], min_saturation: float = MIN_SATURATION) -> list[float] | None:
    """Per tile, the stained share of its core, measured on one coarse level read whole;
    None when the slide has no level both coarse and detailed enough (test each tile's own
    pixels instead, with :func:`tissue_fraction`)."""
    if not tiles:
        return []
    core = max(t.core[2] - t.core[0] for t in tiles), max(t.core[3] - t.core[1] for t in tiles)  # the full-size core
    level = coarse_level(view, core)
    if level is None:
        return None
    h, w = view.slide.level_shapes[level]
    mask = stained(view.slide.read_region(level, (0, 0, h, w)), min_saturation)
    s = view.to_level0 / view.slide.downsamples[level]
    out = []
    for t in tiles:
        y0, x0, y1, x1 = t.core
        part = mask[math.floor(y0 * s):max(math.ceil(y1 * s), math.floor(y0 * s) + 1),
                    math.floor(x0 * s):max(math.ceil(x1 * s), math.floor(x0 * s) + 1)]
        out.append(float(part.mean()) if part.size else 0.0)
    return out
