"""Stage-1 post-processing: published clean-up and splitting of touching nuclei."""

import cv2
import numpy as np

from segpc.method.nucleus import clean_mask, nucleus_instances


def _disc(shape, centre, r):
    m = np.zeros(shape, np.uint8)
    cv2.circle(m, centre, r, 1, -1)
    return m.astype(bool)


def test_touching_round_nuclei_are_split_and_an_oval_is_not():
    a, b = _disc((120, 220), (50, 60), 20), _disc((120, 220), (87, 60), 18)
    oval = np.zeros((120, 220), np.uint8)
    cv2.ellipse(oval, (160, 60), (34, 13), 25, 0, 360, 1, -1)
    prob = (a | b | oval.astype(bool)).astype(np.float32)
    labels = nucleus_instances(prob, min_area=10, reference_pixels=prob.size)
    assert labels.max() == 3
    # each disc centre lands in a different label, most of each disc in its own label
    la, lb = labels[60, 50], labels[60, 87]
    assert la != lb and la > 0 and lb > 0
    assert (labels[a & ~b] == la).mean() > 0.9 and (labels[b & ~a] == lb).mean() > 0.9
    assert len(np.unique(labels[oval.astype(bool)])) == 1


def test_split_can_be_turned_off():
    prob = (_disc((100, 150), (50, 50), 20) | _disc((100, 150), (87, 50), 18)).astype(np.float32)
    assert nucleus_instances(prob, min_area=10, reference_pixels=prob.size, split=False).max() == 1


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
