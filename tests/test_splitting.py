"""Splitting touching nuclei by marker watershed, and the nucleus diameter it is scaled by."""

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from segpc.errors import InputError
from segpc.method.splitting import median_nucleus_diameter, split_nuclei

EIGHT = np.ones((3, 3), bool)


def discs(shape, circles, scale=1.0):
    """Bool mask of filled circles (x, y, r), all lengths multiplied by ``scale``."""
    m = np.zeros([round(s * scale) for s in shape], np.uint8)
    for x, y, r in circles:
        cv2.circle(m, (round(x * scale), round(y * scale)), round(r * scale), 1, -1)
    return m.astype(bool)


def assert_partition(mask, labels):
    """Every mask pixel labelled, labels 1..n consecutive, each label one 8-connected piece
    (so never spanning two components)."""
    assert labels.dtype == np.int32 and labels.shape == mask.shape
    np.testing.assert_array_equal(labels > 0, mask)
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))
    for k in range(1, labels.max() + 1):
        assert ndi.label(labels == k, structure=EIGHT)[1] == 1, k


def test_small_nucleus_beside_a_large_one_is_split():
    # radius 22 and 9, overlapping by 3 px: the small one's distance peak is below half of the
    # blob's largest distance, which is where a relative core threshold loses it
    mask = discs((80, 120), [(45, 40, 22), (73, 40, 9)])
    labels = split_nuclei(mask, diameter=30)
    assert_partition(mask, labels)
    assert labels.max() == 2
    big, small = labels[40, 45], labels[40, 76]
    assert big != small
    assert (labels == small).sum() == pytest.approx(np.pi * 9**2, rel=0.35)


def test_an_oval_nucleus_stays_one():
    oval = np.zeros((100, 140), np.uint8)
    cv2.ellipse(oval, (70, 50), (36, 16), 30, 0, 360, 1, -1)
    mask = oval.astype(bool)
    d = median_nucleus_diameter([mask])
    labels = split_nuclei(mask, d)
    assert labels.max() == 1 and (labels[mask] == 1).all()


@pytest.mark.parametrize("diameter", [20, 30, 70])
def test_elongated_nuclei_stay_one(diameter):
    # the ridge of a rod is flat, and bumpy where its outline is pixelated; that of a long
    # ellipse nearly flat: peaks spaced along it must not each become a nucleus
    c = 2 * diameter
    for length, width in ((1.0, 0.7), (2.0, 0.7), (2.5, 0.5)):
        for slope in (0.0, 0.25, 0.5, 1.0):
            m = np.zeros((4 * diameter, 4 * diameter), np.uint8)
            dx, dy = round(length * diameter / 2), round(length * diameter / 2 * slope)
            cv2.line(m, (c - dx, c - dy), (c + dx, c + dy), 1, round(width * diameter))
            assert split_nuclei(m.astype(bool), diameter).max() == 1, ("rod", length, width, slope)
    for aspect, angle in ((2.0, 0), (3.0, 35), (4.0, 80)):
        m = np.zeros((4 * diameter, 4 * diameter), np.uint8)
        axes = (round(diameter / 2 * aspect**0.5), round(diameter / 2 / aspect**0.5))
        cv2.ellipse(m, (c, c), axes, angle, 0, 360, 1, -1)
        assert split_nuclei(m.astype(bool), diameter).max() == 1, ("ellipse", aspect)


def test_three_in_a_row_give_three():
    mask = discs((70, 170), [(35, 35, 18), (67, 35, 17), (99, 35, 18)])  # overlapping neighbours
    assert ndi.label(mask, structure=EIGHT)[1] == 1
    labels = split_nuclei(mask, diameter=35)
    assert_partition(mask, labels)
    assert labels.max() == 3
    assert len({labels[35, 35], labels[35, 67], labels[35, 99]}) == 3


def test_components_are_never_merged_and_small_ones_kept():
    # a 3 px speck and a 2-px-wide bar next to a big blob: each stays its own nucleus,
    # whatever the markers of its large neighbour
    mask = discs((60, 80), [(25, 30, 20)])
    mask[28:31, 48:49] = True  # 3 px, 2 px from the disc's edge
    mask[5:55, 75:77] = True
    labels = split_nuclei(mask, diameter=40)
    assert_partition(mask, labels)
    assert labels.max() == 3


def test_same_rule_at_two_resolutions():
    circles = [(40, 40, 20), (74, 40, 16), (120, 44, 12), (139, 44, 10), (60, 100, 22), (150, 100, 15)]
    small = discs((130, 190), circles, scale=0.5)
    large = discs((130, 190), circles, scale=2.0)
    assert ndi.label(small, structure=EIGHT)[1] == ndi.label(large, structure=EIGHT)[1] == 4
    for mask, scale in ((small, 0.5), (large, 2.0)):
        labels = split_nuclei(mask, diameter=32 * scale)
        assert_partition(mask, labels)
        assert labels.max() == 6, scale


def test_empty_and_full_masks():
    assert not split_nuclei(np.zeros((20, 30), bool), 10).any()
    full = split_nuclei(np.ones((20, 30), bool), 10)  # no background: no distance peak at all
    assert (full == 1).all()


def test_bad_inputs_are_refused():
    with pytest.raises(InputError):
        split_nuclei(np.ones((4, 4, 3), bool), 10)
    with pytest.raises(InputError):
        split_nuclei(np.ones((4, 4), bool), 0)
    with pytest.raises(InputError):
        median_nucleus_diameter([np.zeros((5, 5), np.int32)])
    with pytest.raises(InputError):
        median_nucleus_diameter(np.zeros((5, 5), np.int32))  # a bare label map iterates rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 150), st.integers(0, 110), st.integers(2, 25)), min_size=1,
                max_size=12), st.floats(4, 60))
def test_any_mask_is_partitioned(circles, diameter):
    mask = discs((110, 150), circles)
    assert_partition(mask, split_nuclei(mask, diameter))


def test_diameter_of_discs_of_known_size():
    radii = [6, 9, 10, 12, 20]
    masks = [discs((60, 60), [(30, 30, r)]) for r in radii]
    assert median_nucleus_diameter(masks) == pytest.approx(20, abs=0.5)
    # a label map gives the same, and so does the label map resized by 2x
    lab = np.zeros((60, 300), np.int32)
    for k, m in enumerate(masks, 1):
        lab[:, 60 * (k - 1):60 * k][m] = k
    assert median_nucleus_diameter([lab]) == median_nucleus_diameter(masks)
    big = cv2.resize(lab, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    assert median_nucleus_diameter([big]) == pytest.approx(40, abs=1)
