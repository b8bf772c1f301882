"""A cell instance: the one data type shared by the reader, the metrics and the segmenter."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from segpc.errors import InputError

NUCLEUS_VALUE = 40
CYTOPLASM_VALUE = 20
GRID = (1080, 1440)  # (H, W) of the official scorer: every mask is judged at this size


def to_grid(mask: np.ndarray) -> np.ndarray:
    """A bool mask at 1080x1440, resized as the official scorer does (cv2 INTER_NEAREST)."""
    if mask.shape == GRID:
        return mask.astype(bool)
    h, w = GRID
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


@dataclass
class Instance:
    """One plasma cell as two full-image boolean masks.

    ``cell`` is the whole cell (nucleus included); ``nucleus`` is a subset of it. ``k`` is
    the instance number used in ``<id>_<k>.bmp`` file names; ``meta`` carries optional
    per-cell facts from the segmenter (scale, scores, ...).
    """

    nucleus: np.ndarray
    cell: np.ndarray
    k: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nucleus.shape != self.cell.shape or self.nucleus.ndim != 2:
            raise InputError(
                f"instance {self.k}: nucleus {self.nucleus.shape} and cell {self.cell.shape} "
                "must be 2-D masks of one shape"
            )
        self.nucleus = self.nucleus.astype(bool, copy=False)
        self.cell = self.cell.astype(bool, copy=False) | self.nucleus

    @property
    def cytoplasm(self) -> np.ndarray:
        return self.cell & ~self.nucleus

    def to_segpc_mask(self) -> np.ndarray:
        """The challenge's uint8 encoding: nucleus 40, cytoplasm 20, background 0."""
        out = np.zeros(self.cell.shape, np.uint8)
        out[self.cell] = CYTOPLASM_VALUE
        out[self.nucleus] = NUCLEUS_VALUE
        return out

    @classmethod
    def from_segpc_mask(cls, mask: np.ndarray, k: int = 0, name: str = "mask") -> "Instance":
        """Decode a SegPC mask, tolerating the real data's quirks (3 channels, values near 20/40)."""
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise InputError(f"{name}: expected a 2-D mask or 3-channel image, got shape {mask.shape}")
        return cls(nucleus=mask >= 30, cell=mask > 0, k=k)
