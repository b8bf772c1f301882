"""A whole slide's label pyramid (segpc.wsi.pyramid, segpc.io.slide_masks): every chunk of
every level has exactly one writer, by construction; tiles written in any order plus the
finishing step give level 0 = the assembled labels and level k = level 0[::2**k, ::2**k];
the result is NGFF 0.5 (ome-zarr-models) and ome-zarr-py's Reader opens it; a rewritten
tile PUTs the same bytes. Local folders, no Ray (the job's own run: test_wsi_job.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_ome_zarr import nodes

from segpc.io.outputs import read_label_masks, write_masks_group
from segpc.io.slide_masks import (
    LABEL_DTYPE,
    SlideMasks,
    finish_slide_masks,
    read_slide_meta,
    tile_objects,
    write_slide_metadata,
    write_tile_masks,
)
from segpc.wsi.pyramid import (
    chunk_boxes,
    chunk_index,
    finish_regions,
    pyramid,
    tile_region,
)
from segpc.wsi.tiles import tile_grid

GRIDS = [((1300, 2200), (256, 512)),  # aligned cores: every level by the tiles
         ((1300, 2200), (150, 330)),  # unaligned: level 2 on by the finishing step
         ((5000, 700), (1024, 640)),  # tall, 5 levels, the coarse ones finished
         ((300, 200), (400, 400))]  # one tile larger than the slide


@pytest.mark.parametrize("shape,core", GRIDS)
def test_every_chunk_of_every_level_has_exactly_one_writer(shape, core):
    tiles = tile_grid(shape[1], shape[0], core, 0)
    levels = pyramid(shape, core)
    assert levels[0].by_tiles and [lv.k for lv in levels] == list(range(len(levels)))
    assert max(levels[-1].shape) <= 1024
    # which tile owns each level-0 pixel
    owner = np.zeros(shape, np.int32)
    for i, t in enumerate(tiles):
        owner[t.core[0]:t.core[2], t.core[1]:t.core[3]] = i
    finished = Counter((lv.k, box) for lv, box in finish_regions(levels))
    for lv in levels:
        chunks = chunk_boxes(lv)
        if lv.by_tiles:
            written = Counter()
            painted = np.full(lv.shape, -1, np.int32)
            for i, t in enumerate(tiles):
                box = tile_region(lv, t.core)
                written[chunk_index(lv, box)] += 1
                painted[box[0]:box[2], box[1]:box[3]] = i
            # one writer per chunk, every chunk written, and a tile's chunk is exactly the
            # level-k pixels whose level-0 position lies in its core
            assert sorted(written) == sorted(chunk_index(lv, b) for b in chunks) and set(written.values()) == {1}
            assert np.array_equal(painted, owner[::2 ** lv.k, ::2 ** lv.k])
            assert not any(k == lv.k for k, _ in finished)
        else:
            assert lv.k > 0 and not any(lv2.by_tiles for lv2 in levels[lv.k:])
            assert sorted(b for k, b in finished if k == lv.k) == sorted(chunks)
            assert max(lv.chunk) <= 1024
    assert set(finished.values()) <= {1}
    if core == (256, 512):
        assert all(lv.by_tiles for lv in levels)
    if core == (150, 330):
        assert [lv.by_tiles for lv in levels] == [True, True, False]


def _labels(shape, core, n=60, seed=0):
    """Label maps as tiles leave them: square cells, each cut at its owner's core."""
    rng = np.random.default_rng(seed)
    nuclei, cells = np.zeros(shape, LABEL_DTYPE), np.zeros(shape, LABEL_DTYPE)
    for k, (y, x) in enumerate(zip(rng.integers(0, shape[0] - 30, n), rng.integers(0, shape[1] - 30, n)), 1):
        cells[y:y + 29, x:x + 27] = k * 1000 + 7
        nuclei[y + 8:y + 20, x + 7:x + 19] = k * 1000 + 7
    return nuclei, cells


