"""The Ray batch job against the single-process segmenter, on the same images and bundle.

    python benchmarks/segment_throughput.py --bundle BUNDLE [--images 120] [--size 640x480]

Both read the images from disk, segment them and write the same outputs (images/, cells/,
masks.zarr, segpc/); both times include loading the models (and, for Ray, starting Ray). Prints
images/s for each and the ratio (target: Ray >= 0.8x on one machine). Then runs the job
with --rule best (every scale for every nucleus) and compares cytoplasm inferences and
strict F1 with the cascade (target: >= 40% of the inferences saved, F1 no worse).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from _common import job_parser, single_process, slide_folders

from ray_jobs.segment import parse_args
from ray_jobs.segment import run as segment_run
from segpc.io.segpc_format import evaluate_folders, named_by_source
from segpc.io.outputs import read_table


def main() -> int:
    p = job_parser(__doc__, images=120)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segpc-tput-"))
    archive, folder = slide_folders(work, args.images, 4, seed=21, size=args.size)

    t_single = single_process(folder, args.bundle, str(work / "single"), segpc_masks=True)
    t0 = time.perf_counter()
    summary = segment_run(parse_args(["--input", str(folder), "--output", str(work / "ray"), "--bundle",
                                      args.bundle, "--segpc-masks", "--progress-every", "1000"]))
    t_ray, t_pipe = time.perf_counter() - t0, summary["pipeline_s"]
    n = args.images
    print(f"\nsingle process:  {t_single:.1f}s = {n / t_single:.2f} images/s (model load included)")
    print(f"Ray job:         {t_ray:.1f}s = {n / t_ray:.2f} images/s (Ray start, actor start included)")
    print(f"  its pipeline:  {t_pipe:.1f}s = {n / t_pipe:.2f} images/s (dataset execution: actor start included, Ray start not)")
    print(f"ratio Ray / single-process throughput: {t_single / t_ray:.2f}x end to end, "
          f"{t_single / t_pipe:.2f}x pipeline")

    segment_run(parse_args(["--input", str(folder), "--output", str(work / "best"), "--bundle", args.bundle,
                            "--segpc-masks", "--rule", "best", "--progress-every", "1000"]))
    inf = {r: int(read_table(str(work / r), "images").column("cytoplasm_inferences").to_numpy().sum())
           for r in ("ray", "best")}
    sources = {r: read_table(str(work / r), "images", ["image_id", "source_uri"]).to_pandas() for r in ("ray", "best")}
    f1 = {r: evaluate_folders(archive, named_by_source(work / r / "segpc", dict(zip(t.image_id, t.source_uri)),
                                                       work / r / "segpc-by-source"))
          for r, t in sources.items()}
    saved = 1 - inf["ray"] / max(inf["best"], 1)
    print(f"cytoplasm inferences: cascade {inf['ray']}, every scale {inf['best']} -> {saved:.0%} saved")
    print(f"strict F1: cascade {f1['ray']['f1']:.4f}, every scale {f1['best']['f1']:.4f}; "
          f"official mIoU: cascade {f1['ray']['miou']:.4f}, every scale {f1['best']['miou']:.4f}")
    print(json.dumps({"single_s": t_single, "ray_s": t_ray, "pipeline_s": t_pipe, "ratio": t_single / t_ray,
                      "inferences": inf, "saved": saved,
                      "f1": {k: v["f1"] for k, v in f1.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
