"""What runs inside each Ray Train worker, and the bundle-validation task.

Only wiring: the worker streams its shard of the training dataset (built and augmented by
Ray Data tasks, see ``ray_jobs.train.training_dataset``), runs DDP steps, validates on rank 0
and reports with checkpoints. The model, the steps and the metrics are ``segpc`` functions.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from segpc.training.splits import SampleRef


def train_loop(c: dict) -> None:
    import ray.train
    import ray.train.torch

    from segpc.config import Config
    from segpc.evaluation.validation import validate_nucleus, validate_scale
    from segpc.models import build_cytoplasm_model, build_nucleus_model
    from segpc.models.runner import NetworkRunner, to_channels_last
    from segpc.training.checkpoint import load_checkpoint, save_checkpoint
    from segpc.training.data import load_sample
    from segpc.training.splits import cached
    from segpc.training.steps import lr_at, train_steps

    # the epoch lines below are the progress: no INFO line per report on the console
    # (Ray Train's own are filtered by its LoggingConfig; its report logger is not ray.train's)
    logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(c["threads"]))
    cfg = Config.from_dict(c["config"])
    scale = c["scale"]
    # the same start on every rank (and reproducible by a test); weights load here, in the
    # worker, from the URI: nothing model-sized travels from the driver
    torch.manual_seed(c["seed"])
    if c["stage"] == "nucleus":
        model = build_nucleus_model(cfg.nucleus, encoder_weights=c["encoder_weights"])
    else:
        model = build_cytoplasm_model(cfg.cytoplasm, encoder_weights=c["encoder_weights"])
    torch.manual_seed(c["seed"] + rank)
    device = ray.train.torch.get_device()
    model = model.to(device)
    if device.type == "cuda":
        to_channels_last(model)
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"])
    start, best_score, best_epoch, best_metrics, history = 0, -1.0, -1, {}, []
    best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state, best = load_checkpoint(d, model, opt)
        start = state["epoch"] + 1
        best_score, best_epoch, best_metrics = state["best_score"], state["best_epoch"], state["best_metrics"]
        history = state["history"]
        if rank == 0:
            print(f"[{c['name']}] resumed after epoch {state['epoch'] + 1}", flush=True)
    ddp = ray.train.torch.prepare_model(model) if world > 1 else model
    shard = ray.train.get_dataset_shard("train")
    # rank 0 validates on whole images, one at a time, from a local copy of the split
    val_refs = cached([SampleRef.from_json(r) for r in c["validation"]]) if rank == 0 else []
    for epoch in range(start, c["epochs"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, c["epochs"], c["lr"])
        rows: list[int] = []
        batches = shard.iter_torch_batches(batch_size=c["batch_size"], local_shuffle_buffer_size=4 * c["batch_size"],
                                           prefetch_batches=2, device="cpu")
        stats = _all_reduce(train_steps(ddp, opt, _pairs(batches, rows), device, amp=c["amp"]), world, device)
        shards = _gather(rows, world)
        metrics = {"epoch": epoch + 1, "loss": stats["loss"], "samples_per_s": stats["samples_per_s"],
                   "shard_rows": [len(r) for r in shards], "distinct_rows": len(set().union(*shards))}
        with tempfile.TemporaryDirectory() as tmp:
            report_ckpt = None
            if rank == 0:
                t0 = time.perf_counter()
                line = ""
                if val_refs:
                    runner = NetworkRunner(model, device, batch_size=32, amp=c["amp"])
                    samples = (load_sample(r) for r in val_refs)
                    if c["stage"] == "nucleus":
                        val_metrics = validate_nucleus(runner, samples, cfg)
                        score = val_metrics["f1"] or 0.0
                    else:
                        val_metrics = validate_scale(runner, samples, scale, cfg)
                        score = val_metrics["miou"] or 0.0
                    model.train()
                    val_metrics.pop("per_image", None)
                    metrics.update({f"val_{k}": v for k, v in val_metrics.items() if v is not None})
                    line = (f" val miou {val_metrics['miou'] or 0:.3f} f1 {val_metrics['f1'] or 0:.3f}"
                            f" ({time.perf_counter() - t0:.1f}s)")
                else:  # --final: nothing held out, the last epoch is the result
                    score = float(epoch)
                metrics["score"] = score
                if score > best_score:
                    best_score, best_epoch, best_metrics = score, epoch, metrics.copy()
                    best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                history.append(metrics)
                save_checkpoint(tmp, model, opt, {"epoch": epoch, "best_score": best_score,
                                                  "best_epoch": best_epoch, "best_metrics": best_metrics,
                                                  "history": history}, best)
                report_ckpt = ray.train.Checkpoint.from_directory(tmp)
                print(f"[{c['name']}] epoch {epoch + 1}/{c['epochs']} loss {stats['loss']:.4f}{line} "
                      f"| {stats['samples_per_s']:.1f} samples/s train, shards {metrics['shard_rows']}",
                      flush=True)
            ray.train.report(metrics, checkpoint=report_ckpt)
        if c.get("fail_after_epoch") == epoch + 1 and start == 0:
            raise RuntimeError(f"test fault hook: stopping after epoch {epoch + 1}")


def _pairs(batches, rows: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of each batch, noting the rows seen (for the shard check)."""
    for b in batches:
        rows.extend(b["row"].tolist())
        yield b["x"], b["y"]


def _gather(rows: list[int], world: int) -> list[list[int]]:
    """Every worker's rows of this epoch (small: one int per example)."""
    if world == 1:
        return [rows]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, rows)
    return out


def _all_reduce(stats: dict, world: int, device: torch.device) -> dict:
    """Loss averaged and throughput summed over the workers."""
    if world == 1:
        return stats
    import torch.distributed as dist

    t = torch.tensor([stats["loss"] * stats["samples"], stats["samples"], stats["samples_per_s"]],
                     dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {"loss": float(t[0] / max(t[1], 1)), "samples": int(t[1]), "samples_per_s": float(t[2])}


def evaluate_bundle_task(files: dict[str, bytes], validation: list[str], slides: dict[str, str],
                         data: str) -> tuple[dict, dict]:
    """Ray task: the bundle (as file bytes) scored on the validation split, rule by rule, and
    its rule around the true nuclei; then its aggregation calibrated on the same split
    (segpc.evaluation.calibration). Images are read one batch at a time."""
    from segpc.evaluation.calibration import calibrate
    from segpc.evaluation.validation import compare_rules
    from segpc.method.segmenter import Segmenter
    from segpc.training.data import load_sample

    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in files.items():
            Path(tmp, name).write_bytes(blob)
        segmenter = Segmenter.from_bundle(tmp)
    samples = lambda: (load_sample(SampleRef.from_json(r)) for r in validation)  # noqa: E731
    rules = compare_rules(segmenter, samples(), true_nuclei=True)
    _, calibration = calibrate(segmenter, samples(), slides=slides, data=f"{data} (validation split)")
    return rules, calibration
