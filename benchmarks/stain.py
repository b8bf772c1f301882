"""Stain normalisation (--stain-normalize): held-out slides in another lab's stain, with and without it.

    python benchmarks/stain.py [--images 40] [--slides 4] [--epochs 15] [--nucleus-epochs 30]
        [--methods none macenko reinhard] [--keep DIR] [--score-only]

One synthetic archive (seed 11, 640x480; one slide held out for validation and calibration)
trains one tiny bundle per method on the same slides, the same way (Ray Train, as
``python -m ray_jobs.train``). Each bundle is then scored with its own rule (the calibrated
cascade) on slides no training step saw (--test-images in 2 slides, seed 23): as generated,
and two stain-shifted copies (segpc.io.synthetic.shift_stain: the hematoxylin- and eosin-like
vectors turned about the grey axis in optical density and their amounts scaled, in opposite
directions). Prints strict F1 (one-to-one at IoU >= 0.5) and official mIoU per bundle and
copy, and how far each shift moved the stained pixels' hue.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from ray_jobs.train import main as train_main  # noqa: E402
from segpc.evaluation.validation import score  # noqa: E402
from segpc.io.imaging import read_image, write_image  # noqa: E402
from segpc.io.synthetic import shift_stain, write_archive  # noqa: E402
from segpc.method.segmenter import Segmenter  # noqa: E402
from segpc.training.data import load_sample  # noqa: E402
from segpc.training.splits import list_splits  # noqa: E402

# (H turn, E turn in degrees, (H, E) amount): a bluer-purple lab, and a pinker one
SHIFTS = {"shift A": (30.0, -30.0, (1.2, 0.8)), "shift B": (-30.0, 30.0, (0.85, 1.15))}


def hue_shift(before: np.ndarray, after: np.ndarray) -> float:
    """Mean absolute hue change (degrees) of the pixels stained (saturated) in ``before``."""
    a, b = (cv2.cvtColor(im, cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3).astype(float) for im in (before, after))
    stained = a[:, 1] > 60
    d = (b[stained, 0] - a[stained, 0]) / 256 * 360
    return float(np.abs((d + 180) % 360 - 180).mean())


def shifted_copy(src: Path, dst: Path, shift: tuple) -> float:
    """``src`` archive with every image stain-shifted (masks and slides as they are); returns
    the mean hue shift of the stained pixels over the images."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / "y", dst / "y")
    shutil.copy(src / "slides.csv", dst / "slides.csv")
    (dst / "x").mkdir()
    hues = []
    for p in sorted((src / "x").iterdir()):
        rgb = read_image(str(p))
        out = shift_stain(rgb, *shift)
        write_image(dst / "x" / p.name, out)
        hues.append(hue_shift(rgb, out))
    return float(np.mean(hues))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--nucleus-epochs", type=int, default=30)
    p.add_argument("--test-images", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=["none", "macenko", "reinhard"],
                   choices=["none", "macenko", "reinhard"])
    p.add_argument("--keep", default=None, help="write archives and bundles here instead of a temp dir")
    p.add_argument("--score-only", action="store_true", help="no training: score the bundles under --keep")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="segpc-stain-"))
    data, unseen = work / "archive", work / "unseen"
    walls = {}
    if not args.score_only:
        write_archive(data, args.images, args.slides, seed=11, size="640x480")
        for method in args.methods:
            t0 = time.time()
            rc = train_main(["--data", str(data), "--out", str(work / f"bundle-{method}"), "--preset", "tiny",
                             "--epochs", str(args.epochs), "--nucleus-epochs", str(args.nucleus_epochs),
                             "--restart", *([] if method == "none" else ["--stain-normalize", method])])
            walls[method] = round(time.time() - t0)
            if rc != 0:
                return rc
    if not (unseen / "x").exists():
        write_archive(unseen, args.test_images, 2, seed=23, size="640x480")
    sets = {"unshifted": (unseen, 0.0)}
    for name, shift in SHIFTS.items():
        folder = work / f"unseen-{name.replace(' ', '-')}"
        sets[name] = (folder, shifted_copy(unseen, folder, shift))
    rows = {}
    for method in args.methods:
        seg = Segmenter.from_bundle(str(work / f"bundle-{method}"), device="cpu")
        rows[method] = {}
        for name, (folder, _) in sets.items():
            m = score(seg, (load_sample(r) for r in list_splits(str(folder), 0.0).train))
            rows[method][name] = {"f1": m["f1"], "miou": m["miou"], "precision": m["precision"],
                                  "recall": m["recall"], "cells": m["n_pred"], "truth": m["n_truth"]}
    print(f"\n{len(list_splits(str(unseen), 0.0).train)} unseen images; mean hue change of stained pixels: "
          + ", ".join(f"{n} {h:.1f} deg" for n, (_, h) in sets.items() if h))
    print("strict F1 / official mIoU (cells counted / true)")
    print(f"{'bundle':<10}" + "".join(f"{n:>26}" for n in sets))
    for method, by_set in rows.items():
        print(f"{method:<10}" + "".join(f"{r['f1']:>10.3f} / {r['miou']:.3f} ({r['cells']:3d}/{r['truth']:3d})"
                                        for r in by_set.values()))
    print(json.dumps({"train_wall_s": walls, "hue_shift_deg": {n: round(h, 1) for n, (_, h) in sets.items()},
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
