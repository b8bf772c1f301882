"""Whole slides in the batch job: the rows a slide becomes, how a tile row is read, and what
is kept of a tile's result. Pure (no Ray): ``ray_jobs.listing`` and ``ray_jobs.stages`` call
these, one slide or one tile at a time, so no step needs another tile's results.

A slide file becomes one *slide row* (``kind`` "slide"; its ``image_id`` is the file's id by
the input id rule, ``slide_id`` the file name without suffix) that records the grid (tiles in
all, tiles skipped as glass), and one *tile row* per tile that holds stained material
(``kind`` "tile", ``image_id`` = ``<slide row's image_id>__tile-<row>-<col>``, which for a
slide directly under ``--input`` is ``<slide_id>__tile-<row>-<col>``). Ids depend only on
the file's path, the bundle and the flags, so a resumed run finds the same ones. What a tile
row needs to read its pixels travels with it as :class:`SlideTile` JSON (``tile`` column).

A tile's image is its read box, seen by the U-Net at the scale of a training field; its
*result* is its core: the cells of the nuclei it owns (nucleus centre in the core,
:mod:`segpc.wsi.tiles`; the others are dropped after stage 1), in the core's coordinates (a
cell may reach past the core by up to the margin). Cell ids are unique in the slide
(:func:`label_stride`): they are the values of the slide's one label pyramid, which each
tile writes for its core only (:mod:`segpc.wsi.pyramid`, :mod:`segpc.io.slide_masks`), so
no slide pixel is written twice and a cell reaching past its owner's core is cut there in
the masks (whole in ``cells/`` and the GeoJSON).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import numpy as np

from segpc.config import Config
from segpc.errors import InputError
from segpc.method.crops import Box
from segpc.method.results import ImageResult
from segpc.wsi.resolution import SlideView
from segpc.wsi.slide import Slide, open_slide
from segpc.wsi.tiles import TILE_FIELDS, Tile, slide_grid
from segpc.wsi.tissue import MIN_FRACTION, MIN_SATURATION, tile_fractions, tissue_fraction

SLIDE, TILE, GLASS = "slide", "tile", "glass"  # images/ ``kind`` of slide-derived rows
TILE_MARK = "__tile-"  # between a slide row's image id and a tile's grid position


@dataclass(frozen=True)
class SlideTile:
    """A slide row's grid, or a tile row's geometry: boxes in analysis pixels (the slide's
    ``level`` resized by ``factor``, :class:`segpc.wsi.resolution.SlideView`)."""

    kind: str  # SLIDE, TILE, or GLASS (a tile found bare when read)
    uri: str
    level: int = 0
    factor: float = 1.0
    mpp: float | None = None  # µm per analysis pixel; None: unknown
    to_level0: float = 1.0  # level-0 pixels per analysis pixel
    shape: tuple[int, int] = (0, 0)  # (H, W) of the analysis view
    row: int = -1
    col: int = -1
    core: Box | None = None
    read: Box | None = None
    field: tuple[int, int] | None = None  # tile rows: the bundle's training field (the U-Net's scale)
    tiles: int = 0  # slide rows: tiles in the grid
    skipped: int = 0  # slide rows: tiles skipped as glass on the small level
    test_tissue: bool = False  # tile rows: no small level, test the core's own pixels when read
    error: str = ""  # slide rows: why the slide could not be tiled
    error_kind: str = ""  # "image" (the file or the flags) or "storage" (it could not be read)
    grid_core: tuple[int, int] | None = None  # the grid's core shape (the last row/column smaller)
    grid_cols: int = 0  # columns of the grid
    label_stride: int = 0  # slide-wide cell ids: tile index * label_stride + 1.. (:func:`label_stride`)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SlideTile":
        d = json.loads(text)
        for k in ("shape", "core", "read", "field", "grid_core"):
            d.setdefault(k, None)
            d[k] = tuple(d[k]) if d[k] is not None else None
        return cls(**d)

    @property
    def tile(self) -> Tile:
        return Tile(self.row, self.col, self.core, self.read)

    @property
    def core_shape(self) -> tuple[int, int]:
        y0, x0, y1, x1 = self.core
        return y1 - y0, x1 - x0

    @property
    def core_area(self) -> int:
        h, w = self.core_shape
        return h * w

    @property
    def label_base(self) -> int:
        """Tile rows: its cells' ids are ``label_base + 1 ..``; the tile index is row-major."""
        return (self.row * self.grid_cols + self.col) * self.label_stride


