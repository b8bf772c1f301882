"""The training-data stages as batch callables (dict of numpy columns in, dict out), in
the style of Ray's batch inference: ``ray_jobs.train`` runs them as Ray Data tasks, tests
call them directly. No Ray in here.

    refs ──decode──> examples (stage 1) / cell contexts (stage 2)   materialised once
         ──per epoch──> guidance jitter, crop_input, augmentation   re-run every epoch

Every output row carries ``row``, a stable id of its example (image index for stage 1,
``image index << 16 | cell index`` for stage 2), so shards can be checked for overlap.
"""

from __future__ import annotations

import numpy as np

from segpc.config import Config, StainConfig
from segpc.training.augment import augment
from segpc.training.data import (CellContext, cell_contexts, cell_example, load_sample, nucleus_example,
                                 nucleus_measures)
from segpc.training.guidance import GuidanceJitter
from segpc.training.splits import SampleRef

CELL_BITS = 16  # cells per image < 65536


def ref_rows(refs: list[SampleRef]) -> list[dict]:
    """One row per image: its position and its reference as JSON (Arrow-friendly)."""
    return [{"index": i, "ref": r.to_json()} for i, r in enumerate(refs)]


def _refs(batch: dict) -> list[tuple[int, SampleRef]]:
    return [(int(i), SampleRef.from_json(text)) for i, text in zip(batch["index"], batch["ref"])]


def decodes(batch: dict) -> dict:
    """Read and decode each image and its masks, keeping nothing: the check of a split that
    is only read later (validation, image by image on one worker)."""
    for _, ref in _refs(batch):
        load_sample(ref)
    return {"index": batch["index"]}


class NucleusDiameters:
    """Image refs -> one row per labelled nucleus, its diameter ``d`` at the U-Net's input
    (``h = w = 0``), and one row per image, its shape ``h, w`` (``d`` NaN): the bundle records
    the typical training field, the tile size of whole slides."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict) -> dict:
        d, h, w = [np.zeros(0)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for _, ref in _refs(batch):
            diameters, shape = nucleus_measures(ref, self.size)
            d += [diameters, np.array([np.nan] if shape else [])]
            h += [np.zeros(len(diameters), np.int64), np.array([shape[0]] if shape else [], np.int64)]
            w += [np.zeros(len(diameters), np.int64), np.array([shape[1]] if shape else [], np.int64)]
        return {"d": np.concatenate(d), "h": np.concatenate(h), "w": np.concatenate(w)}


class NucleusExamples:
    """Stage 1, decode: image refs -> fitted image ``x`` (S, S, 3) and nuclei ``y`` (S, S);
    the image in the reference ``stain`` if there is one."""

    def __init__(self, size: int, stain: StainConfig | None = None):
        self.size, self.stain = size, stain

    def __call__(self, batch: dict) -> dict:
        rows, xs, ys = [], [], []
        for i, ref in _refs(batch):
            x, y = nucleus_example(load_sample(ref), self.size, self.stain)
            rows.append(i)
            xs.append(x)
            ys.append(y)
        return {"row": np.array(rows, np.int64), "x": np.stack(xs), "y": np.stack(ys)}


class CellContexts:
    """Stage 2, decode: image refs -> one context per labelled cell (variable sizes)."""

    def __init__(self, scale: float, config: Config, jitter: GuidanceJitter):
        self.scale, self.config, self.jitter = scale, config, jitter

    def __call__(self, batch: dict) -> dict:
        rows, rgb, planes, allowed = [], [], [], []
        for i, ref in _refs(batch):
            for c, ctx in enumerate(cell_contexts(load_sample(ref), self.scale, self.config, self.jitter)):
                rows.append(i << CELL_BITS | c)
                rgb.append(ctx.rgb)
                planes.append(ctx.planes)
                allowed.append(ctx.allowed)
        return {"row": np.array(rows, np.int64), "rgb": _ragged(rgb), "planes": _ragged(planes),
                "allowed": np.array(allowed, np.int64).reshape(-1, 4)}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), object)
    out[:] = arrays
    return out


def augment_examples(batch: dict) -> dict:
    """Stage 1, every epoch: augmentation of each (x, y)."""
    pairs = [augment(x, y) for x, y in zip(batch["x"], batch["y"])]
    return {"row": batch["row"], "x": np.stack([p[0] for p in pairs]), "y": np.stack([p[1] for p in pairs])}


class CellCrops:
    """Stage 2, every epoch: a perturbed guidance nucleus, its crop (``crop_input``) and target,
    then augmentation; (S, S, 4) ``x`` and (S, S) ``y`` uint8."""

    def __init__(self, scale: float, config: Config, jitter: GuidanceJitter | None):
        self.scale, self.config, self.jitter = scale, config, jitter

    def __call__(self, batch: dict) -> dict:
        rng = np.random.default_rng()
        xs, ys = [], []
        for rgb, planes, allowed in zip(batch["rgb"], batch["planes"], batch["allowed"]):
            ctx = CellContext(rgb, planes, tuple(int(v) for v in allowed))
            x, y = augment(*cell_example(ctx, self.scale, self.config, rng, self.jitter))
            xs.append(x)
            ys.append(y)
        return {"row": batch["row"], "x": np.stack(xs), "y": np.stack(ys)}
