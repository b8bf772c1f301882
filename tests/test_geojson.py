"""GeoJSON cells for QuPath: valid polygons in image coordinates that give back their masks.

Rasterised back at the pixels' centres (pixel (r, c) is inside when (c + 0.5, r + 0.5) is),
each outline gives its mask with IoU >= 0.95; measured here: 1.0 for every outline, the
hole, the corner touch and the one-pixel-wide spur included (the half-pixel mitred buffer
moves no edge across a pixel centre; the polygons' areas exceed the masks' by under 1.5%).
"""

import json
import uuid

import numpy as np
import pytest
import shapely
from shapely.geometry import shape
from skimage.draw import disk, polygon

from segpc.io.geojson import cell_features, feature_id, mask_geometry, write_geojson
from segpc.io.inputs import InputImage
from segpc.io.outputs import ImageRecord, OutputWriter, read_table, unpack_mask
from segpc.method.results import Cell, ImageResult

SHAPE = (200, 300)  # (H, W): wider than high, so a swapped x and y would not fit


def _cell(cell_id: int, box, cell: np.ndarray, nucleus: np.ndarray) -> Cell:
    return Cell(cell_id, cell_id, box, nucleus, cell, scale=2.0, nucleus_score=0.9, cell_score=0.8,
                ratio=max(int(cell.sum()) - int(nucleus.sum()), 0) / max(int(nucleus.sum()), 1), truncated=False)


