"""Shared fixtures: a real SeaweedFS S3 server on 127.0.0.1, started once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Ray Train's controller polls its workers every 2 s and starts a preemption-watcher actor
# for every run; the suite's runs train for about a second each, so they waited on those.
# Polling every 0.25 s, without the watcher (no test drains a node), takes about 6 s off
# each TorchTrainer run (27 -> 21 s for a one-epoch run on 2 cores) and changes nothing a
# run does. Set before the session's Ray starts: its raylet and workers inherit them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


_WATCHED = ("SEGPC_", "AWS_")


def _watched_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_WATCHED)}


@pytest.fixture(autouse=True)
def no_leaked_env():
    """A test that leaves ``SEGPC_*``/``AWS_*`` variables changed fails, and they are put
    back: a job run in-process must not change the next test's settings (a 2-second retry
    budget, another endpoint). Session- and module-scoped fixtures (``s3_server``) are set
    up before this snapshot; function-scoped ones (monkeypatch) are undone before the check."""
    before = _watched_env()
    yield
    after = _watched_env()
    if after == before:
        return
    for k in set(after) - set(before):
        del os.environ[k]
    os.environ.update(before)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    pytest.fail(f"the test left environment variables changed: {changed} (restored)", pytrace=False)


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
def ray_local(s3_server):
    """One in-process Ray instance for the whole session (never `ray stop`).

    Started after ``s3_server`` has put the server's credentials in ``os.environ``: the
    local raylet and its workers inherit the driver's environment at ``ray.init``, as a
    cluster's nodes have their own credentials; the jobs pass their workers no keys."""
    import ray

    from ray_jobs.common import init_ray

    init_ray(num_cpus=4)
    # a stuck pipeline fails the test instead of hanging CI
    ray.data.DataContext.get_current().execution_no_progress_timeout_s = 180
    yield ray
    ray.shutdown()
