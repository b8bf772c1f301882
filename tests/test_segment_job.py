"""The batch job end to end: real SeaweedFS S3 in and out, real local Ray.

A synthetic archive in slide folders with bad files mixed in; every input accounted for
once; cells/ agrees with masks.zarr; slides.parquet agrees with cells/; the SegPC masks
score exactly as the in-process segmenter's; --resume changes nothing, and completes an
interrupted run without duplicates.
"""

from pathlib import Path

import numpy as np
import pytest
from helpers import bad_files, job_id, slide_layout, upload

from ray_jobs.segment import main as segment_main
from segpc.models.bundle import load_bundle, save_bundle
from segpc.io.imaging import read_image
from segpc.io.segpc_format import evaluate_folders, named_by_source
from segpc.io.outputs import read_label_masks, read_table, unpack_mask
from segpc.method.segmenter import Segmenter
from segpc.io.segpc_format import write_masks
from segpc.io.storage import filesystem

pytestmark = [pytest.mark.ray, pytest.mark.s3]
MAX_PIXELS = "400000"


@pytest.fixture
def s3_input(s3_bucket, archive):
    return _upload_input(s3_bucket, archive)


def _upload_input(prefix: str, archive: Path) -> tuple[str, dict[str, bytes]]:
    fs, _ = filesystem(prefix)
    files = slide_layout(archive)
    for n, (name, (data, _)) in enumerate(sorted(bad_files().items())):
        files[f"S0{n % 3 + 1}/{name}"] = data
    upload(fs, f"{prefix.removeprefix('s3://')}/in", files)
    return f"{prefix}/in", files


@pytest.fixture(scope="module")
def job(s3_server, ray_local, archive, bundle):
    """One run of the job over S3, shared by the checks below."""
    prefix = "s3://segpc-tests/job-module"
    fs, _ = filesystem(prefix)
    if not fs.exists("segpc-tests"):
        fs.mkdir("segpc-tests")
    in_uri, files = _upload_input(prefix, archive)
    bundle_uri = f"{prefix}/bundles/tiny"
    save_bundle(load_bundle(bundle), bundle_uri)
    args = ["--input", in_uri, "--output", f"{prefix}/out", "--bundle", bundle_uri, "--segpc-masks",
            "--overlays", "--geojson", "--mpp", "0.25", "--ome-zarr-image", "--max-pixels", MAX_PIXELS,
            "--progress-every", "5"]
    assert segment_main(args) == 0
    return {"input": in_uri, "files": files, "output": f"{prefix}/out", "args": args}


def _listing(uri: str) -> dict[str, tuple]:
    fs, root = filesystem(uri)
    return {p: (d["size"], d.get("ETag") or d.get("mtime")) for p, d in fs.find(root, detail=True).items()}


