"""The analysts' table: one row per slide, reduced from the per-image rows of ``images/``.

Each ``images/`` row carries its image's share of the statistics (cell count and the sums of
cell area, its square, nucleus area and cytoplasm/nucleus ratio), so the table is exact
without reading ``cells/`` back: one row per image, not one per cell.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from segpc.io.outputs import read_table
from segpc.io.storage import filesystem, join, with_retries

SLIDE_COLUMNS = ["slide_id", "images", "images_ok", "images_error", "plasma_cells",
                 "mean_cells_per_image", "mean_cell_area", "sd_cell_area", "mean_nucleus_area",
                 "mean_ratio"]
SUMMED = ["n_cells", "cell_area_sum", "cell_area_sq_sum", "nucleus_area_sum", "ratio_sum"]
IMAGE_COLUMNS = ["image_id", "slide_id", "status", *SUMMED]


def slide_summary(images: pd.DataFrame) -> pd.DataFrame:
    """Counts per slide from ``images/`` rows: images (ok / error), plasma cells, cells per ok
    image, mean and standard deviation of cell area, mean nucleus area and ratio (px)."""
    images = images.assign(ok=images.status == "ok")
    per = images.groupby("slide_id").agg(images=("image_id", "size"), images_ok=("ok", "sum"),
                                         **{c: (c, "sum") for c in SUMMED})
    n = per["n_cells"].where(per["n_cells"] > 0)
    out = pd.DataFrame({
        "images": per["images"].astype("int64"), "images_ok": per["images_ok"].astype("int64"),
        "images_error": (per["images"] - per["images_ok"]).astype("int64"),
        "plasma_cells": per["n_cells"].astype("int64"),
        "mean_cells_per_image": per["n_cells"] / per["images_ok"].where(per["images_ok"] > 0),
        "mean_cell_area": per["cell_area_sum"] / n,
        "sd_cell_area": np.sqrt((per["cell_area_sq_sum"] / n - (per["cell_area_sum"] / n) ** 2).clip(lower=0)),
        "mean_nucleus_area": per["nucleus_area_sum"] / n,
        "mean_ratio": per["ratio_sum"] / n,
    })
    return out.reset_index()[SLIDE_COLUMNS].sort_values("slide_id").reset_index(drop=True)


def write_slides_table(output: str) -> tuple[pd.DataFrame, list[str]]:
    """Build ``slides.parquet`` from the ``images/`` rows; return it and the image ids that
    occur more than once (two inputs given one id)."""
    images = read_table(output, "images", IMAGE_COLUMNS).to_pandas()
    table = slide_summary(images)
    twice = sorted(images.image_id[images.image_id.duplicated()].unique())
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buf)
    fs, root = filesystem(output)
    path = join(root, "slides.parquet")
    with_retries(f"writing {path}", fs.pipe_file, path, buf.getvalue())
    return table, twice
