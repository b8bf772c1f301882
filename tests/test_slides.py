"""slides.parquet is reduced from images/ rows, and equals the statistics over every cell."""

import numpy as np
import pandas as pd
import pytest

from segpc.io.slides import slide_summary


def test_slide_table_from_image_rows_equals_the_cells_statistics():
    rng = np.random.default_rng(3)
    cells = pd.DataFrame({"image_id": rng.choice([f"i{k}" for k in range(9)], 200),
                          "cell_area": rng.integers(100, 2000, 200),
                          "nucleus_area": rng.integers(50, 600, 200)})
    cells["ratio"] = cells.cell_area / cells.nucleus_area
    slide_of = {f"i{k}": f"S{k % 3}" for k in range(12)}  # i9..i11 have no cells
    cells["slide_id"] = cells.image_id.map(slide_of)
    per = cells.groupby("image_id").agg(n_cells=("cell_area", "size"), cell_area_sum=("cell_area", "sum"),
                                        nucleus_area_sum=("nucleus_area", "sum"), ratio_sum=("ratio", "sum"))
    per["cell_area_sq_sum"] = cells.assign(sq=cells.cell_area.astype(float) ** 2).groupby("image_id").sq.sum()
    images = pd.DataFrame({"image_id": list(slide_of), "slide_id": list(slide_of.values())})
    images["status"] = ["error" if i == "i11" else "ok" for i in images.image_id]
    images = images.join(per, on="image_id").fillna(0)

    table = slide_summary(images).set_index("slide_id")
    want = cells.groupby("slide_id")
    assert table.plasma_cells.to_dict() == want.size().to_dict()
    assert table.images.to_dict() == {"S0": 4, "S1": 4, "S2": 4}
    assert table.images_error.to_dict() == {"S0": 0, "S1": 0, "S2": 1}
    assert table.mean_cells_per_image["S2"] == pytest.approx(want.size()["S2"] / 3)
    assert np.allclose(table.mean_cell_area, want.cell_area.mean())
    assert np.allclose(table.sd_cell_area, want.cell_area.std(ddof=0))
    assert np.allclose(table.mean_nucleus_area, want.nucleus_area.mean())
    assert np.allclose(table.mean_ratio, want.ratio.mean())


def test_whole_slides_get_their_grid_analysed_area_and_density():
    """A slide's own row (its grid) and its tile rows: analysed = tiles read, segmented and ok;
    the area is their cores'; glass and failed tiles are not analysed; a folder of fields and
    a slide that could not be opened have no slide figures."""
    rows = [dict(image_id="S07", slide_id="S07", status="ok", kind="slide", tiles=20, tiles_skipped=2,
                 width=1040, height=520, mpp=0.5, n_cells=0)]
    for k in range(16):  # analysed tiles, 10000 px cores, 3 cells each
        rows.append(dict(image_id=f"S07__tile-0-{k}", slide_id="S07", status="ok", kind="tile",
                         core_area_px=10_000, mpp=0.5, n_cells=3))
    rows.append(dict(image_id="S07__tile-1-0", slide_id="S07", status="ok", kind="glass",
                     core_area_px=10_000, mpp=0.5, n_cells=0))
    rows.append(dict(image_id="S07__tile-1-1", slide_id="S07", status="error", kind="tile",
                     core_area_px=10_000, mpp=0.5, n_cells=0))
    rows.append(dict(image_id="S08", slide_id="S08", status="error", kind="slide", n_cells=0))
    rows += [dict(image_id=f"F__{k}", slide_id="F", status="ok", n_cells=2) for k in range(3)]
    images = pd.DataFrame(rows)
    for c in ("cell_area_sum", "cell_area_sq_sum", "nucleus_area_sum", "ratio_sum"):
        images[c] = images.n_cells * 10
    table = slide_summary(images).set_index("slide_id")
    s07, s08, f = table.loc["S07"], table.loc["S08"], table.loc["F"]
    # one input file each: the slide's own row, not its tiles
    assert (s07.images, s07.images_ok, s07.plasma_cells, s07.mean_cells_per_image) == (1, 1, 48, 48)
    assert (s07.tiles, s07.tiles_analysed, s07.tiles_error) == (20, 16, 1)
    assert s07.analysed_mm2 == pytest.approx(16 * 10_000 * 0.25 / 1e6)
    assert s07.analysed_fraction == pytest.approx(160_000 / (1040 * 520))
    assert s07.plasma_cells_per_mm2 == pytest.approx(48 / 0.04)
    assert (s08.images, s08.images_error, s08.tiles_analysed) == (1, 1, 0)
    assert s08.analysed_mm2 == 0 and pd.isna(s08.plasma_cells_per_mm2)  # nothing analysed
    assert (f.images, f.plasma_cells) == (3, 6)
    assert pd.isna(f.tiles) and pd.isna(f.analysed_mm2) and pd.isna(f.plasma_cells_per_mm2)
    # a slide without a pixel size: counts, no mm²
    images.loc[images.slide_id == "S07", "mpp"] = None
    s07 = slide_summary(images).set_index("slide_id").loc["S07"]
    assert s07.tiles_analysed == 16 and pd.isna(s07.analysed_mm2) and pd.isna(s07.plasma_cells_per_mm2)
