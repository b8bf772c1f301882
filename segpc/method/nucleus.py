"""Stage-1 post-processing: the U-Net's probability map to nucleus instances.

The published clean-up (threshold 0.5, 3x3 opening, fill holes, drop components under 80 px
at 800x800) runs, as published, at the network's own resolution; touching nuclei are then
split by a marker watershed scaled to the expected nucleus diameter (the published code lets
them become one cell; see segpc/method/splitting.py). Only the final instances are brought
to the image's full size, each in its own box: the probability is resampled there so that
outlines stay smooth, and no full-size float map is ever made. At camera size this is some
40 times less work than cleaning a full-resolution map, for the same instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from segpc.config import NucleusConfig
from segpc.errors import InputError
from segpc.method.crops import Box
from segpc.method.splitting import split_nuclei

_KERNEL3 = np.ones((3, 3), np.uint8)


def clean_mask(mask: np.ndarray, min_area: float, opening: bool = True) -> np.ndarray:
    """Opening, hole filling and removal of components smaller than ``min_area`` pixels."""
    m = mask.astype(np.uint8)
    if opening:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _KERNEL3)
    m = ndi.binary_fill_holes(m)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def nucleus_instances(prob: np.ndarray, threshold: float = 0.5, min_area: float = 80.0,
                      reference_pixels: int = 800 * 800, diameter: float | None = None,
                      map_pixels: int | None = None) -> np.ndarray:
    """Probability map (H, W) -> int32 labels 1..n (0 background), at the map's resolution.

    ``min_area`` is given at the reference resolution (800x800 in the paper) and scaled to
    this map's pixel count, so the same bundle behaves alike on both cameras. ``diameter``
    (the expected nucleus diameter in this map's pixels) splits touching nuclei with a marker
    watershed; None leaves them joined, as the published code does. ``map_pixels``: the pixel
    count the area is scaled by, when it is not the map's own (a whole-slide tile larger than a
    field, seen at the field's scale, keeps the field's rule).
    """
    if prob.ndim != 2:
        raise InputError(f"nucleus probability map must be 2-D, got shape {prob.shape}")
    scaled_min = min_area * (map_pixels or prob.size) / reference_pixels
    mask = clean_mask(prob >= threshold, scaled_min)
    if diameter is None:
        labels, _ = ndi.label(mask, structure=np.ones((3, 3), bool))
        return labels.astype(np.int32)
    labels = split_nuclei(mask, diameter)
    # A split can leave slivers; drop them by the same area rule.
    sizes = np.bincount(labels.ravel())
    small = sizes < scaled_min
    small[0] = False
    if small.any():
        labels[small[labels]] = 0
        _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(prob.shape).astype(np.int32)


@dataclass
class Nuclei:
    """Stage-1 result for one image: per nucleus its box in the image, its mask in that box,
    its area (full-size pixels) and its score (mean probability)."""

    shape: tuple[int, int]  # (H, W) of the image
    boxes: list[Box]
    masks: list[np.ndarray]  # bool, box-sized
    scores: list[float]

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def areas(self) -> list[int]:
        return [int(m.sum()) for m in self.masks]

    def in_window(self, i: int, window: Box) -> np.ndarray:
        """Nucleus ``i`` as a bool mask of ``window`` (zero where the window leaves it)."""
        wy0, wx0, wy1, wx1 = window
        y0, x0, y1, x1 = self.boxes[i]
        out = np.zeros((wy1 - wy0, wx1 - wx0), bool)
        oy0, ox0, oy1, ox1 = max(y0, wy0), max(x0, wx0), min(y1, wy1), min(x1, wx1)
        if oy1 > oy0 and ox1 > ox0:
            out[oy0 - wy0:oy1 - wy0, ox0 - wx0:ox1 - wx0] = self.masks[i][oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0]
        return out

    def centres(self) -> list[tuple[int, int]]:
        """Per nucleus (y, x): the floor of its pixels' centroid, in integers, so the same
        nucleus seen in two overlapping tiles has the same centre in slide pixels."""
        out = []
        for (y0, x0, _, _), m in zip(self.boxes, self.masks):
            rows, cols = np.nonzero(m)
            n = max(rows.size, 1)
            out.append(((int(rows.sum()) + n * y0) // n, (int(cols.sum()) + n * x0) // n))
        return out

    def centred_in(self, region: Box) -> "Nuclei":
        """The nuclei whose centre lies in ``region``: a whole-slide tile keeps the nuclei it
        owns (its core) before any crop is cut for them."""
        y0, x0, y1, x1 = region
        keep = [i for i, (y, x) in enumerate(self.centres()) if y0 <= y < y1 and x0 <= x < x1]
        return Nuclei(self.shape, [self.boxes[i] for i in keep], [self.masks[i] for i in keep],
                      [self.scores[i] for i in keep])

    def label_map(self) -> np.ndarray:
        """int32 (H, W): nucleus i is labelled i + 1 (for tests, training and pictures)."""
        out = np.zeros(self.shape, np.int32)
        for i, ((y0, x0, y1, x1), m) in enumerate(zip(self.boxes, self.masks)):
            out[y0:y1, x0:x1][m] = i + 1
        return out


def find_nuclei(prob: np.ndarray, shape: tuple[int, int], cfg: NucleusConfig,
                map_pixels: int | None = None) -> Nuclei:
    """Stage 1 after the network: instances on the U-Net's map (the image's part of its
    input, at the network's resolution), brought to the image's full (H, W).
    ``map_pixels``: see :func:`nucleus_instances`."""
    labels = nucleus_instances(prob, cfg.threshold, cfg.min_area, cfg.min_area_at ** 2,
                               cfg.diameter if cfg.split_touching else None, map_pixels)
    return to_full_size(prob, labels, shape, cfg.threshold)


def to_full_size(prob: np.ndarray, labels: np.ndarray, shape: tuple[int, int], threshold: float) -> Nuclei:
    """Instances found on ``prob`` (the U-Net's output over the image, at its own resolution)
    brought to the image's (H, W), each in its own box.

    Within a nucleus's box the probability is resampled bilinearly (as resizing the whole
    map would) after pinning it: at least ``threshold`` on the instance's own pixels (holes
    the clean-up filled stay filled), below it elsewhere (what the opening or the size rule
    removed stays removed, and a neighbour's pixels are not taken). Outlines come out as
    smooth as thresholding a full-size map; touching nuclei never overlap.
    """
    h, w = shape
    ph, pw = prob.shape
    sy, sx = ph / h, pw / w
    n = int(labels.max(initial=0))
    # one pixel of room around each instance, so its outline can move outwards by a sub-pixel
    grown = _grow(labels)
    boxes, masks, scores = [], [], []
    for i, sl in enumerate(ndi.find_objects(grown, max_label=n), start=1):
        own = labels[sl] == i
        scores.append(float(prob[sl][own].mean()) if own.any() else 0.0)
        # the full-size pixels whose centres fall inside this low-resolution box
        fy0, fy1 = _span(sl[0].start, sl[0].stop, sy, h)
        fx0, fx1 = _span(sl[1].start, sl[1].stop, sx, w)
        ys = ((np.arange(fy0, fy1) + 0.5) * sy - 0.5).astype(np.float32)
        xs = ((np.arange(fx0, fx1) + 0.5) * sx - 0.5).astype(np.float32)
        pinned = np.where(own, np.maximum(prob[sl], threshold),
                          np.minimum(prob[sl], np.nextafter(np.float32(threshold), np.float32(0))))
        # one replicated pixel of margin on every side, for bilinear sampling at the edges
        pinned = cv2.copyMakeBorder(pinned.astype(np.float32), 1, 1, 1, 1, cv2.BORDER_REPLICATE)
        map_x, map_y = np.meshgrid(xs - (sl[1].start - 1), ys - (sl[0].start - 1))
        up = cv2.remap(pinned, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        # a neighbour's side of the border is the neighbour's (nearest low-resolution owner)
        iy = np.clip(np.floor((np.arange(fy0, fy1) + 0.5) * sy).astype(int), 0, ph - 1)
        ix = np.clip(np.floor((np.arange(fx0, fx1) + 0.5) * sx).astype(int), 0, pw - 1)
        mask = (up >= threshold) & (grown[np.ix_(iy, ix)] == i)
        if not mask.any():  # a nucleus thinner than a full-size pixel's sampling: keep its core
            mask = labels[np.ix_(iy, ix)] == i
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            scores.pop()
            continue
        boxes.append((fy0 + int(rows[0]), fx0 + int(cols[0]), fy0 + int(rows[-1]) + 1, fx0 + int(cols[-1]) + 1))
        masks.append(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    return Nuclei((h, w), boxes, masks, scores)


def _grow(labels: np.ndarray) -> np.ndarray:
    """Each instance grown by one pixel into the background (8-neighbourhood), without
    overlaps: where two grow into the same pixel the larger label takes it."""
    grown = cv2.dilate(labels.astype(np.float32), _KERNEL3).astype(np.int32)
    grown[labels > 0] = labels[labels > 0]
    return grown


def _span(lo: int, hi: int, s: float, limit: int) -> tuple[int, int]:
    """Full-size indices whose centres map into low-resolution pixels [lo, hi)."""
    return max(0, int(np.floor(lo / s))), min(limit, int(np.ceil(hi / s)))

