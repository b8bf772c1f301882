"""The analysts' table: one row per slide, reduced from the per-image rows of ``images/``.

A slide is a folder of field images, or a whole-slide file: its own ``images/`` row (kind
"slide", the grid) and one row per tile read (kind "tile" or "glass"); see
:mod:`segpc.wsi.job`. Input files are counted by the field and slide rows, so every input
appears exactly once in ``images``.

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
                 "mean_ratio", "tiles", "tiles_analysed", "tiles_error", "analysed_fraction",
                 "analysed_mm2", "plasma_cells_per_mm2"]
SUMMED = ["n_cells", "cell_area_sum", "cell_area_sq_sum", "nucleus_area_sum", "ratio_sum"]
IMAGE_COLUMNS = ["image_id", "slide_id", "status", *SUMMED, "kind", "mpp", "tiles", "width", "height",
                 "core_area_px"]
INPUT_KINDS = ("field", "slide")  # rows that stand for an input file (tiles do not)


def slide_summary(images: pd.DataFrame) -> pd.DataFrame:
    """Counts per slide from ``images/`` rows: input files (ok / error: a field image, or a
    whole slide's own row), plasma cells, cells per ok input, mean and standard deviation of
    cell area, mean nucleus area and ratio (px).

    Whole slides also get their grid's ``tiles``, the tiles analysed (read and segmented) and
    those that failed, the analysed share of the slide and area (the analysed tiles' cores;
    mm² where the pixel size is known) and plasma cells per mm². Null for folders of fields.
    """
    images = images.copy()
    for col in ("kind", "mpp", "tiles", "width", "height", "core_area_px"):
        if col not in images:
            images[col] = None
    kind = images["kind"].fillna("field")
    ok = images.status == "ok"
    tile = kind == "tile"
    core = pd.to_numeric(images["core_area_px"], errors="coerce").fillna(0).where(tile & ok, 0)
    mpp = pd.to_numeric(images["mpp"], errors="coerce")
    slide_row = kind == "slide"
    images = images.assign(
        input=kind.isin(INPUT_KINDS), ok_input=kind.isin(INPUT_KINDS) & ok, analysed=tile & ok,
        tile_error=tile & ~ok, core_px=core, core_mm2=core * mpp ** 2 / 1e6, is_slide=slide_row,
        grid=pd.to_numeric(images["tiles"], errors="coerce").where(slide_row),
        view_px=(pd.to_numeric(images["width"], errors="coerce")
                 * pd.to_numeric(images["height"], errors="coerce")).where(slide_row & ok),
        unknown_mpp=tile & ok & mpp.isna())
    per = images.groupby("slide_id").agg(
        images=("input", "sum"), images_ok=("ok_input", "sum"), tiles=("grid", "sum"),
        slides=("is_slide", "sum"), tiles_analysed=("analysed", "sum"), tiles_error=("tile_error", "sum"),
        core_px=("core_px", "sum"), analysed_mm2=("core_mm2", "sum"), unknown_mpp=("unknown_mpp", "sum"),
        view_px=("view_px", "sum"), **{c: (c, "sum") for c in SUMMED})
    n = per["n_cells"].where(per["n_cells"] > 0)
    slides = per["slides"] > 0
    mm2 = per["analysed_mm2"].where(slides & (per["unknown_mpp"] == 0))
    out = pd.DataFrame({
        "images": per["images"].astype("int64"), "images_ok": per["images_ok"].astype("int64"),
        "images_error": (per["images"] - per["images_ok"]).astype("int64"),
        "plasma_cells": per["n_cells"].astype("int64"),
        "mean_cells_per_image": per["n_cells"] / per["images_ok"].where(per["images_ok"] > 0),
        "mean_cell_area": per["cell_area_sum"] / n,
        "sd_cell_area": np.sqrt((per["cell_area_sq_sum"] / n - (per["cell_area_sum"] / n) ** 2).clip(lower=0)),
        "mean_nucleus_area": per["nucleus_area_sum"] / n,
        "mean_ratio": per["ratio_sum"] / n,
        "tiles": per["tiles"].where(slides).astype("Int64"),
        "tiles_analysed": per["tiles_analysed"].where(slides).astype("Int64"),
        "tiles_error": per["tiles_error"].where(slides).astype("Int64"),
        "analysed_fraction": (per["core_px"] / per["view_px"].where(per["view_px"] > 0)).where(slides),
        "analysed_mm2": mm2,
        "plasma_cells_per_mm2": per["n_cells"] / mm2.where(mm2 > 0),
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
