"""Reliability of the batch job, against a real SeaweedFS and a real local Ray.

Actors killed mid-run (the test-only hook of ray_jobs/faults.py), the driver SIGKILLed and
resumed, the S3 server stopped and restarted during a run (ridden out, or outlasting the
retry budget and resumed), hostile file names. Each run must end with every image exactly
once and the same rows and masks as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import bomb_bytes, slide_layout, synthetic_slides, upload

from ray_jobs.local_s3 import LocalS3
from ray_jobs.segment import main as segment_main
from segpc.io.inputs import MAX_ID_LENGTH
from segpc.io.outputs import done_image_ids, read_label_masks, read_table, zarr_store
from segpc.io.storage import filesystem

pytestmark = [pytest.mark.ray, pytest.mark.s3]
REPO = Path(__file__).resolve().parents[1]
PREFIX = "s3://segpc-tests/reliability"


@pytest.fixture(scope="module")
def archive24(tmp_path_factory):
    """24 small images in 3 slides: enough batches to interrupt a run half-way."""
    return synthetic_slides(tmp_path_factory, 24, seed=5)


@pytest.fixture(scope="module")
def shared_input(s3_server, archive24):
    fs, _ = filesystem(PREFIX)
    if not fs.exists("segpc-tests"):
        fs.mkdir("segpc-tests")
    upload(fs, f"{PREFIX.removeprefix('s3://')}/in", slide_layout(archive24))
    return f"{PREFIX}/in"


def _args(in_uri: str, out: str, bundle: str, *extra: str) -> list[str]:
    return ["--input", in_uri, "--output", out, "--bundle", bundle, "--batch-size", "1",
            "--progress-every", "100", *extra]


@pytest.fixture(scope="module")
def reference(ray_local, shared_input, bundle):
    """An uninterrupted run: what every interrupted one must end up equal to."""
    out = f"{PREFIX}/reference"
    assert segment_main(_args(shared_input, out, bundle)) == 0
    return outputs(out)


def outputs(out: str) -> dict:
    """images/ and cells/ rows (sorted, without timings and source paths) and the label masks."""
    images = read_table(out, "images").to_pandas()
    cells = read_table(out, "cells").to_pandas()
    assert images.image_id.is_unique, "an image has two rows in images/"
    assert not cells.duplicated(["image_id", "cell_id"]).any(), "a cell has two rows in cells/"
    # one array per image with results, nothing else (no group per image)
    root = zarr.open_group(store=zarr_store(out), mode="r")
    assert set(root.array_keys()) == set(images[images.status == "ok"].image_id)
    assert not list(root.group_keys())
    masks = {k: read_label_masks(out, k) for k in root.array_keys()}
    images = images.drop(columns=["seconds", "source_uri"]).sort_values("image_id").reset_index(drop=True)
    cells = cells.sort_values(["image_id", "cell_id"]).reset_index(drop=True)
    return {"images": images, "cells": cells, "masks": masks}


def assert_same(got: dict, want: dict) -> None:
    assert got["images"].equals(want["images"])
    assert got["cells"].equals(want["cells"])
    assert got["masks"].keys() == want["masks"].keys()
    for k, (nuclei, cells) in want["masks"].items():
        assert np.array_equal(got["masks"][k][0], nuclei) and np.array_equal(got["masks"][k][1], cells), k


def _wait_for_first_part(out: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done_image_ids(out):
        assert time.monotonic() < deadline, "the job wrote nothing"
        time.sleep(0.05)


def test_killed_actors_are_restarted_and_nothing_is_lost(reference, shared_input, bundle, s3_bucket,
                                                         tmp_path, monkeypatch):
    # one death each: a nucleus actor, a cytoplasm actor, and the writer right after it wrote
    monkeypatch.setenv("SEGPC_FAULT", "nucleus@3,cytoplasm@3,write@2")
    monkeypatch.setenv("SEGPC_FAULT_DIR", str(tmp_path))
    out = f"{s3_bucket}/out"
    assert segment_main(_args(shared_input, out, bundle)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cytoplasm.fired", "nucleus.fired", "write.fired"]
    assert_same(outputs(out), reference)


def test_killed_driver_then_resume_equals_an_uninterrupted_run(reference, ray_local, shared_input, bundle,
                                                               s3_bucket, tmp_path):
    out = f"{s3_bucket}/out"
    # the driver joins the test session's Ray, so killing it leaves no Ray processes behind
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.segment", *_args(shared_input, out, bundle)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_first_part(out)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    done = done_image_ids(out)
    assert 0 < len(done) < len(reference["images"]), f"not killed mid-run: {len(done)} done"
    assert segment_main(_args(shared_input, out, bundle)) == 2  # refuses to mix runs without --resume
    assert segment_main(_args(shared_input, out, bundle, "--resume")) == 0
    assert_same(outputs(out), reference)


@pytest.fixture
def outage_s3(archive24, monkeypatch):
    """A SeaweedFS of this test's own (it will be stopped), holding the same inputs."""
    server = LocalS3().start()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    fs, _ = filesystem("s3://outage")
    fs.mkdir("outage")
    upload(fs, "outage/in", slide_layout(archive24))
    yield server
    server.stop()


