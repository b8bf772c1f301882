"""Whole slides through the batch job: real pyramidal TIFFs in the test SeaweedFS beside a
folder of field images, real local Ray.

The job's cells of a slide are the single-process slide driver's (same count, same boxes in
slide pixels, same masks, none twice at a seam); slides.parquet has the grid, the analysed
area and the density; a slide without a pixel size is an error row naming the flag; a
resumed run redoes only the tile whose row is missing, and leaves the same label pyramid and
GeoJSON; one whose driver was killed mid-slide ends equal to the uninterrupted run. The
slide's label masks are one NGFF pyramid (level 0 = the driver's cells, each cut at its
owner's core), its GeoJSON one file in level-0 pixels. A manifest lists slides as a folder
does.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_jobs.segment import main as segment_main
from segpc.io.ngff import level_count
from segpc.io.outputs import done_image_ids, read_label_masks, read_table, unpack_mask, zarr_store
from segpc.io.storage import filesystem
from segpc.method.results import ImageResult
from segpc.method.segmenter import Segmenter
from segpc.wsi.driver import segment_slide
from segpc.wsi.job import slide_tiles, tile_id
from segpc.wsi.slide import open_slide
from segpc.wsi.synthetic import mosaic, write_pyramidal_tiff

pytestmark = [pytest.mark.ray, pytest.mark.s3]
FIELD = (240, 320)
PREFIX = "s3://segpc-tests/wsijob"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slide_job(ray_local, s3_server, archive, bundle, tmp_path_factory):
    """One uninterrupted job over two fields and two slides (what the tests here compare
    against): its arguments, files, and its outputs as written, before any test changes them."""
    tmp = tmp_path_factory.mktemp("wsijob")
    # a bundle trained at 0.5 µm/px on 240x320 fields (the quick bundle, its pixel size set)
    b = tmp / "bundle"
    shutil.copytree(bundle, b)
    meta = json.loads((b / "bundle.json").read_text())
    meta["imaging"] = {"mpp": 0.5, "field_shape": list(FIELD)}
    (b / "bundle.json").write_text(json.dumps(meta))
    # S07: two fields and glass where the third would be, 0.5 µm/px; nompp: no pixel size
    s = mosaic(1, 3, gap=40, seed=1, empty=(2,))
    local = tmp / "S07.tif"
    write_pyramidal_tiff(local, s.image, mpp=0.5, levels=3)
    write_pyramidal_tiff(tmp / "nompp.tif", s.image, mpp=None, levels=2)
    fs, _ = filesystem(PREFIX)
    if not fs.exists("segpc-tests"):
        fs.mkdir("segpc-tests")
    base = PREFIX.removeprefix("s3://")
    fs.put_file(str(local), f"{base}/in/S07.tif")
    fs.put_file(str(tmp / "nompp.tif"), f"{base}/in/nompp.tif")
    fields = sorted((archive / "x").iterdir())[:2]
    for p in fields:
        fs.pipe_file(f"{base}/in/S01/{p.name}", p.read_bytes())
    out = f"{PREFIX}/out"
    args = ["--input", f"{PREFIX}/in", "--output", out, "--bundle", str(b), "--batch-size", "1", "--geojson"]
    assert segment_main(args) == 0
    return {"bundle": b, "local": local, "fields": fields, "out": out, "args": args, "outputs": _outputs(out)}


def _outputs(out: str) -> dict:
    """images/ (without timings), cells/ and slides.parquet, sorted, to compare runs."""
    images = read_table(out, "images").to_pandas()
    assert images.image_id.is_unique
    images = images.drop(columns="seconds").sort_values("image_id").reset_index(drop=True)
    key = ["image_id", "cell_id"]
    cells = read_table(out, "cells").to_pandas().sort_values(key).reset_index(drop=True)
    fs, path = filesystem(f"{out}/slides.parquet")
    with fs.open(path, "rb") as f:
        slides = pq.read_table(f).to_pandas().sort_values("slide_id").reset_index(drop=True)
    return {"images": images, "cells": cells, "slides": slides}


def test_whole_slides_through_the_job_and_resume_per_tile(slide_job, capsys):
    b, local, fields, out, args = (slide_job[k] for k in ("bundle", "local", "fields", "out", "args"))
    fs, _ = filesystem(out)
    base = PREFIX.removeprefix("s3://")
    images = slide_job["outputs"]["images"].set_index("image_id")
    head, tiles = slide_tiles(str(local), Segmenter.from_bundle(str(b)).config, FIELD, 0.5)
    assert (head.tiles, head.skipped, len(tiles)) == (3, 1, 2)  # tiles of two fields a side; glass skipped
    # every input once (two fields, two slides' own rows), and one row per tile analysed
    want = {f"S01__{p.stem}" for p in fields} | {"S07", "nompp"} | {tile_id("S07", t.row, t.col) for t in tiles}
    assert set(images.index) == want and images.index.is_unique
    assert images.loc["S07", ["status", "kind", "tiles", "tiles_skipped"]].tolist() == ["ok", "slide", 3, 1]
    bad = images.loc["nompp"]
    assert bad.status == "error" and "nompp.tif" in bad.error and "--mpp" in bad.error and bad.kind == "slide"
    assert (images.loc[[f"S01__{p.stem}" for p in fields], "kind"].isna()).all()
    tile_rows = images[images.kind == "tile"]
    assert len(tile_rows) == 2 and (tile_rows.status == "ok").all() and (tile_rows.slide_id == "S07").all()
    assert sorted(tile_rows.core_area_px) == sorted(t.core_area for t in tiles)

    # the slide's cells are the single-process driver's: count, slide boxes, masks
    ref = segment_slide(Segmenter.from_bundle(str(b)), open_slide(str(local)), FIELD, target_mpp=0.5)
    cells = slide_job["outputs"]["cells"]
    mine = cells[cells.slide_id == "S07"]
    assert len(mine) == len(ref.cells) >= 5  # the quick bundle: trained U-Net, random cytoplasm nets
    boxes = list(zip(mine.slide_y0, mine.slide_x0, mine.slide_y1, mine.slide_x1))
    assert sorted(boxes) == sorted(c.box for c in ref.cells)
    by_box = {c.box: c for c in ref.cells}
    for box, row in zip(boxes, mine.itertuples()):
        local_box = (row.y0, row.x0, row.y1, row.x1)
        assert (unpack_mask(row.nucleus_mask, local_box) == by_box[box].nucleus).all()
        assert row.cell_area_um2 == pytest.approx(row.cell_area * 0.25)
    assert not cells.duplicated(["image_id", "cell_id"]).any()
    assert cells[cells.slide_id == "S01"].slide_y0.isna().all()
    # cell ids are unique in the slide (tile index * stride + n) and are the label pyramid's
    # values: level 0 is the driver's cells painted by their owner tiles, each cut at its core
    assert mine.cell_id.is_unique and (mine.cell_id // head.label_stride).isin([t.row * head.grid_cols + t.col
                                                                                for t in tiles]).all()
    want_n, want_c = np.zeros(ref.shape, np.uint32), np.zeros(ref.shape, np.uint32)
    for t in tiles:
        rows = mine[mine.image_id == tile_id("S07", t.row, t.col)]
        y0, x0 = t.core[:2]
        own = [replace(by_box[(r.slide_y0, r.slide_x0, r.slide_y1, r.slide_x1)], cell_id=r.cell_id,
                       box=(r.y0, r.x0, r.y1, r.x1)) for r in rows.itertuples()]
        n, c = ImageResult(t.core_shape, own, 0).label_maps(np.uint32)
        want_n[y0:t.core[2], x0:t.core[3]], want_c[y0:t.core[2], x0:t.core[3]] = n, c
    check_slide_pyramid(out, "S07", want_n, want_c)
    # one GeoJSON per slide: one Feature per cells/ row, outlines in level-0 pixels in its box
    check_slide_geojson(fs, f"{base}/out/geojson/S07.geojson", mine)
    fs.invalidate_cache()
    assert not [p for p in fs.find(f"{base}/out/geojson/_parts") if p.endswith(".jsonl")]  # merged, deleted

    # slides.parquet: the grid, the analysed area (the cores of the tiles analysed) and density
    slides = slide_job["outputs"]["slides"].set_index("slide_id")
    s07 = slides.loc["S07"]
    area = sum(t.core_area for t in tiles) * 0.25 / 1e6
    assert (s07.images, s07.tiles, s07.tiles_analysed, s07.plasma_cells) == (1, 3, 2, len(ref.cells))
    assert s07.analysed_mm2 == pytest.approx(area) and ref.analysed_mm2 == pytest.approx(area)
    assert s07.plasma_cells_per_mm2 == pytest.approx(len(ref.cells) / area)
    assert s07.analysed_fraction == pytest.approx(ref.analysed_fraction)
    assert slides.loc["nompp"].images_error == 1 and pd.isna(slides.loc["S01"].tiles)

    # the report: the slide's grid columns, and its best tile first in the gallery (its core
    # read from the slide, the slide's label pyramid drawn on it)
    from segpc.evaluation.report import build_report

    build_report(out, gallery_size=3)
    page = fs.cat_file(f"{base}/out/report/index.html").decode()
    assert "<th>tiles analysed / tiles</th>" in page and "<td>2 / 3</td>" in page
    assert f"<td>{100 * s07.analysed_fraction:.1f}%</td>" in page
    best = min(tile_rows.index, key=lambda i: (-tile_rows.n_cells[i], i))
    assert page.index(f"gallery/{best}.png") < page.index("gallery/S01__")
    assert fs.exists(f"{base}/out/report/gallery/{best}.png")

    # resume: a tile whose images/ part is gone (its cells/ part left behind) is redone, alone,
    # here by the GPU clusters' graph (read task, network actors, writers)
    parts = {p: pq.read_table(fs.open(p, "rb")).column("image_id").to_pylist() for p in fs.ls(f"{base}/out/images")}
    tid = tile_id("S07", tiles[0].row, tiles[0].col)
    lost = next(p for p, ids in parts.items() if ids == [tid])
    fs.rm(lost)
    capsys.readouterr()
    assert segment_main(args + ["--resume", "--no-fuse"]) == 0
    assert "1 ok, 0 error(s)" in capsys.readouterr().out
    again = _outputs(out)
    assert set(again["images"].image_id) == want
    assert again["images"].equals(slide_job["outputs"]["images"])
    assert again["cells"].equals(slide_job["outputs"]["cells"])
    check_slide_pyramid(out, "S07", want_n, want_c)  # the redone tile rewrote the same chunks
    check_slide_geojson(fs, f"{base}/out/geojson/S07.geojson", mine)  # its features once


def check_slide_pyramid(out: str, slide: str, nuclei: np.ndarray, cells: np.ndarray) -> None:
    """masks.zarr/<slide>: NGFF labels (ome-zarr-py's Reader, ome-zarr-models), level 0 =
    the given maps, level k = level 0[::2**k, ::2**k]."""
    import zarr
    from ome_zarr_models.v05.image_label import ImageLabel
    from test_ome_zarr import nodes

    assert nuclei.any()
    got = read_label_masks(out, slide)
    assert np.array_equal(got[0], nuclei) and np.array_equal(got[1], cells)
    found = nodes(f"{out}/masks.zarr/{slide}/labels")
    for name, labels in (("nuclei", nuclei), ("cells", cells)):
        node = found[f"{slide}/labels/{name}"]
        assert len(node.data) == level_count(labels.shape) >= 2
        for k, level in enumerate(node.data):
            assert np.array_equal(np.asarray(level), labels[::2 ** k, ::2 ** k]), (name, k)
        ImageLabel.from_zarr(zarr.open_group(store=zarr_store(out), path=f"{slide}/labels/{name}", mode="r"))


def check_slide_geojson(fs, path: str, cells: pd.DataFrame) -> None:
    from shapely.geometry import shape

    with fs.open(path, "rb") as f:
        features = json.load(f)["features"]
    assert sorted(f["properties"]["measurements"]["cell_id"] for f in features) == sorted(cells.cell_id)
    rows = cells.set_index("cell_id")
    for f in features:
        r = rows.loc[f["properties"]["measurements"]["cell_id"]]
        assert f["properties"]["tile"] == r.image_id and f["properties"]["objectType"] == "cell"
        x0, y0, x1, y1 = shape(f["geometry"]).bounds
        tol = 0.5  # outlines are smoothed within half a pixel of the mask's edges
        assert r.slide_x0 - tol <= x0 < x1 <= r.slide_x1 + tol and r.slide_y0 - tol <= y0 < y1 <= r.slide_y1 + tol
        assert shape(f["nucleusGeometry"]).within(shape(f["geometry"]).buffer(1e-6))


def _tiles_done(out: str) -> int:
    try:
        return sum("__tile-" in i for i in done_image_ids(out))
    except FileNotFoundError:
        return 0


def _job_of(pid: int) -> str:
    from ray._private import state

    return next(j["JobID"] for j in state.jobs() if j.get("DriverPid") == pid)


def test_killed_driver_mid_slide_then_resume_equals_an_uninterrupted_run(slide_job, ray_local, tmp_path):
    """The job's driver, a process of its own on the test session's Ray, SIGKILLed once some
    but not all of S07's tiles have their images/ row; --resume completes the slide."""
    out = f"{PREFIX}/killed"
    args = [a if a != slide_job["out"] else out for a in slide_job["args"]]
    # one actor, one tile per batch: the tiles' rows come one after the other, seconds apart
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.segment", *args, "--nucleus-actors", "1"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while _tiles_done(out) == 0:
                assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the job wrote no tile"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert _tiles_done(out) == 1, f"not killed mid-slide: {_tiles_done(out)} of 2 tiles done"
    # Ray ends a dead driver's job: its actors (the segmenting and writing processes) die too
    from ray._private import state

    job = ray_local.JobID(bytes.fromhex(_job_of(proc.pid)))
    deadline = time.monotonic() + 60
    while any(a["State"] != "DEAD" for a in state.actors(job_id=job).values()):
        assert time.monotonic() < deadline, "the killed driver's actors are still alive"
        time.sleep(0.5)
    assert segment_main(args + ["--resume"]) == 0
    got, want = _outputs(out), slide_job["outputs"]
    assert got["images"].equals(want["images"])
    assert got["cells"].equals(want["cells"]), "cells differ (ids, boxes, areas or masks)"
    assert got["slides"].equals(want["slides"])
    # the label pyramid and the slide's GeoJSON too: each cell once, as uninterrupted
    for a, b in zip(read_label_masks(out, "S07"), read_label_masks(slide_job["out"], "S07")):
        assert np.array_equal(a, b)
    fs, _ = filesystem(out)
    fs.invalidate_cache()
    check_slide_geojson(fs, f"{out.removeprefix('s3://')}/geojson/S07.geojson", got["cells"][got["cells"].slide_id == "S07"])


def test_manifest_lists_whole_slides_as_a_folder_does(slide_job, ray_local):
    """A manifest row naming a whole slide becomes the slide's row and tile rows, the same as
    the folder listing gives (the manifest's slide_id kept); a field stays one row."""
    from ray_jobs.listing import list_folders, manifest_rows
    from segpc.config import Config
    from segpc.io.inputs import ROOT_FILES

    fs, _ = filesystem(PREFIX)
    manifest = f"{PREFIX}/manifest.csv"
    field = slide_job["fields"][0].name
    fs.pipe_file(manifest.removeprefix("s3://"),
                 f"path,slide_id\nS07.tif,S07\nS01/{field},S01\nnompp.tif,patient-12\n".encode())
    slides = {"config": Config.from_dict(json.loads((slide_job["bundle"] / "bundle.json").read_text())["config"]).to_dict(),
              "field_shape": FIELD, "target_mpp": 0.5, "mpp": None}
    done = [None]
    listed = _frame(list_folders({"folder": [ROOT_FILES, "S01"]}, f"{PREFIX}/in", done, slides))
    named = _frame(manifest_rows({"manifest": [manifest]}, f"{PREFIX}/in", done, slides))

    def of(rows: pd.DataFrame, name: str) -> pd.DataFrame:
        return rows[rows.uri.str.endswith(name)].reset_index(drop=True)

    assert len(of(listed, "S07.tif")) == 3  # the slide's row and its 2 tiles
    assert of(named, "S07.tif").equals(of(listed, "S07.tif"))
    assert of(named, field).equals(of(listed, field)) and len(of(named, field)) == 1
    nompp = of(named, "nompp.tif")
    assert nompp.slide_id.tolist() == ["patient-12"] and "--mpp" in nompp.tile.iloc[0]  # its error row


def _frame(batches) -> pd.DataFrame:
    rows = pd.concat([pd.DataFrame(b) for b in batches], ignore_index=True)
    return rows.sort_values("image_id").reset_index(drop=True)


def test_a_slides_tiles_spread_over_the_actors(slide_job, ray_local):
    """One listing task yields a slide's row and its tiles' rows together; cut into blocks of
    one batch (by the listing task itself, at its quarter CPU, so nothing waits for the
    actors' CPUs), they go to both actors of a pool of two, not all to one."""
    import argparse

    from ray_jobs.listing import LIST_CPUS, input_dataset

    class Which:  # defined here: Ray's workers cannot import this test module
        """Notes which process saw each row (and takes its time, as a tile does)."""

        def __call__(self, batch: dict) -> dict:
            time.sleep(0.3)
            return {"image_id": batch["image_id"], "pid": np.full(len(batch["image_id"]), os.getpid())}

    slides = {"config": Segmenter.from_bundle(str(slide_job["bundle"])).config.to_dict(), "field_shape": FIELD,
              "target_mpp": 0.5, "mpp": None}
    args = argparse.Namespace(input=f"{PREFIX}/in", manifest=None, image_column="image")
    ds = input_dataset(args, None, None, slides, rows_per_block=1)
    assert ds._logical_plan.dag.ray_remote_args["num_cpus"] == LIST_CPUS
    rows = ds.map_batches(Which, batch_size=1, compute=ray_local.data.ActorPoolStrategy(size=2),
                          num_cpus=0.25, batch_format="numpy").take_all()
    s07 = {r["pid"] for r in rows if str(r["image_id"]).startswith("S07")}
    assert len([r for r in rows if str(r["image_id"]).startswith("S07__tile-")]) == 2
    assert len(s07) == 2, "the slide's rows all went to one actor"
