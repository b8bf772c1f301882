"""Train the nucleus U-Net and one Attention DeepLabv3+ per scale with Ray Train; write a bundle.

    python -m ray_jobs.train --data URI --out BUNDLE_URI [--stage nucleus|cytoplasm|all]
        [--preset tiny|paper] [--scales 0.5 1.75 ...] [--num-workers N] [--use-gpu]
        [--epochs E] [--batch-size B] [--resume]

Each stage (the nucleus network, then each scale) is one data-parallel ``TorchTrainer``
run. Every epoch is validated with the official and strict metrics and checkpointed
(latest training state plus the best weights so far) under ``--checkpoints``; ``--resume``
continues interrupted runs from their last checkpoint. The finished bundle is validated
end to end (each scale alone and the cascade) and the figures go into its provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ray_jobs.faults import fault_at
from segpc.models.bundle import Bundle, load_bundle, network_name, new_bundle, read_bundle_meta, save_bundle
from segpc.config import Config, preset
from segpc.errors import InputError, exit_status
from segpc.io.storage import filesystem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="SegPC root with train/ and validation/, or a flat synthetic archive "
                        "(x/, y/, slides.csv; split by slide); local path or s3://")
    p.add_argument("--out", required=True, help="bundle folder to write (local or s3://)")
    p.add_argument("--stage", choices=["nucleus", "cytoplasm", "all"], default="all")
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="cytoplasm scales to train (default: all of the preset's)")
    p.add_argument("--num-workers", type=int, default=1, help="data-parallel workers per run")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--autoscale", action="store_true",
                   help="with --use-gpu: do not require the GPUs to exist yet (autoscaling cluster)")
    p.add_argument("--epochs", type=int, default=None, help="default: 30 (tiny), 100 (paper)")
    p.add_argument("--nucleus-epochs", type=int, default=None,
                   help="epochs of the nucleus U-Net (default: --epochs); it learns slowest")
    p.add_argument("--batch-size", type=int, default=None, help="per worker; default 8")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate, cosine decay; default 1e-3 (tiny, from scratch), 1e-4 (paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoints", default=None,
                   help="where Ray Train keeps checkpoints (default: <out>-checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the runs found under --checkpoints")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker-group restarts Ray Train may do within a run (from its last checkpoint)")
    p.add_argument("--restart", action="store_true", help="discard earlier runs under --checkpoints")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="flat archives only: share of slides held out for validation")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    if args.epochs is None:
        args.epochs = 30 if args.preset == "tiny" else 100
    if args.nucleus_epochs is None:
        args.nucleus_epochs = args.epochs
    if args.batch_size is None:
        args.batch_size = 8
    if args.lr is None:
        args.lr = 1e-3 if args.preset == "tiny" else 1e-4
    if args.checkpoints is None:
        args.checkpoints = args.out.rstrip("/") + "-checkpoints"
    if args.num_workers < 1 or args.epochs < 1 or args.batch_size < 2:
        p.error("--num-workers and --epochs must be >= 1, --batch-size >= 2")
    return args


def check_inputs(args: argparse.Namespace, cfg: Config) -> None:
    """Everything that can be wrong before training starts: data, output, GPUs, scales."""
    import ray

    from segpc.training.splits import data_summary, localize

    n_train, n_cells, n_val = data_summary(localize(args.data), args.val_fraction)
    if n_train < args.num_workers or n_cells < 2 * args.num_workers:
        raise InputError(f"{args.data}: {n_train} training images / {n_cells} cells are too few "
                         f"for {args.num_workers} workers")
    print(f"[train] data: {n_train} training images ({n_cells} cells), {n_val} validation images",
          flush=True)
    fs, root = filesystem(args.out)
    try:
        fs.makedirs(root, exist_ok=True)
        probe = f"{root}/.write-test"
        fs.pipe(probe, b"ok")
        fs.rm(probe)
    except Exception as exc:
        raise InputError(f"{args.out}: bundle location is not writable ({exc})") from None
    if args.use_gpu and not args.autoscale:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < args.num_workers:
            raise InputError(f"--use-gpu with {args.num_workers} worker(s) needs as many GPUs; the "
                             f"Ray cluster has {gpus:g} (pass --autoscale on an autoscaling cluster)")
    bad = [s for s in (args.scales or []) if s not in cfg.cytoplasm.scales]
    if bad:
        raise InputError(f"--scales {bad}: the {cfg.preset} preset has scales {list(cfg.cytoplasm.scales)}")


def base_bundle(args: argparse.Namespace, cfg: Config) -> Bundle:
    """The bundle to train into: the existing one at --out (partial retraining), or new."""
    try:
        meta = read_bundle_meta(args.out)
    except InputError:
        return new_bundle(cfg)
    existing = Config.from_dict(meta["config"])
    if existing.preset != cfg.preset:
        raise InputError(f"{args.out} holds a {existing.preset!r} bundle; refusing to mix in "
                         f"{cfg.preset!r} networks (choose another --out)")
    return load_bundle(args.out)


def run_stage(args: argparse.Namespace, cfg: Config, stage: str, scale: float | None):
    """One TorchTrainer run; returns (best network weights as a state dict, last metrics)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_jobs.common import pyarrow_filesystem, worker_runtime_env
    from ray_jobs.train_loop import train_loop

    name = network_name(scale)
    storage_fs, storage_path = pyarrow_filesystem(args.checkpoints)
    if storage_fs is None:
        storage_path = str(Path(storage_path).resolve())
        Path(storage_path).mkdir(parents=True, exist_ok=True)
    _guard_previous_run(args, name)
    cpus = max(1, int(min(_cluster_cpus(), os.cpu_count() or 1) // args.num_workers))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"data": args.data, "config": cfg.to_dict(), "stage": stage, "scale": scale,
                           "epochs": args.nucleus_epochs if scale is None else args.epochs,
                           "batch_size": args.batch_size, "lr": args.lr,
                           "seed": args.seed, "threads": cpus, "val_fraction": args.val_fraction,
                           "name": name, "amp": args.use_gpu,
                           # test-only fault hook (ray_jobs/faults.py): fail once after this epoch
                           "fail_after_epoch": fault_at("epoch")},
        scaling_config=ray.train.ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                               resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            worker_runtime_env=worker_runtime_env()),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RunFailed(f"{name}: training failed ({str(exc).splitlines()[0][:300]}); its checkpoints "
                        f"are kept under {args.checkpoints}/{name}: rerun with --resume") from exc
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training produced no checkpoint")
    from segpc.training.checkpoint import load_best

    with result.checkpoint.as_directory() as d:
        weights, state = load_best(d)
    return weights, state