def test_job_over_s3(job, bundle, archive, tmp_path):
    in_uri, files, out, args = job["input"], job["files"], job["output"], job["args"]
    images = read_table(out, "images").to_pandas()
    # every input exactly once
    assert sorted(images.source_uri) == sorted(f"{in_uri}/{name}" for name in files)
    assert images.image_id.is_unique
    bad = images[images.source_uri.str.rsplit("/", n=1).str[-1].isin(bad_files())]
    for _, row in bad.iterrows():
        name = row.source_uri.rsplit("/", 1)[-1]
        assert row.status == "error" and name in row.error and bad_files()[name][1] in row.error
        assert row.error_kind == "image"  # not worth retrying
    good = images[~images.index.isin(bad.index)]
    assert (good.status == "ok").all() and good.error.isna().all()
    assert set(good.image_id) == {job_id(p.stem) for p in (archive / "x").iterdir()}

    # cells/ agrees with the Zarr label arrays
    cells = read_table(out, "cells").to_pandas()
    assert len(cells) > 0, "the test bundle must find cells"
    assert not cells.duplicated(["image_id", "cell_id"]).any()
    assert cells.groupby("image_id").size().reindex(good.image_id, fill_value=0).tolist() == good.n_cells.tolist()
    for image_id, group in cells.groupby("image_id"):
        nuclei, labels = read_label_masks(out, image_id)
        assert set(np.unique(nuclei)) - {0} == set(group.cell_id)
        for _, c in group.iterrows():
            box = (c.y0, c.x0, c.y1, c.x1)
            assert (nuclei == c.cell_id).sum() == c.nucleus_area
            cell = np.zeros(labels.shape, bool)
            cell[c.y0:c.y1, c.x0:c.x1] = unpack_mask(c.cell_mask, box)
            assert cell.sum() == c.cell_area and not ((labels == c.cell_id) & ~cell).any()
            assert unpack_mask(c.nucleus_mask, box).sum() == c.nucleus_area

    # masks.zarr (--ome-zarr-image): its group's zarr.json, and per image with results an
    # OME-Zarr image group, one level (320 x 240 px): the RGB image and both label images,
    # each array one shard beside its zarr.json (the default layout: tests/test_outputs.py)
    fs, root_path = filesystem(out)
    keys = sorted(p.split("/masks.zarr/", 1)[1] for p in fs.find(f"{root_path}/masks.zarr"))
    per_image = ["zarr.json", "0/zarr.json", "0/c/0/0/0", "labels/zarr.json",
                 *(f"labels/{n}/{k}" for n in ("nuclei", "cells") for k in ("zarr.json", "0/zarr.json", "0/c/0/0"))]
    assert keys == sorted(["zarr.json", *(f"{i}/{k}" for i in good.image_id for k in per_image)])
    import zarr
    from ome_zarr_models.v05.image import Image

    from segpc.io.outputs import zarr_store

    some = zarr.open_group(store=zarr_store(out), path=good.image_id.iloc[0], mode="r")
    ngff = Image.from_zarr(some)  # valid NGFF 0.5, the pixel size --mpp's
    assert ngff.labels.label_paths == ["nuclei", "cells"]
    assert list(ngff.datasets[0][0].coordinateTransformations[0].scale) == [1.0, 0.25, 0.25]
    assert np.array_equal(np.moveaxis(some["0"][...], 0, -1),
                          read_image(archive / "x" / f"{good.image_id.iloc[0].split('__')[-1]}.bmp"))

    # --geojson: one FeatureCollection per ok image, a QuPath cell per cells/ row
    import json

    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root_path}/geojson"))
    assert names == sorted(f"{i}.geojson" for i in good.image_id)
    for image_id, n in zip(good.image_id, good.n_cells):
        features = json.loads(fs.cat_file(f"{root_path}/geojson/{image_id}.geojson"))["features"]
        assert len(features) == n
        assert sorted(f["properties"]["measurements"]["cell_id"] for f in features) == \
            sorted(cells[cells.image_id == image_id].cell_id)
        assert all("nucleusGeometry" in f and "cell_area_um2" in f["properties"]["measurements"] for f in features)

    # slides.parquet totals equal cells/
    import pyarrow.parquet as pq

    with fs.open(f"{root_path}/slides.parquet", "rb") as f:
        slides = pq.read_table(f).to_pandas()
    assert slides.plasma_cells.sum() == len(cells)
    assert slides.images.sum() == len(images) and slides.images_error.sum() == len(bad)
    assert dict(zip(slides.slide_id, slides.plasma_cells)) == cells.groupby("slide_id").size().reindex(
        slides.slide_id, fill_value=0).to_dict()

    # --segpc-masks scores exactly as the in-process segmenter on the same bundle
    job_masks = tmp_path / "job"
    fs.get(f"{root_path}/segpc/", str(job_masks), recursive=True)
    seg = Segmenter.from_bundle(bundle, device="cpu")
    for p in sorted((archive / "x").iterdir()):
        write_masks(tmp_path / "inproc", p.stem, seg.segment(read_image(p)).instances())
    job_masks = named_by_source(job_masks, dict(zip(images.image_id, images.source_uri)), tmp_path / "named")
    by_job, in_process = evaluate_folders(archive, job_masks), evaluate_folders(archive, tmp_path / "inproc")
    assert by_job == in_process and by_job["n_pred"] == len(cells)

    # --resume on a finished run: no new inference, nothing changes
    before = _listing(out)
    assert segment_main(args + ["--resume"]) == 0
    assert _listing(out) == before


