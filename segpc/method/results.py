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
        y0, x0, y1, x1 = self.box
        nuc, cell = np.zeros(shape, bool), np.zeros(shape, bool)
        nuc[y0:y1, x0:x1], cell[y0:y1, x0:x1] = self.nucleus, self.cell
        return nuc, cell


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

        Cells may overlap; larger cells are painted first so a smaller cell lying on a
        larger one stays visible, and each cell's own nucleus is painted last.
        """
        nuclei, cells = np.zeros(self.shape, dtype), np.zeros(self.shape, dtype)
        for c in sorted(self.cells, key=lambda c: -c.cell_area):
            y0, x0, y1, x1 = c.box
            cells[y0:y1, x0:x1][c.cell] = c.cell_id
        for c in self.cells:
            y0, x0, y1, x1 = c.box
            cells[y0:y1, x0:x1][c.nucleus] = c.cell_id
            nuclei[y0:y1, x0:x1][c.nucleus] = c.cell_id
        return nuclei, cells