def _outage_after_first_part(server: LocalS3, out: str, down_s: float, restart: bool,
                             facts: dict) -> threading.Thread:
    def outage() -> None:
        _wait_for_first_part(out)
        facts["done_before"] = len(done_image_ids(out))
        server.halt()
        time.sleep(down_s)
        if restart:
            server.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    return thread


def test_storage_outage_is_ridden_out(reference, ray_local, outage_s3, bundle):
    out, facts = "s3://outage/out", {}
    outage = _outage_after_first_part(outage_s3, out, down_s=3, restart=True, facts=facts)
    assert segment_main(_args("s3://outage/in", out, bundle, "--io-retry-s", "180")) == 0
    outage.join()
    assert 0 < facts["done_before"] < len(reference["images"]), "the outage missed the run"
    assert_same(outputs(out), reference)


def test_storage_outage_beyond_the_budget_stops_then_resume_completes(reference, ray_local, outage_s3, bundle,
                                                                      capsys):
    out = "s3://outage/out"
    outage = _outage_after_first_part(outage_s3, out, down_s=0, restart=False, facts={})
    assert segment_main(_args("s3://outage/in", out, bundle, "--io-retry-s", "2")) == 1
    outage.join()
    err = capsys.readouterr().err
    assert "object storage unreachable for 2s" in err and "--resume" in err
    outage_s3.start()
    assert 0 < len(done_image_ids(out)) < len(reference["images"])
    assert segment_main(_args("s3://outage/in", out, bundle, "--resume")) == 0
    assert_same(outputs(out), reference)


def test_hostile_names_stay_under_output_with_unique_ids(ray_local, s3_bucket, archive24, bundle):
    images = list(slide_layout(archive24).values())
    names = ["S01/with space.bmp", "S01/ünïcødé-細胞.bmp", "S01/..dots.bmp", "S01/a..b.bmp",
             "S02/percent%20and?query#frag.bmp", "S02/" + "long" * 50 + ".bmp",
             "S01/dup.bmp", "S02/dup.bmp", "S03/dup.bmp"]
    files = {name: images[n] for n, name in enumerate(names)}
    files["S03/bomb.png"] = bomb_bytes(".png", 60000, 60000)  # 3.6 G pixels claimed, 100 bytes stored
    fs, _ = filesystem(s3_bucket)
    bucket_key = s3_bucket.removeprefix("s3://")
    upload(fs, f"{bucket_key}/in", files)
    before = set(fs.find("segpc-tests"))
    out = f"{s3_bucket}/out"
    assert segment_main(["--input", f"{s3_bucket}/in", "--output", out, "--bundle", bundle, "--segpc-masks",
                         "--overlays"]) == 0

    table = read_table(out, "images").to_pandas()
    assert sorted(table.source_uri) == sorted(f"{s3_bucket}/in/{name}" for name in files)
    assert table.image_id.is_unique
    assert all(len(i) <= MAX_ID_LENGTH and "/" not in i and not i.startswith(".") for i in table.image_id)
    bomb = table[table.source_uri.str.endswith("bomb.png")].iloc[0]
    assert bomb.status == "error" and "exceeds the limit" in bomb.error
    assert (table[~table.source_uri.str.endswith("bomb.png")].status == "ok").all()
    # every new object lies under --output; nothing outside it changed
    new = set(fs.find("segpc-tests")) - before
    assert new and all(k.startswith(f"{bucket_key}/out/") for k in new)
    # nothing overwritten: one Zarr group, one overlay per image; the three dup.bmp differ
    got = outputs(out)
    assert len(got["masks"]) == len(names)
    overlays = [k for k in new if "/overlays/" in k]
    assert len(overlays) == len(names)
    dups = table[table.source_uri.str.endswith("/dup.bmp")].image_id
    assert len({got["masks"][i][1].tobytes() for i in dups}) == 3
