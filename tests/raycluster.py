"""A real local Ray cluster started with ``ray start --head`` for job-submission tests.

Own temp dir, free ports, token authentication with a token of its own; stopped through
the processes it started (never ``ray stop``, which would kill every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ray_jobs.local_s3 import kill_mentioning, stop_group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeadNode:
    def __init__(self, num_cpus: int = 2):
        # a short path: Ray's unix sockets live under it and have a length limit
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
        self.token = secrets.token_hex(16)
        self.dashboard_port = _free_port()
        self.num_cpus = num_cpus
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The environment of ``ray start`` and of the ``ray`` CLI calls: this process's (with
        the test S3 server's credentials when started after ``s3_server``, as a real node has
        its own), and this cluster's token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 120) -> "HeadNode":
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [ray, "start", "--head", "--block", f"--temp-dir={self.temp_dir}",
               f"--num-cpus={self.num_cpus}", "--node-ip-address=127.0.0.1",
               f"--port={_free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}",
               f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
               f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", "--disable-usage-stats"]
        self.log = open(Path(self.temp_dir) / "head.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited; see {self.temp_dir}/head.log")
            try:
                req = urllib.request.Request(f"{self.address}/api/version",
                                             headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(req, timeout=2):
                    return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError("the Ray head did not come up in time")

    def submit(self, entrypoint: list[str], working_dir: str, env_vars: dict[str, str] | None = None,
               submission_id: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job submit``. The job gets no credentials this way: its driver and workers
        have the head's environment, as nodes of a real cluster have their own."""
        import json

        ray = str(Path(sys.executable).with_name("ray"))
        runtime_env = {"env_vars": env_vars or {}, "excludes": [".venv", ".git", "**/__pycache__"]}
        cmd = [ray, "job", "submit", f"--address={self.address}", f"--working-dir={working_dir}",
               f"--runtime-env-json={json.dumps(runtime_env)}",
               *([f"--submission-id={submission_id}"] if submission_id else []), "--", *entrypoint]
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM the blocking `ray start` (it stops its children), then reap stragglers
        that carry this cluster's temp dir on their command line."""
        if self.proc:
            stop_group(self.proc, grace_s=10)
        kill_mentioning(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
