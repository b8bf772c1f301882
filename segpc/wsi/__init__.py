"""Whole-slide images: reading pyramidal slides, the tile grid, seam ownership, the tissue
test and a single-process driver (the Ray job does not take slides yet)."""
