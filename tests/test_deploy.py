"""The deployment files agree with each other and with the project: one image name, the Ray
version pyproject pins, a pinned CUDA torch, nothing installed at boot, node credentials,
re-runnable start commands, an autoscaling KubeRay job; and the job plans for the GPU nodes
an autoscaling cluster will bring. Offline: no Ray, no docker, no cluster."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from ray_jobs.autoscaling import read_autoscaler_config
from ray_jobs.plan import plan_resources
from ray_jobs.segment import parse_args

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--input", "in", "--output", "out", "--bundle", "b"]
# Ray's "-gpu" image tag is an alias of one CUDA build (GPU_PLATFORM in Ray's
# ci/ray_ci/docker_container.py: cu12.1.1-cudnn8); "-cuXYZ" tags name theirs.
RAY_GPU_ALIAS_CUDA = "cu121"


def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/kuberay/rayjob.yaml").read_text()) if d]


def rayjob() -> dict:
    (job,) = [d for d in rayjob_docs() if d["kind"] == "RayJob"]
    return job


def readme_cluster_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Running on a cluster")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile() -> tuple[str, dict[str, str], str]:
    """The Dockerfile's text, its ARG defaults, and its FROM image with the ARGs filled in."""
    text = (ROOT / "deploy/Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    return text, args, re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


def containers(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# ----------------------------------------------------------------------------- one image


def test_one_image_name_in_cluster_yaml_readme_and_kuberay():
    image = cluster()["docker"]["image"]
    assert not image.startswith("rayproject/"), "the nodes boot the project's image, not Ray's"
    readme = readme_cluster_section()
    built = re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", readme)
    pushed = re.findall(r"docker push (\S+)", readme)
    assert built == [image] and pushed == [image]
    assert [c["image"] for c in containers(rayjob())] == [image] * len(containers(rayjob()))
    # its tag is the project's version, and the registry the nodes log in to is the image's
    assert image.rsplit(":", 1)[1] == pyproject()["project"]["version"]
    registry = image.split("/", 1)[0]
    logins = [c for c in cluster()["initialization_commands"] if "docker login" in c]
    assert logins and all(c.rstrip().endswith(registry) for c in logins)
    for step in ("ray up cluster.yaml", "ray job submit", "kubectl apply -f deploy/kuberay/rayjob.yaml"):
        assert step in readme


def test_dockerfile_base_is_the_ray_version_pyproject_pins():
    _, _, base = dockerfile()
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", base)
    assert m, base
    version = Version(m.group(1))
    (ray_req,) = [Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("ray[")]
    assert ray_req.specifier.contains(version)
    # the lowest Ray pyproject allows, so the image and the pin move together
    floor = min(Version(s.version) for s in ray_req.specifier if s.operator == ">=")
    assert (version.major, version.minor) == (floor.major, floor.minor)
    # the Ray that submits (this environment's) is the Ray the nodes run, and KubeRay is told so
    assert version == Version(importlib.metadata.version("ray"))
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == str(version)


def test_dockerfile_installs_the_project_with_a_pinned_cuda_torch():
    text, args, base = dockerfile()
    # the project: the repo copied in and installed as a package, not editable
    assert re.search(r"^COPY (--chown=\S+ )?\. (\S+)$", text, re.M)
    dest = re.search(r"^COPY (?:--chown=\S+ )?\. (\S+)$", text, re.M).group(1)
    installs = [ln for ln in text.splitlines() if "pip install" in ln]
    assert any(dest in ln for ln in installs)
    assert not re.search(r"pip install[^\n]*(\s-e\s|--editable)", text)
    # torch and torchvision pinned to one release pair (torchvision 0.N+15 goes with torch 2.N)
    torch, vision = Version(args["TORCH_VERSION"]), Version(args["TORCHVISION_VERSION"])
    assert len(torch.release) == 3 and not torch.local
    assert (vision.major, vision.minor) == (0, torch.minor + 15)
    assert '"torch==${TORCH_VERSION}"' in text and '"torchvision==${TORCHVISION_VERSION}"' in text
    # from PyTorch's index for the base image's CUDA (a CPU wheel means a silent CPU fallback)
    assert "--index-url https://download.pytorch.org/whl/${TORCH_CUDA}" in text
    platform = base.rsplit("-", 1)[1]
    assert args["TORCH_CUDA"] == (RAY_GPU_ALIAS_CUDA if platform == "gpu" else platform)
    # pyproject only sets a floor: the pin belongs to the image
    (torch_req,) = [Requirement(r) for r in pyproject()["project"]["dependencies"]
                    if Requirement(r).name == "torch"]
    assert not any(s.operator in ("==", "===") for s in torch_req.specifier)
    assert torch_req.specifier.contains(torch)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


# ----------------------------------------------------------------------------- cluster.yaml


def test_cluster_nodes_have_instance_profiles_and_restartable_start_commands():
    config = cluster()
    for name, node in config["available_node_types"].items():
        arn = node["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\S+:instance-profile/\S+", arn), (name, arn)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = config[key]
        assert commands[0].strip() == "ray stop", key  # a re-run of `ray up` restarts Ray
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    # token authentication as before: the mode in every container, the token file on every node
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_nothing_is_pip_installed_at_boot():
    config = cluster()
    # spelled out: Ray fills missing keys from its defaults, which pip install on the head
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in config
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key) or []:
            assert "pip install" not in command and "torch" not in command, (key, command)


# ----------------------------------------------------------------------------- KubeRay


def test_rayjob_autoscales_a_gpu_group_with_a_service_account():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    rc = spec["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["authOptions"]["mode"] == "token"
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in rc["workerGroupSpecs"] if any(
        "nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert len(gpu_groups) == 1
    (group,) = gpu_groups
    assert group["minReplicas"] == 0 and group["maxReplicas"] > 0
    (worker,) = group["template"]["spec"]["containers"]
    res = worker["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind])
    # the service account for storage, on every pod, defined with its IAM role (IRSA)
    accounts = {g["template"]["spec"].get("serviceAccountName") for g in [rc["headGroupSpec"], group]}
    (account,) = accounts
    assert account
    (sa,) = [d for d in rayjob_docs() if d["kind"] == "ServiceAccount"]
    assert sa["metadata"]["name"] == account
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    # the entrypoint is the job's own command line, planning for the group at its largest
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["python", "-m", "ray_jobs.segment"]
    args = parse_args(words[3:])
    gpus_per_pod = int(res["limits"]["nvidia.com/gpu"])
    assert args.gpus == group["maxReplicas"] * gpus_per_pod
    assert args.cpus_per_gpu == float(res["limits"]["cpu"]) / gpus_per_pod


# ----------------------------------------------------------------------------- planning


def write_bootstrap(path: Path, n_gpu_nodes: int) -> Path:
    """A cluster launcher's ~/ray_bootstrap_config.yaml (Ray writes it as JSON): a CPU head
    with 0 CPUs and up to N workers of 8 CPUs and 1 GPU."""
    config = {"cluster_name": "t", "max_workers": n_gpu_nodes, "head_node_type": "head",
              "available_node_types": {
                  "head": {"resources": {"CPU": 0}, "node_config": {}},
                  "gpu_worker": {"min_workers": 0, "max_workers": n_gpu_nodes,
                                 "resources": {"CPU": 8, "GPU": 1}, "node_config": {}}}}
    path.write_text(json.dumps(config))
    return path


# N nodes of 8 CPUs: read tasks one per CPU (8N), write actors one per 8 CPUs but at least
# one per GPU (N), one U-Net actor per GPU (N)
@pytest.mark.parametrize("n, reads, writers", [(1, 8, 1), (4, 32, 4)])
@pytest.mark.parametrize("head", [{}, {"CPU": 0.0}])  # Ray may leave out a resource of 0
def test_cpu_head_plans_for_the_gpu_nodes_to_come(tmp_path, n, reads, writers, head):
    target = read_autoscaler_config(write_bootstrap(tmp_path / "ray_bootstrap_config.yaml", n))
    plan = plan_resources(parse_args(BASE), head, n_scales=4, autoscaler=target)
    assert not plan.fuse and plan.gpus == n and plan.nucleus_actors == plan.cytoplasm_actors == n
    assert plan.cpus == 8 * n
    assert plan.read_tasks == reads and plan.write_actors == writers
    assert f"gpu_worker x{n}" in plan.gpus_from and str(tmp_path) in plan.gpus_from
    # without the autoscaler's view: the head alone, fused on one CPU with two read tasks
    blind = plan_resources(parse_args(BASE), head, n_scales=4,
                           autoscaler=read_autoscaler_config(tmp_path / "missing.yaml"))
    assert blind.fuse and blind.read_tasks == 2 and blind.gpus == 0 and blind.gpus_from == "cluster"


def test_gpus_flag_overrides_the_autoscaler(tmp_path):
    target = read_autoscaler_config(write_bootstrap(tmp_path / "b.yaml", 4))
    plan = plan_resources(parse_args(BASE + ["--gpus", "2"]), {}, n_scales=4, autoscaler=target)
    assert (plan.gpus, plan.cpus, plan.read_tasks, plan.gpus_from) == (2, 16, 16, "--gpus")


def test_cluster_yaml_tells_the_planner_its_gpu_workers():
    # the head's bootstrap config is cluster.yaml as the launcher fills it in
    target = read_autoscaler_config(ROOT / "cluster.yaml")
    workers = cluster()["available_node_types"]["gpu_worker"]
    assert target is not None
    assert target.gpus == workers["max_workers"] * workers["resources"]["GPU"]
    assert target.cpus_per_gpu == workers["resources"]["CPU"] / workers["resources"]["GPU"]
