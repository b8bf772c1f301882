"""Training throughput with 1 and with 2 data-parallel workers on the same data.

    python benchmarks/train_scaling.py [--images 40] [--epochs 4] [--stage cytoplasm|nucleus]

Trains one network (the scale-1.75 Attention DeepLabv3+ by default) with Ray Train, once per
worker count, and prints the mean training samples/s (summed over the workers, first epoch
left out) and the ratio 2 workers / 1 worker. On a 2-core machine each worker of two gets
one core where one worker got both, so the ratio shows DDP's overhead more than its gain.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.train import main as train_main  # noqa: E402
from segpc.models.bundle import read_bundle_meta  # noqa: E402
from segpc.io.synthetic import write_archive  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--stage", choices=["cytoplasm", "nucleus"], default="cytoplasm")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segpc-scaling-"))
    write_archive(work / "data", args.images, 4, seed=2, size="640x480")
    rates = {}
    for workers in (1, 2):
        out = str(work / f"bundle-{workers}")
        extra = ["--scales", "1.75"] if args.stage == "cytoplasm" else []
        assert train_main(["--data", str(work / "data"), "--out", out, "--stage", args.stage, *extra,
                           "--epochs", str(args.epochs), "--num-workers", str(workers)]) == 0
        net = "cytoplasm-s1.75" if args.stage == "cytoplasm" else "nucleus"
        hist = read_bundle_meta(out)["provenance"]["training"][net]["history"][1:]
        rates[workers] = sum(h["samples_per_s"] for h in hist) / len(hist)
    print(f"\n1 worker:  {rates[1]:.1f} samples/s\n2 workers: {rates[2]:.1f} samples/s")
    print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
