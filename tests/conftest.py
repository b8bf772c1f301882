"""Shared fixtures: a real SeaweedFS S3 server on 127.0.0.1, started once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def s3_server():
    from ray_jobs.local_s3 import LocalS3

    server = LocalS3().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh ``s3://`` prefix per test, in one shared bucket (SeaweedFS gives every bucket
    volumes of its own; one bucket keeps the server small)."""
    from segpc.io.storage import filesystem

    fs, _ = filesystem("s3://segpc-tests")
    if not fs.exists("segpc-tests"):
        fs.mkdir("segpc-tests")
    name = "".join(ch for ch in request.node.name.lower() if ch.isalnum())[:60]
    return f"s3://segpc-tests/{name}"


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    """9 synthetic 320x240 images in 3 slides (SegPC layout), for the batch-job tests."""
    from helpers import synthetic_slides

    return synthetic_slides(tmp_path_factory, 9, seed=7)


@pytest.fixture(scope="session")
def bundle(archive, tmp_path_factory):
    """A tiny bundle whose U-Net finds the archive's nuclei (see helpers.quick_bundle)."""
    from helpers import quick_bundle

    return quick_bundle(archive, str(tmp_path_factory.mktemp("bundle") / "tiny"))


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray instance for the whole session (never `ray stop`)."""
    import ray

    from ray_jobs.common import init_ray

    init_ray(num_cpus=4)
    # a stuck pipeline fails the test instead of hanging CI
    ray.data.DataContext.get_current().execution_no_progress_timeout_s = 180
    yield ray
    ray.shutdown()
