"""The per-slide finishing step after a job's pipeline (the driver runs it where it writes
``slides.parquet``): the coarse levels of each slide's label pyramid, which no tile owns
(:func:`segpc.io.slide_masks.finish_slide_masks`), and with ``--geojson`` each slide's one
GeoJSON file from its tiles' parts (:func:`segpc.io.slide_geojson.merge_slide_geojson`).

A slide is finished when its own ``images/`` row is ok and either a tile of it was written
in this run or it was never finished: a marker object (``masks.zarr/<slide>/``
:data:`MARKER`) is PUT once both steps are through, so a resumed run over an archive does
not redo the slides done before, and a job stopped before or during this step finishes
them on resume. Both steps are idempotent. A slide costs its coarse levels (1/4**k of its
pixels, k the first level the tiles do not write) and its GeoJSON's bytes.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

import pyarrow.compute as pc

from segpc.io.outputs import put_object, read_table
from segpc.io.storage import filesystem, join, with_retries

SLIDES_AT_ONCE = 4
MARKER = "segpc_finished.json"  # in the slide's group: its finishing step went through


def finished_slides(output: str) -> list[str]:
    """Image ids of the slide rows that are ok."""
    t = read_table(output, "images", ["image_id", "kind", "status"])
    ok = pc.and_(pc.equal(t.column("kind"), "slide"), pc.equal(t.column("status"), "ok"))
    return sorted(t.filter(pc.fill_null(ok, False)).column("image_id").to_pylist())


def _marker(output: str, image_id: str) -> tuple:
    fs, root = filesystem(output)
    return fs, join(root, "masks.zarr", image_id, MARKER)


def was_finished(output: str, image_id: str, geojson: bool) -> bool:
    """Whether the slide's finishing step went through before (with ``--geojson`` if asked)."""
    fs, path = _marker(output, image_id)
    try:
        marker = json.loads(with_retries(f"reading {path}", fs.cat_file, path))
    except FileNotFoundError:
        return False
    return marker.get("geojson", False) or not geojson


def finish_slides(output: str, geojson: bool = False, written: Collection[str] | None = None) -> dict[str, int]:
    """Finish the ok slides that need it (module docstring): ``written``, the image ids of
    the slides with a tile written in this run (None: every ok slide). Returns {slide image
    id: label chunks written by this step} for the slides finished."""
    from segpc.io.slide_geojson import merge_slide_geojson
    from segpc.io.slide_masks import finish_slide_masks, read_slide_meta

    def needs(image_id: str) -> bool:
        return written is None or image_id in written or not was_finished(output, image_id, geojson)

    def one(image_id: str) -> int:
        m = read_slide_meta(output, image_id)
        n = finish_slide_masks(output, m) if m is not None else 0
        if geojson:
            merge_slide_geojson(output, image_id)
        fs, path = _marker(output, image_id)
        put_object(fs, path, json.dumps({"geojson": geojson}).encode())
        return n

    with ThreadPoolExecutor(SLIDES_AT_ONCE) as pool:
        ok = finished_slides(output)
        ids = [i for i, todo in zip(ok, pool.map(needs, ok)) if todo]
        return dict(zip(ids, pool.map(one, ids)))
