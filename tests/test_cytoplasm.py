"""Stage-2 crops and candidates at the network's resolution: the same as the two-step way where
no resizing happens, and as good where it does."""

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from segpc.config import AggregationConfig, CytoplasmConfig
from segpc.method.crops import crop_window, extract, fit_to_input
from segpc.method.cytoplasm import candidate_from_probability, crop_input


def _scene(h, w, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(1, 255, (h, w, 3), np.uint8)
    labels = np.zeros((h, w), np.int32)
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    cv2.ellipse(labels, (int(cx), int(cy)), (int(rng.integers(3, 12)), int(rng.integers(3, 12))), 0, 0, 360, 1, -1)
    return image, labels


def _two_step(image, labels, box, scale, size):
    window = crop_window(box, scale)
    stacked = np.concatenate([extract(image, window), (extract(labels, window) == 1)[..., None].astype(np.uint8) * 255], -1)
    return fit_to_input(stacked, size)[0]


@settings(max_examples=150, deadline=None)
@given(st.integers(40, 120), st.integers(40, 120), st.sampled_from([0.5, 1.75, 2.6, 3.0]), st.integers(0, 10**6))
def test_crop_in_one_step_equals_extract_then_fit_when_nothing_is_resized(h, w, scale, seed):
    image, labels = _scene(h, w, seed)
    ys, xs = np.nonzero(labels)
    if ys.size == 0:
        return
    box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    cfg = CytoplasmConfig(small_input=256, large_input=256)  # every window here fits
    crop = crop_input(image, labels, 1, box, scale, cfg)
    assert crop.fit.factor == 1.0
    np.testing.assert_array_equal(crop.pixels, _two_step(image, labels, box, scale, 256))


def test_crop_in_one_step_is_close_when_resized():
    image, labels = _scene(400, 500, 3)
    labels[:] = 0
    cv2.circle(labels, (250, 200), 40, 1, -1)
    box = (160, 210, 241, 291)
    cfg = CytoplasmConfig(small_input=64, large_input=96)
    crop = crop_input(image, labels, 1, box, 3.0, cfg)
    assert crop.fit.factor < 0.5
    diff = np.abs(crop.pixels.astype(int) - _two_step(image, labels, box, 3.0, 96).astype(int))
    assert diff[..., 3].mean() < 2 and diff[..., :3].mean() < 8  # area means of the same pixels


def test_candidate_at_the_networks_resolution_recovers_a_resized_cell():
    # a cell much larger than the network input: the truth, fitted as the network would see it,
    # comes back at the window's resolution with a smooth outline
    shape = (600, 800)
    nucleus = np.zeros(shape, np.int32)
    cv2.circle(nucleus, (400, 300), 30, 1, -1)
    cell = np.zeros(shape, np.uint8)
    cv2.ellipse(cell, (385, 305), (95, 70), 20, 0, 360, 1, -1)
    cell = cell.astype(bool) | (nucleus > 0)
    image = np.full(shape + (3,), 200, np.uint8)
    cfg, agg = CytoplasmConfig(small_input=64, large_input=96), AggregationConfig()
    crop = crop_input(image, nucleus, 1, (270, 370, 331, 431), 3.0, cfg)
    prob = fit_to_input(extract(cell.astype(np.float32), crop.window), crop.fit.size)[0]
    cand = candidate_from_probability(prob, crop, shape, cfg, agg)
    truth = extract(cell, crop.window)
    got = cand.window_mask()
    assert got.shape == truth.shape
    assert (got & truth).sum() / (got | truth).sum() > 0.97
    assert not (crop.nucleus & ~got).any()  # the nucleus is always part of its cell
    assert not cand.truncated and cand.score > 0.9
    assert abs(cand.ratio - (truth.sum() - crop.nucleus.sum()) / crop.nucleus.sum()) < 0.1
