"""Guidance jitter: train the cytoplasm networks on nuclei that look like the U-Net's.

At inference the guidance channel (and the crop window, from its box) comes from the
nucleus U-Net, whose nuclei are a few pixels fatter or thinner than the truth, off by a
pixel or two, now and then missing a bite or fused with a touching neighbour. A network
trained only on clean true nuclei never sees that (arXiv 2105.06238 section 3.4 trained on
the U-Net's own matched nuclei for this reason). These perturbations are applied to the true
nucleus afresh every epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from segpc.method.crops import Box, box_or_none


@dataclass(frozen=True)
class GuidanceJitter:
    """Perturbation sizes, as fractions of the nucleus size d (the longer side of its box)."""

    p_true: float = 0.3  # share of examples that keep the true nucleus
    morph: float = 0.08  # dilation / erosion radius, up to morph * d
    shift: float = 0.06  # offset in each axis, up to shift * d
    p_hole: float = 0.2  # a missing part: a disc of radius up to hole * d cut from the rim
    hole: float = 0.25
    p_merge: float = 0.2  # fragments of other nuclei within merge * d fused on
    merge: float = 0.15
    margin: float = 0.2  # the guidance never leaves the true box grown by margin * d + 2 px

    def margin_px(self, box: Box) -> int:
        """How far (pixels) a perturbed nucleus may reach beyond the true box: the context
        a training crop is cut from is sized so every such nucleus's window fits in it."""
        return math.ceil(self.margin * max(box[2] - box[0], box[3] - box[1])) + 2


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component: an inference nucleus is one instance."""
    comps, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    return comps == np.argmax(np.bincount(comps.ravel())[1:]) + 1


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def jitter_guidance(own: np.ndarray, others: np.ndarray, allowed: Box, rng: np.random.Generator,
                    j: GuidanceJitter) -> np.ndarray:
    """A perturbed copy of the true nucleus ``own`` (bool, context-sized): dilated or eroded,
    bitten, fused with nearby fragments of ``others``, shifted; always one non-empty
    component inside ``allowed``. Falls back to ``own`` when a perturbation would erase it."""
    box = box_or_none(own)
    if box is None or rng.random() < j.p_true:
        return own
    d = max(box[2] - box[0], box[3] - box[1])
    area = int(own.sum())
    g = own.view(np.uint8)
    r = round(rng.uniform(-j.morph, j.morph) * d)
    if r > 0:
        g = cv2.dilate(g, _disk(r))
    elif r < 0:
        eroded = cv2.erode(g, _disk(-r))
        g = eroded if eroded.sum() >= 0.3 * area else g
    g = g > 0
    if rng.random() < j.p_hole:
        ys, xs = np.nonzero(g)
        k = rng.integers(len(ys))
        rad = rng.uniform(0.1, j.hole) * d
        yy, xx = np.ogrid[:g.shape[0], :g.shape[1]]
        bitten = g & ((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2 > rad ** 2)
        g = bitten if bitten.sum() >= 0.5 * g.sum() else g
    if rng.random() < j.p_merge and others.any():
        reach = max(1, round(j.merge * d))
        near = others & (cv2.dilate(g.view(np.uint8), _disk(reach)) > 0)
        if near.any():  # fused as a U-Net fuses touching nuclei: the gap closed
            g = cv2.morphologyEx((g | near).view(np.uint8), cv2.MORPH_CLOSE, _disk(reach)) > 0
    s = round(j.shift * d)
    if s:
        dy, dx = (int(v) for v in rng.integers(-s, s + 1, 2))
        g = _shifted(g, dy, dx)
    y0, x0, y1, x1 = allowed
    inside = np.zeros_like(g)
    inside[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    g = _largest(g & inside)
    return g if g.any() else own
