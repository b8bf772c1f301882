"""QuPath cell objects as GeoJSON: ``geojson/<image_id>.geojson``, one file per image.

A FeatureCollection with one Feature per plasma cell, as QuPath (0.4+) writes and reads
cells: ``geometry`` the cell's outline, ``nucleusGeometry`` (a member of the Feature, beside
``geometry``) its nucleus, ``properties.objectType = "cell"``, a classification and the
cell's measurements (the ``cells/`` columns: px, and ``_um2`` when the pixel size is known).

Coordinates are the image's pixels with QuPath's convention: x to the right, y down, the
origin at the top-left corner of the top-left pixel, so pixel (row r, column c) covers
[c, c+1) x [r, r+1). An outline follows the outer edges of its mask's pixels: OpenCV traces
the boundary pixels' centres, and a half-pixel mitred buffer moves the lines out to the
pixel edges (the area then matches the mask's pixel count within a fraction of a percent
for cell-shaped masks, where the centres alone lose half a pixel all round, about 10% of a
small cell). Holes stay holes; a mask in several parts becomes a MultiPolygon.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

import cv2
import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, mapping

from segpc.method.results import Cell, ImageResult

CLASSIFICATION = {"name": "Plasma cell", "color": [0, 200, 255]}  # the overlays' cell colour
# one namespace for the features' ids: the same image and cell always give the same UUID,
# so a rerun rewrites a file identical to the one before
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/segpc/cells")
GRID = 0.01  # coordinates on a 1/100 px grid: exact enough, and short in the file


def mask_geometry(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> Polygon | MultiPolygon | None:
    """The outline of a bool mask as a valid shapely (Multi)Polygon in image coordinates
    (``offset`` = the mask's (y0, x0) in the image), or None for an empty mask."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    hierarchy = hierarchy[0]  # per contour: next, previous, first child, parent
    y0, x0 = offset
    shift = np.array([x0 + 0.5, y0 + 0.5])  # pixel (r, c)'s centre is (c + 0.5, r + 0.5)

    def points(i: int) -> np.ndarray:
        return contours[i][:, 0, :].astype(np.float64) + shift

    parts = []
    for i in range(len(contours)):
        if hierarchy[i][3] != -1:  # a hole: taken with its outer contour
            continue
        shell, holes, j = points(i), [], hierarchy[i][2]
        while j != -1:
            if len(contours[j]) >= 3:
                holes.append(points(j))
            j = hierarchy[j][0]
        if len(shell) >= 3:
            parts.append(shapely.make_valid(Polygon(shell, holes)))
        else:  # a part one pixel wide: a segment or a single pixel
            parts.append(LineString(shell) if len(shell) == 2 else Point(shell[0]))
    # the centres' outline grown by half a pixel reaches the pixels' outer edges (and shrinks
    # each hole to its empty pixels); buffer's result is valid by construction
    grown = shapely.buffer(shapely.GeometryCollection(parts), 0.5, cap_style="square", join_style="mitre")
    return _polygonal(shapely.set_precision(grown, GRID))


def _polygonal(geom) -> Polygon | MultiPolygon | None:
    """Only the polygons of ``geom`` (a snapped geometry may carry a collapsed sliver), one
    Polygon when there is one."""
    geom = shapely.make_valid(geom) if not geom.is_valid else geom
    polys = [p for p in shapely.get_parts(geom) if isinstance(p, Polygon) and not p.is_empty]
    polys = [q for p in polys for q in (shapely.get_parts(p) if isinstance(p, MultiPolygon) else [p])]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _geojson_geometry(geom) -> dict:
    """GeoJSON of a shapely geometry with closed rings; whole numbers written as ints."""
    def tidy(value):
        if isinstance(value, (tuple, list)):
            return [tidy(v) for v in value]
        value = round(float(value), 2)
        return int(value) if value.is_integer() else value

    out = mapping(geom)
    return {"type": out["type"], "coordinates": tidy(out["coordinates"])}


def feature_id(image_id: str, cell_id: int) -> str:
    """The Feature's id: a UUID fixed by the image and the cell."""
    return str(uuid.uuid5(ID_NAMESPACE, f"{image_id}/{int(cell_id)}"))


def cell_measurements(cell: Cell, mpp: float | None = None) -> dict:
    """QuPath measurements of a cell (numbers only): the ``cells/`` columns' names and values."""
    nucleus, area = cell.nucleus_area, cell.cell_area
    out = {"cell_id": int(cell.cell_id), "nucleus_area": nucleus, "cell_area": area,
           "cytoplasm_area": area - nucleus, "ratio": float(cell.ratio), "scale": float(cell.scale),
           "nucleus_score": float(cell.nucleus_score), "cell_score": float(cell.cell_score),
           "truncated": int(bool(cell.truncated))}
    if mpp:
        um2 = float(mpp) ** 2
        out.update({"nucleus_area_um2": nucleus * um2, "cell_area_um2": area * um2,
                    "cytoplasm_area_um2": (area - nucleus) * um2})
    return out


def cell_feature(cell: Cell, image_id: str, mpp: float | None = None, origin: tuple[int, int] = (0, 0),
                 scale: float = 1.0) -> dict | None:
    """One QuPath cell Feature, or None when the cell's mask is empty. ``origin``: where the
    image's (0, 0) lies in the picture the coordinates refer to, ``scale``: that picture's
    pixels per image pixel (a slide tile's core in the scan's level 0)."""
    y0, x0 = cell.box[0] + origin[0], cell.box[1] + origin[1]

    def outline(mask):
        geom = mask_geometry(mask, (y0, x0))
        return geom if geom is None or scale == 1.0 else shapely.transform(geom, lambda xy: xy * scale)

    shape = outline(cell.cell | cell.nucleus)  # the nucleus lies in its cell
    if shape is None:
        return None
    feature = {"type": "Feature", "id": feature_id(image_id, cell.cell_id),
               "geometry": _geojson_geometry(shape)}
    nucleus = outline(cell.nucleus)
    if nucleus is not None:
        feature["nucleusGeometry"] = _geojson_geometry(nucleus)
    feature["properties"] = {"objectType": "cell", "classification": dict(CLASSIFICATION),
                             "measurements": cell_measurements(cell, mpp)}
    return feature


def cell_features(result: ImageResult | Iterable[Cell], image_id: str, mpp: float | None = None) -> dict:
    """The GeoJSON FeatureCollection of an image's cells (an :class:`ImageResult` or its cells)."""
    cells = result.cells if isinstance(result, ImageResult) else list(result)
    features = [f for f in (cell_feature(c, image_id, mpp) for c in cells) if f is not None]
    return {"type": "FeatureCollection", "features": features}


def geojson_bytes(result: ImageResult | Iterable[Cell], image_id: str, mpp: float | None = None) -> bytes:
    """The file's content: compact UTF-8 JSON."""
    return json.dumps(cell_features(result, image_id, mpp), separators=(",", ":")).encode()


def write_geojson(path: str, result: ImageResult | Iterable[Cell], image_id: str,
                  mpp: float | None = None) -> None:
    """``path`` (a local path or fsspec URL) <- the image's cells as GeoJSON."""
    from fsspec.implementations.local import LocalFileSystem

    from segpc.io.storage import filesystem, with_retries

    fs, root = filesystem(path)
    data = geojson_bytes(result, image_id, mpp)
    if isinstance(fs, LocalFileSystem):  # a local folder must exist; object storage has none
        fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
    with_retries(f"writing {path}", fs.pipe_file, root, data)
