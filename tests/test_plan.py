"""Resource planning of the batch job: never more than the machine has, GPUs filled, CPU
stages sized from the CPUs."""

import pytest

from ray_jobs.autoscaling import GpuTarget, NodeType, autoscaler_gpus
from ray_jobs.plan import plan_resources
from ray_jobs.segment import parse_args

BASE = ["--input", "in", "--output", "out", "--bundle", "b"]


def test_small_cpu_machine_never_oversubscribes():
    plan = plan_resources(parse_args(BASE), {"CPU": 2.0}, n_scales=4)
    assert plan.fuse and plan.nucleus_gpu == 0 and plan.cytoplasm_gpu == 0
    assert plan.segment_actors == 2  # one per core, one torch thread each
    assert plan.segment_actors * plan.actor_cpus <= 2 - 1.25 + 1e-9  # a whole CPU (+ reads) left free
    assert plan.threads * plan.segment_actors <= 2


@pytest.mark.parametrize("gpus", [1, 4])
def test_gpu_cluster_fills_each_gpu_with_network_only_actors(gpus):
    plan = plan_resources(parse_args(BASE), {"CPU": 16.0 * gpus, "GPU": float(gpus)}, n_scales=4)
    assert not plan.fuse and plan.nucleus_actors == plan.cytoplasm_actors == gpus
    per_gpu = plan.nucleus_gpu + 4 * plan.cytoplasm_gpu
    assert per_gpu == pytest.approx(1.0)
    assert plan.write_actors == 2 * gpus  # from the CPUs (16 per GPU), not one per GPU


def test_autoscaling_cluster_plans_for_the_gpus_and_their_cpus():
    # a CPU-only head with 4 CPUs; 8 GPUs to come, 12 CPUs each
    plan = plan_resources(parse_args(BASE + ["--gpus", "8", "--cpus-per-gpu", "12"]), {"CPU": 4.0}, n_scales=4)
    assert plan.nucleus_actors == 8 and plan.nucleus_gpu > 0
    assert plan.cpus == 4 + 8 * 12 and plan.write_actors == 100 // 8 and plan.read_tasks == 100
    # without --cpus-per-gpu: as the GPU nodes that are up, else 8
    assert plan_resources(parse_args(BASE + ["--gpus", "2"]), {"CPU": 4.0}, 4).cpus == 4 + 2 * 8
    assert plan_resources(parse_args(BASE + ["--gpus", "2"]), {"CPU": 4.0, "GPU": 1.0}, 4,
                          gpu_node_cpus=16).cpus == 4 + 16


def test_autoscaler_brings_each_gpu_type_at_its_max_within_the_cluster_max():
    a100 = NodeType("a100", cpus=96, gpus=8, max_workers=2)
    g5 = NodeType("g5", cpus=8, gpus=1, max_workers=8)
    cpu = NodeType("cpu", cpus=16, gpus=0, max_workers=4)
    # the GPU-richest type first, then what the cluster-wide max_workers leaves
    target = autoscaler_gpus([g5, cpu, a100], max_workers=3)
    assert target.gpus == 2 * 8 + 1 and target.cpus_per_gpu == pytest.approx((2 * 96 + 8) / 17)
    assert target.source == "autoscaler: a100 x2, g5 x1"
    assert autoscaler_gpus([g5, a100]).gpus == 8 + 2 * 8  # no cluster-wide max: each at its own
    assert autoscaler_gpus([cpu]) is None and autoscaler_gpus([g5], max_workers=0) is None


def test_autoscaler_plan_counts_only_the_gpu_nodes_still_to_come():
    # 2 of 4 GPU nodes (8 CPUs each) up beside a 0-CPU head: 2 more bring 16 CPUs
    target = GpuTarget(4, 8.0, "autoscaler: gpu_worker x4")
    plan = plan_resources(parse_args(BASE), {"CPU": 16.0, "GPU": 2.0}, 4, gpu_node_cpus=8, autoscaler=target)
    assert (plan.gpus, plan.cpus, plan.nucleus_actors, plan.gpus_from) == (4, 32, 4, target.source)
    # all up: the cluster as it is
    plan = plan_resources(parse_args(BASE), {"CPU": 32.0, "GPU": 4.0}, 4, gpu_node_cpus=8, autoscaler=target)
    assert (plan.gpus, plan.cpus, plan.gpus_from) == (4, 32, "cluster")
    # --cpus-per-gpu beats the node type's
    plan = plan_resources(parse_args(BASE + ["--cpus-per-gpu", "4"]), {}, 4, autoscaler=target)
    assert plan.cpus == 4 * 4 and plan.read_tasks == 16


def test_flags_override():
    args = parse_args(BASE + ["--nucleus-actors", "3", "--cytoplasm-actors", "2", "--threads", "4",
                              "--no-fuse", "--batch-size", "5", "--write-actors", "2"])
    plan = plan_resources(args, {"CPU": 8.0}, n_scales=4)
    assert (plan.nucleus_actors, plan.cytoplasm_actors, plan.threads, plan.batch_size, plan.write_actors) == \
        (3, 2, 4, 5, 2)
    assert not plan.fuse
    # every actor of the GPU-shaped graph fits on the CPUs, with a whole one left over
    assert (3 + 2 * 4 + 2) * plan.actor_cpus <= 8 - 2.25 + 1e-9