def _ring(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A cell with a hole (a vacuole) and its nucleus off centre."""
    cell, nucleus = np.zeros((h, w), bool), np.zeros((h, w), bool)
    cell[disk((h / 2, w / 2), min(h, w) / 2 - 1, shape=(h, w))] = True
    cell[disk((h / 2 + 6, w / 2 + 6), 5, shape=(h, w))] = False
    nucleus[disk((h / 2 - 6, w / 2 - 6), 9, shape=(h, w))] = True
    return cell | nucleus, nucleus  # the nucleus is part of its cell


def _touching(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A mask in parts: two blocks touching at one corner, the first with a one-pixel-wide
    spur, and a third block apart from them."""
    cell = np.zeros((h, w), bool)
    cell[: h // 2, : w // 2] = True
    cell[h // 2:, w // 2: w - 6] = True
    cell[0, w // 2: w // 2 + 6] = True
    cell[h - 5:, w - 4:] = True
    nucleus = np.zeros((h, w), bool)
    nucleus[3:9, 3:9] = True
    return cell, nucleus


def _result() -> ImageResult:
    cells = []
    for cell_id, (box, make) in enumerate([((20, 40, 60, 90), _ring), ((120, 200, 150, 240), _touching),
                                            ((150, 10, 181, 31), _ring)], start=1):
        y0, x0, y1, x1 = box
        cell, nucleus = make(y1 - y0, x1 - x0)
        cells.append(_cell(cell_id, box, cell, nucleus))
    return ImageResult(SHAPE, cells, n_nuclei=3)


def rasterise(geom, shape_hw) -> np.ndarray:
    """The pixels whose centres lie inside ``geom`` (holes cut out)."""
    out = np.zeros(shape_hw, bool)
    for part in shapely.get_parts(geom):
        for ring, value in [(part.exterior, True), *((r, False) for r in part.interiors)]:
            xy = np.asarray(ring.coords)
            rr, cc = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape_hw)
            out[rr, cc] = value
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_features_are_valid_cells_in_image_coordinates():
    result = _result()
    collection = cell_features(result, "S01__img-7", mpp=0.25)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(result.cells)
    json.loads(json.dumps(collection))  # plain JSON types only
    worst = 1.0
    for feature, c in zip(collection["features"], result.cells):
        props = feature["properties"]
        assert feature["type"] == "Feature" and props["objectType"] == "cell"
        assert props["classification"]["name"] == "Plasma cell" and len(props["classification"]["color"]) == 3
        assert uuid.UUID(feature["id"]) and feature["id"] == feature_id("S01__img-7", c.cell_id)
        m = props["measurements"]
        assert m["cell_id"] == c.cell_id and m["cell_area"] == c.cell_area and m["nucleus_area"] == c.nucleus_area
        assert m["scale"] == 2.0 and m["nucleus_score"] == 0.9 and m["cell_score"] == 0.8
        assert m["ratio"] == pytest.approx(c.ratio) and m["cell_area_um2"] == pytest.approx(c.cell_area / 16)
        for key, mask in (("geometry", c.cell), ("nucleusGeometry", c.nucleus)):
            geo = feature[key]
            for ring in (r for poly in (geo["coordinates"] if geo["type"] == "MultiPolygon" else [geo["coordinates"]])
                         for r in poly):
                assert ring[0] == ring[-1] and len(ring) >= 4  # closed rings
            geom = shape(geo)
            assert geom.is_valid and not geom.is_empty
            y0, x0, y1, x1 = c.box
            minx, miny, maxx, maxy = geom.bounds  # image coordinates: x is the column, y the row
            assert x0 - 0.01 <= minx and maxx <= x1 + 0.01 and y0 - 0.01 <= miny and maxy <= y1 + 0.01
            full = np.zeros(SHAPE, bool)
            full[y0:y1, x0:x1] = mask
            worst = min(worst, iou(rasterise(geom, SHAPE), full))
    assert worst >= 0.95, worst
    # the hole stays a hole; a part apart stays apart
    assert len(shape(collection["features"][0]["geometry"]).interiors) == 1
    assert shape(collection["features"][1]["geometry"]).geom_type == "MultiPolygon"
    # without a pixel size, no µm²
    assert not any(k.endswith("_um2") for k in cell_features(result, "x")["features"][0]["properties"]["measurements"])


def test_outline_follows_pixel_edges():
    """A square block's outline is exactly its pixels' outer edges."""
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True  # rows 2..4, columns 3..8
    geom = mask_geometry(mask, offset=(100, 50))
    assert geom.equals(shapely.box(53, 102, 59, 105)) and geom.area == mask.sum()
    disc = np.zeros((80, 80), bool)
    disc[disk((40, 40), 30)] = True
    assert mask_geometry(disc).area == pytest.approx(disc.sum(), rel=0.01)
    assert mask_geometry(np.zeros((5, 5), bool)) is None
    single = np.zeros((5, 5), bool)
    single[2, 3] = True
    assert mask_geometry(single).equals(shapely.box(3, 2, 4, 3))


def test_written_through_the_output_writer(tmp_path):
    result = _result()
    out = tmp_path / "out"
    writer = OutputWriter(str(out), geojson=True, mpp=0.5)
    records = [ImageRecord(InputImage("x/a.png", "S01__a", "S01"), "ok", "", SHAPE[1], SHAPE[0], 0.1, result),
               ImageRecord(InputImage("x/b.png", "S01__b", "S01"), "ok", "", SHAPE[1], SHAPE[0], 0.1,
                           ImageResult(SHAPE, [], 0, {})),
               ImageRecord(InputImage("x/c.png", "S01__c", "S01"), "error", "not an image")]
    writer.write(records)
    assert sorted(p.name for p in (out / "geojson").iterdir()) == ["S01__a.geojson", "S01__b.geojson"]
    data = json.loads((out / "geojson" / "S01__a.geojson").read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 3
    assert json.loads((out / "geojson" / "S01__b.geojson").read_text()) == {"type": "FeatureCollection",
                                                                             "features": []}
    # the outlines agree with the cells/ rows' masks
    cells = read_table(str(out), "cells").to_pandas().set_index("cell_id")
    for feature in data["features"]:
        m = feature["properties"]["measurements"]
        row = cells.loc[m["cell_id"]]
        assert m["cell_area_um2"] == pytest.approx(row.cell_area * 0.25)
        full = np.zeros(SHAPE, bool)
        full[row.y0:row.y1, row.x0:row.x1] = unpack_mask(row.cell_mask, (row.y0, row.x0, row.y1, row.x1))
        assert iou(rasterise(shape(feature["geometry"]), SHAPE), full) >= 0.95
    # a rewrite gives the same bytes (ids fixed by image and cell); write_geojson the same file
    before = (out / "geojson" / "S01__a.geojson").read_bytes()
    writer.write(records[:1])
    assert (out / "geojson" / "S01__a.geojson").read_bytes() == before
    write_geojson(str(tmp_path / "alone" / "a.geojson"), result.cells, "S01__a", mpp=0.5)
    assert (tmp_path / "alone" / "a.geojson").read_bytes() == before


def test_slide_geojson_parts_merge_in_level0_pixels_and_a_redone_tile_replaces_its_own(tmp_path):
    from segpc.io.slide_geojson import merge_slide_geojson, part_path, slide_path, tile_part

    out = str(tmp_path / "out")
    sq = np.ones((4, 6), bool)

    def put(tile: str, ids: list[int], origin=(100, 200)) -> None:
        cells = [_cell(i, (2 * k, 3, 2 * k + 4, 9), sq, sq) for k, i in enumerate(ids)]
        path = tmp_path / "out" / part_path("S07", tile)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tile_part(ImageResult((64, 64), cells), tile, "S07", origin, 2.0, 0.25))

    put("S07__tile-0-0", [1, 2])
    put("S07__tile-0-1", [100000001])
    assert merge_slide_geojson(out, "S07") == 3
    doc = json.loads((tmp_path / "out" / slide_path("S07")).read_text())
    first = next(f for f in doc["features"] if f["properties"]["measurements"]["cell_id"] == 1)
    # the cell's box (0, 3, 4, 9) in its core at (100, 200), level 0 at twice the pixels
    assert shape(first["geometry"]).bounds == (406.0, 200.0, 418.0, 208.0)
    assert first["id"] == feature_id("S07", 1) and first["properties"]["tile"] == "S07__tile-0-0"
    assert not list((tmp_path / "out" / "geojson" / "_parts" / "S07").iterdir())
    assert merge_slide_geojson(out, "S07") is None  # nothing new
    # a resumed run redid tile 0-0 (now one cell): its old features go, tile 0-1's stay
    put("S07__tile-0-0", [1])
    assert merge_slide_geojson(out, "S07") == 2
    doc = json.loads((tmp_path / "out" / slide_path("S07")).read_text())
    assert sorted(f["properties"]["measurements"]["cell_id"] for f in doc["features"]) == [1, 100000001]
