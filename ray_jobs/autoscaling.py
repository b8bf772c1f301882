"""The GPU nodes an autoscaling cluster will bring, for the planner.

On a cluster whose GPU workers start on demand, the job starts with the head alone (often
0 CPUs); sized from the CPUs up now it would plan two read tasks for eight GPUs. The Ray
cluster launcher writes the autoscaler's config to ``~/ray_bootstrap_config.yaml`` on the
head: its worker types, their resources and ``max_workers``. KubeRay keeps its worker
groups in the RayCluster resource, not in a file: its manifest passes ``--gpus`` and
``--cpus-per-gpu`` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class NodeType:
    """A worker type the autoscaler may start: what one node brings, and how many at most."""

    name: str
    cpus: float
    gpus: float
    max_workers: int


@dataclass(frozen=True)
class GpuTarget:
    """The GPUs to plan for, the CPUs each brings (None: unknown), and where they came from."""

    gpus: float
    cpus_per_gpu: float | None
    source: str


def autoscaler_gpus(node_types: list[NodeType], max_workers: int | None = None) -> GpuTarget | None:
    """The most GPUs the autoscaler can bring: every GPU type at its ``max_workers``, within
    the cluster-wide ``max_workers`` (GPU-richest types first); None without GPU types.

    Planning for the most is what a batch job of a million images wants: the actor pools ask
    for these GPUs, the autoscaler starts the nodes, and the CPU stages are already sized for
    the CPUs those nodes bring.
    """
    budget = max_workers if max_workers is not None else sum(t.max_workers for t in node_types)
    gpus = cpus = 0.0
    used = []
    for t in sorted((t for t in node_types if t.gpus > 0), key=lambda t: -t.gpus):
        n = min(t.max_workers, budget)
        if n <= 0:
            continue
        budget -= n
        gpus += n * t.gpus
        cpus += n * t.cpus
        used.append(f"{t.name} x{n}")
    if not gpus:
        return None
    return GpuTarget(gpus, cpus / gpus, "autoscaler: " + ", ".join(used))


def node_types_of(config: dict) -> tuple[list[NodeType], int | None]:
    """The worker types of a cluster-launcher config (head excluded: it is up already) and its
    cluster-wide ``max_workers``. A type without declared resources counts as none."""
    head = config.get("head_node_type")
    default_max = int(config.get("max_workers") or 0)
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        res = spec.get("resources") or {}
        types.append(NodeType(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                              int(spec.get("max_workers", default_max))))
    top = config.get("max_workers")
    return types, (int(top) if top is not None else None)


def read_autoscaler_config(path: str | Path = BOOTSTRAP_CONFIG) -> GpuTarget | None:
    """The GPU target of the cluster launcher's config at ``path`` (the head's bootstrap
    config by default; Ray writes it as JSON); None where there is no such file."""
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    text = p.read_text()
    try:
        config = json.loads(text)
    except ValueError:
        import yaml

        config = yaml.safe_load(text)
    target = autoscaler_gpus(*node_types_of(config or {}))
    return GpuTarget(target.gpus, target.cpus_per_gpu, f"{target.source} ({p})") if target else None
