"""One training epoch and the learning-rate schedule (no Ray in here)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segpc.training.augment import augment
from segpc.training.data import Arrays


def to_tensors(arrays: Arrays, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(arrays.x[idx]).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.from_numpy(arrays.y[idx].astype(np.float32))[:, None]
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, arrays: Arrays, idx: np.ndarray,
                batch_size: int, device: torch.device, gen: torch.Generator,
                amp: bool = False) -> dict:
    """One pass over ``idx``: BCE on logits, Adam step; returns loss and samples/s."""
    model.train()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(enabled=amp and dtype == torch.float16)
    total, seen, t0 = 0.0, 0, time.perf_counter()
    for i in range(0, len(idx), batch_size):
        batch = idx[i:i + batch_size]
        if len(batch) < 2:  # BatchNorm needs two samples
            continue
        x, y = augment(*to_tensors(arrays, batch, device), gen)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total += float(loss.detach()) * len(batch)
        seen += len(batch)
    dt = time.perf_counter() - t0
    return {"loss": total / max(seen, 1), "samples": seen, "samples_per_s": seen / max(dt, 1e-9)}


def lr_at(epoch: int, epochs: int, base: float) -> float:
    """Cosine decay to 5% of the base rate: stable late epochs on small data."""
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1))))
