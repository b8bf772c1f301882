"""The analysts' table: one row per slide, from the per-image and per-cell tables."""

from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from segpc.io.outputs import read_table
from segpc.io.storage import filesystem, join, with_retries

SLIDE_COLUMNS = ["slide_id", "images", "images_ok", "images_error", "plasma_cells",
                 "mean_cells_per_image", "median_cell_area", "mean_cell_area", "mean_nucleus_area",
                 "median_ratio"]


def slide_summary(images: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Counts per slide: images (ok / error), plasma cells, cells per ok image, area stats (px)."""
    per = images.groupby("slide_id").agg(
        images=("image_id", "size"),
        images_ok=("status", lambda s: int((s == "ok").sum())),
        images_error=("status", lambda s: int((s != "ok").sum())),
    )
    counts = cells.groupby("slide_id").agg(
        plasma_cells=("cell_id", "size"),
        median_cell_area=("cell_area", "median"),
        mean_cell_area=("cell_area", "mean"),
        mean_nucleus_area=("nucleus_area", "mean"),
        median_ratio=("ratio", "median"),
    )
    out = per.join(counts, how="left")
    out["plasma_cells"] = out["plasma_cells"].fillna(0).astype("int64")
    ok = out["images_ok"].where(out["images_ok"] > 0)
    out["mean_cells_per_image"] = out["plasma_cells"] / ok
    return out.reset_index()[SLIDE_COLUMNS].sort_values("slide_id").reset_index(drop=True)


def write_slides_table(output: str) -> pd.DataFrame:
    """Build ``slides.parquet`` from ``images/`` and ``cells/`` and return it."""
    images = read_table(output, "images", ["image_id", "slide_id", "status"]).to_pandas()
    cells = read_table(output, "cells", ["slide_id", "cell_id", "cell_area", "nucleus_area", "ratio"]).to_pandas()
    table = slide_summary(images, cells)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buf)
    fs, root = filesystem(output)
    path = join(root, "slides.parquet")
    with_retries(f"writing {path}", fs.pipe_file, path, buf.getvalue())
    return table
