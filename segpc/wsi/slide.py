"""Whole-slide files, local or on object storage, read tile by tile with ``tiffslide``, or
with OpenSlide for the formats tiffslide cannot read.

A slide is opened through the project's fsspec filesystems (:mod:`segpc.io.storage`), so on
``s3://`` every read is a range request of about ``block_size`` bytes: a tile costs its own
compressed bytes and the TIFF directory, never the whole file. The open file is not part of
a :class:`Slide`'s pickled state; each process (a Ray worker, later) reopens it lazily.

OpenSlide (:mod:`segpc.wsi.openslide_slide`) reads MIRAX (``.mrxs``, a file plus a folder of
``.dat`` files), Hamamatsu VMS/VMU, and the TIFF-based files tiffslide fails on; it reads
local files only, so such a slide on object storage is first downloaded whole
(:mod:`segpc.wsi.local_copy`). :func:`open_slide` picks the backend; both give the same
:class:`Slide` interface.

Which files are slides (:func:`is_whole_slide`): ``.svs .ndpi .scn .bif`` by their suffix
(TIFF-based scanner formats), ``.mrxs .vms .vmu`` too (OpenSlide only); a ``.tif``/``.tiff``
only when its first page is *tiled* and it either holds more than one resolution level (a
pyramid) or its full level exceeds the field images' limit
(:data:`segpc.io.imaging.MAX_PIXELS`). A field image saved as TIFF (stripped, or tiled but
one small level) stays a field image, as the batch job reads it today.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from segpc.errors import InputError
from segpc.io.imaging import MAX_PIXELS
from segpc.io.storage import filesystem, with_retries
from segpc.method.crops import Box

SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".vmu")
TIFF_SUFFIXES = (".tif", ".tiff")
OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu")  # not TIFF: OpenSlide reads them, tiffslide does not
BACKENDS = ("tiffslide", "openslide")
BLOCK_SIZE = 256 * 1024  # bytes per range read: about one compressed tile, a few TIFF directories


def slide_id(uri: str) -> str:
    """A slide's id: its file name without the suffix (one slide per file)."""
    return PurePosixPath(uri.rstrip("/")).stem


def _open_file(uri: str, block_size: int):
    """A seekable file object whose reads are range requests of ``block_size`` bytes."""
    fs, path = filesystem(uri)
    return with_retries(f"opening {uri}", lambda: fs.open(path, "rb", block_size=block_size,
                                                          cache_type="blockcache"))


def is_whole_slide(uri: str, block_size: int = 64 * 1024) -> bool:
    """Whether ``uri`` is a whole slide (module docstring's rule) rather than a field image.

    Suffix alone for scanner formats; a ``.tif``/``.tiff`` is opened and its TIFF directory
    read (a few small range reads), never its pixels.
    """
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES:
        return False
    with _open_file(uri, block_size) as fh:
        return _tiff_is_slide(fh)


def _tiff_is_slide(fh) -> bool:
    """The TIFF rule of the module docstring, from the file's directory alone."""
    import tifffile

    try:
        with tifffile.TiffFile(fh) as tif:
            page = tif.pages.first
            if not page.is_tiled:
                return False
            levels = len(tif.series[0].levels) if tif.series else 1
            return levels > 1 or page.imagewidth * page.imagelength > MAX_PIXELS
    except tifffile.TiffFileError:
        return False  # not a TIFF: the field reader will say what it is


TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def check_not_slide_bytes(data: bytes | None, name: str) -> None:
    """Refuse a whole slide handed over as bytes (a Parquet shard's image column): a slide
    is read tile by tile from its own file, by range requests, never decoded whole."""
    import io

    if data and data[:4] in TIFF_MAGICS and _tiff_is_slide(io.BytesIO(data)):
        shard, _, row = name.partition("#")
        raise InputError(f"{shard}: the row {row!r} holds a whole slide; whole slides are not read "
                         "from Parquet shards: list them by path under --input (or in a --manifest)")


class UnreadableSlide(InputError):
    """tiffslide cannot parse the file (:func:`open_slide` then tries OpenSlide)."""


