"""Load: 1,000 small images in a few slides through the batch job, over a real S3 server.

    python benchmarks/segment_load.py --bundle BUNDLE [--images 1000] [--slides 4] [--size 320x240]

Starts SeaweedFS on 127.0.0.1, uploads a synthetic archive in slide folders, runs
`python -m ray_jobs.segment` from the bucket to the bucket (its own local Ray) while sampling
the summed PSS of the job's processes, then checks that every image is accounted for
exactly once with no error rows. Prints images/s and peak memory, and the peak of each
quarter of the run: the first quarter holds Ray's and the actors' start-up, so flat
memory means the last quarter's peak is not above the second's by more than noise.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from _common import job_parser, run_sampled

from ray_jobs.local_s3 import LocalS3
from segpc.io.outputs import read_table
from segpc.io.storage import filesystem
from segpc.io.synthetic import write_archive


def main() -> int:
    p = job_parser(__doc__, images=1000, size="320x240")
    p.add_argument("--slides", type=int, default=4)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segpc-load-"))
    t0 = time.time()
    write_archive(work / "archive", args.images, args.slides, seed=3, size=args.size)
    print(f"archive: {args.images} images in {args.slides} slides, {time.time() - t0:.0f}s", flush=True)
    with LocalS3(str(work / "s3")) as s3:
        env = {**os.environ, **s3.env()}
        os.environ.update(s3.env())
        fs, _ = filesystem("s3://load")
        fs.mkdir("load")
        t0 = time.time()
        for img in sorted((work / "archive" / "x").iterdir()):
            fs.pipe_file(f"load/in/{img.stem.rsplit('-', 1)[0]}/{img.name}", img.read_bytes())
        print(f"uploaded in {time.time() - t0:.0f}s", flush=True)
        log = work / "job.log"
        rc, wall, samples = run_sampled(
            [sys.executable, "-m", "ray_jobs.segment", "--input", "s3://load/in", "--output", "s3://load/out",
             "--bundle", args.bundle, "--progress-every", "100"], env=env, every_s=0.5, log=log)
        text = log.read_text(errors="replace")
        if rc != 0:
            print(text[-3000:])
            raise SystemExit(f"the job failed (exit {rc}); log: {log}")
        images = read_table("s3://load/out", "images").to_pandas()
        cells = read_table("s3://load/out", "cells", ["image_id", "cell_id"]).to_pandas()

    assert len(images) == args.images and images.image_id.is_unique, "an image is missing or twice in images/"
    errors = images[images.status != "ok"]
    assert errors.empty, f"{len(errors)} good image(s) got error rows: {errors.error.tolist()[:3]}"
    assert not cells.duplicated().any() and len(cells) == images.n_cells.sum()
    done = re.search(r"\[segment\] done in ([\d.]+)s", text)
    job_s = float(done.group(1)) if done else wall
    quarters = [max((m for t, m in samples if q * wall / 4 <= t < (q + 1) * wall / 4), default=0.0)
                for q in range(4)]
    peak = max(m for _, m in samples)
    print(f"\n{args.images} images ({args.size}), {len(cells)} cells: all accounted for once, 0 error rows")
    print(f"wall {wall:.0f}s (process start to exit) = {args.images / wall:.2f} images/s; "
          f"job's own time {job_s:.0f}s = {args.images / job_s:.2f} images/s")
    print(f"peak PSS {peak:.0f} MiB; per quarter of the run: {', '.join(f'{q:.0f}' for q in quarters)} MiB; "
          f"last / second quarter {quarters[3] / max(quarters[1], 1):.2f}x")
    print(json.dumps({"images": args.images, "cells": len(cells), "wall_s": round(wall, 1), "job_s": job_s,
                      "images_per_s": round(args.images / wall, 2), "peak_mib": round(peak),
                      "quarters_mib": [round(q) for q in quarters]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