def label_stride(tiles: int) -> int:
    """Cell ids of a slide's tiles are ``tile index * stride + n`` (n = 1, 2, ... in the
    tile): unique within the slide, readable (``tile 3, cell 7`` of a 10-tile slide is
    300000007) and below 2**31 (``cells/`` ``cell_id`` is int32, the masks uint32). The
    stride is the largest power of ten that keeps ``tiles * stride <= 2**31 - 1``: a tile
    may hold ``stride - 1`` cells, at least 10**4 for a grid of 200,000 tiles."""
    return 10 ** int(math.floor(math.log10((2 ** 31 - 1) // max(tiles, 1))))


def slide_error(uri: str, exc: Exception) -> SlideTile:
    """The slide row of a slide that could not be opened or tiled."""
    return SlideTile(SLIDE, uri, error=str(exc), error_kind="image" if isinstance(exc, InputError) else "storage")


def tile_id(slide_image_id: str, row: int, col: int) -> str:
    """The image id of a tile row: stable, one per grid position."""
    return f"{slide_image_id}{TILE_MARK}{row}-{col}"


def slide_tiles(uri: str, config: Config, field_shape: tuple[int, int] | None,
                target_mpp: float | None = None, mpp: float | None = None,
                min_fraction: float = MIN_FRACTION, min_saturation: float = MIN_SATURATION,
                fields_per_tile: float = TILE_FIELDS) -> tuple[SlideTile, list[SlideTile]]:
    """(slide row, tile rows to analyse) of the slide at ``uri``: opens its directory, picks
    the level for ``target_mpp`` (the bundle's; ``mpp`` stands in for a slide that does not
    record its own), lays the grid for the bundle's training ``field_shape``
    (:func:`segpc.wsi.tiles.slide_grid`) and runs the tissue test on a small level. Reads no
    full-resolution pixel."""
    if field_shape is None:
        raise InputError(f"{uri}: the bundle does not record the size of its training fields (it "
                         "predates whole-slide support): retrain it with this version to segment slides")
    with open_slide(uri) as slide:
        if target_mpp is not None and slide.mpp is None and mpp is None:
            raise InputError(f"{uri}: the slide does not record its pixel size and the bundle was trained "
                             f"at {target_mpp:g} µm/px: pass --mpp (µm per pixel of the scan's full resolution)")
        view = SlideView.at(slide, target_mpp, mpp)
        tiles = slide_grid(view.shape, config, field_shape, fields_per_tile)
        fractions = tile_fractions(view, tiles, min_saturation)
    c = tiles[0].core  # cores are laid from (0, 0) with one shape: the first is a full one
    base = dict(uri=uri, level=view.level, factor=view.factor, mpp=view.mpp, to_level0=view.to_level0,
                shape=view.shape, grid_core=(c[2] - c[0], c[3] - c[1]), grid_cols=1 + max(t.col for t in tiles),
                label_stride=label_stride(len(tiles)))
    keep = tiles if fractions is None else [t for t, f in zip(tiles, fractions) if f >= min_fraction]
    row = SlideTile(SLIDE, tiles=len(tiles), skipped=len(tiles) - len(keep), **base)
    return row, [SlideTile(TILE, row=t.row, col=t.col, core=t.core, read=t.read, field=tuple(field_shape),
                           test_tissue=fractions is None, **base) for t in keep]


_OPEN: OrderedDict[str, Slide] = OrderedDict()  # this process's open slides, newest last
MAX_OPEN = 8


def _slide(uri: str) -> Slide:
    """An open slide, reused by the tiles of one slide that a worker reads in turn."""
    if uri in _OPEN:
        _OPEN.move_to_end(uri)
        return _OPEN[uri]
    _OPEN[uri] = slide = open_slide(uri)
    while len(_OPEN) > MAX_OPEN:
        _OPEN.popitem(last=False)[1].close()
    return slide


def read_tile(tile: SlideTile) -> np.ndarray:
    """RGB uint8 of the tile's read box: range reads of its level, resampled as the view is."""
    return SlideView(_slide(tile.uri), tile.level, tile.factor, tile.mpp).read(tile.read)


def is_glass(image: np.ndarray, tile: SlideTile, min_fraction: float = MIN_FRACTION,
             min_saturation: float = MIN_SATURATION) -> bool:
    """Whether a tile that could not be tested on a small level holds too little stain in its
    own core's pixels to be worth the networks."""
    if not tile.test_tissue:
        return False
    return tissue_fraction(image[tile.tile.core_in_read], min_saturation) < min_fraction


def tile_result(result: ImageResult, tile: SlideTile) -> ImageResult:
    """The tile's share of the slide: the cells of its read box's image (the nuclei it owns
    only, :func:`segpc.method.steps.prepare`'s ``region``), numbered ``label_base + 1..n``
    in the order found (unique in the slide: the value in its label pyramid), with boxes in
    the core's coordinates; the result's shape is the core's."""
    if tile.label_stride and len(result.cells) >= tile.label_stride:
        raise ValueError(f"{len(result.cells)} cells in one tile: more than the slide's ids allow")
    y0, x0 = tile.tile.core_box_in_read[:2]
    cells = [replace(c, cell_id=tile.label_base + i + 1, box=(c.box[0] - y0, c.box[1] - x0, c.box[2] - y0, c.box[3] - x0))
             for i, c in enumerate(result.cells)]
    return ImageResult(tile.core_shape, cells, result.n_nuclei, dict(result.inferences))


def placement(tile: SlideTile):
    """What the writers need to know of a slide-derived row (:class:`segpc.io.outputs.Placement`)."""
    from segpc.io.outputs import Placement

    if tile.kind == SLIDE:
        return Placement(SLIDE, tile.mpp, tiles=tile.tiles if not tile.error else None,
                         tiles_skipped=tile.skipped if not tile.error else None, tile=tile)
    return Placement(tile.kind, tile.mpp, tuple(tile.core[:2]), tile.to_level0, core_area_px=tile.core_area,
                     tile=tile)


def slide_of(tile_image_id: str) -> str:
    """The slide row's image id of a tile row's (inverse of :func:`tile_id`)."""
    return tile_image_id.rsplit(TILE_MARK, 1)[0]


def level0_box(box: Box, origin: tuple[int, int], to_level0: float) -> Box:
    """A box of an image whose (0, 0) lies at ``origin`` of the analysis view, in the slide's
    level-0 pixels: the smallest level-0 box that covers it."""
    s, (oy, ox), eps = to_level0, origin, 1e-9
    y0, x0, y1, x1 = box
    return (math.floor((y0 + oy) * s + eps), math.floor((x0 + ox) * s + eps),
            math.ceil((y1 + oy) * s - eps), math.ceil((x1 + ox) * s - eps))
