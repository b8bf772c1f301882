"""What every Ray program here needs: connecting to Ray and Ray-side filesystems."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

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
    """The jobs print their own progress; Ray Data's progress bars, plans, INFO lines and
    warnings go to its log file only (``logs/ray-data.log`` of the Ray session: /tmp/ray/session_latest
    on the head node). Set in the driver, it reaches the datasets' coordinators too."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # The rows' ``work`` column holds Python objects by design; said explicitly, Ray stops
    # printing "Failed to convert column 'work' ... falling back" from every actor.
    ctx.enable_fallback_to_arrow_object_ext_type = True
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console, not the session file
            handler.setLevel(logging.ERROR)
    # Ray Data's advice on pools wider than a small input ("... only received 1 input(s)").
    warnings.filterwarnings("ignore", message=r"The (maximum|minimum) number of concurrent", category=UserWarning)


def pyarrow_filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for Ray APIs that take pyarrow filesystems: None for local paths,
    else :func:`segpc.io.storage.arrow_filesystem` (the endpoint and region passed on, never
    keys: the filesystem travels pickled to Ray Train's controller and workers, and with no
    ``access_key`` pyarrow resolves credentials where it is used, through the AWS SDK's
    default chain, refreshing expiring ones itself)."""
    if not uri.startswith(("s3://", "s3a://")):
        return None, uri
    from segpc.io.storage import arrow_filesystem

    return arrow_filesystem(uri)


# What the job passes on to its tasks and actors: non-secret settings only. Ray shows a
# runtime_env to anyone who can reach its dashboard, job or state APIs, so credentials
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) never go in it: every
# process finds its own through the AWS default chain on its node (instance profile, IRSA,
# the environment Ray was started with, credential files), which also renews expiring
# session tokens, where a copy taken at the job's start would expire during a long job.
# AWS_PROFILE is not passed either: it names a section of the driver machine's ~/.aws files,
# and a worker on a node without that profile would fail every storage call
# (ProfileNotFound) instead of using its node's own credentials.
WORKER_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
               # the job's storage retry budget, the size limit of slides copied for OpenSlide
               # (segpc/wsi/local_copy.py; its cache folder is each node's own setting), and
               # the tests' fault hook (ray_jobs/faults.py)
               "SEGPC_IO_RETRY_S", "SEGPC_SLIDE_DOWNLOAD_GB", "SEGPC_FAULT", "SEGPC_FAULT_DIR")
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def worker_runtime_env() -> dict:
    """The driver's non-secret object-storage settings (endpoint, region) and ``SEGPC_*`` job
    settings, for every task and actor it starts (see WORKER_VARS: never credentials).

    Workers of a long-running cluster do not see the variables of the shell that started
    the driver; without this, reads from an S3-compatible endpoint would go to AWS.
    """
    env = {k: os.environ[k] for k in WORKER_VARS if os.environ.get(k)}
    return {"env_vars": env} if env else {}


def job_settings(args) -> dict[str, str]:
    """The job's command-line storage settings as the variables segpc.io.storage reads:
    ``--s3-endpoint`` and ``--io-retry-s`` (both non-secret)."""
    env = {}
    if getattr(args, "s3_endpoint", None):
        # named for S3 too, so that an AWS_ENDPOINT_URL_S3 of the shell cannot override it
        env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = args.s3_endpoint
    if getattr(args, "io_retry_s", None) is not None:
        env["SEGPC_IO_RETRY_S"] = str(args.io_retry_s)
    return env


def job_environment(args):
    """While the job runs, its :func:`job_settings` in this process's environment (where the
    driver's own storage calls and :func:`worker_runtime_env`, hence the workers, read
    them); the environment as it was afterwards, so that a job run in-process (tests, the
    demo) leaves nothing behind for the next one."""
    return scoped_environ(job_settings(args))


@contextmanager
def scoped_environ(env: dict[str, str]):
    """``env`` in ``os.environ`` inside the ``with`` block, the variables as they were after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
