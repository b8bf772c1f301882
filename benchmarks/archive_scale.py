"""Does the driver's work grow with the archive? Listing, planning, resume, tables, first result.

    python benchmarks/archive_scale.py [--sizes 1000 100000] [--per-slide 100] [--per-part 16]

For each archive size N, in a SeaweedFS server of its own on 127.0.0.1: N tiny images
(64x64 PNG, N / --per-slide slide folders) under ``in-N/``, and an output prefix ``done-N/``
holding what a finished job writes for N images and 10 N cells (``images/`` and ``cells/``
parts of --per-part images, with the job's schemas). Then, in a fresh driver process per N,
the driver's steps are timed: reading the bundle, resume's done check, listing the input
(Ray tasks, every row counted), planning, the slides table and the report's tables; its
peak resident memory is the process's high-water mark. Last, the real job is started on
``in-N/`` with a fresh output and the time to its first written ``images/`` part is taken
(then the job is stopped). Prints one table and the 100,000 : 1,000 ratios, the targets
being driver memory <= 1.5x, slides table and resume check <= 20 s, first result <= 1.5x.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "scale"


def _png() -> bytes:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    ok, buf = cv2.imencode(".png", rng.integers(150, 255, (64, 64, 3), np.uint8))
    return buf.tobytes()


def _pipe_all(fs, files: dict[str, bytes], chunk: int = 2000) -> None:
    keys = list(files)
    for i in range(0, len(keys), chunk):
        fs.pipe({k: files[k] for k in keys[i:i + chunk]})


def write_inputs(fs, n: int, per_slide: int) -> None:
    data = _png()
    _pipe_all(fs, {f"{BUCKET}/in-{n}/S{i // per_slide:05d}/img{i:07d}.png": data for i in range(n)})


def write_done_output(fs, n: int, per_slide: int, per_part: int, cells_per_image: int = 10) -> None:
    """The parts a finished job leaves for ``n`` images, written directly with its schemas."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segpc.io.outputs import CELLS_SCHEMA, IMAGES_SCHEMA, part_name

    mask = np.packbits(np.ones((24, 24), bool)).tobytes()
    files: dict[str, bytes] = {}

    def parquet(rows: list[dict], schema) -> bytes:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        return buf.getvalue()

    for start in range(0, n, per_part):
        ids = [(f"S{i // per_slide:05d}__img{i:07d}", f"S{i // per_slide:05d}")
               for i in range(start, min(n, start + per_part))]
        images = [{"image_id": i, "slide_id": s, "source_uri": f"s3://{BUCKET}/in-{n}/{s}/{i}.png",
                   "status": "ok", "width": 64, "height": 64, "n_cells": cells_per_image, "n_nuclei": cells_per_image,
                   "cytoplasm_inferences": cells_per_image, "seconds": 0.1, "cell_area_sum": 500 * cells_per_image,
                   "cell_area_sq_sum": 250000.0 * cells_per_image, "nucleus_area_sum": 200 * cells_per_image,
                   "ratio_sum": 1.5 * cells_per_image} for i, s in ids]
        cells = [{"image_id": i, "slide_id": s, "cell_id": k + 1, "y0": 0, "x0": 0, "y1": 24, "x1": 24,
                  "nucleus_area": 200, "cell_area": 500, "cytoplasm_area": 300, "ratio": 1.5, "scale": 1.75,
                  "nucleus_score": 0.9, "cell_score": 0.9, "truncated": False, "nucleus_mask": mask,
                  "cell_mask": mask} for i, s in ids for k in range(cells_per_image)]
        part = part_name([i for i, _ in ids])
        files[f"{BUCKET}/done-{n}/cells/{part}"] = parquet(cells, CELLS_SCHEMA)
        files[f"{BUCKET}/done-{n}/images/{part}"] = parquet(images, IMAGES_SCHEMA)
    _pipe_all(fs, files, chunk=500)