def test_report_from_the_job_output(job, tmp_path):
    import re
    import shutil
    import subprocess

    from ray_jobs.report import main as report_main

    assert report_main(["--output", job["output"], "--gallery", "4"]) == 0
    fs, root = filesystem(job["output"])
    local = tmp_path / "out"
    fs.get(f"{root}/", str(local), recursive=True)
    page = (local / "report" / "index.html").read_text()
    # every picture the page shows exists
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 3 + 4 and all((local / "report" / s).is_file() for s in sources)
    # its numbers are slides.parquet's
    import pandas as pd

    slides = pd.read_parquet(local / "slides.parquet")
    assert f'<b id="n-cells">{slides.plasma_cells.sum()}</b>' in page
    assert f'<b id="n-images">{slides.images.sum()}</b>' in page
    for r in slides.itertuples():
        assert f"<td>{r.slide_id}</td><td>{r.images}</td><td>{r.images_ok}</td><td>{r.images_error}</td>" \
               f"<td class=n>{r.plasma_cells}</td>" in page
    assert page.count("<td class=t>") == 2 * int(slides.images_error.sum())
    # the per-image table (sortable), every image once; areas in µm² too (the job had --mpp)
    table = page[page.index('<table id="images" class="sortable">'):]
    assert table[:table.index("</table>")].count("<tr><td>") == int(slides.images.sum())
    assert "mean cell area (µm²)" in page
    # it opens in headless Chromium without console errors
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed here (apt-get install chromium); the page check needs it")
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                           (local / "report" / "index.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Plasma-cell report" in proc.stdout
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []

def test_resume_completes_an_interrupted_run(job, ray_local, s3_bucket, s3_input, bundle):
    in_uri, files = s3_input
    out = f"{s3_bucket}/out"
    # the GPU clusters' graph here (network-only actors, CPU stages between them); the other
    # tests run every step of an image in one actor: both give the same cells. Small write
    # batches (the default, 64, would write these 19 images as one part pair): several parts,
    # one of them to interrupt
    args = ["--input", in_uri, "--output", out, "--bundle", bundle, "--max-pixels", MAX_PIXELS, "--no-fuse",
            "--write-batch-size", "4", "--mpp", "0.25"]  # the fixture's pixel size: the same µm² columns
    assert segment_main(args) == 0
    full = read_table(out, "images").to_pandas().sort_values("image_id").reset_index(drop=True)
    full_cells = read_table(out, "cells").to_pandas()
    by_cell = ["image_id", "cell_id"]
    fused = read_table(job["output"], "cells").to_pandas().sort_values(by_cell).reset_index(drop=True)
    assert full_cells.sort_values(by_cell).reset_index(drop=True).equals(fused)
    # interrupt: a batch whose cells/ part was written but not its images/ part
    fs, root = filesystem(out)
    images_parts = sorted(fs.ls(f"{root}/images"))
    assert len(images_parts) >= 3
    fs.rm(images_parts[0])
    assert segment_main(args) == 2  # results exist: must say --resume
    assert segment_main(args + ["--resume"]) == 0
    again = read_table(out, "images").to_pandas().sort_values("image_id").reset_index(drop=True)
    cells = read_table(out, "cells").to_pandas()
    assert again.image_id.tolist() == full.image_id.tolist() and again.image_id.is_unique
    assert again.drop(columns="seconds").equals(full.drop(columns="seconds"))
    assert len(cells) == len(full_cells) and not cells.duplicated(["image_id", "cell_id"]).any()


def test_resume_refuses_another_run_and_retries_storage_errors(ray_local, archive, bundle, tmp_path, capsys):
    import json
    import shutil

    src = sorted((archive / "x").iterdir())
    (tmp_path / "in" / "S01").mkdir(parents=True)
    for p in src[:2]:
        shutil.copy(p, tmp_path / "in" / "S01" / p.name)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,slide_id\n" + "".join(f"S01/{p.name},S01\n" for p in src[:2]) + "S09/late.bmp,S09\n")
    out = str(tmp_path / "out")
    args = ["--input", str(tmp_path / "in"), "--manifest", str(manifest), "--output", out, "--bundle", bundle]
    assert segment_main(args) == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["rule"] == "cascade" and len(record["bundle_sha256"]) == 64
    images = read_table(out, "images").to_pandas().set_index("image_id")
    assert images.loc["S09__late", "status"] == "error" and images.loc["S09__late", "error_kind"] == "storage"

    # another rule, or another bundle: refused, naming what differs; nothing written
    capsys.readouterr()
    assert segment_main(args + ["--resume", "--rule", "keep-all"]) == 2
    assert "rule: 'cascade' -> 'keep-all'" in capsys.readouterr().err
    assert segment_main(args + ["--resume", "--ome-zarr"]) == 2  # would mix two masks.zarr layouts
    assert "ome_zarr: False -> True" in capsys.readouterr().err
    other = tmp_path / "other-bundle"
    shutil.copytree(bundle, other)
    meta = json.loads((other / "bundle.json").read_text())
    meta["config"]["nucleus"]["threshold"] = 0.9
    (other / "bundle.json").write_text(json.dumps(meta))
    assert segment_main([a if a != bundle else str(other) for a in args] + ["--resume"]) == 2
    assert "bundle_sha256" in capsys.readouterr().err

    # the missing file arrives: a plain resume keeps its error row, --retry-errors redoes it
    (tmp_path / "in" / "S09").mkdir()
    shutil.copy(src[2], tmp_path / "in" / "S09" / "late.bmp")
    assert segment_main(args + ["--resume"]) == 0
    assert read_table(out, "images").to_pandas().set_index("image_id").loc["S09__late", "status"] == "error"
    capsys.readouterr()
    assert segment_main(args + ["--resume", "--retry-errors"]) == 0
    assert "1 storage error(s) to retry" in capsys.readouterr().out
    again = read_table(out, "images").to_pandas()
    assert again.image_id.is_unique and len(again) == 3 and (again.status == "ok").all()


def test_bad_bundle_or_input_stops_before_any_work(ray_local, s3_bucket, s3_input, bundle, tmp_path):
    in_uri, _ = s3_input
    out = str(tmp_path / "out")
    assert segment_main(["--input", in_uri, "--output", out, "--bundle", str(tmp_path / "nope")]) == 2
    assert segment_main(["--input", f"{s3_bucket}/missing-prefix", "--output", out, "--bundle", bundle]) == 2
    assert segment_main(["--input", "s3://no-such-bucket-segpc/x", "--output", out, "--bundle", bundle]) == 2
    assert not Path(out).exists()


def test_parquet_shards_as_input(ray_local, s3_bucket, archive, bundle):
    """Image bytes in Parquet shards (one per slide folder): every row once, bad rows errors."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = filesystem(s3_bucket)
    rows: dict[str, list] = {}
    for name, data in slide_layout(archive).items():
        slide, file = name.split("/")
        rows.setdefault(slide, []).append({"image_id": file.rsplit(".", 1)[0], "image": data})
    rows["S01"].append({"image_id": "broken", "image": b"not an image"})
    for slide, items in rows.items():
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(items), buf, row_group_size=2)
        fs.pipe_file(f"{s3_bucket.removeprefix('s3://')}/shards/{slide}/part-0.parquet", buf.getvalue())
    out = f"{s3_bucket}/out"
    assert segment_main(["--input", f"{s3_bucket}/shards", "--output", out, "--bundle", bundle]) == 0
    images = read_table(out, "images").to_pandas()
    expected = {r["image_id"] for items in rows.values() for r in items}
    assert sorted(images.image_id) == sorted(expected)
    assert images.set_index("image_id").loc["broken", "status"] == "error"
    assert set(images[images.image_id != "broken"].status) == {"ok"}
    assert dict(zip(images.image_id, images.slide_id))["S02-0002"] == "S02"
    assert images.source_uri.str.startswith(f"{s3_bucket}/shards/").all()
