"""The per-slide finishing step after a job's pipeline (the driver runs it where it writes
``slides.parquet``): the coarse levels of each slide's label pyramid, which no tile owns
(:func:`segpc.io.slide_masks.finish_slide_masks`), and with ``--geojson`` each slide's one
GeoJSON file from its tiles' parts (:func:`segpc.io.slide_geojson.merge_slide_geojson`).

Every slide of the output whose own ``images/`` row is ok is finished again on every run,
resumed ones included: both steps are idempotent, so a job stopped during this step (or a
resume that redid one tile) ends with complete files. A slide costs its coarse levels
(1/4**k of its pixels, k the first level the tiles do not write) and its GeoJSON's bytes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow.compute as pc

from segpc.io.outputs import read_table

SLIDES_AT_ONCE = 4


def finished_slides(output: str) -> list[str]:
    """Image ids of the slide rows that are ok."""
    t = read_table(output, "images", ["image_id", "kind", "status"])
    ok = pc.and_(pc.equal(t.column("kind"), "slide"), pc.equal(t.column("status"), "ok"))
    return sorted(t.filter(pc.fill_null(ok, False)).column("image_id").to_pylist())


def finish_slides(output: str, geojson: bool = False) -> dict[str, int]:
    """Finish every ok slide; returns {slide image id: label chunks written by this step}."""
    from segpc.io.slide_geojson import merge_slide_geojson
    from segpc.io.slide_masks import finish_slide_masks, read_slide_meta

    def one(image_id: str) -> int:
        m = read_slide_meta(output, image_id)
        n = finish_slide_masks(output, m) if m is not None else 0
        if geojson:
            merge_slide_geojson(output, image_id)
        return n

    ids = finished_slides(output)
    with ThreadPoolExecutor(SLIDES_AT_ONCE) as pool:
        return dict(zip(ids, pool.map(one, ids)))
