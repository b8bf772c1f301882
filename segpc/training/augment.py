"""Per-sample augmentation of network inputs, with albumentations (on the CPU, in the
data-loading tasks, so the accelerator only trains).

A smear has no up or down, so any rotation and the flips; scale jitter for the spread of
cell sizes between patients and cameras; stain jitter (hue, saturation, per-channel gains,
gamma) for Jenner-Giemsa batches and scanners; mild blur for focus. The colour transforms
are multiplicative or hue-only, so the zero padding of a fitted input (and of a crop that
leaves the image) stays zero, as the networks see it at inference.
"""

from __future__ import annotations

from functools import cache

import albumentations as A
import cv2
import numpy as np


@cache
def transforms() -> A.Compose:
    """The pipeline (built once per process; random state from the OS, fresh every epoch)."""
    return A.Compose([
        A.SquareSymmetry(p=1.0),
        A.Affine(rotate=(-180, 180), scale=(0.9, 1.1), border_mode=cv2.BORDER_CONSTANT,
                 fill=0, fill_mask=0, p=0.8),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=20, val_shift_limit=0, p=0.8),
        A.MultiplicativeNoise(multiplier=(0.88, 1.12), per_channel=True, elementwise=False, p=0.8),
        A.RandomGamma(gamma_limit=(85, 115), p=0.5),
        A.GaussianBlur(sigma_limit=(0.2, 1.0), p=0.2),
    ])


def augment(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (S, S, 3 or 4) uint8 input and its (S, S) target, transformed together.

    A fourth channel (the guidance nucleus) moves with the geometry as a mask (nearest
    neighbour, so it stays binary and aligned with the target) and is kept out of the
    colour transforms.
    """
    if x.shape[-1] == 4:
        out = transforms()(image=np.ascontiguousarray(x[..., :3]), masks=[x[..., 3], y])
        guidance, target = out["masks"]
        return np.concatenate([out["image"], guidance[..., None]], -1), target
    out = transforms()(image=x, mask=y)
    return out["image"], out["mask"]
