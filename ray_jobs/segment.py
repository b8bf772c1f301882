"""The batch job: segment every image under an input prefix with Ray Data.

    python -m ray_jobs.segment --input URI --output URI --bundle BUNDLE_URI
        [--segpc-masks] [--overlays] [--keep-all] [--resume] [--manifest CSV]

--input is a prefix of image files (any depth; the first folder is the slide), or of
Parquet shards with the image bytes in a column (--image-column) beside image_id and,
optionally, slide_id.

Pipeline (streaming, no all-to-all step): list inputs on the driver -> read + decode + validate
(CPU tasks) -> nucleus U-Net (actor pool) -> one Attention DeepLabv3+ actor pool per scale,
each running only the nuclei that the cascade still sends to it -> aggregate, label masks
and writes (CPU tasks). Each image's crops travel with its own row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from ray_jobs.faults import maybe_die
from segpc.errors import InputError, exit_status
from segpc.io.storage import StorageUnavailable


@dataclass
class Work:
    """The heavy part of a row, carried as one Python object between stages."""

    image: np.ndarray | None = None
    state: object | None = None  # segpc.method.segmenter.ImageState once stage 1 ran


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.segment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="prefix of image files (any depth; slide = first folder)")
    p.add_argument("--output", required=True, help="output prefix (images/, cells/, slides.parquet, masks.zarr)")
    p.add_argument("--bundle", required=True, help="model bundle (folder or s3:// URI)")
    p.add_argument("--manifest", default=None, help="CSV/Parquet with columns path, slide_id")
    p.add_argument("--image-column", default="image",
                   help="for Parquet shards under --input: the column of image bytes (with image_id, "
                        "and optionally slide_id, beside it)")
    p.add_argument("--segpc-masks", action="store_true", help="also write segpc/<id>_<k>.bmp (40/20)")
    p.add_argument("--overlays", action="store_true", help="also write overlays/<id>.png QC pictures")
    p.add_argument("--rule", choices=["cascade", "best", "keep-all"], default="cascade",
                   help="aggregation: cascade (default), best (every scale, best kept), keep-all")
    p.add_argument("--keep-all", action="store_true",
                   help="same as --rule keep-all: every plausible candidate (published challenge mode)")
    p.add_argument("--resume", action="store_true", help="skip images already in images/")
    p.add_argument("--batch-size", type=int, default=None, help="images per model batch (default 8 CPU, 16 GPU)")
    p.add_argument("--nucleus-actors", type=int, default=None, help="nucleus pool size (default: 1 per GPU, else 1)")
    p.add_argument("--cytoplasm-actors", type=int, default=None, help="pool size per scale (default: as nucleus)")
    p.add_argument("--gpus", type=float, default=None,
                   help="GPUs to plan for (default: the cluster's; set it on an autoscaling cluster)")
    p.add_argument("--nucleus-gpu", type=float, default=0.5, help="GPU fraction per nucleus actor")
    p.add_argument("--cytoplasm-gpu", type=float, default=None,
                   help="GPU fraction per cytoplasm actor (default: the rest of a GPU shared by the scales)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per CPU actor")
    p.add_argument("--fuse-scales", action=argparse.BooleanOptionalAction, default=None,
                   help="one actor pool for all scales instead of one per scale "
                        "(default: fused without GPUs, per scale with GPUs)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (default 50 MP)")
    p.add_argument("--progress-every", type=int, default=50, help="a progress line every N images")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    p.add_argument("--io-retry-s", type=float, default=None,
                   help="seconds each storage read or write keeps retrying before the job stops "
                        "(default 300, or SEGPC_IO_RETRY_S); --resume completes a stopped job")
    args = p.parse_args(argv)
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    if args.io_retry_s is not None:
        os.environ["SEGPC_IO_RETRY_S"] = str(args.io_retry_s)  # reaches the workers too
    if args.keep_all:
        args.rule = "keep-all"
    return args


# ----------------------------------------------------------------------------- stages


def read_decode(batch: dict, max_pixels: int) -> dict:
    """CPU task: fetch (with retries) and decode each image; failures become error rows."""
    from segpc.io.imaging import MAX_PIXELS, decode_image
    from segpc.io.storage import read_bytes

    n = len(batch["uri"])
    shard_bytes = batch.pop("data", None)  # rows of Parquet shards bring their bytes along
    status, error, width, height, seconds, work = [], [], [], [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        try:
            data = shard_bytes[i] if shard_bytes is not None else read_bytes(batch["uri"][i])
            image = decode_image(data, batch["uri"][i], max_pixels or MAX_PIXELS)
            status.append("ok"), error.append(""), width.append(image.shape[1]), height.append(image.shape[0])
            work.append(Work(image=image))
        except (InputError, OSError) as exc:  # StorageUnavailable is neither: it stops the job
            status.append("error"), error.append(str(exc)), width.append(0), height.append(0)
            work.append(Work())
        seconds.append(time.perf_counter() - t0)
    return {**batch, "status": np.array(status), "error": np.array(error), "width": np.array(width),
            "height": np.array(height), "seconds": np.array(seconds), "work": _objects(work)}


def shard_rows(batch: dict, slides: dict, todo: set, image_column: str, scheme: str) -> dict:
    """Parquet-shard rows -> the read stage's columns, keeping only the images still to do."""
    from segpc.io.inputs import safe_id

    ids_all = [safe_id(str(raw)) for raw in batch["image_id"]]
    keep = [i for i, image_id in enumerate(ids_all) if image_id in todo]
    ids = [ids_all[i] for i in keep]
    return {"uri": np.array([f"{scheme}{batch['path'][i]}#{batch['image_id'][i]}" for i in keep], dtype=object),
            "image_id": np.array(ids, dtype=object), "slide_id": np.array([slides[i] for i in ids], dtype=object),
            "data": _objects([batch[image_column][i] for i in keep])}


