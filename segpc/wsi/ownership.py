"""Which tile a cell belongs to: the one whose core holds its nucleus centre.

Cores partition the slide, so a cell whose centre is the same in every tile that sees it is
kept exactly once, with no exchange between tiles. The centre is computed in integers so
that it does not depend on the tile it is computed in: the floor of the nucleus mask's
centroid (row and column means of its pixels), ``(sum + n * offset) // n``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from segpc.method.results import Cell
from segpc.wsi.tiles import Tile


def nucleus_centre(cell: Cell, origin: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(y, x): floor of the centroid of the cell's nucleus pixels, in the coordinates of an
    image whose pixel (0, 0) lies at ``origin`` of this cell's image."""
    rows, cols = np.nonzero(cell.nucleus)
    if rows.size == 0:  # a cell always holds its nucleus; fall back to its box for safety
        rows, cols = np.nonzero(cell.cell)
    n = rows.size
    y0, x0 = cell.box[0] + origin[0], cell.box[1] + origin[1]
    return (int(rows.sum()) + n * y0) // n, (int(cols.sum()) + n * x0) // n


def owned(cells: list[Cell], tile: Tile) -> list[Cell]:
    """The cells (found in ``tile``'s read box, in its coordinates) whose nucleus centre lies
    in the tile's core, moved to slide coordinates. Cell ids are left to the caller."""
    ry0, rx0 = tile.read[:2]
    cy0, cx0, cy1, cx1 = tile.core
    out = []
    for c in cells:
        y, x = nucleus_centre(c, (ry0, rx0))
        if cy0 <= y < cy1 and cx0 <= x < cx1:
            y0, x0, y1, x1 = c.box
            out.append(replace(c, box=(y0 + ry0, x0 + rx0, y1 + ry0, x1 + rx0)))
    return out
