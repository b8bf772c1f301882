"""Local paths and object-storage URIs through one fsspec entry point.

S3-compatible endpoints (SeaweedFS, MinIO, Ceph) come from ``AWS_ENDPOINT_URL``, the
variable boto3 and the AWS CLI honour; passing it explicitly keeps older botocore working.
"""

from __future__ import annotations

import os

import fsspec
from fsspec import AbstractFileSystem


def storage_options(uri: str) -> dict:
    """fsspec options for ``uri``: the S3 endpoint from the environment, if any."""
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path.rstrip("/") or path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
