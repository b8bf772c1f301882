"""Crop geometry: paste(extract(x)) recovers the in-image window, at every scale and border."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpc.config import PAPER_SCALES
from segpc.method.crops import (clip_box, crop_window, extract, fit_to_input, half_up, input_size_for,
                         mask_box, paste, plan_fit, unfit)
from segpc.errors import InputError


@st.composite
def image_and_box(draw):
    h, w = draw(st.integers(8, 60)), draw(st.integers(8, 60))
    y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
    y1, x1 = draw(st.integers(y0 + 1, h)), draw(st.integers(x0 + 1, w))
    scale = draw(st.sampled_from(PAPER_SCALES + (0.0, 1.0, 5.0)))
    seed = draw(st.integers(0, 2**16))
    return h, w, (y0, x0, y1, x1), scale, seed


@settings(max_examples=300, deadline=None)
@given(image_and_box())
def test_paste_extract_recovers_in_image_window(case):
    h, w, box, scale, seed = case
    image = np.random.default_rng(seed).integers(1, 255, (h, w, 3), np.uint8)
    win = crop_window(box, scale)
    crop = extract(image, win)
    assert crop.shape == (win[2] - win[0], win[3] - win[1], 3)
    back = paste(crop, win, (h, w))
    cy0, cx0, cy1, cx1 = clip_box(win, (h, w))
    np.testing.assert_array_equal(back[cy0:cy1, cx0:cx1], image[cy0:cy1, cx0:cx1])
    outside = np.ones((h, w), bool)
    outside[cy0:cy1, cx0:cx1] = False
    assert not back[outside].any()
    # the zero fill is exactly the part of the window outside the image
    assert int((crop == 0).all(-1).sum()) == crop.shape[0] * crop.shape[1] - (cy1 - cy0) * (cx1 - cx0)


@settings(max_examples=200, deadline=None)
@given(image_and_box())
def test_window_padding_follows_the_method(case):
    _, _, (y0, x0, y1, x1), scale, _ = case
    wy0, wx0, wy1, wx1 = crop_window((y0, x0, y1, x1), scale)
    h, w = y1 - y0, x1 - x0
    assert y0 - wy0 == wy1 - y1 == half_up(scale * h / 2)
    assert x0 - wx0 == wx1 - x1 == half_up(scale * w / 2)


def test_half_up_is_not_bankers_rounding():
    assert half_up(2.5) == 3 and half_up(3.5) == 4 and half_up(0.5) == 1 and half_up(1.49) == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 120), st.integers(1, 120), st.sampled_from([32, 64, 96]), st.integers(0, 999))
def test_fit_unfit_is_exact_when_the_crop_fits(h, w, size, seed):
    crop = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    fitted, fit = fit_to_input(crop, size)
    assert fitted.shape == (size, size)
    if max(h, w) <= size:
        assert fit.factor == 1.0
        np.testing.assert_array_equal(unfit(fitted, fit), crop)
        assert fitted.sum() == pytest.approx(crop.sum(), rel=1e-5)  # zero padding only
    else:
        assert unfit(fitted, fit).shape == (h, w)
        assert max(fit.inner_h, fit.inner_w) == size  # aspect preserved, long side fills


def test_fit_keeps_aspect_ratio_and_centres():
    fit = plan_fit(200, 100, 64)
    assert (fit.inner_h, fit.inner_w) == (64, 32) and fit.left == 16 and fit.top == 0
    mask = np.zeros((200, 100), np.float32)
    mask[50:150, 25:75] = 1
    back = unfit(fit_to_input(mask, 64)[0], fit) > 0.5
    assert abs(int(back.sum()) - 5000) < 300


def test_multichannel_uint8_crop_keeps_channels():
    crop = np.full((150, 90, 4), 7, np.uint8)
    fitted, _ = fit_to_input(crop, 96)
    assert fitted.shape == (96, 96, 4) and fitted.dtype == np.uint8


def test_input_size_per_scale():
    assert [input_size_for(s, 256, 384) for s in PAPER_SCALES] == [256, 384, 384, 384]


def test_mask_box_and_errors():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    assert mask_box(m) == (2, 3, 5, 9)
    with pytest.raises(InputError):
        mask_box(np.zeros((3, 3), bool))
    with pytest.raises(InputError):
        crop_window((5, 5, 5, 9), 1.0)
    with pytest.raises(InputError, match="does not match"):
        paste(np.zeros((3, 3)), (0, 0, 4, 4), (10, 10))
