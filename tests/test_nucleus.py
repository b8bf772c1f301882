"""Stage-1 post-processing: published clean-up and splitting of touching nuclei."""

import cv2
import numpy as np

from segpc.config import NucleusConfig
from segpc.method.nucleus import clean_mask, find_nuclei, nucleus_instances


def _disc(shape, centre, r):
    m = np.zeros(shape, np.uint8)
    cv2.circle(m, centre, r, 1, -1)
    return m.astype(bool)


def test_touching_round_nuclei_are_split_and_an_oval_is_not():
    a, b = _disc((120, 220), (50, 60), 20), _disc((120, 220), (87, 60), 18)
    oval = np.zeros((120, 220), np.uint8)
    cv2.ellipse(oval, (160, 60), (34, 13), 25, 0, 360, 1, -1)
    prob = (a | b | oval.astype(bool)).astype(np.float32)
    labels = nucleus_instances(prob, min_area=10, reference_pixels=prob.size, diameter=38)
    assert labels.max() == 3
    # each disc centre lands in a different label, most of each disc in its own label
    la, lb = labels[60, 50], labels[60, 87]
    assert la != lb and la > 0 and lb > 0
    assert (labels[a & ~b] == la).mean() > 0.9 and (labels[b & ~a] == lb).mean() > 0.9
    assert len(np.unique(labels[oval.astype(bool)])) == 1


def test_split_can_be_turned_off():
    prob = (_disc((100, 150), (50, 50), 20) | _disc((100, 150), (87, 50), 18)).astype(np.float32)
    assert nucleus_instances(prob, min_area=10, reference_pixels=prob.size, diameter=None).max() == 1


def test_clean_up_drops_small_blobs_and_fills_holes():
    m = _disc((100, 100), (50, 50), 20)
    m[48:52, 48:52] = False  # a hole
    m[5:8, 5:8] = True  # 9 px speck
    out = clean_mask(m, min_area=20)
    assert out[50, 50] and not out[6, 6]


def test_min_area_scales_with_image_size():
    # 80 px at 800x800 is 20 px at 400x400: a 25 px blob survives, a 12 px blob does not
    prob = np.zeros((400, 400), np.float32)
    prob[10:15, 10:15] = 1
    prob[100:103, 100:104] = 1
    labels = nucleus_instances(prob, threshold=0.5, min_area=80, reference_pixels=800 * 800)
    assert labels.max() == 1 and labels[12, 12] == 1


def test_threshold_is_inclusive_at_half():
    prob = np.zeros((64, 64), np.float32)
    prob[20:40, 20:40] = 0.5
    assert nucleus_instances(prob, min_area=1, reference_pixels=prob.size).max() == 1
    assert nucleus_instances(prob * 0.99, min_area=1, reference_pixels=prob.size).max() == 0


def _upsampled_truth(low: np.ndarray, shape, threshold=0.5) -> np.ndarray:
    """What cleaning a full-size map would start from: the map resized, then thresholded."""
    return cv2.resize(low, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR) >= threshold


def test_instances_found_at_the_networks_resolution_are_as_smooth_at_full_size():
    # a full-size image with three nuclei (two touching), seen by the network at 1/6.4
    shape = (1536, 2040)
    full = np.zeros(shape, np.float32)
    for centre, r in (((400, 500), 60), ((505, 500), 48), ((1500, 1100), 70)):
        cv2.circle(full, centre, r, 1.0, -1)
    low = cv2.resize(full, (320, 241), interpolation=cv2.INTER_AREA)
    cfg = NucleusConfig(min_area=80, min_area_at=800, diameter=16)
    nuclei = find_nuclei(low, shape, cfg)
    assert len(nuclei) == 3 and nuclei.shape == shape
    labels = nuclei.label_map()
    # never two nuclei on one pixel; each mask fits its box
    assert sum(m.sum() for m in nuclei.masks) == (labels > 0).sum()
    for (y0, x0, y1, x1), m in zip(nuclei.boxes, nuclei.masks):
        assert m.shape == (y1 - y0, x1 - x0) and m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
    # together they cover what thresholding the upsampled map covers, outline for outline
    smooth = _upsampled_truth(low, shape)
    iou = (smooth & (labels > 0)).sum() / (smooth | (labels > 0)).sum()
    assert iou > 0.99, iou
    # and each is the true disc it came from
    for centre, r in (((400, 500), 60), ((1500, 1100), 70)):
        disc = _disc(shape, centre, r)
        own = labels == labels[centre[1], centre[0]]
        assert (disc & own).sum() / (disc | own).sum() > 0.93
    assert all(0.9 < s <= 1.0 for s in nuclei.scores)


def test_a_filled_hole_stays_filled_at_full_size():
    low = np.zeros((60, 80), np.float32)
    cv2.circle(low, (40, 30), 12, 1.0, -1)
    low[28:33, 38:43] = 0.1  # a hole the clean-up fills
    nuclei = find_nuclei(low, (600, 800), NucleusConfig(min_area=1, min_area_at=80, diameter=24))
    assert len(nuclei) == 1
    y0, x0, _, _ = nuclei.boxes[0]
    assert nuclei.masks[0][300 - y0, 400 - x0]  # the hole's centre, at full size