def test_slide_pyramid_from_tiles_in_any_order_reads_back_as_ngff(tmp_path):
    from ome_zarr_models.v05.image_label import ImageLabel

    shape, core = (1300, 2200), (150, 330)
    out = str(tmp_path / "out")
    m = SlideMasks("S07", shape, core, 0.5, 2.0, 10 ** 8, "s3://b/S07.tif", 1, 1.0)
    nuclei, cells = _labels(shape, core)
    tiles = tile_grid(shape[1], shape[0], core, 0)
    skipped = tiles[5]  # a glass tile: never written, reads as 0
    write_masks_group(out)
    # tiles write in any order (here reversed), each its own chunks only
    keys = Counter()
    for t in reversed(tiles):
        if t is skipped:
            continue
        y0, x0, y1, x1 = t.core
        objects = tile_objects(m, t.core, nuclei[y0:y1, x0:x1], cells[y0:y1, x0:x1])
        keys.update(list(objects))
        if t is tiles[0]:  # metadata after some tiles' chunks: create-if-absent is order-free
            write_slide_metadata(out, m)
        write_tile_masks(out, m, t.core, nuclei[y0:y1, x0:x1], cells[y0:y1, x0:x1])
    assert set(keys.values()) == {1} and not any(k.endswith("zarr.json") for k in keys)
    assert read_slide_meta(out, "S07") == m
    assert finish_slide_masks(out, m) == 1  # level 2 (325 x 550 px): one chunk (per label)
    y0, x0, y1, x1 = skipped.core
    nuclei[y0:y1, x0:x1] = cells[y0:y1, x0:x1] = 0
    got_n, got_c = read_label_masks(out, "S07")
    assert np.array_equal(got_n, nuclei) and np.array_equal(got_c, cells)
    part = read_label_masks(out, "S07", box=(100, 200, 400, 900))
    assert np.array_equal(part[1], cells[100:400, 200:900])
    assert np.array_equal(read_label_masks(out, "S07", level=2)[1], cells[::4, ::4])
    # ome-zarr-py reads every level as level 0's stride; ome-zarr-models validates the groups
    found = nodes(f"{out}/masks.zarr/S07/labels")
    for name, labels in (("nuclei", nuclei), ("cells", cells)):
        node = found[f"S07/labels/{name}"]
        assert len(node.data) == 3
        for k, level in enumerate(node.data):
            assert np.array_equal(np.asarray(level), labels[::2 ** k, ::2 ** k]), (name, k)
        assert node.metadata["coordinateTransformations"][1][0]["scale"] == [1.0, 1.0]  # 0.5 µm * 2
        ImageLabel.from_zarr(__import__("zarr").open_group(f"{out}/masks.zarr/S07/labels/{name}", mode="r"))
    attrs = json.loads((tmp_path / "out/masks.zarr/S07/zarr.json").read_text())["attributes"]["segpc"]
    assert attrs["to_level0"] == 2.0 and attrs["grid_core"] == [150, 330] and attrs["levels_by_tiles"] == 2
    # a re-run tile PUTs byte-identical objects; so does the finishing step
    before = {p: p.read_bytes() for p in (tmp_path / "out/masks.zarr").rglob("*") if p.is_file()}
    t = tiles[3]
    y0, x0, y1, x1 = t.core
    write_tile_masks(out, m, t.core, nuclei[y0:y1, x0:x1], cells[y0:y1, x0:x1])
    write_slide_metadata(out, m)
    finish_slide_masks(out, m)
    after = {p: p.read_bytes() for p in (tmp_path / "out/masks.zarr").rglob("*") if p.is_file()}
    assert after == before


def test_finishing_runs_once_per_slide_unless_a_tile_of_it_was_written(tmp_path):
    """The finishing step redoes a slide only when this run wrote a tile of it or it was never
    finished (no marker, e.g. a driver killed before the step): a resumed run over an archive
    does not redo every slide done before."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from segpc.io.outputs import put_object
    from segpc.io.slide_finish import MARKER, finish_slides, was_finished
    from segpc.io.storage import filesystem

    out = str(tmp_path / "out")
    fs, root = filesystem(out)
    rows = [{"image_id": i, "kind": k, "status": st} for i, k, st in
            [("S1", "slide", "ok"), ("S2", "slide", "ok"), ("S3", "slide", "error"), ("F1", None, "ok")]]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("image_id", pa.string()), ("kind", pa.string()),
                                                           ("status", pa.string())]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    put_object(fs, f"{root}/images/part-0.parquet", buf.getvalue())
    shape, core = (1300, 2200), (150, 330)
    write_masks_group(out)
    for sid in ("S1", "S2"):
        write_slide_metadata(out, SlideMasks(sid, shape, core, 0.5, 1.0, 10 ** 8))
    assert finish_slides(out) == {"S1": 1, "S2": 1}  # never finished: both (S3 is an error row)
    assert was_finished(out, "S1", geojson=False) and not was_finished(out, "S1", geojson=True)
    assert finish_slides(out, written=set()) == {}  # a resume that wrote no tile of them
    assert finish_slides(out, written={"S2"}) == {"S2": 1}
    (tmp_path / "out/masks.zarr/S1" / MARKER).unlink()  # as if stopped before the step
    assert finish_slides(out, written=set()) == {"S1": 1}
