"""`ray job submit` against a real head started with `ray start --head` (token auth on)."""

import json
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import job_id, quick_bundle, slide_layout, upload
from raycluster import HeadNode

from segpc.models.bundle import load_bundle, save_bundle
from segpc.io.outputs import read_table
from segpc.io.storage import filesystem
from segpc.io.synthetic import write_archive

pytestmark = [pytest.mark.ray, pytest.mark.s3]
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head(s3_server):
    """Started after ``s3_server``: ``ray start`` gets the server's credentials from the
    environment it is started with (HeadNode.env), as a real node has its own."""
    node = HeadNode(num_cpus=2).start()
    yield node
    node.stop()


def _get(head: HeadNode, path: str) -> str:
    req = urllib.request.Request(f"{head.address}{path}", headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read().decode()


def test_segment_job_runs_under_ray_job_submit(head, s3_server, s3_bucket, tmp_path):
    from ray.job_submission import JobSubmissionClient

    archive = tmp_path / "archive"
    write_archive(archive, n_images=4, n_slides=2, seed=3, size="320x240")
    fs, _ = filesystem(s3_bucket)
    prefix = s3_bucket.removeprefix("s3://")
    upload(fs, f"{prefix}/in", slide_layout(archive))
    save_bundle(load_bundle(quick_bundle(archive, str(tmp_path / "bundle"), epochs=2)), f"{s3_bucket}/bundle")
    # no credentials passed: the head (driver and workers) has them from its environment; a
    # marker in the submitted runtime_env shows the queries below really return it
    marker = f"marker-{secrets.token_hex(8)}"
    submission = f"segpc-{secrets.token_hex(6)}"
    proc = head.submit([sys.executable, "-m", "ray_jobs.segment", "--input", f"{s3_bucket}/in",
                        "--output", f"{s3_bucket}/out", "--bundle", f"{s3_bucket}/bundle",
                        "--progress-every", "2", "--io-retry-s", "123", "--s3-endpoint", s3_server.endpoint],
                       working_dir=str(ROOT), env_vars={"SEGPC_TEST_MARKER": marker}, submission_id=submission)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and "[segment] done" in proc.stdout
    images = read_table(f"{s3_bucket}/out", "images").to_pandas()
    assert sorted(images.image_id) == sorted(job_id(p.stem) for p in (archive / "x").iterdir())
    assert (images.status == "ok").all()

    # What Ray shows anyone who can reach its job and state APIs holds no credential.
    env = s3_server.env()
    secret_values = [env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"]]
    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    info = client.get_job_info(submission)
    job_text = json.dumps([info.model_dump(), [j.model_dump() for j in client.list_jobs()]], default=str)
    assert marker in job_text and info.runtime_env["env_vars"] == {"SEGPC_TEST_MARKER": marker}
    logs = client.get_job_logs(submission)
    assert "[segment] done" in logs
    # every task's and actor's runtime_env (the stages get the job's non-secret settings)
    state = {what: _get(head, f"/api/v0/{what}?detail=1&limit=10000")
             for what in ("tasks", "actors", "jobs", "runtime_envs")}
    tasks = json.loads(state["tasks"])["data"]["result"]["result"]
    stage_envs = [json.loads(t["runtime_env_info"]["serialized_runtime_env"]).get("env_vars", {})
                  for t in tasks if t["job_id"] and (t.get("runtime_env_info") or {}).get("serialized_runtime_env")]
    assert any(e.get("SEGPC_IO_RETRY_S") == "123.0" and e.get("AWS_ENDPOINT_URL") == s3_server.endpoint
               for e in stage_envs), "no task shows the job's settings: is runtime_env still reported?"
    assert marker in state["actors"] and marker in state["jobs"]
    for where, text in {"job API": job_text, "job logs": logs, "ray job submit": proc.stdout + proc.stderr,
                        **{f"state API /{k}": v for k, v in state.items()}}.items():
        for value in secret_values:
            assert value not in text, f"a credential ({value[:3]}...) appears in the {where}"
    # nor Ray's own log files on the head (the runtime-env agent logs the envs it builds)
    logged = {p: p.read_bytes() for p in Path(head.temp_dir).rglob("*") if p.is_file() and "logs" in p.parts}
    assert any(marker.encode() in b for b in logged.values()), "the marker is in no Ray log: wrong folder?"
    for path, data in logged.items():
        for value in secret_values:
            assert value.encode() not in data, f"a credential ({value[:3]}...) appears in {path}"


def _job_list(head: HeadNode, token: str) -> subprocess.CompletedProcess:
    env = {**head.env(), "RAY_AUTH_TOKEN": token}
    return subprocess.run([RAY, "job", "list", f"--address={head.address}"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_submission_without_the_token_is_refused(head):
    ok = _job_list(head, head.token)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    refused = _job_list(head, "wrong-token")
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0
    # the dashboard's answer to a wrong token (HTTP 403), not any other failure
    assert "Invalid authentication token" in out and "Authentication failed" in out, out[-2000:]
