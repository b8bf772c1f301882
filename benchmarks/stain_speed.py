"""Stain normalisation per camera-size image: the project's against torchstain's ``normalize``,
same process, same images, and how far apart their outputs are. Macenko: the stain estimated
on a pixel sample and the unmixing as matrix products, against least squares over every
pixel; Reinhard: OpenCV's LAB conversions against torchstain's numpy ones.

    python benchmarks/stain_speed.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from segpc.io.stain import BETA, IO, StainNormalizer, fit_reference  # noqa: E402
from segpc.io.synthetic import CAMERAS, make_image, shift_stain  # noqa: E402


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per variant (the fastest is kept)")
    args = p.parse_args()
    fields = [make_image(np.random.default_rng(i), 640, 480)[0] for i in range(8)]
    for method in ("macenko", "reinhard"):
        norm = StainNormalizer(method, fit_reference(fields, method))

        def theirs(image):
            if method == "macenko":
                return norm._norm.normalize(image, Io=IO, beta=BETA, stains=False)[0]
            return norm._norm.normalize(image)

        for name, (w, h) in [("640x480", (640, 480)), *CAMERAS.items()]:
            image = shift_stain(make_image(np.random.default_rng(9), w, h)[0])
            t_ours, t_theirs = best_of(args.repeat, lambda: norm(image)), best_of(args.repeat, lambda: theirs(image))
            diff = np.abs(norm(image).astype(int) - theirs(image))
            print(f"{method:>8} {name:>8} {w}x{h}: segpc {t_ours:.3f} s, torchstain {t_theirs:.3f} s, "
                  f"{t_theirs / t_ours:.1f}x faster; outputs differ by at most {diff.max()} grey level(s), "
                  f"in {100 * (diff > 0).mean():.2f}% of values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
