"""A synthetic whole slide with known cells: synthetic fields mosaicked on glass, written as
a tiled pyramidal TIFF (tests, demos).

Fields come from :func:`segpc.io.synthetic.make_image` and sit on a grid separated by gaps
of bare background; the outer fields touch the slide's edges, so cells are cut by the slide
border too, and any tile grid finer than a field cuts cells at its seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segpc.io.synthetic import PALETTE, make_image
from segpc.method.instances import Instance


@dataclass
class SyntheticSlide:
    """Level 0 of the slide, its plasma cells (slide-sized masks: small slides only), and the
    fields it was made of with their top-left corners (y, x) in the slide."""

    image: np.ndarray
    truth: list[Instance]
    fields: list[tuple[np.ndarray, list[Instance], tuple[int, int]]]


def mosaic(rows: int, cols: int, field_size: tuple[int, int] = (320, 240), gap: int = 40,
           seed: int = 0, empty: tuple[int, ...] = ()) -> SyntheticSlide:
    """``rows`` x ``cols`` fields of ``field_size`` (width, height), ``gap`` px of glass apart;
    the grid positions in ``empty`` (row-major indices) stay bare glass."""
    fw, fh = field_size
    height, width = rows * fh + (rows - 1) * gap, cols * fw + (cols - 1) * gap
    rng = np.random.default_rng([seed, 10_000])
    glass = np.array(PALETTE["background"], np.float32)
    image = np.clip(glass + rng.normal(0, 1.5, (height, width, 3)), 0, 255).astype(np.uint8)
    truth, fields = [], []
    for i in range(rows * cols):
        if i in empty:
            continue
        y, x = (i // cols) * (fh + gap), (i % cols) * (fw + gap)
        rgb, cells = make_image(np.random.default_rng([seed, i]), fw, fh)
        image[y:y + fh, x:x + fw] = rgb
        fields.append((rgb, cells, (y, x)))
        for c in cells:
            nuc, cell = np.zeros((height, width), bool), np.zeros((height, width), bool)
            nuc[y:y + fh, x:x + fw], cell[y:y + fh, x:x + fw] = c.nucleus, c.cell
            truth.append(Instance(nuc, cell, k=len(truth) + 1))
    return SyntheticSlide(image, truth, fields)


def write_pyramidal_tiff(path: str | Path, image: np.ndarray, mpp: float | None = None,
                         levels: int = 3, tile: int = 128, compression: str = "zlib",
                         subifds: bool = True) -> None:
    """A tiled pyramidal TIFF: level 0 and ``levels - 1`` halvings (area-averaged) as its
    SubIFDs (``subifds``, tiffslide reads them), or as the pages after the first (OpenSlide's
    generic TIFF layout; tiffslide reads it too); ``mpp`` (µm per pixel) in the resolution
    tags. Lossless by default, so reads equal the pixels written."""
    import tifffile

    opts = dict(tile=(tile, tile), photometric="rgb", compression=compression)
    extra = {} if mpp is None else dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(str(path)) as tw:
        tw.write(image, **({"subifds": levels - 1} if subifds else {}), **extra, **opts)
        for k in range(1, levels):
            h, w = image.shape[0] >> k, image.shape[1] >> k
            tw.write(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), subfiletype=1, **opts)
