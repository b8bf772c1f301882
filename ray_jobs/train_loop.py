"""What runs inside each Ray Train worker, and the bundle-validation task.

Only wiring: data sharding by rank, DDP, reporting and checkpoints. The data, the step and
the metrics are ``segpc.training.steps`` / ``segpc.evaluation.validation`` functions.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def train_loop(c: dict) -> None:
    import ray.train
    import ray.train.torch

    from segpc.config import Config
    from segpc.models import build_cytoplasm_model, build_nucleus_model
    from segpc.models.runner import NetworkRunner, to_channels_last
    from segpc.training.splits import localize, training_data
    from segpc.evaluation.validation import validate_nucleus, validate_scale
    from segpc.training.checkpoint import load_checkpoint, save_checkpoint
    from segpc.training.data import cytoplasm_arrays, epoch_indices, nucleus_arrays
    from segpc.training.steps import lr_at, train_epoch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(c["threads"]))
    torch.manual_seed(c["seed"] + rank)
    cfg = Config.from_dict(c["config"])
    train, val = training_data(localize(c["data"]), c["val_fraction"])
    scale = c["scale"]
    if c["stage"] == "nucleus":
        arrays, model = nucleus_arrays(train, cfg.nucleus.input_size), build_nucleus_model(cfg.nucleus)
    else:
        arrays, model = cytoplasm_arrays(train, scale, cfg), build_cytoplasm_model(cfg.cytoplasm)
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
    gen = torch.Generator().manual_seed(c["seed"] * 1000 + rank)
    for epoch in range(start, c["epochs"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, c["epochs"], c["lr"])
        idx = epoch_indices(len(arrays), epoch, rank, world, c["seed"])
        stats = train_epoch(ddp, opt, arrays, idx, c["batch_size"], device, gen, amp=c["amp"])
        stats = _all_reduce(stats, world, device)
        metrics = {"epoch": epoch + 1, "loss": stats["loss"], "samples_per_s": stats["samples_per_s"]}
        with tempfile.TemporaryDirectory() as tmp:
            report_ckpt = None
            if rank == 0:
                runner = NetworkRunner(model, device, batch_size=32, amp=c["amp"])
                t0 = time.perf_counter()
                if c["stage"] == "nucleus":
                    val_metrics = validate_nucleus(runner, val, cfg)
                    score = val_metrics["f1"] or 0.0
                else:
                    val_metrics = validate_scale(runner, val, scale, cfg)
                    score = val_metrics["miou"] or 0.0
                model.train()
                val_metrics.pop("per_image", None)
                metrics.update({f"val_{k}": v for k, v in val_metrics.items() if v is not None})
                metrics["score"] = score
                if score > best_score:
                    best_score, best_epoch, best_metrics = score, epoch, metrics.copy()
                    best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                history.append(metrics)
                save_checkpoint(tmp, model, opt, {"epoch": epoch, "best_score": best_score,
                                                  "best_epoch": best_epoch, "best_metrics": best_metrics,
                                                  "history": history}, best)
                report_ckpt = ray.train.Checkpoint.from_directory(tmp)
                print(f"[{c['name']}] epoch {epoch + 1}/{c['epochs']} loss {stats['loss']:.4f} "
                      f"val miou {val_metrics['miou'] or 0:.3f} f1 {val_metrics['f1'] or 0:.3f} "
                      f"| {stats['samples_per_s']:.1f} samples/s train, "
                      f"val {time.perf_counter() - t0:.1f}s", flush=True)
            ray.train.report(metrics, checkpoint=report_ckpt)
        if c.get("fail_after_epoch") == epoch + 1 and start == 0:
            raise RuntimeError(f"test fault hook: stopping after epoch {epoch + 1}")


def _all_reduce(stats: dict, world: int, device: torch.device) -> dict:
    """Loss averaged and throughput summed over the workers."""
    if world == 1:
        return stats
    import torch.distributed as dist

    t = torch.tensor([stats["loss"] * stats["samples"], stats["samples"], stats["samples_per_s"]],
                     dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {"loss": float(t[0] / max(t[1], 1)), "samples": int(t[1]), "samples_per_s": float(t[2])}


def evaluate_bundle_task(files: dict[str, bytes], data: str, val_fraction: float) -> dict:
    """Ray task: the bundle (as file bytes) scored on the validation split, rule by rule."""
    from segpc.method.segmenter import Segmenter
    from segpc.training.splits import localize, training_data
    from segpc.evaluation.validation import compare_rules

    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in files.items():
            Path(tmp, name).write_bytes(blob)
        segmenter = Segmenter.from_bundle(tmp)
    _, val = training_data(localize(data), val_fraction)
    return compare_rules(segmenter, val)
