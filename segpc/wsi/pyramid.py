"""Who writes which chunk of a slide's label pyramid: pure geometry, no Zarr.

A slide's label masks (``masks.zarr/<slide image_id>/labels/{nuclei,cells}``) are one NGFF
pyramid over the analysis view (:attr:`segpc.wsi.job.SlideTile.shape`). Level ``k`` is level
0 taken every ``2**k``-th pixel (nearest, as :func:`segpc.io.ngff.downsample`), so level-k
pixel ``j`` is level-0 pixel ``j * 2**k``; a tile owns the level-k pixels whose level-0
position lies in its core.

The grid's cores are laid from (0, 0) with one core shape ``(gh, gw)`` (the last row and
column smaller). While ``2**k`` divides both sides and a chunk keeps at least MIN_CHUNK px a
side, level k's chunk (shard) is the core divided by ``2**k``: a tile's level-k pixels are
then exactly one chunk, written by that tile alone (:func:`tile_region`). The first level
that would not align, and every level below it, is built by one finishing step after all
tiles, each chunk of FINISH_CHUNK px from two-by-two strides of the level above
(:func:`finish_regions`), never the whole slide in memory. So every chunk of every level has
exactly one writer (``tests/test_slide_masks.py`` checks this for whole grids).
"""

from __future__ import annotations

from dataclasses import dataclass

from segpc.io.ngff import level_count
from segpc.method.crops import Box
from segpc.wsi.tiles import CORE_ALIGN

MIN_CHUNK = CORE_ALIGN  # smallest chunk side a tile-written level may have (k > 0)
FINISH_CHUNK = 1024  # chunk side of the levels the finishing step writes


@dataclass(frozen=True)
class Level:
    k: int
    shape: tuple[int, int]  # (H, W) of this level
    chunk: tuple[int, int]  # chunk (shard) shape
    by_tiles: bool  # written by the tiles (one chunk each), else by the finishing step


def level_shape(shape: tuple[int, int], k: int) -> tuple[int, int]:
    s = 2 ** k
    return -(-shape[0] // s), -(-shape[1] // s)


def pyramid(shape: tuple[int, int], grid_core: tuple[int, int]) -> list[Level]:
    """The levels of a ``shape`` slide whose tile cores are ``grid_core`` (module doc)."""
    gh, gw = grid_core
    out, tiles = [], True
    for k in range(level_count(shape)):
        s, ls = 2 ** k, level_shape(shape, k)
        tiles = tiles and gh % s == 0 and gw % s == 0 and (k == 0 or min(gh, gw) // s >= MIN_CHUNK)
        chunk = (gh // s, gw // s) if tiles else (min(FINISH_CHUNK, ls[0]), min(FINISH_CHUNK, ls[1]))
        out.append(Level(k, ls, chunk, tiles))
    return out


def tile_region(level: Level, core: Box) -> Box:
    """The level-k box a tile with ``core`` (level-0 box) writes: its level-k pixels, one
    whole chunk. Raises if the core does not sit on the level's chunk grid."""
    s = 2 ** level.k
    y0, x0, y1, x1 = core
    box = (y0 // s, x0 // s, -(-y1 // s), -(-x1 // s))
    ch, cw = level.chunk
    whole = (box[0] % ch == 0 and box[1] % cw == 0 and y0 % s == 0 and x0 % s == 0
             and box[2] == min(box[0] + ch, level.shape[0]) and box[3] == min(box[1] + cw, level.shape[1]))
    if not level.by_tiles or not whole:
        raise ValueError(f"core {core} is not one chunk of level {level.k} (chunk {level.chunk})")
    return box


def chunk_index(level: Level, box: Box) -> tuple[int, int]:
    return box[0] // level.chunk[0], box[1] // level.chunk[1]


def chunk_boxes(level: Level) -> list[Box]:
    """Every chunk of a level as a box, row by row."""
    (h, w), (ch, cw) = level.shape, level.chunk
    return [(y, x, min(y + ch, h), min(x + cw, w)) for y in range(0, h, ch) for x in range(0, w, cw)]


def finish_regions(levels: list[Level]) -> list[tuple[Level, Box]]:
    """(level, chunk box) the finishing step writes, coarser levels after the level they
    are taken from: each from ``previous[2*y0:2*y1:2, 2*x0:2*x1:2]``."""
    return [(lv, box) for lv in levels if not lv.by_tiles for box in chunk_boxes(lv)]