def _objects(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


class _Stage:
    """Shared actor set-up: one bundle load per actor, explicit threads, the job's rule."""

    def _setup(self, bundle_uri: str, threads: int, rule: str, scales: list[float], nucleus: bool):
        import torch

        from segpc.models.bundle import load_bundle

        torch.set_num_threads(max(1, threads))
        self.bundle = load_bundle(bundle_uri, device="cpu", scales=scales, nucleus=nucleus)
        self.config = self.bundle.config
        self.config.aggregation.mode = rule


class NucleusStage(_Stage):
    def __init__(self, bundle_uri: str, threads: int, rule: str, batch_size: int):
        from segpc.method.segmenter import nucleus_fn

        self._setup(bundle_uri, threads, rule, [], True)
        self.fn = nucleus_fn(self.bundle, None, batch_size)

    def __call__(self, batch: dict) -> dict:
        from segpc.method.segmenter import detect

        maybe_die("nucleus")
        t0 = time.perf_counter()
        rows = [i for i, w in enumerate(batch["work"]) if w.image is not None]
        for i, st in zip(rows, detect([batch["work"][i].image for i in rows], self.fn, self.config)):
            batch["work"][i].state = st
        _charge(batch, rows, time.perf_counter() - t0)
        return batch


class ScaleStage(_Stage):
    """One pool per scale (``scales`` = [s]); or, with ``--fuse-scales``, one pool that runs
    the whole cascade (``scales`` = all): on CPUs that saves three model loads and three
    hand-overs of every row, and the cascade still skips the scales a nucleus does not need."""

    def __init__(self, bundle_uri: str, scales: list[float], threads: int, rule: str, batch_size: int):
        from segpc.method.segmenter import cell_fn

        self._setup(bundle_uri, threads, rule, scales, False)
        self.scales = scales
        self.fn = cell_fn(self.bundle, None, batch_size)

    def __call__(self, batch: dict) -> dict:
        from segpc.method.segmenter import run_scale

        maybe_die("cytoplasm")
        t0 = time.perf_counter()
        rows = [i for i, w in enumerate(batch["work"]) if w.state is not None]
        for scale in self.scales:
            run_scale([batch["work"][i].state for i in rows], scale, self.fn, self.config)
        _charge(batch, rows, time.perf_counter() - t0)
        return batch


def _charge(batch: dict, rows: list[int], seconds: float) -> None:
    """Spread a batch's stage time over its images (the per-image ``seconds`` column)."""
    if rows:
        batch["seconds"] = batch["seconds"].astype(float)
        batch["seconds"][rows] += seconds / len(rows)


class Finalize:
    """CPU stage: aggregation, label masks and all writes of a batch (images/ part last)."""

    def __init__(self, config: dict, output: str, segpc_masks: bool, overlays: bool, rule: str):
        # The bundle's config comes from the driver: this actor needs no torch, so it starts
        # in a fraction of the time the model actors take, while they are starting too.
        from segpc.config import Config
        from segpc.io.outputs import OutputWriter

        self.config = Config.from_dict(config)
        self.config.aggregation.mode = rule
        self.writer = OutputWriter(output, segpc_masks, overlays)
        self.overlays = overlays

    def __call__(self, batch: dict) -> dict:
        from segpc.io.inputs import InputImage
        from segpc.io.outputs import SUMMARY_COLUMNS, ImageRecord
        from segpc.method.segmenter import finish

        records = []
        for i, w in enumerate(batch["work"]):
            t0 = time.perf_counter()
            result = finish(w.state, self.config) if w.state is not None else None
            records.append(ImageRecord(
                InputImage(batch["uri"][i], batch["image_id"][i], batch["slide_id"][i]),
                batch["status"][i], batch["error"][i], int(batch["width"][i]), int(batch["height"][i]),
                float(batch["seconds"][i]) + time.perf_counter() - t0, result,
                w.image if self.overlays else None))
        rows = self.writer.write(records)  # [] for an empty batch (all rows filtered on resume)
        maybe_die("write")  # the worst moment: written, but Ray has not heard back
        return {k: np.array([r[k] if r[k] is not None else "" for r in rows], dtype=object if k != "n_cells" else int)
                for k in SUMMARY_COLUMNS}


# ----------------------------------------------------------------------------- driver


@dataclass
class Plan:
    """Pool sizes and per-actor resources, from the flags and the cluster."""

    nucleus_actors: int
    cytoplasm_actors: int
    nucleus_gpu: float
    cytoplasm_gpu: float
    actor_cpus: float
    threads: int
    batch_size: int
    fuse_scales: bool
    read_tasks: int  # concurrent read + decode tasks


def plan_resources(args: argparse.Namespace, cluster: dict, n_scales: int) -> Plan:
    """GPU cluster: per GPU, one nucleus actor (half a GPU) and one actor per scale sharing
    the other half. CPU only: the scales share one pool (``--fuse-scales``), every actor gets
    a fraction of the CPUs, leaving at least one whole CPU for the read and write tasks, so
    small machines never deadlock, and torch threads are split between the actors."""
    gpus = cluster.get("GPU", 0) if args.gpus is None else args.gpus
    cpus = cluster.get("CPU", 1)
    n_nuc = args.nucleus_actors or max(1, int(gpus))
    n_cyt = args.cytoplasm_actors or n_nuc
    fuse = args.fuse_scales if args.fuse_scales is not None else gpus == 0
    # Read tasks wait on storage, not the CPU, so one per CPU is plenty; more only start
    # more worker processes, which on a small machine slows the actors' start-up.
    reads = max(2, int(cpus))
    if gpus > 0:
        cyt_gpu = args.cytoplasm_gpu if args.cytoplasm_gpu is not None else \
            (1 - args.nucleus_gpu) / (1 if fuse else n_scales)
        return Plan(n_nuc, n_cyt, args.nucleus_gpu, cyt_gpu, 1.0, args.threads or 2, args.batch_size or 16, fuse, reads)
    actors = n_nuc + n_cyt * (1 if fuse else n_scales)
    # Keep a whole CPU (or a quarter of a big node) free for reading, listing and writing:
    # some of Ray Data's own tasks ask for one full CPU.
    free = max(1.0, cpus * 0.25) + 0.25
    actor_cpus = max(0.05, round((cpus - free) / actors, 3))
    # the stages run at once, so their torch threads share the cores (oversubscribing them
    # cost 20% on 2 cores)
    threads = args.threads or max(1, int(cpus // actors))
    return Plan(n_nuc, n_cyt, 0.0, 0.0, actor_cpus, threads, args.batch_size or 8, fuse, reads)


def build_pipeline(items: list, args: argparse.Namespace, plan: Plan, config):
    """The Ray Data graph, top to bottom; ``config`` is the bundle's."""
    import ray

    from ray_jobs.common import worker_runtime_env

    rule, scales = args.rule, list(config.cytoplasm.scales)
    # a storage outage raised in a stage reaches the driver as itself (run() explains it)
    ray.data.DataContext.get_current().raise_original_map_exception = True
    env = worker_runtime_env() or None
    if items[0].shard:
        from ray_jobs.common import pyarrow_filesystem

        shards = sorted({it.shard for it in items})
        fs, _ = pyarrow_filesystem(shards[0])
        paths = [p.split("://", 1)[1] if fs is not None else p for p in shards]
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, num_cpus=0.25) \
            .select_columns(["path", "image_id", args.image_column])
        ds = ds.map_batches(shard_rows, fn_kwargs={
            "slides": {it.image_id: it.slide_id for it in items}, "todo": {it.image_id for it in items},
            "image_column": args.image_column,
            "scheme": shards[0].split("://", 1)[0] + "://" if fs is not None else ""}, batch_size=16, batch_format="numpy", runtime_env=env)
    else:
        ds = ray.data.from_items([{"uri": it.uri, "image_id": it.image_id, "slide_id": it.slide_id}
                                  for it in items], override_num_blocks=max(1, min(len(items) // 4, 1000)))
    ds = ds.map_batches(read_decode, fn_kwargs={"max_pixels": args.max_pixels}, batch_size=4,
                        compute=ray.data.TaskPoolStrategy(size=plan.read_tasks),
                        num_cpus=0.25, batch_format="numpy", runtime_env=env)
    ds = ds.map_batches(NucleusStage, fn_constructor_kwargs={
                            "bundle_uri": args.bundle, "threads": plan.threads, "rule": rule,
                            "batch_size": plan.batch_size},
                        compute=ray.data.ActorPoolStrategy(size=plan.nucleus_actors),
                        batch_size=plan.batch_size, num_gpus=plan.nucleus_gpu or None,
                        num_cpus=plan.actor_cpus, batch_format="numpy", runtime_env=env)
    for group in ([scales] if plan.fuse_scales else [[s] for s in scales]):
        ds = ds.map_batches(ScaleStage, fn_constructor_kwargs={
                                "bundle_uri": args.bundle, "scales": group, "threads": plan.threads,
                                "rule": rule, "batch_size": plan.batch_size * 4},
                            compute=ray.data.ActorPoolStrategy(size=plan.cytoplasm_actors),
                            batch_size=plan.batch_size, num_gpus=plan.cytoplasm_gpu or None,
                            num_cpus=plan.actor_cpus, batch_format="numpy", runtime_env=env)
    return ds.map_batches(Finalize, fn_constructor_kwargs={
                              "config": config.to_dict(), "output": args.output,
                              "segpc_masks": args.segpc_masks, "overlays": args.overlays,
                              "rule": rule},
                          # one writer per nucleus actor: writes keep up as the GPUs grow
                          compute=ray.data.ActorPoolStrategy(size=plan.nucleus_actors),
                          batch_size=plan.batch_size, num_cpus=0.25, batch_format="numpy", runtime_env=env)


def _storage_errors_unwrapped(batches):
    """Batches as they come; a storage outage that outlasted its retries, raised inside a
    worker and wrapped by Ray on the way, comes out as itself, with what to do next."""
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
            seen = inner
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: run(args), failures=(StorageUnavailable,))


def run(args: argparse.Namespace) -> dict:
    """The job; returns its summary (counts, wall time, time spent in the pipeline)."""
    import ray

    from ray_jobs.common import init_ray
    from segpc.models.bundle import load_bundle
    from segpc.io.inputs import list_inputs
    from segpc.io.outputs import done_image_ids, remove_orphan_cells
    from segpc.io.slides import write_slides_table

    t0 = time.time()
    config = load_bundle(args.bundle).config  # a bad bundle stops here, before any work
    items = list_inputs(args.input, args.manifest)
    done: set[str] = set()
    if args.resume:
        removed = remove_orphan_cells(args.output)
        done = done_image_ids(args.output)
        print(f"[segment] resume: {len(done)} image(s) already done"
              + (f", {removed} unfinished part(s) removed" if removed else ""), flush=True)
    elif done_image_ids(args.output):
        raise InputError(f"{args.output} already holds results: pass --resume to complete them, "
                         "or choose another --output")
    todo = [it for it in items if it.image_id not in done]
    print(f"[segment] {len(items)} input image(s), {len(todo)} to do", flush=True)
    init_ray()
    plan = plan_resources(args, ray.cluster_resources(), len(config.cytoplasm.scales))
    print(f"[segment] plan: {plan}", flush=True)
    counts = {"ok": 0, "error": 0, "cells": 0, "pipeline_s": 0.0}
    if todo:
        ds = build_pipeline(todo, args, plan, config)
        seen, t_start = 0, time.time()
        for batch in _storage_errors_unwrapped(ds.iter_batches(batch_size=None, batch_format="numpy")):
            for status, n_cells in zip(batch["status"], batch["n_cells"]):
                counts["ok" if status == "ok" else "error"] += 1
                counts["cells"] += int(n_cells)
            before, seen = seen, seen + len(batch["status"])
            if seen // args.progress_every > before // args.progress_every or seen == len(todo):
                rate = seen / max(time.time() - t_start, 1e-9)
                print(f"[segment] {seen}/{len(todo)} images, {rate:.2f} images/s, {counts['cells']} cells, "
                      f"{counts['error']} error(s)", flush=True)
        counts["pipeline_s"] = time.time() - t_start
    slides = write_slides_table(args.output)
    wall = time.time() - t0
    print(f"[segment] done in {wall:.1f}s: {counts['ok']} ok, {counts['error']} error(s), "
          f"{counts['cells']} plasma cells in this run", flush=True)
    print(slides[["slide_id", "images", "images_error", "plasma_cells", "mean_cells_per_image"]]
          .to_string(index=False), flush=True)
    print(f"[segment] outputs: {args.output}/{{images,cells}}/, slides.parquet, masks.zarr"
          + (", segpc/" if args.segpc_masks else "") + (", overlays/" if args.overlays else ""), flush=True)
    return {**counts, "wall_s": wall}


if __name__ == "__main__":
    sys.exit(main())
