"""Resource planning of the batch job: never more than the machine has, GPUs filled."""

import pytest

from ray_jobs.segment import parse_args, plan_resources

BASE = ["--input", "in", "--output", "out", "--bundle", "b"]


def test_small_cpu_machine_never_oversubscribes():
    plan = plan_resources(parse_args(BASE), {"CPU": 2.0}, n_scales=4)
    assert plan.fuse_scales and plan.nucleus_gpu == 0 and plan.cytoplasm_gpu == 0
    actors = plan.nucleus_actors + plan.cytoplasm_actors
    assert actors * plan.actor_cpus <= 2 - 1.25 + 1e-9  # a whole CPU (+ the writer) left free
    assert plan.threads * actors <= 2


@pytest.mark.parametrize("gpus", [1, 4])
def test_gpu_cluster_fills_each_gpu_with_one_pipeline(gpus):
    plan = plan_resources(parse_args(BASE), {"CPU": 16.0 * gpus, "GPU": float(gpus)}, n_scales=4)
    assert not plan.fuse_scales and plan.nucleus_actors == plan.cytoplasm_actors == gpus
    per_gpu = plan.nucleus_gpu + 4 * plan.cytoplasm_gpu
    assert per_gpu == pytest.approx(1.0)


def test_autoscaling_cluster_plans_for_the_gpus_it_is_told():
    plan = plan_resources(parse_args(BASE + ["--gpus", "8"]), {"CPU": 4.0}, n_scales=4)
    assert plan.nucleus_actors == 8 and plan.nucleus_gpu > 0


def test_flags_override():
    args = parse_args(BASE + ["--nucleus-actors", "3", "--cytoplasm-actors", "2", "--threads", "4",
                              "--no-fuse-scales", "--batch-size", "5"])
    plan = plan_resources(args, {"CPU": 8.0}, n_scales=4)
    assert (plan.nucleus_actors, plan.cytoplasm_actors, plan.threads, plan.batch_size) == (3, 2, 4, 5)
    assert not plan.fuse_scales
