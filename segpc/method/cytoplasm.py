"""Stage-2 inputs and outputs around one nucleus: the 4-channel crop and its cell candidate.

``crop_input`` builds what one scale's Attention DeepLabv3+ sees; ``candidate_from_probability``
turns its output back into a cell in image coordinates (METHOD.md sections 4-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from segpc.method.aggregate import Candidate, truncation
from segpc.config import AggregationConfig, CytoplasmConfig
from segpc.method.crops import Box, Fit, clip_box, crop_window, extract, fit_to_input, input_size_for, unfit
from segpc.method.nucleus import clean_mask


@dataclass
class CropInput:
    """One nucleus at one scale: uint8 (S, S, 4) pixels (RGB + nucleus*255) and their geometry."""

    pixels: np.ndarray
    window: Box
    fit: Fit
    nucleus: np.ndarray  # bool, window-sized: this instance's nucleus only
    scale: float


def crop_input(image: np.ndarray, labels: np.ndarray, nucleus_id: int, box: Box, scale: float,
               cfg: CytoplasmConfig) -> CropInput:
    """Crop RGB and this nucleus's mask around ``box`` at ``scale`` and fit to the scale's input.

    The guidance channel holds only this instance's nucleus, so the network segments the cell
    that owns it, not its neighbours.
    """
    window = crop_window(box, scale)
    nucleus = extract(labels, window) == nucleus_id
    stacked = np.concatenate([extract(image, window), nucleus[..., None].astype(np.uint8) * 255], -1)
    size = input_size_for(scale, cfg.small_input, cfg.large_input, cfg.size_switch)
    pixels, fit = fit_to_input(stacked, size)
    return CropInput(pixels, window, fit, nucleus, scale)


def candidate_from_probability(prob: np.ndarray, crop: CropInput, image_shape: tuple[int, int],
                               cfg: CytoplasmConfig, agg: AggregationConfig) -> Candidate:
    """(S, S) cell probability -> the cell candidate in the crop window's coordinates.

    Published clean-up: threshold 0.48, 3x3 opening, fill holes, drop components under 10 px.
    Of the remaining components we keep the largest one that overlaps this nucleus (the
    published code keeps the largest outright, which can pick a neighbour's cell); the
    nucleus itself is always part of its cell.
    """
    full = unfit(prob.astype(np.float32), crop.fit)
    y0, x0, y1, x1 = crop.window
    cy0, cx0, cy1, cx1 = clip_box(crop.window, image_shape)
    inside = np.zeros(full.shape, bool)
    inside[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = True
    min_area = cfg.min_area / (crop.fit.factor ** 2)
    mask = clean_mask((full >= cfg.threshold) & inside, min_area)
    comps, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    cell = crop.nucleus.copy()
    if n:
        sizes = np.bincount(comps.ravel(), minlength=n + 1)
        owners = np.unique(comps[crop.nucleus & (comps > 0)])
        if owners.size:
            cell |= comps == owners[np.argmax(sizes[owners])]
    score = float(full[cell].mean()) if cell.any() else 0.0
    truncated, edge_fraction = truncation(cell, crop.window, image_shape, agg.touch_fraction)
    return Candidate(crop.scale, crop.window, cell, int(crop.nucleus.sum()), score, truncated,
                     edge_fraction)


def gather_inputs(crops: list[CropInput]) -> np.ndarray:
    """Stack crops of one scale into the (N, 4, S, S) float32 batch the network takes."""
    if not crops:
        return np.zeros((0, 4, 1, 1), np.float32)
    arr = np.stack([c.pixels for c in crops]).astype(np.float32) / 255.0
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