def driver_steps(n: int, bundle: str) -> dict:
    """In a fresh process: the driver's steps on the archive of ``n`` images, timed."""
    import argparse as ap

    import numpy as np

    t: dict = {}

    def clock(name, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        t[name] = round(time.perf_counter() - t0, 2)
        return out

    from ray_jobs.common import init_ray
    from ray_jobs.listing import id_hashes, input_dataset
    from ray_jobs.plan import plan_resources
    from ray_jobs.segment import build_pipeline, parse_args
    from segpc.config import Config
    from segpc.evaluation.report import figures, load, render
    from segpc.io.outputs import done_images, remove_orphan_cells
    from segpc.io.slides import write_slides_table
    from segpc.models.bundle import read_bundle_meta

    out, inp = f"s3://{BUCKET}/done-{n}", f"s3://{BUCKET}/in-{n}"
    meta = clock("bundle_s", read_bundle_meta, bundle)

    def resume_check():
        remove_orphan_cells(out)
        return np.sort(id_hashes(done_images(out).column("image_id").to_pylist()))

    done = clock("resume_check_s", resume_check)
    assert len(done) == n, f"{len(done)} done images read back, {n} written"
    init_ray()
    import ray

    def listing() -> int:
        ds = input_dataset(ap.Namespace(input=inp, manifest=None, image_column="image"), None, None)
        return sum(len(b["image_id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))

    listed = clock("listing_s", listing)
    assert listed == n, f"{listed} images listed, {n} written"
    args = parse_args(["--input", inp, "--output", out, "--bundle", bundle, "--resume"])
    config = Config.from_dict(meta["config"])

    def planning():
        plan = plan_resources(args, ray.cluster_resources(), len(config.cytoplasm.scales))
        return build_pipeline(args, plan, config, ray.put(done))

    clock("planning_s", planning)
    slides, _ = clock("slides_table_s", write_slides_table, out)
    assert int(slides.images.sum()) == n and int(slides.plasma_cells.sum()) == 10 * n

    def report_tables():
        data = load(out)
        figures(data)
        return render(data, [])

    clock("report_tables_s", report_tables)
    t["driver_peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return t


def first_result_s(n: int, bundle: str, env: dict, timeout_s: float = 900) -> float:
    """Seconds from starting the real job on ``in-N/`` to its first ``images/`` part."""
    from segpc.io.storage import filesystem

    out = f"s3://{BUCKET}/fresh-{n}-{int(time.time())}"
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    cmd = [sys.executable, "-m", "ray_jobs.segment", "--input", f"s3://{BUCKET}/in-{n}", "--output", out,
           "--bundle", bundle, "--progress-every", "1000000"]
    log = open(Path(ray_tmp) / "job.log", "wb")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "RAY_TMPDIR": ray_tmp}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    fs, root = filesystem(out)
    try:
        while time.time() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the job ended ({proc.returncode}) before writing; see {log.name}")
            fs.invalidate_cache()
            if fs.exists(f"{root}/images") and fs.ls(f"{root}/images"):
                return round(time.time() - t0, 1)
            time.sleep(0.5)
        raise RuntimeError(f"no result within {timeout_s}s")
    finally:
        from ray_jobs.local_s3 import kill_mentioning, stop_group

        stop_group(proc, grace_s=20)
        kill_mentioning(ray_tmp)  # the job's Ray processes, by their temp dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    p.add_argument("--per-slide", type=int, default=100, help="images per slide folder")
    p.add_argument("--per-part", type=int, default=16, help="images per images/ and cells/ part")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--bundle", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(driver_steps(args.child, args.bundle)), flush=True)
        return 0

    from ray_jobs.local_s3 import LocalS3
    from segpc.config import preset
    from segpc.io.storage import filesystem
    from segpc.models.bundle import new_bundle, save_bundle

    rows = {}
    with LocalS3() as s3:
        os.environ.update(s3.env())
        env = {**os.environ}
        fs, _ = filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        bundle = f"s3://{BUCKET}/bundle"
        save_bundle(new_bundle(preset("tiny")), bundle)
        for n in args.sizes:
            t0 = time.time()
            write_inputs(fs, n, args.per_slide)
            write_done_output(fs, n, args.per_slide, args.per_part)
            print(f"[archive_scale] {n} inputs and a done output of {n} images written in "
                  f"{time.time() - t0:.0f}s", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--bundle", bundle],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                return 1
            rows[n] = json.loads(line[0][7:])
            rows[n]["first_result_s"] = first_result_s(n, bundle, env)
            print(f"[archive_scale] {n}: {rows[n]}", flush=True)
    keys = ["driver_peak_mib", "bundle_s", "resume_check_s", "listing_s", "planning_s", "slides_table_s",
            "report_tables_s", "first_result_s"]
    print(f"\n{'images':>10} " + " ".join(f"{k:>16}" for k in keys))
    for n, r in rows.items():
        print(f"{n:>10} " + " ".join(f"{r[k]:>16}" for k in keys))
    lo, hi = min(rows), max(rows)
    if lo != hi:
        print(f"\n{hi}:{lo} ratios: driver peak memory {rows[hi]['driver_peak_mib'] / rows[lo]['driver_peak_mib']:.2f}x "
              f"(target <= 1.5x), first result {rows[hi]['first_result_s'] / rows[lo]['first_result_s']:.2f}x "
              f"(target <= 1.5x); at {hi}: slides table {rows[hi]['slides_table_s']}s, resume check "
              f"{rows[hi]['resume_check_s']}s (targets <= 20 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
