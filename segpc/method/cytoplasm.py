"""Stage-2 inputs and outputs around one nucleus: the 4-channel crop and its cell candidate.

``crop_input`` builds what one scale's Attention DeepLabv3+ sees; ``candidate_from_probability``
turns its output back into a cell in image coordinates (METHOD.md sections 4-5). Both work at
the network's resolution and touch the crop window's full resolution once: the crop is cut
and fitted in one resize, and the cleaned-up cell is brought back in one resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from segpc.config import AggregationConfig, CytoplasmConfig
from segpc.method.aggregate import Candidate, truncation
from segpc.method.crops import (Box, Fit, clip_box, crop_window, cut_and_fit, extract, half_up,
                                input_size_for, plan_fit)
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
    return crop_from(image, (0, 0), extract(labels, window) == nucleus_id, window, scale,
                     image.shape[:2], cfg)


def crop_from(source: np.ndarray, origin: tuple[int, int], nucleus: np.ndarray, window: Box, scale: float,
              image_shape: tuple[int, int], cfg: CytoplasmConfig) -> CropInput:
    """The crop of ``window`` from ``source`` (image pixels from ``origin`` = (y, x) on, covering
    the window's in-image part), with ``nucleus`` (window-sized bool) as guidance."""
    size = input_size_for(scale, cfg.small_input, cfg.large_input, cfg.size_switch)
    fit = plan_fit(window[2] - window[0], window[3] - window[1], size)
    pixels = np.zeros((size, size, 4), np.uint8)
    cut_and_fit(source, origin, window, image_shape, pixels[..., :3], fit)
    guide = pixels[..., 3]
    cut_and_fit(nucleus.astype(np.uint8) * 255, window[:2], window, image_shape, guide, fit)
    return CropInput(pixels, window, fit, nucleus, scale)


def candidate_from_probability(prob: np.ndarray, crop: CropInput, image_shape: tuple[int, int],
                               cfg: CytoplasmConfig, agg: AggregationConfig) -> Candidate:
    """(S, S) cell probability -> the cell candidate in the crop window's coordinates.

    Published clean-up, at the network's resolution: threshold 0.48, 3x3 opening, fill holes,
    drop components under 10 px. Of the remaining components we keep the largest one that
    overlaps this nucleus (the published code keeps the largest outright, which can pick a
    neighbour's cell); the nucleus itself is always part of its cell. The cell is then brought
    to the window's resolution by resampling its pinned probability (as in stage 1), so its
    outline is as smooth as thresholding a full-resolution map.
    """
    fit = crop.fit
    inner = prob[fit.top:fit.top + fit.inner_h, fit.left:fit.left + fit.inner_w].astype(np.float32)
    y0, x0, y1, x1 = crop.window
    cy0, cx0, cy1, cx1 = clip_box(crop.window, image_shape)
    sy, sx = fit.inner_h / fit.h, fit.inner_w / fit.w
    inside = np.zeros(inner.shape, bool)  # the window's in-image part, where cut_and_fit put it
    inside[half_up((cy0 - y0) * sy):half_up((cy1 - y0) * sy), half_up((cx0 - x0) * sx):half_up((cx1 - x0) * sx)] = True
    guide = crop.pixels[fit.top:fit.top + fit.inner_h, fit.left:fit.left + fit.inner_w, 3] >= 128
    mask = clean_mask((inner >= cfg.threshold) & inside, cfg.min_area).astype(np.uint8)
    n, comps, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    cell_low = guide.copy()
    owners = np.unique(comps[guide & (comps > 0)]) if n > 1 else np.zeros(0, int)
    if owners.size:
        cell_low |= comps == owners[np.argmax(stats[owners, cv2.CC_STAT_AREA])]
    score = float(inner[cell_low].mean()) if cell_low.any() else 0.0
    if fit.factor == 1.0:
        cell = cell_low
    else:
        below = np.nextafter(np.float32(cfg.threshold), np.float32(0))
        pinned = np.where(cell_low, np.maximum(inner, cfg.threshold), np.minimum(inner, below))
        cell = cv2.resize(pinned.astype(np.float32), (fit.w, fit.h), interpolation=cv2.INTER_LINEAR) >= cfg.threshold
    in_image = np.zeros(cell.shape, bool)
    in_image[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = True
    cell = (cell | crop.nucleus) & in_image
    truncated, edge_fraction = truncation(cell, crop.window, image_shape, agg.touch_fraction)
    return Candidate(crop.scale, crop.window, cell, int(crop.nucleus.sum()), score, truncated,
                     edge_fraction)


def gather_inputs(crops: list[CropInput]) -> np.ndarray:
    """Stack crops of one scale into the (N, S, S, 4) uint8 batch the network runner takes."""
    if not crops:
        return np.zeros((0, 1, 1, 4), np.uint8)
    return np.stack([c.pixels for c in crops])
