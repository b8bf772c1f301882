"""Splitting touching nuclei in a binary nucleus mask: marker-controlled watershed.

Markers are the peaks of the (lightly smoothed) distance transform that stand apart from
higher ones in distance and in height. Every length is given in units of the expected
nucleus diameter, so one rule serves the network's resolution (800x800, 320x320) and full
image size alike. Unlike a core threshold relative to the blob's largest distance, this
keeps the low peak of a small nucleus pressed against a large one.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from segpc.errors import InputError

_EIGHT = np.ones((3, 3), bool)


def split_nuclei(mask: np.ndarray, diameter: float, spacing: float = 0.35, smoothing: float = 0.05,
                 h: float = 0.02) -> np.ndarray:
    """Bool (H, W) nucleus mask -> int32 labels 1..n (0 background), touching nuclei split.

    ``diameter`` is the expected nucleus diameter in pixels of this mask; the other lengths
    are fractions of it. The distance transform is smoothed by a Gaussian of sigma
    ``smoothing``, which removes the ridge ties of a pixelated outline (each would become a
    nucleus). A marker is a peak at least ``spacing`` from any higher one that also rises
    ``h`` above the lowest point of the best path to it (its dynamic), so the flat or gently
    wavy ridge of an elongated nucleus stays one marker. Each 8-connected component is
    split on its own: components are never merged, and every mask pixel gets a label.

    Limits: a small nucleus pressed deep into a large one leaves no peak of its own (no
    distance-transform split can find it); below about 20 px of diameter the pixelated ridge
    of a straight, rod-like nucleus can be cut.
    """
    if mask.ndim != 2:
        raise InputError(f"nucleus mask must be 2-D, got shape {mask.shape}")
    if not diameter > 0:
        raise InputError(f"expected nucleus diameter must be > 0 pixels, got {diameter}")
    components, _ = ndi.label(mask.astype(bool), structure=_EIGHT)
    sigma, min_distance = smoothing * diameter, max(1, round(spacing * diameter))
    pad = int(np.ceil(3 * sigma)) + 1  # background around the blob, so the blur sees its edge
    labels = np.zeros(mask.shape, np.int32)
    n = 0
    # One crop per component: whole-image distance transform, blur and watershed cost several
    # times more, and a component's neighbours must not shift its peaks anyway.
    for i, box in enumerate(ndi.find_objects(components), 1):
        window = tuple(slice(max(s.start - pad, 0), s.stop + pad) for s in box)
        blob = components[window] == i
        dist = cv2.distanceTransform(blob.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        if sigma > 0:
            dist = cv2.GaussianBlur(dist, (0, 0), sigma)
        peaks = peak_local_max(dist, min_distance=min_distance, labels=blob.astype(np.int32),
                               exclude_border=False)
        group = _merge_shallow(dist, blob, peaks, h * diameter)
        n_nuclei = len(np.unique(group))
        if n_nuclei < 2:  # one nucleus (no peak at all: a blob that fills its crop)
            n += 1
            labels[window][blob] = n
            continue
        markers = np.zeros(blob.shape, np.int32)
        markers[tuple(peaks.T)] = n + 1 + np.unique(group, return_inverse=True)[1]
        split = watershed(-dist, markers, connectivity=2, mask=blob)
        labels[window][blob] = split[blob]
        n += n_nuclei
    return labels


def _merge_shallow(dist: np.ndarray, blob: np.ndarray, peaks: np.ndarray, h: float) -> np.ndarray:
    """Group number per peak: a peak joins the highest higher peak that it reaches without
    dropping more than ``h`` below itself (its dynamic is under h), as on a plateau or along
    the bumpy ridge of an elongated nucleus. One labelling per peak; a blob holds a handful."""
    heights = dist[tuple(peaks.T)]
    order = np.argsort(-heights, kind="stable")
    group = np.arange(len(peaks))
    for rank in range(1, len(order)):
        j, higher = order[rank], order[:rank]
        above, _ = ndi.label(blob & (dist >= heights[j] - h), structure=_EIGHT)
        joined = higher[above[tuple(peaks[higher].T)] == above[tuple(peaks[j])]]
        if joined.size:
            group[j] = group[joined[0]]
    return group


def median_nucleus_diameter(masks: Iterable[np.ndarray]) -> float:
    """Median equivalent diameter (pixels) of labelled nuclei: what ``split_nuclei`` expects.

    Each item is a bool mask of one nucleus or an integer label map (0 background, one
    label per nucleus). Record it at the resolution the splitter will run at: resizing by
    (sx, sy) scales it by sqrt(sx * sy).
    """
    areas = []
    for m in masks:
        if m.ndim != 2:
            raise InputError(f"nucleus masks must be 2-D, got shape {m.shape}")
        if m.dtype == bool:
            areas.append(np.count_nonzero(m))
        else:
            counts = np.bincount(m.ravel().astype(np.int64))[1:]
            areas.extend(counts[counts > 0])
    areas = np.asarray(areas, float)
    areas = areas[areas > 0]
    if not areas.size:
        raise InputError("no labelled nucleus to estimate the nucleus diameter from")
    return float(np.median(2 * np.sqrt(areas / np.pi)))
