"""Local paths and object-storage URIs through one fsspec entry point.

S3-compatible endpoints (SeaweedFS, MinIO, Ceph) come from ``AWS_ENDPOINT_URL``, the
variable boto3 and the AWS CLI honour; passing it explicitly keeps older botocore working.
"""

from __future__ import annotations

import os

import fsspec
from fsspec import AbstractFileSystem


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


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(uri: str, attempts: int = 5, backoff_s: float = 0.5) -> bytes:
    """Whole object, retrying transient failures with exponential backoff.

    A missing object is not transient and fails at once; anything else (connection reset,
    throttling, a storage server restarting) is retried ``attempts`` times.
    """
    import time

    fs, path = filesystem(uri)
    for attempt in range(attempts):
        try:
            return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")
