"""Training samples of each stage, as uint8 arrays (no Ray in here).

Stage 1 learns nucleus probability on whole images fitted to the preset's input size;
stage 2 learns, per scale, the whole-cell mask on 4-channel crops built around the
ground-truth nuclei (METHOD.md sections 3-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from segpc.config import Config
from segpc.errors import InputError
from segpc.io.imaging import equalize
from segpc.io.segpc_format import Sample
from segpc.method.crops import extract, fit_to_input
from segpc.method.cytoplasm import CropInput, crop_input
from segpc.method.instances import Instance


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
