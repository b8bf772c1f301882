"""A GPU actor that Ray gave a GPU and that sees none stops the job, naming the node.

A local Ray of the test's own declares one logical GPU on this CPU machine: Ray hands it out
(CUDA_VISIBLE_DEVICES=0) exactly as on a GPU node whose torch cannot use its GPU (a CPU
build, a driver mismatch); the job must stop there, not run on the CPU unnoticed.
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segpc.config import preset
from segpc.io.synthetic import write_archive
from segpc.models.bundle import new_bundle, save_bundle

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import sys, ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
from ray_jobs.segment import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU that torch sees")
def test_a_gpu_actor_without_a_usable_gpu_stops_the_job(tmp_path):
    write_archive(tmp_path / "archive", 2, 1, seed=1, size="320x240")
    save_bundle(new_bundle(preset("tiny")), str(tmp_path / "bundle"))
    proc = subprocess.run([sys.executable, "-c", DRIVER, "--input", str(tmp_path / "archive" / "x"),
                           "--output", str(tmp_path / "out"), "--bundle", str(tmp_path / "bundle")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, proc.stderr[-3000:]
    assert f"node {socket.gethostname()}" in error[0] and "sees no CUDA device" in error[0]
    assert "GPU [0]" in error[0]
    assert not (tmp_path / "out" / "images").exists()  # nothing was segmented on the CPU
