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
