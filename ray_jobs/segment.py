"""The batch job: segment every image under an input prefix with Ray Data.

    python -m ray_jobs.segment --input URI --output URI --bundle BUNDLE_URI
        [--segpc-masks] [--overlays] [--geojson] [--mpp UM] [--ome-zarr [--ome-zarr-image]]
        [--keep-all] [--tta] [--tile-fields N]
        [--resume [--retry-errors]] [--manifest CSV]

--input is a prefix of image files (any depth; the first folder is the slide) and of
whole-slide files (one slide per file: slide_id = file name; read at the bundle's pixel size
in tiles of about --tile-fields training fields a side, ids <slide>__tile-<row>-<col>; MIRAX
and other formats tiffslide cannot read go through OpenSlide, from a local copy), or of
Parquet shards with the image bytes in a column (--image-column) beside image_id and,
optionally, slide_id (fields only: a whole slide there is an error row).
image_id is the path below --input without suffix ("/" -> "__"): files added later never
change the ids of images already done.

Pipeline (streaming, no all-to-all step): list each slide folder (CPU tasks; a task per whole
slide lays its tiles, skipping glass) -> read + decode (a tile: range reads of its slide) +
validate + fit the U-Net's input (CPU tasks) -> then, on GPU clusters, network-only actors
with CPU stages between them: nucleus U-Net (GPU) -> nucleus instances and first crops (CPU)
-> per scale: its Attention DeepLabv3+ (GPU) -> candidates and the crops the cascade needs
next (CPU) -> aggregation, label masks and writes (CPU actors). On CPU-only clusters one
actor pool runs every step of an image, reading included (--fuse). Each image's crops
travel with its row.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ray_jobs.autoscaling import read_autoscaler_config
from ray_jobs.plan import Plan, plan_resources
from ray_jobs.stages import GPUUnavailable
from segpc.errors import InputError, exit_status
from segpc.io.run_record import (NOTED_KEYS, RESULT_KEYS, RUN_FILE, differences, read_run_record, run_record,
                                 write_run_record)
from segpc.io.storage import StorageUnavailable
from segpc.wsi.tiles import TILE_FIELDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.segment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="prefix of image files (any depth; slide = first folder) and/or whole-slide files "
                        "(.svs .ndpi .scn .bif, pyramidal .tif; .mrxs .vms .vmu through OpenSlide, "
                        "downloaded to the reading machine; slide = file name)")
    p.add_argument("--output", required=True, help="output prefix (images/, cells/, slides.parquet, masks.zarr)")
    p.add_argument("--bundle", required=True, help="model bundle (folder or s3:// URI)")
    p.add_argument("--manifest", default=None,
                   help="CSV/Parquet with columns path, slide_id (and optionally image_id): the images and "
                        "whole slides to do, paths relative to --input or full URIs")
    p.add_argument("--image-column", default="image",
                   help="for Parquet shards under --input: the column of image bytes (with image_id, "
                        "and optionally slide_id, beside it)")
    p.add_argument("--segpc-masks", action="store_true", help="also write segpc/<id>_<k>.bmp (40/20)")
    p.add_argument("--overlays", action="store_true", help="also write overlays/<id>.png QC pictures")
    p.add_argument("--geojson", action="store_true",
                   help="also write geojson/<id>.geojson: the cells as QuPath cell objects (File > Import objects)")
    p.add_argument("--mpp", type=_positive, default=None,
                   help="pixel size in micrometres per pixel: areas in um^2 too (GeoJSON measurements, "
                        "run.json, the report), the OME-Zarr pixel size; for whole slides whose file does not record it, their "
                        "full resolution's pixel size")
    p.add_argument("--tile-fields", type=_positive, default=TILE_FIELDS,
                   help="whole slides: a tile's read box is about this many of the bundle's training fields "
                        f"on a side (default {TILE_FIELDS:g}); the U-Net sees it at a field's scale. Larger "
                        "tiles read their margin (read twice, by neighbours) less often, and use more memory each")
    p.add_argument("--ome-zarr", action="store_true",
                   help="masks.zarr/<id> as an OME-Zarr (NGFF 0.5) image group that napari and Fiji open: "
                        "labels/nuclei and labels/cells, a pyramid; about 16 objects per camera image "
                        "instead of 2 (the default compact layout)")
    p.add_argument("--ome-zarr-image", action="store_true",
                   help="with --ome-zarr (implied): the RGB image itself in masks.zarr/<id> too, so a viewer "
                        "shows the image under the labels (about 6 objects more, the image's size again)")
    p.add_argument("--rule", choices=["cascade", "best", "keep-all"], default="cascade",
                   help="aggregation: cascade (default), best (every scale, best kept), keep-all")
    p.add_argument("--keep-all", action="store_true",
                   help="same as --rule keep-all: every plausible candidate (published challenge mode)")
    p.add_argument("--tta", action="store_true",
                   help="test-time flips: both stages' networks also run on the image flipped left-right, "
                        "up-down and both, and average the probabilities (about 4x the network time)")
    p.add_argument("--resume", action="store_true",
                   help="complete an earlier run into the same --output: skip images already in images/ "
                        "(refused when the bundle, rule or inputs differ from its run.json)")
    p.add_argument("--retry-errors", action="store_true",
                   help="with --resume: process again the images that failed for a storage cause "
                        "(missing, access denied, outage), not those that are not usable images")
    p.add_argument("--batch-size", type=int, default=None, help="images per model batch (default 4 CPU, 16 GPU)")
    p.add_argument("--write-batch-size", type=int, default=None,
                   help="images per images/ + cells/ Parquet part pair on GPU clusters' graph: the "
                        "aggregation and write actors' batch (default 64, 16 with --overlays or "
                        "--ome-zarr-image, or --batch-size "
                        "if larger); CPU clusters write one pair per model batch")
    p.add_argument("--nucleus-actors", type=int, default=None,
                   help="U-Net actors (default: 1 per GPU); with --fuse: actors running every step "
                        "(default: 1 per CPU)")
    p.add_argument("--cytoplasm-actors", type=int, default=None, help="actors per scale (default: 1 per GPU)")
    p.add_argument("--write-actors", type=int, default=None,
                   help="aggregation and write actors (default: 1 per 8 CPUs, at least 1 per GPU)")
    p.add_argument("--gpus", type=float, default=None,
                   help="GPUs to plan for (default: the most the autoscaler can bring, read from "
                        "~/ray_bootstrap_config.yaml on a cluster-launcher head, else the cluster's; "
                        "set it on KubeRay)")
    p.add_argument("--cpus-per-gpu", type=float, default=None,
                   help="CPUs each planned GPU brings, for GPUs not up yet (default: as the "
                        "autoscaler's GPU node type, else the GPU nodes up now, else 8)")
    p.add_argument("--nucleus-gpu", type=float, default=0.5, help="GPU fraction per nucleus actor")
    p.add_argument("--cytoplasm-gpu", type=float, default=None,
                   help="GPU fraction per cytoplasm actor (default: the rest of a GPU shared by the scales)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per CPU actor")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="every step of an image in one CPU actor (default without GPUs) instead of "
                        "network-only actors with CPU stages between them (default with GPUs)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (default 50 MP)")
    p.add_argument("--progress-every", type=int, default=50, help="a progress line every N images")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    p.add_argument("--io-retry-s", type=float, default=None,
                   help="seconds each storage read or write keeps retrying before the job stops "
                        "(default 300, or SEGPC_IO_RETRY_S); --resume completes a stopped job")
    # --s3-endpoint and --io-retry-s reach the driver's storage calls and the workers through
    # main()'s job_environment, for the job's duration: parsing changes no environment
    args = p.parse_args(argv)
    if args.keep_all:
        args.rule = "keep-all"
    args.ome_zarr = args.ome_zarr or args.ome_zarr_image
    return args


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


# ----------------------------------------------------------------------------- pipeline


READ_BATCH = 4  # images per read-and-decode task call (GPU clusters)


def build_pipeline(args: argparse.Namespace, plan: Plan, config, done_ref=None, meta: dict | None = None):
    """The Ray Data graph, top to bottom; ``config`` is the bundle's, ``meta`` its bundle.json
    (the pixel size and field shape whole slides are tiled at), ``done_ref`` the hashes of the
    images already done (see ray_jobs/listing.py)."""
    import ray

    from ray_jobs.common import worker_runtime_env
    from ray_jobs.listing import input_dataset
    from ray_jobs.stages import CellNet, Finalize, NucleusNet, Segment, find_nuclei, read_decode, take_candidates

    rule, scales, cfg = args.rule, list(config.cytoplasm.scales), config.to_dict()
    # a storage outage raised in a stage reaches the driver as itself (run() explains it)
    ray.data.DataContext.get_current().raise_original_map_exception = True
    env = worker_runtime_env() or None
    common = {"batch_size": plan.batch_size, "batch_format": "numpy", "runtime_env": env}
    from segpc.models.bundle import bundle_imaging

    target_mpp, field_shape = bundle_imaging(meta or {})
    slides = {"config": cfg, "field_shape": field_shape, "target_mpp": target_mpp, "mpp": args.mpp,
              "fields_per_tile": args.tile_fields}
    # CPU clusters: blocks of one actor batch, so that a slide's tiles spread over the
    # actors. Not in the split graph: there a no-fuse test job twice waited past the
    # no-progress limit with its listing cut (its read tasks take blocks as listed)
    ds = input_dataset(args, done_ref, env, slides, rows_per_block=plan.batch_size if plan.fuse else None)
    writer = {"output": args.output, "segpc_masks": args.segpc_masks, "overlays": args.overlays,
              "geojson": args.geojson, "mpp": args.mpp, "ome_zarr": args.ome_zarr,
              "ome_zarr_image": args.ome_zarr_image}
    keep_image = args.overlays or args.ome_zarr_image  # the decoded image rides to the writers
    if plan.fuse:  # CPU cluster: each actor runs every step of its images, reading included,
        # so no decoded image crosses the object store
        return ds.map_batches(Segment, fn_constructor_kwargs={
                                  "bundle_uri": args.bundle, "threads": plan.threads, "rule": rule,
                                  "batch_size": plan.batch_size, "max_pixels": args.max_pixels,
                                  "tta": args.tta, **writer},
                              compute=ray.data.ActorPoolStrategy(size=plan.segment_actors),
                              num_cpus=plan.actor_cpus, **common)
    ds = ds.map_batches(read_decode, fn_kwargs={"max_pixels": args.max_pixels, "config": cfg},
                        compute=ray.data.TaskPoolStrategy(size=plan.read_tasks), num_cpus=plan.task_cpus,
                        **{**common, "batch_size": READ_BATCH})
    model = {"bundle_uri": args.bundle, "threads": plan.threads, "rule": rule, "tta": args.tta}
    ds = ds.map_batches(NucleusNet, fn_constructor_kwargs={**model, "batch_size": plan.batch_size},
                        compute=ray.data.ActorPoolStrategy(size=plan.nucleus_actors),
                        num_gpus=plan.nucleus_gpu or None, num_cpus=plan.actor_cpus, **common)
    ds = ds.map_batches(find_nuclei, fn_kwargs={"config": cfg, "keep_image": keep_image},
                        num_cpus=plan.task_cpus, **common)
    for k, scale in enumerate(scales):
        ds = ds.map_batches(CellNet, fn_constructor_kwargs={**model, "scale": scale,
                                                             "batch_size": plan.batch_size * 4},
                            compute=ray.data.ActorPoolStrategy(size=plan.cytoplasm_actors),
                            num_gpus=plan.cytoplasm_gpu or None, num_cpus=plan.actor_cpus, **common)
        if k < len(scales) - 1:  # the last scale's candidates are taken by the writers
            ds = ds.map_batches(take_candidates, fn_kwargs={"scale": scale, "config": cfg},
                                num_cpus=plan.task_cpus, **common)
    # Large write batches: one Parquet part pair per batch, so fewer objects and requests;
    # Ray Data gathers the rows, each call still writes its whole batch (images/ part last).
    write_batch = args.write_batch_size or max(16 if keep_image else 64, plan.batch_size)
    return ds.map_batches(Finalize, fn_constructor_kwargs={"config": cfg, "rule": rule, **writer},
                          compute=ray.data.ActorPoolStrategy(size=plan.write_actors),
                          num_cpus=plan.task_cpus, **{**common, "batch_size": write_batch})


def _job_errors_unwrapped(batches):
    """Batches as they come. Two failures raised inside workers stop the job and come out as
    themselves, with what to do next, whatever Ray wrapped them in on the way: a storage
    outage that outlasted its retries, and a GPU actor that sees no GPU."""
    try:
        yield from batches
    except Exception as exc:
        seen: BaseException | None = exc
        while seen is not None:  # Ray's wrappers are instances of the cause's type too
            inner = getattr(seen, "cause", None) or seen.__cause__
            if isinstance(seen, StorageUnavailable) and not isinstance(inner, StorageUnavailable):
                what = str(seen).splitlines()[0]  # Ray appends its own advice on retries
                raise StorageUnavailable(f"{what}. The job stopped; what it wrote is kept: run it "
                                         "again with --resume once the storage is back.") from None
            if isinstance(seen, GPUUnavailable) and not isinstance(inner, GPUUnavailable):
                raise GPUUnavailable(str(seen).splitlines()[0]) from None
            seen = inner
        # an actor that died in its constructor carries the error only as text
        text = str(exc)
        if GPUUnavailable.__name__ in text:
            line = next(ln for ln in text.splitlines() if GPUUnavailable.__name__ + ":" in ln)
            raise GPUUnavailable(line.split(GPUUnavailable.__name__ + ":", 1)[1].strip()) from None
        raise


def _gpu_node_cpus() -> float | None:
    """CPUs per GPU on the GPU nodes that are up (None when none is)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU")]
    gpus = sum(r["GPU"] for r in nodes)
    return sum(r.get("CPU", 0) for r in nodes) / gpus if gpus else None


