"""Local paths and object-storage URIs through one fsspec entry point.

S3-compatible endpoints (SeaweedFS, MinIO, Ceph) come from ``AWS_ENDPOINT_URL``, the
variable boto3 and the AWS CLI honour; passing it explicitly keeps older botocore working.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec
from fsspec import AbstractFileSystem

T = TypeVar("T")


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint the environment names, as boto3 reads it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def storage_options(uri: str) -> dict:
    """fsspec options for ``uri``: the S3 endpoint from the environment, if any."""
    if uri.startswith(("s3://", "s3a://")):
        # Other processes (Ray workers) write under the same prefixes: never trust a
        # cached listing.
        opts: dict = {"use_listings_cache": False}
        endpoint = s3_endpoint()
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path.rstrip("/") or path


def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path inside it): for pyarrow's own readers, which fetch many
    Parquet parts concurrently in C++ threads (three times faster than fsspec here).

    pyarrow's S3 client ignores ``AWS_ENDPOINT_URL``, so an S3-compatible endpoint is passed
    on explicitly; credentials it finds itself, as any AWS SDK does (environment, credential
    files, instance or pod role), so none travel with the filesystem object.
    """
    import pyarrow.fs as pafs

    if not uri.startswith(("s3://", "s3a://")):
        return pafs.LocalFileSystem(), uri.removeprefix("file://")
    kwargs: dict = {}
    endpoint = s3_endpoint()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), uri.split("://", 1)[1]


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


class StorageUnavailable(RuntimeError):
    """Object storage did not answer within the retry budget. Not a property of any one
    image: the job stops (outputs so far are kept) and ``--resume`` completes it later."""


# Errors that retrying cannot fix: the object is not there, or we may not touch it.
PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError,
             TypeError)

# "Slow down" answers: S3's 503 SlowDown (s3fs raises OSError(EBUSY) for it), a 503 without a
# body (HEAD), other stores' and AWS APIs' throttling. Always transient, whatever type a client
# maps them to.
THROTTLING_CODES = frozenset({"SlowDown", "ServiceUnavailable", "503", "429", "RequestLimitExceeded",
                              "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
                              "TooManyRequests", "TooManyRequestsException", "RequestThrottledException"})
_THROTTLING_TEXT = re.compile(r"SlowDown|Slow Down|reduce your request rate|ServiceUnavailable|Service Unavailable"
                              r"|RequestLimitExceeded|Throttl|TooManyRequests|Too Many Requests|\((?:503|429)\)")


def is_throttling(exc: BaseException) -> bool:
    """Whether ``exc`` (or the exception it was raised from, as s3fs raises its own from
    botocore's) is a storage server asking the client to slow down: an error code or HTTP
    status of botocore's ``response``, or the server's words in the message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in THROTTLING_CODES or status in (429, 503):
                return True
        if _THROTTLING_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__
    return False


def retry_budget_s() -> float:
    """Seconds a storage call keeps retrying (``SEGPC_IO_RETRY_S``, default 300): long enough
    to ride out a storage server restart, short enough to notice a real outage."""
    return float(os.environ.get("SEGPC_IO_RETRY_S", "300"))


def with_retries(what: str, call: Callable[..., T], *args, budget_s: float | None = None) -> T:
    """``call(*args)``, retrying transient failures (connection refused or reset, throttling
    such as S3's 503 SlowDown, a server restarting) with exponential backoff (0.25 s doubling
    to 8 s, each wait jittered down by up to half so that many workers do not come back at
    once) for ``budget_s`` seconds; then :class:`StorageUnavailable` naming ``what``.
    Permanent errors (a missing object, access denied) are raised at once, unless the server
    said they were throttling."""
    budget = retry_budget_s() if budget_s is None else budget_s
    deadline, delay = time.monotonic() + budget, 0.25
    while True:
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 - clients raise many types for one outage
            if isinstance(exc, PERMANENT) and not is_throttling(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(
                    f"object storage unreachable for {budget:g}s while {what}: "
                    f"{type(exc).__name__}: {exc}") from exc
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 8.0)


def read_bytes(uri: str) -> bytes:
    """Whole object, retrying transient failures (see :func:`with_retries`)."""
    fs, path = filesystem(uri)
    return with_retries(f"reading {uri}", fs.cat_file, path)
