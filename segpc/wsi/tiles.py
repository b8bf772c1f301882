"""The tile grid of a slide: cores that partition it, read boxes that overlap by a margin.

Pure geometry. A tile's *core* is its share of the slide: the cores of a grid cover every
pixel exactly once. Its *read box* is the core grown by ``margin`` on each side (the part
the networks see), clipped to the slide, its start moved back to a multiple of ``align``.
The U-Net sees a tile resized by the factor ``a/b`` that fits a training field into its
input (:func:`segpc.method.steps.prepare`); with read boxes starting on multiples of ``b``
(:func:`input_alignment`), every tile's resized pixels are the same samples of the slide,
so two tiles that see a nucleus give the U-Net the same pixels around it. A tile may be
larger than a field: :func:`slide_grid` makes read boxes about :data:`TILE_FIELDS` fields on
a side, so that the margin, read twice, is a small share of what is read.

Ownership: a cell belongs to the tile whose core holds its nucleus centre, the floor of its
nucleus pixels' centroid in integers (:meth:`segpc.method.nucleus.Nuclei.centres`). Cores
partition the slide, so a nucleus whose centre is the same in every tile that sees it is
kept exactly once, with no exchange between tiles. A tile drops the nuclei it does not own
right after stage 1, before their crops are cut.

The margin bound (:func:`tile_margin`): for the owning tile to see the cell exactly as an
untiled run would, the largest crop window the cascade can cut around the nucleus must lie
strictly inside the read box (a window edge on the read box's edge would count as the image
border in the truncation rule). The centre lies inside the nucleus box, so with ``h`` the
nucleus box's longest side and ``s`` the largest crop scale, the window reaches at most
``h + half_up(s * h / 2) - 1`` pixels from the centre: a margin of ``h + half_up(s * h / 2)``
suffices. ``h`` is bounded by :data:`NUCLEUS_LIMIT` expected nucleus diameters (the
config's ``nucleus.diameter``, in network-input pixels, brought to tile pixels); a nucleus
longer than that may be cut by a tile edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from segpc.config import Config
from segpc.errors import InputError
from segpc.method.crops import Box, half_up, plan_fit

NUCLEUS_LIMIT = 2.0  # longest nucleus the margin guarantees, in expected nucleus diameters
TILE_FIELDS = 2  # a tile's read box: about this many training fields on each side
CORE_ALIGN = 64  # core sides are multiples of this (whole chunks of a label pyramid's levels)


@dataclass(frozen=True)
class Tile:
    """One tile: grid position, core (its share of the slide) and read box, in slide pixels."""

    row: int
    col: int
    core: Box
    read: Box

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the read box: the image the networks see."""
        y0, x0, y1, x1 = self.read
        return y1 - y0, x1 - x0

    @property
    def core_box_in_read(self) -> Box:
        """The core in the read box's image coordinates."""
        (cy0, cx0, cy1, cx1), (ry0, rx0) = self.core, self.read[:2]
        return cy0 - ry0, cx0 - rx0, cy1 - ry0, cx1 - rx0

    @property
    def core_in_read(self) -> tuple[slice, slice]:
        """The core's pixels in the read box's image: ``image[tile.core_in_read]``."""
        y0, x0, y1, x1 = self.core_box_in_read
        return slice(y0, y1), slice(x0, x1)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _spans(length: int, core: int, margin: int, align: int) -> list[tuple[int, int, int, int]]:
    """Per axis: (core start, core end, read start, read end)."""
    out = []
    for c0 in range(0, length, core):
        c1 = min(c0 + core, length)
        out.append((c0, c1, max(c0 - margin, 0) // align * align, min(c1 + margin, length)))
    return out


def tile_grid(width: int, height: int, core: int | tuple[int, int], margin: int, align: int = 1) -> list[Tile]:
    """Tiles of a ``width`` x ``height`` slide, row by row; ``core`` = (height, width) or a side.

    Cores are ``core``-sized from the top-left (the last row and column smaller); each read
    box holds its core and at least ``margin`` pixels around it wherever the slide goes on,
    and starts on a multiple of ``align``.
    """
    ch, cw = _pair(core)
    if width < 1 or height < 1:
        raise InputError(f"tile_grid: empty slide {width}x{height}")
    if ch < 1 or cw < 1 or margin < 0 or align < 1:
        raise InputError(f"tile_grid: core {core} and align {align} must be >= 1 and margin {margin} >= 0")
    tiles = []
    for r, (cy0, cy1, ry0, ry1) in enumerate(_spans(height, ch, margin, align)):
        for c, (cx0, cx1, rx0, rx1) in enumerate(_spans(width, cw, margin, align)):
            tiles.append(Tile(r, c, (cy0, cx0, cy1, cx1), (ry0, rx0, ry1, rx1)))
    return tiles


def tile_margin(config: Config, tile_shape: tuple[int, int]) -> int:
    """The margin (tile pixels) that keeps every guaranteed cell whole in its owner's read
    box (module docstring): ``h + half_up(s * h / 2)``, ``h`` = :data:`NUCLEUS_LIMIT` expected
    diameters at the scale the U-Net sees a ``tile_shape`` image."""
    net_per_tile = min(1.0, config.nucleus.input_size / max(tile_shape))  # the U-Net's fit
    h = math.ceil(NUCLEUS_LIMIT * config.nucleus.diameter / net_per_tile)
    return h + half_up(max(config.cytoplasm.scales) * h / 2)


def slide_grid(shape: tuple[int, int], config: Config, field_shape: tuple[int, int],
               fields_per_tile: float = TILE_FIELDS) -> list[Tile]:
    """The tiles of a slide view of ``shape`` (H, W) for a bundle trained on ``field_shape``
    fields: the margin of such fields (:func:`tile_margin`), cores of read boxes about
    ``fields_per_tile`` fields on a side, cut down to multiples of :data:`CORE_ALIGN`."""
    margin = tile_margin(config, field_shape)
    size = (round(fields_per_tile * field_shape[0]), round(fields_per_tile * field_shape[1]))
    core = tuple(c // CORE_ALIGN * CORE_ALIGN if c >= CORE_ALIGN else c for c in core_shape(size, margin))
    return tile_grid(shape[1], shape[0], core, margin, input_alignment(config, field_shape))


def input_alignment(config: Config, field_shape: tuple[int, int]) -> int:
    """``b`` of the U-Net's resize factor ``a/b`` for ``field_shape`` fields (2 for 1/2,
    51 for 800/2040): read boxes starting on multiples of it are resized on one grid. 1 when
    the factor is 1 or no fraction with ``b <= 256`` is exact."""
    factor = plan_fit(*field_shape, config.nucleus.input_size).factor
    frac = Fraction(factor).limit_denominator(256)
    return frac.denominator if abs(float(frac) - factor) < 1e-12 else 1


def core_shape(tile_shape: tuple[int, int], margin: int) -> tuple[int, int]:
    """The core of a ``tile_shape`` read box with ``margin`` on each side."""
    ch, cw = tile_shape[0] - 2 * margin, tile_shape[1] - 2 * margin
    if ch < 1 or cw < 1:
        raise InputError(f"tiles of {tile_shape} leave no core inside a margin of {margin} px; "
                         "use larger tiles")
    return ch, cw
