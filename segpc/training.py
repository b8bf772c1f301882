"""Training data and per-step logic shared by the Ray Train loops (no Ray in here).

Stage 1 learns nucleus probability on whole images fitted to the preset's input size;
stage 2 learns, per scale, the whole-cell mask on 4-channel crops built around the
ground-truth nuclei (METHOD.md sections 3-5). Arrays are kept as uint8 in memory and
augmented on the fly in torch, so an epoch costs only the forward and backward passes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from safetensors.torch import load_file, save_file
from torch import nn

from segpc.config import Config
from segpc.crops import extract, fit_to_input, paste
from segpc.cytoplasm import CropInput, candidate_from_probability, crop_input, gather_inputs
from segpc.errors import InputError
from segpc.imaging import equalize
from segpc.instances import Instance
from segpc.metrics import evaluate
from segpc.segmenter import find_nuclei, nucleus_probabilities
from segpc.segpc_format import Sample


@dataclass
class Arrays:
    """Inputs (N, S, S, C) uint8 and targets (N, S, S) uint8 {0, 1} of one stage."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def nucleus_labels(sample: Sample) -> np.ndarray:
    """Ground-truth nuclei as a label map (instance i -> i + 1)."""
    h, w = sample.image.shape[:2]
    labels = np.zeros((h, w), np.int32)
    for i, inst in enumerate(sample.instances):
        labels[inst.nucleus & (labels == 0)] = i + 1
    return labels


def nucleus_arrays(samples: list[Sample], size: int) -> Arrays:
    """Whole images and the union of their nuclei, fitted like the segmenter fits them."""
    xs, ys = [], []
    for s in samples:
        union = np.zeros(s.image.shape[:2], np.uint8)
        for inst in s.instances:
            union[inst.nucleus] = 1
        xs.append(fit_to_input(s.image, size)[0])
        ys.append(fit_to_input(union, size, cv2.INTER_NEAREST)[0])
    if not xs:
        raise InputError("nucleus training: no images")
    return Arrays(np.stack(xs), np.stack(ys))


def true_nucleus_crops(sample: Sample, scale: float, config: Config) -> list[tuple[Instance, CropInput]]:
    """Each labelled cell with its crop at ``scale``, built around its true nucleus."""
    image = equalize(sample.image) if config.cytoplasm.equalize else sample.image
    labels = nucleus_labels(sample)
    boxes = ndi.find_objects(labels, max_label=len(sample.instances))
    return [(inst, crop_input(image, labels, i + 1, (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop),
                              scale, config.cytoplasm))
            for i, (inst, sl) in enumerate(zip(sample.instances, boxes)) if sl is not None]


def cytoplasm_arrays(samples: list[Sample], scale: float, config: Config) -> Arrays:
    """One crop per labelled cell at ``scale``; target = the whole cell, fitted alike."""
    xs, ys = [], []
    for s in samples:
        for inst, crop in true_nucleus_crops(s, scale, config):
            target = extract(inst.cell.astype(np.uint8), crop.window)
            xs.append(crop.pixels)
            ys.append(fit_to_input(target, crop.fit.size, cv2.INTER_NEAREST)[0])
    if not xs:
        raise InputError(f"cytoplasm training at scale {scale}: no labelled cells")
    return Arrays(np.stack(xs), np.stack(ys))


def epoch_indices(n: int, epoch: int, rank: int, world: int, seed: int = 0) -> np.ndarray:
    """This worker's share of one epoch: a fresh permutation, split without overlap.

    Every worker gets the same count (DDP steps in lockstep); the n % world samples left
    over differ from epoch to epoch, so none is left out for good.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per = n // world
    if per == 0:
        raise InputError(f"{n} training samples cannot be shared by {world} workers")
    return order[rank * per:(rank + 1) * per]


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stain- and orientation-invariances of a smear: flips, 90-degree turns, +-10% zoom,
    and per-image colour jitter of the RGB channels (brightness, contrast, channel gains)."""
    b = x.shape[0]
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(dev)

    k = int(torch.randint(0, 4, (1,), generator=gen))
    x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (2, 3))
    flip = rand(b) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    y = torch.where(flip[:, None, None, None], y.flip(3), y)
    zoom = 1.0 + (rand(b) - 0.5) * 0.2
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    rgb = x[:, :3]
    gain = 1.0 + (rand(b, 3, 1, 1) - 0.5) * 0.2
    bright = (rand(b, 1, 1, 1) - 0.5) * 0.16
    contrast = 1.0 + (rand(b, 1, 1, 1) - 0.5) * 0.3
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    rgb = ((rgb - mean) * contrast + mean) * gain + bright
    return torch.cat([rgb.clamp(0, 1), x[:, 3:]], 1), y


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


def validate_nucleus(predict: Callable[[np.ndarray], np.ndarray], samples: list[Sample],
                     config: Config) -> dict:
    """Nucleus instances (with the full post-processing) against the true nuclei."""
    truth, pred = {}, {}
    for s in samples:
        prob = nucleus_probabilities([s.image], predict, config.nucleus.input_size)[0]
        nuclei = find_nuclei(prob, config)
        truth[s.image_id] = [inst.nucleus for inst in s.instances]
        pred[s.image_id] = [nuclei.labels == i + 1 for i in range(len(nuclei))]
    return evaluate(truth, pred)


def validate_scale(predict: Callable[[np.ndarray], np.ndarray], samples: list[Sample],
                   scale: float, config: Config) -> dict:
    """One scale alone, on crops around the true nuclei: its cells against the true cells."""
    truth, pred = {}, {}
    for s in samples:
        crops = [crop for _, crop in true_nucleus_crops(s, scale, config)]
        probs = predict(gather_inputs(crops)) if crops else []
        shape = s.image.shape[:2]
        pred[s.image_id] = [
            paste(candidate_from_probability(prob, crop, shape, config.cytoplasm, config.aggregation).cell,
                  crop.window, shape) for crop, prob in zip(crops, probs)]
        truth[s.image_id] = [inst.cell for inst in s.instances]
    return evaluate(truth, pred)


# ------------------------------------------------------------------ checkpoint state
# Checkpoints hold no pickles either: tensors in safetensors, the rest in JSON.


def save_checkpoint(folder: str | Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict,
                    best: dict[str, torch.Tensor]) -> None:
    """Latest training state (model, optimizer, epoch, metrics) and the best weights so far."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(model.state_dict()), str(folder / "model.safetensors"))
    save_file(_cpu(best), str(folder / "best.safetensors"))
    osd = opt.state_dict()
    tensors = {f"{pid}.{key}": v for pid, st in osd["state"].items() for key, v in st.items()
               if torch.is_tensor(v)}
    save_file(_cpu(tensors), str(folder / "optimizer.safetensors"))
    (folder / "state.json").write_text(json.dumps({**state, "param_groups": osd["param_groups"]}))


def load_checkpoint(folder: str | Path, model: nn.Module,
                    opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model and optimizer in place; returns (state, best weights)."""
    folder = Path(folder)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = json.loads((folder / "state.json").read_text())
    per: dict[int, dict] = {}
    for name, v in load_file(str(folder / "optimizer.safetensors")).items():
        pid, key = name.split(".", 1)
        per.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": per, "param_groups": state.pop("param_groups")})
    return state, load_file(str(folder / "best.safetensors"))


def load_best(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(best weights, state) of a checkpoint, for the bundle."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    state.pop("param_groups", None)
    return load_file(str(folder / "best.safetensors")), state


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def lr_at(epoch: int, epochs: int, base: float) -> float:
    """Cosine decay to 5% of the base rate: stable late epochs on small data."""
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1))))

