"""Training steps over batches of uint8 examples, and the learning-rate schedule (no Ray in here).

Examples travel as uint8 NHWC (4x smaller than float) and become float NCHW on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segpc.training.augment import augment, transforms
from segpc.training.data import Arrays


def to_inputs(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, S, S, C) inputs and (N, S, S) targets -> float (N, C, S, S) in [0, 1] and
    (N, 1, S, S) on ``device``; channels_last on CUDA."""
    if device.type == "cuda" and x.device.type == "cpu":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y[:, None].float()


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                device: torch.device, amp: bool = False) -> dict:
    """One pass over ``batches`` of uint8 (x, y): BCE on logits, Adam step; loss and samples/s.

    A batch of one is skipped (BatchNorm needs two); data-parallel workers get equal shards,
    so they skip the same step and stay in lockstep.
    """
    model.train()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(enabled=amp and dtype == torch.float16)
    total, seen, t0 = 0.0, 0, time.perf_counter()
    for xb, yb in batches:
        if len(xb) < 2:
            continue
        x, y = to_inputs(xb, yb, device)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total += float(loss.detach()) * len(xb)
        seen += len(xb)
    dt = time.perf_counter() - t0
    return {"loss": total / max(seen, 1), "samples": seen, "samples_per_s": seen / max(dt, 1e-9)}


def array_batches(arrays: Arrays, idx: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory examples ``idx`` in batches, each sample augmented on the way."""
    for i in range(0, len(idx), batch_size):
        pairs = [augment(arrays.x[j], arrays.y[j]) for j in idx[i:i + batch_size]]
        yield (torch.from_numpy(np.stack([p[0] for p in pairs])),
               torch.from_numpy(np.stack([p[1] for p in pairs])))


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, arrays: Arrays, idx: np.ndarray,
                batch_size: int, device: torch.device, gen: torch.Generator, amp: bool = False) -> dict:
    """One in-process epoch over in-memory ``arrays`` (no Ray: quick test bundles, the GPU
    check); ``gen`` seeds the augmentation, so a run is repeatable."""
    transforms().set_random_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    return train_steps(model, opt, array_batches(arrays, idx, batch_size), device, amp)


def lr_at(epoch: int, epochs: int, base: float) -> float:
    """Cosine decay to 5% of the base rate: stable late epochs on small data."""
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1))))