def main(argv: list[str] | None = None) -> int:
    from ray_jobs.common import job_environment

    args = parse_args(argv)
    with job_environment(args):
        return exit_status(lambda: run(args), failures=(StorageUnavailable, GPUUnavailable))


def run(args: argparse.Namespace) -> dict:
    """The job; returns its summary (counts, wall time, time spent in the pipeline)."""
    import ray

    from ray_jobs.common import init_ray
    from ray_jobs.listing import id_hashes
    from segpc.config import Config
    from segpc.io.outputs import done_images, forget_errors, has_results, remove_orphan_cells
    from segpc.io.slide_finish import finish_slides
    from segpc.io.slides import write_slides_table
    from segpc.models.bundle import read_bundle_meta
    from segpc.wsi.job import TILE_MARK, slide_of

    t0 = time.time()
    meta = read_bundle_meta(args.bundle)  # a bad bundle stops here, before any work
    config = Config.from_dict(meta["config"])
    record = run_record(args.bundle, meta, args.rule, args.input, args.manifest, args.image_column,
                        args.max_pixels, args.segpc_masks, args.overlays, args.geojson, args.mpp, args.tta,
                        args.ome_zarr, args.ome_zarr_image, args.tile_fields)
    done_ref, n_done = None, 0
    if args.resume:
        check_resumable(args.output, record)
        removed = remove_orphan_cells(args.output)
        retried = forget_errors(args.output) if args.retry_errors else 0
        done = done_images(args.output).column("image_id").to_pylist()
        n_done = len(done)
        print(f"[segment] resume: {n_done} image(s) already done"
              + (f", {removed} unfinished part(s) removed" if removed else "")
              + (f", {retried} storage error(s) to retry" if args.retry_errors else ""), flush=True)
    else:
        if args.retry_errors:
            raise InputError("--retry-errors completes an earlier run: pass --resume too")
        if read_run_record(args.output) or has_results(args.output):
            raise InputError(f"{args.output} already holds results: pass --resume to complete them, "
                             "or choose another --output")
    init_ray()
    if n_done:
        done_ref = ray.put(np.sort(id_hashes(done)))
        del done
    plan = plan_resources(args, ray.cluster_resources(), len(config.cytoplasm.scales), _gpu_node_cpus(),
                          read_autoscaler_config())
    print(f"[segment] plan: {plan}", flush=True)
    counts = {"ok": 0, "error": 0, "cells": 0, "pipeline_s": 0.0, "first_result_s": None}
    ds = build_pipeline(args, plan, config, done_ref, meta)  # lazy; checks the input is there
    if not args.resume:
        write_run_record(args.output, record)
    seen, t_start = 0, time.time()
    written = set()  # the slides with a tile written in this run: their finishing step runs again
    for batch in _job_errors_unwrapped(ds.iter_batches(batch_size=None, batch_format="numpy")):
        if counts["first_result_s"] is None and len(batch["status"]):
            counts["first_result_s"] = time.time() - t0
        written.update(slide_of(str(i)) for i in batch["image_id"] if TILE_MARK in str(i))
        for status, n_cells in zip(batch["status"], batch["n_cells"]):
            counts["ok" if status == "ok" else "error"] += 1
            counts["cells"] += int(n_cells)
        before, seen = seen, seen + len(batch["status"])
        if seen // args.progress_every > before // args.progress_every:
            _progress(seen, t_start, counts)
    if seen % args.progress_every:
        _progress(seen, t_start, counts)
    counts["pipeline_s"] = time.time() - t_start
    finish_slides(args.output, args.geojson, written)  # each slide's coarse mask levels and GeoJSON
    slides, twice = write_slides_table(args.output)
    if twice:
        print(f"[segment] warning: {len(twice)} image id(s) occur more than once in images/ (two inputs "
              f"with one id, e.g. in Parquet shards): {', '.join(twice[:5])}", flush=True)
    wall = time.time() - t0
    print(f"[segment] done in {wall:.1f}s: {counts['ok']} ok, {counts['error']} error(s), "
          f"{counts['cells']} plasma cells in this run" + (f", {n_done} done before" if n_done else ""),
          flush=True)
    print(slides[["slide_id", "images", "images_error", "plasma_cells", "mean_cells_per_image"]]
          .to_string(index=False), flush=True)
    print(f"[segment] outputs: {args.output}/{{images,cells}}/, slides.parquet, "
          + ("masks.zarr (OME-Zarr)" if args.ome_zarr else "masks.zarr") + ", run.json"
          + (", segpc/" if args.segpc_masks else "") + (", overlays/" if args.overlays else "")
          + (", geojson/" if args.geojson else ""), flush=True)
    return {**counts, "wall_s": wall}


def _progress(seen: int, t_start: float, counts: dict) -> None:
    rate = seen / max(time.time() - t_start, 1e-9)
    print(f"[segment] {seen} images done, {rate:.2f} images/s, {counts['cells']} cells, "
          f"{counts['error']} error(s)", flush=True)


def check_resumable(output: str, record: dict) -> None:
    """Refuse to resume a run made with another bundle, rule or input; report other changes."""
    before = read_run_record(output)
    if before is None:
        print(f"[segment] {output} has no {RUN_FILE} (written by an older version): resuming without "
              "checking what made it", flush=True)
        return
    changed = differences(before, record, RESULT_KEYS)
    if changed:
        raise InputError(f"{output} was made by another run; --resume would mix results. Differences: "
                         + "; ".join(changed) + ". Use another --output, or the same settings.")
    noted = differences(before, record, NOTED_KEYS)
    if noted:
        print("[segment] resuming with: " + "; ".join(noted), flush=True)


if __name__ == "__main__":
    sys.exit(main())
