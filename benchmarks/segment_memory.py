"""Peak memory of the Ray batch job for an archive of N and of 4N images.

    python benchmarks/segment_memory.py --bundle BUNDLE [--images 50]

Each run is a fresh `python -m ray_jobs.segment` (its own local Ray); the peak of the
summed PSS (proportional set size: shared pages such as the object store counted once)
of the driver and every process it started is sampled every 0.2 s. Target: the 4N peak
at most 1.2x the N peak (streaming: memory does not grow with the archive).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _common import job_parser, run_sampled, slide_folders


def run(folder: Path, out: Path, bundle: str) -> tuple[float, float]:
    rc, wall, samples = run_sampled([sys.executable, "-m", "ray_jobs.segment", "--input", str(folder),
                                     "--output", str(out), "--bundle", bundle, "--progress-every", "100000"])
    assert rc == 0, "the job failed"
    return max(m for _, m in samples), wall


def main() -> int:
    p = job_parser(__doc__, images=50)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segpc-mem-"))
    peaks = {}
    for n in (args.images, 4 * args.images):
        _, folder = slide_folders(work, n, 4, seed=5, size=args.size)
        peaks[n], wall = run(folder, work / f"out-{n}", args.bundle)
        print(f"{n:5d} images: peak PSS {peaks[n]:.0f} MiB, {wall:.0f}s ({n / wall:.2f} images/s)")
    print(f"peak memory growth 4N / N: {peaks[4 * args.images] / peaks[args.images]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
