"""How the batch job shares out a cluster: pool sizes and per-actor resources.

GPU clusters: per GPU, one U-Net actor (half a GPU) and one actor per scale sharing the
other half; those actors only run networks. The CPU work (decoding, stage 1, crops,
candidates, aggregation, writes) is sized from the CPUs the cluster has, or will have: on an
autoscaling cluster the GPUs to come (the autoscaler's node types, see ``autoscaling``, or
``--gpus N``) bring their CPUs (the node type's, or ``--cpus-per-gpu``) with them.

CPU clusters: one actor pool runs every step of an image (``fuse``), one actor per CPU with
one torch thread each (the post-processing is single-threaded, so data parallelism uses the
cores best), on fractions of a CPU so that Ray Data's own tasks (some ask for a whole CPU)
always find room: small machines never deadlock.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ray_jobs.autoscaling import GpuTarget

DEFAULT_CPUS_PER_GPU = 8.0


@dataclass
class Plan:
    fuse: bool  # every step of an image in one CPU actor
    nucleus_actors: int  # U-Net actors (split)
    cytoplasm_actors: int  # actors per scale (split)
    segment_actors: int  # actors running every step (fuse)
    write_actors: int  # aggregation + writes (split)
    nucleus_gpu: float
    cytoplasm_gpu: float
    actor_cpus: float  # per model actor
    task_cpus: float  # per CPU task (read, stage 1, candidates) and per write actor
    threads: int  # torch threads per model actor
    batch_size: int  # images per batch
    read_tasks: int  # concurrent read + decode tasks
    cpus: float  # the CPUs planned for
    gpus: float = 0.0  # the GPUs planned for
    gpus_from: str = ""  # where that number came from: --gpus, the autoscaler's config, the cluster


def gpu_target(args: argparse.Namespace, have_gpus: float, autoscaler: GpuTarget | None) -> GpuTarget:
    """The GPUs to plan for: ``--gpus``, else the most the autoscaler can bring, else those up."""
    if args.gpus is not None:
        return GpuTarget(args.gpus, autoscaler.cpus_per_gpu if autoscaler else None, "--gpus")
    if autoscaler is not None and autoscaler.gpus > have_gpus:
        return autoscaler
    return GpuTarget(have_gpus, None, "cluster")


def plan_resources(args: argparse.Namespace, cluster: dict, n_scales: int,
                   gpu_node_cpus: float | None = None, autoscaler: GpuTarget | None = None) -> Plan:
    """The plan for ``cluster`` (``ray.cluster_resources()``); ``gpu_node_cpus`` is the CPUs
    per GPU of the GPU nodes that are up, if any; ``autoscaler`` the GPU nodes that can come."""
    have_gpus = cluster.get("GPU", 0)
    target = gpu_target(args, have_gpus, autoscaler)
    gpus = target.gpus
    cpus = cluster.get("CPU", 0.0)  # a CPU-only head with num-cpus 0 has no "CPU" at all
    if gpus > have_gpus:  # GPU nodes still to come bring their CPUs with them
        per_gpu = args.cpus_per_gpu or target.cpus_per_gpu or gpu_node_cpus or DEFAULT_CPUS_PER_GPU
        cpus += (gpus - have_gpus) * per_gpu
    cpus = cpus or 1.0  # nothing up and nothing to come: plan for one, the driver's
    planned = {"gpus": gpus, "gpus_from": target.source}
    fuse = args.fuse if args.fuse is not None else gpus == 0
    # Read tasks wait on storage more than on the CPU; more than one per CPU only starts more
    # worker processes, which on a small machine slows the actors' start-up.
    reads = max(2, int(cpus))
    if gpus > 0 and not fuse:
        n_nuc = args.nucleus_actors or max(1, int(gpus))
        n_cyt = args.cytoplasm_actors or n_nuc
        cyt_gpu = args.cytoplasm_gpu if args.cytoplasm_gpu is not None else (1 - args.nucleus_gpu) / n_scales
        writers = args.write_actors or max(n_nuc, int(cpus // 8))
        return Plan(False, n_nuc, n_cyt, 0, writers, args.nucleus_gpu, cyt_gpu, 1.0, 1.0,
                    args.threads or 2, args.batch_size or 16, reads, cpus, **planned)
    # Keep a whole CPU (or a quarter of a big node) free for reading, listing and writing:
    # some of Ray Data's own tasks ask for one full CPU.
    free = max(1.0, cpus * 0.25) + 0.25
    if fuse:
        n_seg = args.nucleus_actors or max(1, int(cpus))
        actor_cpus = max(0.05, round((cpus - free) / n_seg, 3))
        threads = args.threads or max(1, int(cpus // n_seg))
        return Plan(True, 0, 0, n_seg, 0, 0.0, 0.0, actor_cpus, 0.25, threads, args.batch_size or 4,
                    reads, cpus, **planned)
    # the GPU-shaped graph on CPUs (tests, or a user's choice): every actor a fraction of a CPU
    n_nuc = args.nucleus_actors or 1
    n_cyt = args.cytoplasm_actors or 1
    writers = args.write_actors or 1
    actors = n_nuc + n_cyt * n_scales + writers
    actor_cpus = max(0.05, round((cpus - free) / actors, 3))
    threads = args.threads or max(1, int(cpus // (n_nuc + n_cyt * n_scales)))
    return Plan(False, n_nuc, n_cyt, 0, writers, 0.0, 0.0, actor_cpus, min(0.25, actor_cpus), threads,
                args.batch_size or 4, reads, cpus, **planned)
