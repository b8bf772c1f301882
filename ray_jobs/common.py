"""What every Ray program here needs: connecting to Ray and Ray-side filesystems."""

from __future__ import annotations

import logging
import os

import pyarrow.fs as pafs


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster when there is one (``ray job submit``, RAY_ADDRESS), else start locally."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    # One copy of each worker print (Ray Train would otherwise also re-log it).
    env = {"runtime_env": {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**env)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **env)


def quiet_ray_data() -> None:
    """The jobs print their own progress; Ray Data's progress bars, plans and INFO lines go
    to its log file only (``logs/ray-data.log`` of the Ray session: /tmp/ray/session_latest
    on the head node). Set in the driver, it reaches the datasets' coordinators too."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console, not the session file
            handler.setLevel(logging.WARNING)


def pyarrow_filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for Ray APIs that take pyarrow filesystems.

    pyarrow's S3 client ignores ``AWS_ENDPOINT_URL``, so an S3-compatible endpoint is
    passed on explicitly (``endpoint_override`` and the URL's scheme).
    """
    if not uri.startswith(("s3://", "s3a://")):
        return None, uri
    from segpc.io.storage import s3_endpoint

    endpoint = s3_endpoint()
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # The filesystem travels pickled to Ray Train's controller and workers, which may not
    # see the driver's environment: carry explicit keys when the driver has them.
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs), uri.split("://", 1)[1]


WORKER_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                # the job's storage retry budget, and the tests' fault hook (ray_jobs/faults.py)
                "SEGPC_IO_RETRY_S", "SEGPC_FAULT", "SEGPC_FAULT_DIR")


def worker_runtime_env() -> dict:
    """The driver's object-storage settings (and ``SEGPC_*`` job settings), for every task
    and actor it starts.

    Workers of a long-running cluster do not see the variables of the shell that started
    the driver; without this, reads from an S3-compatible endpoint would go to AWS.
    """
    import os

    env = {k: os.environ[k] for k in WORKER_VARS if os.environ.get(k)}
    return {"env_vars": env} if env else {}