class Slide:
    """A whole-slide image: its pyramid levels and pixel size, read a box at a time.

    ``level_shapes[l]`` is level ``l``'s (height, width); ``downsamples[l]`` its size ratio
    to level 0; ``mpp`` micrometres per level-0 pixel from the file's metadata (None when the
    file does not say). Boxes are (y0, x0, y1, x1) in the level's own pixels. This class
    reads with tiffslide (range reads); :class:`segpc.wsi.openslide_slide.OpenSlideSlide`
    overrides :meth:`_open`, :meth:`_describe` and :meth:`_read`.
    """

    backend = "tiffslide"

    def __init__(self, uri: str, block_size: int = BLOCK_SIZE):
        self.uri, self.block_size = uri, block_size
        self._slide = None
        self._describe(self._open())
        if self.axes not in ("YXS", "YX"):
            raise InputError(f"{uri}: unsupported slide layout {self.axes!r} (expected YXS or YX)")

    def _describe(self, ts) -> None:
        """Levels, downsamples, pixel size and axes from the open slide's metadata."""
        self.level_shapes: list[tuple[int, int]] = [(h, w) for w, h in ts.level_dimensions]
        self.downsamples: list[float] = [float(d) for d in ts.level_downsamples]
        props = ts.properties
        mx, my = props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")
        self.mpp: float | None = float(np.mean([m for m in (mx, my) if m])) if (mx or my) else None
        self.axes: str = props.get("tiffslide.series-axes", "YXS")

    @property
    def id(self) -> str:
        return slide_id(self.uri)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0."""
        return self.level_shapes[0]

    def _open(self):
        if self._slide is None:
            import tiffslide

            try:
                self._file = _open_file(self.uri, self.block_size)
                self._slide = tiffslide.TiffSlide(self._file)
            except FileNotFoundError:
                raise InputError(f"{self.uri}: no such slide") from None
            except Exception as exc:  # tifffile raises several types for files it cannot read
                raise UnreadableSlide(f"{self.uri}: not a readable whole slide "
                                      f"({type(exc).__name__}: {exc})") from None
        return self._slide

    def _read(self, level: int, box: Box) -> np.ndarray:
        """The level's pixels in ``box`` as stored (2-D, RGB or RGBA), one try."""
        y0, x0, y1, x1 = box
        return np.asarray(self._open().zarr_group[str(level)][y0:y1, x0:x1])

    def read_region(self, level: int, box: Box) -> np.ndarray:
        """RGB uint8 (y1-y0, x1-x0, 3) of ``box`` at ``level``; the box must lie inside it."""
        if not 0 <= level < len(self.level_shapes):
            raise InputError(f"{self.uri}: no level {level} (the slide has {len(self.level_shapes)})")
        y0, x0, y1, x1 = box
        h, w = self.level_shapes[level]
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise InputError(f"{self.uri}: box {box} leaves level {level} of shape {(h, w)}")
        region = with_retries(f"reading {self.uri} level {level} {box}", self._read, level, box)
        if region.dtype != np.uint8:
            raise InputError(f"{self.uri}: {region.dtype} pixels; only 8-bit slides are supported")
        if region.ndim == 2:
            return np.repeat(region[..., None], 3, axis=2)
        if region.shape[2] < 3:
            raise InputError(f"{self.uri}: {region.shape[2]} channels; expected RGB")
        return np.ascontiguousarray(region[..., :3])  # RGBA scanners: drop alpha

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            if getattr(self, "_file", None) is not None:
                self._file.close()
            self._slide = self._file = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"] = None  # reopened lazily in the receiving process
        state.pop("_file", None)
        return state

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(uri: str, block_size: int = BLOCK_SIZE, backend: str | None = None) -> Slide:
    """Open a whole slide (local path or any fsspec URI, ``s3://`` through the project's
    endpoint settings); reads its directory, no pixels. ``backend``: "tiffslide" or
    "openslide" to force one; by default MIRAX and VMS/VMU go to OpenSlide, the rest to
    tiffslide, and to OpenSlide when tiffslide cannot parse the file."""
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "openslide" or (backend is None and PurePosixPath(uri).suffix.lower() in OPENSLIDE_ONLY):
        return _openslide(uri)
    try:
        return Slide(uri, block_size)
    except UnreadableSlide as exc:
        if backend == "tiffslide":
            raise
        try:
            return _openslide(uri)
        except InputError as also:
            raise InputError(f"{exc}; OpenSlide cannot read it either ({also})") from None


def _openslide(uri: str) -> Slide:
    from segpc.wsi.openslide_slide import OpenSlideSlide

    return OpenSlideSlide(uri)
