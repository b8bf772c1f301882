"""What the jobs pass to Ray, and what they leave in the environment (no Ray, no server)."""

import os
import pickle

import pytest

from ray_jobs import segment, train
from ray_jobs.common import (SECRET_VARS, WORKER_VARS, job_environment, pyarrow_filesystem,
                             worker_runtime_env)
from segpc.io.storage import retry_budget_s, s3_endpoint

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIDSEGPCTEST", "AWS_SECRET_ACCESS_KEY": "segpc-test-secret-value",
           "AWS_SESSION_TOKEN": "segpc-test-session-token"}


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in {**SECRETS, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1",
                 "AWS_PROFILE": "only-on-the-driver", "SEGPC_IO_RETRY_S": "7"}.items():
        monkeypatch.setenv(k, v)


def test_parse_args_leaves_the_environment_unchanged():
    before = dict(os.environ)
    args = segment.parse_args(["--input", "in", "--output", "out", "--bundle", "b",
                               "--io-retry-s", "2", "--s3-endpoint", "http://x"])
    assert args.io_retry_s == 2 and args.s3_endpoint == "http://x"
    train.parse_args(["--data", "d", "--out", "o", "--s3-endpoint", "http://x"])
    assert dict(os.environ) == before


def test_the_job_settings_apply_while_the_job_runs_only(monkeypatch):
    monkeypatch.delenv("SEGPC_IO_RETRY_S", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://from-the-shell")
    before = dict(os.environ)
    args = segment.parse_args(["--input", "in", "--output", "out", "--bundle", "b",
                               "--io-retry-s", "2", "--s3-endpoint", "http://x"])
    with job_environment(args):
        # the driver's own storage calls, and the workers (through their runtime_env)
        assert retry_budget_s() == 2 and s3_endpoint() == "http://x"
        env = worker_runtime_env()["env_vars"]
        assert env["SEGPC_IO_RETRY_S"] == "2.0" and env["AWS_ENDPOINT_URL"] == "http://x"
    assert dict(os.environ) == before


def test_the_job_settings_are_restored_when_the_job_fails():
    before = dict(os.environ)
    args = train.parse_args(["--data", "d", "--out", "o", "--s3-endpoint", "http://x"])
    with pytest.raises(RuntimeError), job_environment(args):
        raise RuntimeError("the job failed")
    assert dict(os.environ) == before


def test_workers_get_no_credentials_and_no_profile(aws_env):
    env = worker_runtime_env()["env_vars"]
    assert env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1", "SEGPC_IO_RETRY_S": "7"}
    assert not set(WORKER_VARS) & {*SECRET_VARS, "AWS_PROFILE"}
    assert not any(v in repr(worker_runtime_env()) for v in SECRETS.values())


def test_pyarrow_filesystem_carries_no_keys(aws_env):
    fs, path = pyarrow_filesystem("s3://bucket/checkpoints")
    assert path == "bucket/checkpoints"
    # it travels pickled to Ray Train's controller and workers, which resolve their own
    data = pickle.dumps(fs)
    assert not any(v.encode() in data for v in SECRETS.values())
    options = fs.__reduce__()[1][0]
    assert options["access_key"] is None and options["secret_key"] is None and options["session_token"] is None
    # what pyarrow does not read from the environment is still passed on
    assert options["endpoint_override"] == "127.0.0.1:9" and options["scheme"] == "http"
    assert options["region"] == "eu-west-1"
    assert pyarrow_filesystem("/local/path") == (None, "/local/path")
