"""The OpenSlide backend of :class:`segpc.wsi.slide.Slide`, for the formats tiffslide cannot
read: MIRAX (``.mrxs``), Hamamatsu VMS/VMU, and TIFF variants tiffslide fails on.

OpenSlide opens local files only (it reads a MIRAX slide's companion files itself), so a
slide on object storage is read from a local copy (:func:`segpc.wsi.local_copy.local_copy`,
made once per machine), where tiffslide's slides are range-read in place. Same interface:
levels, downsamples, ``mpp``, ``read_region`` of a (y0, x0, y1, x1) box in a level's pixels.
"""

from __future__ import annotations

import numpy as np

from segpc.errors import InputError
from segpc.method.crops import Box
from segpc.wsi.slide import BLOCK_SIZE, Slide


def _openslide():
    try:
        import openslide
    except ImportError as exc:  # the package, or its native library (openslide-bin)
        raise InputError(f"this slide needs OpenSlide: pip install openslide-python openslide-bin ({exc})") from None
    return openslide


class OpenSlideSlide(Slide):
    """A whole slide read through OpenSlide from a local file (a copy, for remote slides)."""

    backend = "openslide"

    def __init__(self, uri: str, block_size: int = BLOCK_SIZE):
        super().__init__(uri, block_size)

    def _open(self):
        if self._slide is None:
            from segpc.wsi.local_copy import local_copy

            openslide = _openslide()
            path = local_copy(self.uri)
            try:
                self._slide = openslide.OpenSlide(path)
            except openslide.OpenSlideError as exc:  # the unsupported-format error is one too
                raise InputError(f"{self.uri}: not a whole slide OpenSlide reads "
                                 f"({type(exc).__name__}: {exc})") from None
        return self._slide

    def _describe(self, osl) -> None:
        self.level_shapes = [(h, w) for w, h in osl.level_dimensions]
        self.downsamples = [float(d) for d in osl.level_downsamples]
        props = osl.properties
        mx, my = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        self.mpp = float(np.mean([float(m) for m in (mx, my) if m])) if (mx or my) else None
        self.axes = "YXS"  # OpenSlide always gives RGBA
        colour = props.get("openslide.background-color") or "FFFFFF"
        self.background = np.array([int(colour[i:i + 2], 16) for i in (0, 2, 4)], np.float32)

    def _read(self, level: int, box: Box) -> np.ndarray:
        """RGB of the box: OpenSlide's premultiplied RGBA laid over the slide's background
        colour (MIRAX leaves unscanned areas transparent; black would read as tissue-free
        but dark)."""
        y0, x0, y1, x1 = box
        d = self.downsamples[level]
        # OpenSlide takes the top-left corner in level-0 pixels and the size in the level's
        x, y = round(x0 * d), round(y0 * d)
        rgba = np.asarray(self._open().read_region((x, y), level, (x1 - x0, y1 - y0)))
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        if (alpha == 255).all():
            return np.ascontiguousarray(rgb)
        out = rgb.astype(np.float32) + self.background * (1 - alpha.astype(np.float32) / 255)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
