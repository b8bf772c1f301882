"""Training ingest: Ray Data (the job's path) against every worker holding the data in memory.

    python benchmarks/train_ingest.py [--images 40] [--epochs 4] [--stage cytoplasm|nucleus]
        [--scale 1.75] [--size 640x480] [--batch-size 8]

Trains one network with Ray Train, 1 and then 2 data-parallel workers, over the same
synthetic archive, two ways:

- ``ray-data``: ``ray_jobs.train.training_dataset`` (decode + examples materialised once in
  the object store by Ray Data tasks; guidance jitter, crops and augmentation re-run per
  epoch by fractional-CPU tasks), each worker streaming its shard (``iter_torch_batches``);
- ``in-memory``: the path before it: every worker reads and decodes the whole training
  split, builds all examples in its own memory, and augments them itself.

Prints training samples/s (summed over workers, first epoch left out: it includes the
start-up of the pipeline), the ratio ray-data / in-memory per worker count, and the peak
PSS (proportional set size: shared pages such as the object store counted once) of each
training worker process and of Ray Data's task processes. Validation is left out of both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import process_tree, pss_kib  # noqa: E402
from segpc.config import Config, preset  # noqa: E402
from segpc.io.synthetic import write_archive  # noqa: E402
from segpc.training.splits import SampleRef, list_splits  # noqa: E402


def _loop(c: dict) -> None:
    """Either ingest path; writes the samples/s of each epoch to ``c["out"]``."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from segpc.models import build_cytoplasm_model, build_nucleus_model
    from segpc.training.data import Arrays, cell_contexts, cell_example, load_sample, nucleus_arrays
    from segpc.training.steps import array_batches, train_steps

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(c["threads"])
    torch.manual_seed(0)
    cfg = Config.from_dict(c["config"])
    model = build_nucleus_model(cfg.nucleus) if c["stage"] == "nucleus" else build_cytoplasm_model(cfg.cytoplasm)
    device = ray.train.torch.get_device()
    model = model.to(device)
    ddp = ray.train.torch.prepare_model(model) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if c["path"] == "in-memory":
        samples = [load_sample(SampleRef.from_json(r)) for r in c["refs"]]
        if c["stage"] == "nucleus":
            arrays = nucleus_arrays(samples, cfg.nucleus.input_size)
        else:
            pairs = [cell_example(ctx, c["scale"], cfg) for s in samples for ctx in cell_contexts(s, c["scale"], cfg)]
            arrays = Arrays(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
        del samples
    rates = []
    for epoch in range(c["epochs"]):
        if c["path"] == "in-memory":
            order = np.random.default_rng([0, epoch]).permutation(len(arrays))
            per = len(arrays) // world
            batches = array_batches(arrays, order[rank * per:(rank + 1) * per], c["batch_size"])
        else:
            shard = ray.train.get_dataset_shard("train")
            batches = ((b["x"], b["y"]) for b in shard.iter_torch_batches(batch_size=c["batch_size"]))
        stats = train_steps(ddp, opt, batches, device)
        t = torch.tensor([stats["samples_per_s"]], dtype=torch.float64)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        rates.append(float(t[0]))
    if rank == 0:  # Ray Train keeps metrics only with checkpoints; this is a one-machine benchmark
        Path(c["out"]).write_text(json.dumps(rates))


class PeakPss:
    """Peak PSS (MiB) of each of this process's descendants whose title starts with one of
    ``prefixes``, sampled every ``every_s``."""

    def __init__(self, prefixes: tuple[str, ...], every_s: float = 0.3):
        self.prefixes, self.every_s = prefixes, every_s
        self.peaks: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakPss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in process_tree(os.getpid()) - {os.getpid()}:
                d = Path("/proc") / str(pid)
                try:
                    title = (d / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
                except OSError:
                    continue
                kind = next((p for p in self.prefixes if title.startswith(p)), None)
                if kind:
                    self.peaks[(kind, pid)] = max(self.peaks.get((kind, pid), 0.0), pss_kib(pid) / 1024)
            self._stop.wait(self.every_s)

    def by_kind(self, kind: str) -> list[float]:
        return sorted((v for (k, _), v in self.peaks.items() if k == kind), reverse=True)


def run(path: str, workers: int, args: argparse.Namespace, cfg: Config, refs: list[SampleRef],
        storage: Path) -> tuple[float, list[float], list[float]]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_jobs.train import AUGMENT_CPUS, DATA_HEADROOM, training_dataset

    cpus = ray.cluster_resources().get("CPU", 1)
    scale = None if args.stage == "nucleus" else args.scale
    datasets = {"train": training_dataset(refs, args.stage, scale, cfg)} if path == "ray-data" else None
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"path": path, "stage": args.stage, "scale": scale, "config": cfg.to_dict(),
                           "epochs": args.epochs, "batch_size": args.batch_size,
                           "threads": max(1, int((cpus - 1) // workers)) if path == "ray-data" else max(1, int(cpus // workers)), "refs": [r.to_json() for r in refs],
                           "out": str(storage / f"{path}-{workers}.json")},
        datasets=datasets,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, resources_per_worker={"CPU": max(AUGMENT_CPUS, min(1.0, (cpus - DATA_HEADROOM) / workers))}),
        run_config=ray.train.RunConfig(name=f"{path}-{workers}", storage_path=str(storage)),
    )
    storage.mkdir(parents=True, exist_ok=True)
    with PeakPss(("ray::RayTrainWorker", "ray::MapBatches", "ray::SplitCoordinator")) as pss:
        trainer.fit()
    rates = json.loads((storage / f"{path}-{workers}.json").read_text())
    steady = rates[1:] or rates
    data_tasks = pss.by_kind("ray::MapBatches") + pss.by_kind("ray::SplitCoordinator")
    return sum(steady) / len(steady), pss.by_kind("ray::RayTrainWorker"), data_tasks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--stage", choices=["cytoplasm", "nucleus"], default="cytoplasm")
    p.add_argument("--scale", type=float, default=1.75)
    p.add_argument("--size", default="640x480")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    import ray

    from ray_jobs.common import init_ray

    work = Path(tempfile.mkdtemp(prefix="segpc-ingest-"))
    write_archive(work / "data", args.images, 4, seed=2, size=args.size)
    refs = list_splits(str(work / "data")).train
    cfg = preset("tiny")
    init_ray()
    rows = []
    for workers in (1, 2):
        for path in ("ray-data", "in-memory"):
            t0 = time.time()
            rate, trainers, tasks = run(path, workers, args, cfg, refs, work / "runs")
            rows.append((workers, path, rate, trainers, tasks, time.time() - t0))
            print(f"{workers} worker(s) {path:<9} {rate:7.1f} samples/s | peak PSS per worker (MiB) "
                  f"{', '.join(f'{v:.0f}' for v in trainers)} | Ray Data processes "
                  f"{', '.join(f'{v:.0f}' for v in tasks[:4]) or '-'} | {time.time() - t0:.0f}s wall", flush=True)
    ray.shutdown()
    print(f"\n{len(refs)} training images ({args.size}), {args.stage}"
          f"{'' if args.stage == 'nucleus' else f' scale {args.scale:g}'}, {args.epochs} epochs, batch {args.batch_size}")
    print(f"{'workers':<8} {'ray-data/s':>11} {'in-memory/s':>12} {'ratio':>6} {'peak MiB/worker rd':>19} {'in-mem':>7}")
    for workers in (1, 2):
        rd, mem = (next(r for r in rows if r[0] == workers and r[1] == path) for path in ("ray-data", "in-memory"))
        print(f"{workers:<8} {rd[2]:11.1f} {mem[2]:12.1f} {rd[2] / mem[2]:6.2f} {max(rd[3], default=0):19.0f} "
              f"{max(mem[3], default=0):7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
