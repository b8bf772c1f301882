"""Image decoding refuses every kind of bad file with a message naming file and problem."""

import numpy as np
import pytest
from helpers import bad_files, bomb_bytes, png_bytes

from segpc.errors import InputError
from segpc.io.imaging import decode_image


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_files_are_refused_with_a_clear_message(name):
    data, word = bad_files()[name]
    with pytest.raises(InputError) as err:
        decode_image(data, f"slide/{name}", max_pixels=400_000)
    assert f"slide/{name}" in str(err.value) and word in str(err.value)


def test_good_rgb_round_trip_keeps_channel_order():
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0] = 200  # red
    out = decode_image(png_bytes(rgb), "red.png")
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("ext", [".png", ".bmp"])
def test_decompression_bombs_are_refused_before_any_pixel_is_allocated(ext):
    import resource

    data = bomb_bytes(ext, 60000, 60000)  # 3.6 G pixels (10.8 GB decoded) claimed by ~200 bytes
    assert len(data) < 1000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(InputError, match="exceeds the limit"):
        decode_image(data, f"bomb{ext}")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 * 1024
