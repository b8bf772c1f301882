"""What the method returns per image: its plasma cells, each with masks in its own box."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from segpc.method.crops import Box
from segpc.method.instances import Instance


@dataclass
class Cell:
    """One segmented plasma cell; masks are cropped to ``box`` (the cell's tight box)."""

    cell_id: int
    nucleus_id: int
    box: Box
    nucleus: np.ndarray
    cell: np.ndarray
    scale: float
    nucleus_score: float
    cell_score: float
    ratio: float
    truncated: bool

    @property
    def nucleus_area(self) -> int:
        return int(self.nucleus.sum())

    @property
    def cell_area(self) -> int:
        return int(self.cell.sum())

    def full_masks(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        nuc, cell = np.zeros(shape, bool), np.zeros(shape, bool)
        at, part = self.clipped(shape)
        nuc[at], cell[at] = self.nucleus[part], self.cell[part]
        return nuc, cell

    def clipped(self, shape: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(where in a ``shape`` image, which part of the masks): the box cut to the image. A
        tile's cell may reach past the tile's core, the image of its masks."""
        y0, x0, y1, x1 = self.box
        cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, shape[0]), min(x1, shape[1])
        cy1, cx1 = max(cy1, cy0), max(cx1, cx0)
        return ((slice(cy0, cy1), slice(cx0, cx1)),
                (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)))


@dataclass
class ImageResult:
    shape: tuple[int, int]
    cells: list[Cell]
    n_nuclei: int = 0
    inferences: dict[float, int] = field(default_factory=dict)  # cytoplasm crops run per scale

    def instances(self) -> list[Instance]:
        out = []
        for c in self.cells:
            nuc, cell = c.full_masks(self.shape)
            out.append(Instance(nuc, cell, k=c.cell_id, meta={"scale": c.scale}))
        return out

    def label_maps(self, dtype: type = np.int32) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) nucleus and cell label maps, value = cell_id, painted box by box.

        Boxes are cut to the image (a tile's cells may reach past its core). Cells may overlap; larger cells are painted first so a smaller cell lying on a
        larger one stays visible, and each cell's own nucleus is painted last.
        """
        nuclei, cells = np.zeros(self.shape, dtype), np.zeros(self.shape, dtype)
        for c in sorted(self.cells, key=lambda c: -c.cell_area):
            at, part = c.clipped(self.shape)
            cells[at][c.cell[part]] = c.cell_id
        for c in self.cells:
            at, part = c.clipped(self.shape)
            cells[at][c.nucleus[part]] = c.cell_id
            nuclei[at][c.nucleus[part]] = c.cell_id
        return nuclei, cells
