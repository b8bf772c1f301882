"""Storage retries: S3's 503 SlowDown and other throttling are transient, as s3fs raises them.

The exceptions are made the way s3fs makes them (``s3fs.errors.translate_boto_error`` of the
botocore ``ClientError`` an S3 answer becomes), and the zarr read path goes through a real
``FsspecStore`` over an fsspec filesystem that answers SlowDown a few times first.
"""

from __future__ import annotations

import numpy as np
import pytest
from botocore.exceptions import ClientError
from fsspec.implementations.memory import MemoryFileSystem
from s3fs.errors import translate_boto_error

from segpc.io import storage
from segpc.io.outputs import read_label_masks, write_label_masks
from segpc.io.storage import PERMANENT, StorageUnavailable, is_throttling, with_retries


def s3_error(code: str, status: int, message: str = "", operation: str = "PutObject") -> Exception:
    """What s3fs raises for an S3 error answer (after its own and botocore's retries)."""
    error = {"Code": code}
    if message:
        error["Message"] = message
    boto = ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
    return translate_boto_error(boto)


def slowdown() -> Exception:
    return s3_error("SlowDown", 503, "Please reduce your request rate.")


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", waits.append)
    return waits


def flaky(exc_factory, failures: int):
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise exc_factory()
        return "done"

    return call, calls


def test_s3fs_raises_slowdown_as_a_retryable_oserror():
    exc = slowdown()
    assert type(exc) is OSError and exc.errno == 16  # EBUSY: neither permanent nor a subclass
    assert not isinstance(exc, PERMANENT) and is_throttling(exc)


def test_slowdown_is_retried_with_backoff_then_succeeds(sleeps):
    call, calls = flaky(slowdown, 4)
    assert with_retries("writing x", call, budget_s=60) == "done"
    assert calls["n"] == 5 and len(sleeps) == 4
    # exponential (0.25 s doubling), each wait jittered down by at most half
    for k, wait in enumerate(sleeps):
        assert 0.25 * 2**k * 0.5 <= wait <= 0.25 * 2**k


@pytest.mark.parametrize("code,status", [
    ("503", 503),  # a HEAD has no body: the status is the code
    ("ServiceUnavailable", 503), ("RequestLimitExceeded", 503), ("Throttling", 400),
    ("ThrottlingException", 400), ("TooManyRequests", 429), ("InternalError", 500)])
def test_other_throttling_and_server_errors_are_retried(sleeps, code, status):
    call, calls = flaky(lambda: s3_error(code, status, operation="HeadObject"), 2)
    assert with_retries("reading x", call, budget_s=60) == "done" and calls["n"] == 3


def test_throttling_mapped_to_a_permanent_type_is_still_retried(sleeps):
    def throttled_permission_error() -> Exception:  # a client that maps it oddly
        exc = PermissionError("denied?")
        exc.__cause__ = ClientError({"Error": {"Code": "SlowDown"},
                                     "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
        return exc

    call, calls = flaky(throttled_permission_error, 2)
    assert with_retries("writing x", call, budget_s=60) == "done" and calls["n"] == 3


@pytest.mark.parametrize("code,status,kind", [("AccessDenied", 403, PermissionError),
                                              ("NoSuchKey", 404, FileNotFoundError)])
def test_permanent_errors_are_raised_at_once(sleeps, code, status, kind):
    call, calls = flaky(lambda: s3_error(code, status), 5)
    with pytest.raises(kind):
        with_retries("reading x", call, budget_s=60)
    assert calls["n"] == 1 and not sleeps


def test_slowdown_beyond_the_budget_stops_the_job(sleeps):
    call, _ = flaky(slowdown, 10**6)
    with pytest.raises(StorageUnavailable, match="SlowDown|reduce your request rate") as info:
        with_retries("writing masks.zarr/a", call, budget_s=0.1)
    assert "writing masks.zarr/a" in str(info.value)


class SlowMemFS(MemoryFileSystem):
    """An in-memory filesystem of its own that answers the next ``failures`` reads and writes
    with s3fs's SlowDown exception."""

    protocol = "slowmem"
    store: dict = {}
    pseudo_dirs = [""]
    failures = 0
    refused = 0

    @classmethod
    def _throttle(cls) -> None:
        if cls.failures > 0:
            cls.failures -= 1
            cls.refused += 1
            raise slowdown()

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._throttle()
        return super().cat_file(path, start, end, **kwargs)

    def pipe_file(self, path, value, **kwargs):
        self._throttle()
        return super().pipe_file(path, value, **kwargs)


@pytest.fixture
def slowmem():
    import fsspec

    fsspec.register_implementation("slowmem", SlowMemFS, clobber=True)
    SlowMemFS.store.clear()
    SlowMemFS.failures = SlowMemFS.refused = 0
    yield SlowMemFS
    SlowMemFS.store.clear()


def test_zarr_fsspec_store_reads_ride_out_slowdown(slowmem, sleeps):
    nuclei = np.zeros((300, 400), np.uint16)
    nuclei[10:40, 20:60] = 1
    cells = nuclei.copy()
    cells[5:50, 10:80] = 1
    slowmem.failures = 2  # the two PUTs are retried too
    write_label_masks("slowmem://out", "img", nuclei, cells)
    assert slowmem.refused == 2
    slowmem.failures = 3  # zarr's reads through FsspecStore raise the same, and are retried
    got_nuclei, got_cells = read_label_masks("slowmem://out", "img")
    assert slowmem.refused == 5 and slowmem.failures == 0
    assert np.array_equal(got_nuclei, nuclei) and np.array_equal(got_cells, cells)
