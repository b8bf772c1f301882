"""The whole system on one machine: synthetic slides -> training -> batch job -> report.

    ./run.sh demo [--images-train 60] [--images 12] [--slides 3] [--epochs 20] ...

1. starts an S3-compatible server (SeaweedFS) on 127.0.0.1, unless --s3-endpoint or
   AWS_ENDPOINT_URL points at your own object storage;
2. writes a synthetic training archive and, separately, slides to analyse into the bucket;
3. trains the tiny preset with Ray Train into a bundle in the bucket (skipped with --bundle);
4. runs the batch job from the bucket to the bucket;
5. builds the HTML report, prints the per-slide counts and the evaluation against the
   synthetic truth, copies results and report to --workdir, and stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo-output", help="where results and report are copied")
    p.add_argument("--bucket", default="segpc-demo", help="bucket to use (created if missing)")
    p.add_argument("--s3-endpoint", default=None,
                   help="use this S3-compatible endpoint instead of a local SeaweedFS server")
    p.add_argument("--bundle", default=None, help="use this bundle URI instead of training one")
    p.add_argument("--images-train", type=int, default=60, help="synthetic training images")
    p.add_argument("--images", type=int, default=12, help="synthetic images to analyse")
    p.add_argument("--slides", type=int, default=3, help="slides the analysed images spread over")
    p.add_argument("--size", default="640x480", help="image size (WxH, camera1, camera2, mixed)")
    p.add_argument("--epochs", type=int, default=20, help="cytoplasm epochs per scale")
    p.add_argument("--nucleus-epochs", type=int, default=50, help="nucleus U-Net epochs")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="cytoplasm scales to train (default: all four; the others stay untrained: a quicker look)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(f"\n[demo] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray_jobs.local_s3 import LocalS3

    own_server = not (args.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"))
    t0 = time.time()
    with (LocalS3() if own_server else nullcontext()) as server, _environment(args, server):
        if server is not None:
            _say(f"SeaweedFS S3 server on {server.endpoint} (data in {server.dir})")
        return run(args, t0)


def _environment(args: argparse.Namespace, server):
    """The demo's storage settings in this process's environment while it runs, as they were
    afterwards. Its own SeaweedFS server's credentials go there before run() starts Ray:
    the local Ray it starts, raylet and workers, inherits them from this process, as a
    cluster's nodes get theirs from their own environment or instance role; the jobs pass
    their tasks the endpoint and region only, never keys (ray_jobs/common.py). (To join an
    existing cluster, RAY_ADDRESS, with the demo's own server, that cluster's nodes would
    need the server's credentials in the environment they were started with.)"""
    from ray_jobs.common import job_settings, scoped_environ

    return scoped_environ({**(server.env() if server is not None else {}), **job_settings(args)})


def run(args: argparse.Namespace, t0: float) -> int:
    from ray_jobs.common import init_ray
    from ray_jobs.segment import main as segment_main
    from ray_jobs.train import main as train_main
    from segpc.io.segpc_format import evaluate_folders, named_by_source
    from segpc.evaluation.report import build_report
    from segpc.io.storage import filesystem
    from segpc.io.synthetic import write_archive

    bucket = f"s3://{args.bucket}"
    fs, _ = filesystem(bucket)
    if not fs.exists(args.bucket):
        fs.mkdir(args.bucket)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    prefix = f"{bucket}/{run_id}"
    work = Path(args.workdir).resolve()
    local = Path(tempfile.mkdtemp(prefix="segpc-demo-"))

    _say(f"writing synthetic data to {prefix}/ (training archive and {args.slides} slides to analyse)")
    write_archive(local / "training", args.images_train, max(2, args.slides), seed=args.seed, size=args.size)
    write_archive(local / "truth", args.images, args.slides, seed=args.seed + 1000, size=args.size)
    fs.put(f"{local / 'training'}/", f"{prefix}/training/".removeprefix("s3://"), recursive=True)
    for p in sorted((local / "truth" / "x").iterdir()):  # slide folders, as a scanner writes them
        fs.pipe_file(f"{prefix}/slides/{p.stem.rsplit('-', 1)[0]}/{p.name}".removeprefix("s3://"), p.read_bytes())
    init_ray()

    bundle = args.bundle or f"{prefix}/bundle"
    if not args.bundle:
        _say(f"training the tiny preset with Ray Train -> {bundle}")
        scales = ["--scales", *map(str, args.scales)] if args.scales else []
        rc = train_main(["--data", f"{prefix}/training", "--out", bundle, "--preset", "tiny",
                         "--epochs", str(args.epochs), "--nucleus-epochs", str(args.nucleus_epochs),
                         "--seed", str(args.seed), *scales])
        if rc != 0:
            return rc

    _say(f"batch job: {prefix}/slides -> {prefix}/results")
    rc = segment_main(["--input", f"{prefix}/slides", "--output", f"{prefix}/results", "--bundle", bundle,
                       "--segpc-masks", "--overlays", "--geojson", "--ome-zarr-image", "--progress-every", "4"])
    if rc != 0:
        return rc

    _say("building the report")
    build_report(f"{prefix}/results")
    if work.exists():
        shutil.rmtree(work / "results", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    fs.get(f"{prefix}/results/".removeprefix("s3://"), str(work / "results"), recursive=True)
    (work / "results" / "segpc").mkdir(exist_ok=True)  # no cell found: no masks, score 0
    import pandas as pd

    images = pd.read_parquet(work / "results" / "images", columns=["image_id", "source_uri"])
    pred = named_by_source(work / "results" / "segpc", dict(zip(images.image_id, images.source_uri)),
                           local / "pred")
    scores = evaluate_folders(local / "truth", pred)
    slides = pd.read_parquet(work / "results" / "slides.parquet")
    _say("plasma cells per slide:\n" + slides[["slide_id", "images", "images_error", "plasma_cells",
                                               "mean_cells_per_image"]].to_string(index=False))
    truth_counts = {}
    for p in (local / "truth" / "y").iterdir():
        slide = p.stem.rsplit("-", 1)[0]
        truth_counts[slide] = truth_counts.get(slide, 0) + 1
    _say("true counts per slide (synthetic truth): " + json.dumps(dict(sorted(truth_counts.items()))))
    keys = ("miou", "f1", "precision", "recall", "matched_iou", "n_truth", "n_pred")
    _say("evaluation against the synthetic truth: " + json.dumps({k: scores[k] for k in keys}))
    _say(f"done in {time.time() - t0:.0f}s. Results: {work / 'results'}; "
         f"report: {work / 'results' / 'report' / 'index.html'}; QuPath: {work / 'results' / 'geojson'}/; "
         f"napari: napari --plugin napari-ome-zarr {work / 'results' / 'masks.zarr'}/<image_id>")
    shutil.rmtree(local, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
