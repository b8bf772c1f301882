"""Segmenting a whole slide tile by tile in one process: the reference the Ray job will
distribute.

:func:`segment_tiles` is the per-tile step (read the read box, run the segmenter on the
nuclei the tile owns, move their cells to slide coordinates); it needs nothing from other
tiles, so a Ray actor can run it on any batch of tiles. :func:`segment_slide` lays the grid, skips tiles without stained
material before any network runs, and gathers the cells and the analysed area.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from segpc.errors import InputError
from segpc.method.results import Cell
from segpc.method.segmenter import Segmenter
from segpc.wsi.resolution import SlideView
from segpc.wsi.slide import Slide
from segpc.wsi.tiles import TILE_FIELDS, Tile, slide_grid
from segpc.wsi.tissue import MIN_FRACTION, MIN_SATURATION, tile_fractions, tissue_fraction


def segment_tiles(segmenter: Segmenter, view: SlideView, tiles: list[Tile], field_shape: tuple[int, int],
                  min_fraction: float | None = None,
                  min_saturation: float = MIN_SATURATION) -> list[list[Cell] | None]:
    """Per tile, its owned cells in slide coordinates (ids as found, not yet numbered); the
    U-Net sees the tiles at the scale of ``field_shape`` fields.

    With ``min_fraction``, a tile whose core's own pixels are less stained than that is
    skipped (None) before the networks: the tissue test for slides without a small level.
    """
    images = [view.read(t.read) for t in tiles]
    keep = [min_fraction is None or tissue_fraction(im[t.core_in_read], min_saturation) >= min_fraction
            for t, im in zip(tiles, images)]
    todo = [t for t, k in zip(tiles, keep) if k]
    results = iter(segmenter.segment_batch([im for im, k in zip(images, keep) if k], field_shape=field_shape,
                                           regions=[t.core_box_in_read for t in todo]))
    return [_in_slide(next(results).cells, t) if k else None for t, k in zip(tiles, keep)]


def _in_slide(cells: list[Cell], tile: Tile) -> list[Cell]:
    ry0, rx0 = tile.read[:2]
    return [replace(c, box=(c.box[0] + ry0, c.box[1] + rx0, c.box[2] + ry0, c.box[3] + rx0)) for c in cells]


def segment_tile(segmenter: Segmenter, view: SlideView, tile: Tile, field_shape: tuple[int, int]) -> list[Cell]:
    """One tile's owned cells in slide coordinates."""
    return segment_tiles(segmenter, view, [tile], field_shape)[0]


def _area(box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


@dataclass
class SlideResult:
    """A slide's cells (view pixels, ids 1..n in tile order) and how much of it was analysed."""

    slide_id: str
    shape: tuple[int, int]  # (H, W) of the view the tiles were cut from
    cells: list[Cell]
    mpp: float | None  # µm per view pixel
    to_level0: float  # level-0 pixels per view pixel
    tiles: int
    tiles_analysed: int
    analysed_px: int  # sum of the analysed tiles' cores

    @property
    def slide_px(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def analysed_fraction(self) -> float:
        return self.analysed_px / self.slide_px

    @property
    def analysed_mm2(self) -> float | None:
        return None if self.mpp is None else self.analysed_px * self.mpp ** 2 / 1e6

    @property
    def slide_mm2(self) -> float | None:
        return None if self.mpp is None else self.slide_px * self.mpp ** 2 / 1e6


def segment_slide(segmenter: Segmenter, slide: Slide, field_shape: tuple[int, int],
                  target_mpp: float | None = None, mpp: float | None = None,
                  min_fraction: float = MIN_FRACTION, min_saturation: float = MIN_SATURATION,
                  batch_size: int = 4, fields_per_tile: float = TILE_FIELDS) -> SlideResult:
    """Every plasma cell of ``slide``, each once.

    ``field_shape`` (H, W): the fields the bundle was trained on, in view pixels: the U-Net
    sees tiles at their scale, and read boxes are about ``fields_per_tile`` fields a side.
    ``target_mpp``: the bundle's pixel size (None: level 0 as scanned); ``mpp`` stands in
    for a slide whose metadata lacks its pixel size. Tiles whose core is less than
    ``min_fraction`` stained are skipped before any network runs.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    view = SlideView.at(slide, target_mpp, mpp)
    tiles = slide_grid(view.shape, segmenter.config, field_shape, fields_per_tile)
    fractions = tile_fractions(view, tiles, min_saturation)
    if fractions is not None:
        todo = [t for t, f in zip(tiles, fractions) if f >= min_fraction]
        per_tile = None  # already tested on the coarse level
    else:
        todo, per_tile = tiles, min_fraction
    cells: list[Cell] = []
    analysed = done = 0
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        for tile, found in zip(batch, segment_tiles(segmenter, view, batch, field_shape, per_tile, min_saturation)):
            if found is None:
                continue
            done += 1
            analysed += _area(tile.core)
            first = len(cells) + 1
            cells.extend(replace(c, cell_id=first + n) for n, c in enumerate(found))
    return SlideResult(slide.id, view.shape, cells, view.mpp, view.to_level0, len(tiles), done, analysed)
