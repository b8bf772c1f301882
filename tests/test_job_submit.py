"""`ray job submit` against a real head started with `ray start --head` (token auth on)."""

import sys
from pathlib import Path

import pytest
from helpers import job_id, quick_bundle, slide_layout, upload
from raycluster import HeadNode

from ray_jobs.common import WORKER_VARS
from segpc.models.bundle import load_bundle, save_bundle
from segpc.io.outputs import read_table
from segpc.io.storage import filesystem
from segpc.io.synthetic import write_archive

pytestmark = [pytest.mark.ray, pytest.mark.s3]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head():
    node = HeadNode(num_cpus=2).start()
    yield node
    node.stop()


def test_segment_job_runs_under_ray_job_submit(head, s3_bucket, tmp_path):
    import os

    archive = tmp_path / "archive"
    write_archive(archive, n_images=4, n_slides=2, seed=3, size="320x240")
    fs, _ = filesystem(s3_bucket)
    prefix = s3_bucket.removeprefix("s3://")
    upload(fs, f"{prefix}/in", slide_layout(archive))
    save_bundle(load_bundle(quick_bundle(archive, str(tmp_path / "bundle"), epochs=2)), f"{s3_bucket}/bundle")
    env = {k: os.environ[k] for k in WORKER_VARS if os.environ.get(k)}
    proc = head.submit([sys.executable, "-m", "ray_jobs.segment", "--input", f"{s3_bucket}/in",
                        "--output", f"{s3_bucket}/out", "--bundle", f"{s3_bucket}/bundle",
                        "--progress-every", "2"], working_dir=str(ROOT), env_vars=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and "[segment] done" in proc.stdout
    images = read_table(f"{s3_bucket}/out", "images").to_pandas()
    assert sorted(images.image_id) == sorted(job_id(p.stem) for p in (archive / "x").iterdir())
    assert (images.status == "ok").all()


def test_submission_without_the_token_is_refused(head):
    import subprocess

    env = head.env()
    env["RAY_AUTH_TOKEN"] = "wrong-token"
    proc = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "list",
                           f"--address={head.address}"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
