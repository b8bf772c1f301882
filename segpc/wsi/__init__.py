"""Whole-slide images: reading pyramidal slides, the tile grid, ownership at seams, the tissue
test, a single-process driver, and the pure steps the Ray batch job runs per slide and per
tile (:mod:`segpc.wsi.job`)."""