class RunFailed(RuntimeError):
    """A training run stopped; what it checkpointed can be resumed."""


def _cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1)


def _guard_previous_run(args: argparse.Namespace, name: str) -> None:
    """Ray Train resumes a run of the same name by itself; make that an explicit choice."""
    fs, root = filesystem(args.checkpoints)
    run_dir = f"{root}/{name}"
    if not fs.exists(run_dir):
        if args.resume:
            print(f"[train] {name}: no earlier run at {args.checkpoints}/{name}; starting fresh",
                  flush=True)
        return
    if args.resume:
        print(f"[train] {name}: resuming from {args.checkpoints}/{name}", flush=True)
    elif args.restart:
        fs.rm(run_dir, recursive=True)
    else:
        raise InputError(f"an earlier training run exists at {args.checkpoints}/{name}: pass --resume "
                         "to continue it or --restart to discard it")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: _main(args), failures=(RunFailed,))


def _main(args: argparse.Namespace) -> None:
    from ray_jobs.common import init_ray

    t0 = time.time()
    cfg = preset(args.preset)
    init_ray()
    check_inputs(args, cfg)
    bundle = base_bundle(args, cfg)
    scales = args.scales or list(cfg.cytoplasm.scales)
    stages = ([("nucleus", None)] if args.stage in ("nucleus", "all") else []) + \
             ([("cytoplasm", s) for s in scales] if args.stage in ("cytoplasm", "all") else [])
    history = dict(bundle.provenance.get("training", {}))
    for stage, scale in stages:
        print(f"[train] === {network_name(scale)} ({args.num_workers} worker(s), "
              f"{'GPU' if args.use_gpu else 'CPU'}) ===", flush=True)
        weights, state = run_stage(args, cfg, stage, scale)
        net = bundle.nucleus if scale is None else bundle.cytoplasm[scale]
        net.load_state_dict(weights)
        history[network_name(scale)] = {"best_epoch": state["best_epoch"] + 1,
                                        "epochs": state["epoch"] + 1, "best": state["best_metrics"],
                                        "history": state["history"]}
    bundle.provenance = {"data": args.data, "preset": args.preset, "epochs": args.epochs,
                         "nucleus_epochs": args.nucleus_epochs,
                         "batch_size": args.batch_size, "lr": args.lr, "num_workers": args.num_workers,
                         "use_gpu": args.use_gpu, "seed": args.seed, "training": history,
                         "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    bundle.provenance["validation"] = validate_bundle(args, bundle)
    save_bundle(bundle, args.out)
    print(f"[train] bundle written to {args.out} in {time.time() - t0:.0f}s", flush=True)
    print(json.dumps(bundle.provenance["validation"], indent=2), flush=True)


def validate_bundle(args: argparse.Namespace, bundle: Bundle) -> dict:
    """End-to-end validation of the bundle: each scale alone and the cascade."""
    import ray

    from ray_jobs.common import worker_runtime_env
    from ray_jobs.train_loop import evaluate_bundle_task

    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(bundle, tmp)
        task = ray.remote(num_cpus=1, num_gpus=1 if args.use_gpu else 0,
                          runtime_env=worker_runtime_env())(evaluate_bundle_task)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
        return ray.get(task.remote(files, args.data, args.val_fraction))


if __name__ == "__main__":
    sys.exit(main())
