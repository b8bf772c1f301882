"""The job's input as a Ray Data dataset, listed by parallel tasks, one per slide folder.

The driver makes one listing request (the prefix's top level) and holds one row per slide
folder; the folders are listed, and the images already done dropped, by tasks that stream
their rows into the pipeline, so the first image is read while the listing goes on. Parquet
shards and manifests are read by Ray Data's own readers. Rows: ``uri, image_id, slide_id``
(and ``data``, the image bytes, for shards).
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np

from ray_jobs.common import pyarrow_filesystem
from segpc.errors import InputError
from segpc.io.imaging import IMAGE_SUFFIXES


FOLDERS_PER_TASK = 8
LISTING_TASKS = 2


def _rows(items) -> dict:
    return {"uri": np.array([it.uri for it in items], dtype=object),
            "image_id": np.array([it.image_id for it in items], dtype=object),
            "slide_id": np.array([it.slide_id for it in items], dtype=object)}


def id_hashes(image_ids) -> np.ndarray:
    """64-bit hashes of image ids: the done set of a million images is 8 MB, not hundreds
    (two ids sharing a hash: odds about 3e-8 for a million images)."""
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
                     for i in image_ids], dtype=np.uint64)


def _not_done(image_ids, done: list) -> np.ndarray:
    """Mask of the ids whose hash is not in the sorted done array (an object-store reference,
    fetched once per worker process)."""
    if done[0] is None:
        return np.ones(len(image_ids), bool)
    global _DONE_CACHE
    ref = done[0]
    if _DONE_CACHE[0] != ref:
        import ray

        _DONE_CACHE = (ref, ray.get(ref))
    table, h = _DONE_CACHE[1], id_hashes(image_ids)
    at = np.minimum(np.searchsorted(table, h), max(len(table) - 1, 0))
    return ~((table[at] == h) if len(table) else np.zeros(len(h), bool))


_DONE_CACHE: tuple = (None, None)


def _take(rows: dict, keep: np.ndarray) -> dict:
    return {k: v[keep] for k, v in rows.items()}


def list_folders(batch: dict, prefix: str, done: list) -> dict:
    """Map task: the images of each slide folder in the batch, minus those already done."""
    from segpc.io.inputs import list_folder

    items = [it for folder in batch["folder"] for it in list_folder(prefix, str(folder))]
    rows = _rows(items)
    return _take(rows, _not_done(rows["image_id"], done))


def manifest_rows(batch: dict, prefix: str, done: list) -> dict:
    from segpc.io.inputs import manifest_inputs

    names = list(batch)
    rows = _rows(manifest_inputs([{k: batch[k][i] for k in names} for i in range(len(batch["path"]))], prefix))
    return _take(rows, _not_done(rows["image_id"], done))


def shard_rows(batch: dict, prefix: str, image_column: str, scheme: str, done: list) -> dict:
    """Parquet-shard rows -> the read stage's columns (bytes in ``data``), minus those done."""
    from ray_jobs.stages import object_column
    from segpc.io.inputs import shard_inputs

    items = []
    slides = batch.get("slide_id")
    for i, raw in enumerate(batch["image_id"]):  # a batch may span shards: one row at a time
        items += shard_inputs([raw], None if slides is None else [slides[i]], scheme + str(batch["path"][i]),
                              prefix)
    rows = _rows(items)
    keep = _not_done(rows["image_id"], done)
    rows = _take(rows, keep)
    rows["data"] = object_column([d for d, k in zip(batch[image_column], keep) if k])
    return rows


def input_kind(prefix: str) -> tuple[str, list[str]]:
    """("images" | "shards", slide folders (plus the root's own files as ``""``)): decided
    from the top level and, if that holds no files, the first folder's listing."""
    from segpc.io.inputs import ROOT_FILES, image_files, list_folder, top_level
    from segpc.io.storage import filesystem

    folders, files = top_level(prefix)
    images, shards = image_files(files), [f for f in files if f.lower().endswith(".parquet")]
    units = ([ROOT_FILES] if images else []) + folders
    if images:
        return "images", units
    if shards:
        return "shards", []
    if folders:
        if list_folder(prefix, folders[0]):
            return "images", units
        fs, root = filesystem(prefix)
        if any(p.lower().endswith(".parquet") for p in fs.find(f"{root.rstrip('/')}/{folders[0]}")):
            return "shards", []
        if len(folders) > 1:
            return "images", units  # the first folder is empty; the others may not be
    raise InputError(f"{prefix}: no images ({', '.join(IMAGE_SUFFIXES)}) or Parquet shards found")


def input_dataset(args: argparse.Namespace, done_ref, env: dict | None):
    """The dataset of images to do (``done_ref``: object-store ref of the done ids, or None)."""
    import ray

    done = [done_ref]
    common = {"batch_format": "numpy", "runtime_env": env, "num_cpus": 0.25}
    if args.manifest:
        fs, path = pyarrow_filesystem(args.manifest)
        reader = ray.data.read_parquet if path.endswith(".parquet") else ray.data.read_csv
        ds = reader(path, filesystem=fs)
        from segpc.io.inputs import check_manifest_columns

        check_manifest_columns(args.manifest, ds.schema().names)
        return ds.map_batches(manifest_rows, fn_kwargs={"prefix": args.input, "done": done},
                              batch_size=1024, **common)
    kind, units = input_kind(args.input)
    if kind == "shards":
        fs, path = pyarrow_filesystem(args.input)
        ds = ray.data.read_parquet(path, filesystem=fs, include_paths=True, num_cpus=0.25,
                                   file_extensions=["parquet"])
        names = ds.schema().names
        if "image_id" not in names or args.image_column not in names:
            raise InputError(f"{args.input}: Parquet shards need the columns image_id and "
                             f"{args.image_column} (--image-column)")
        cols = ["path", "image_id", args.image_column] + (["slide_id"] if "slide_id" in names else [])
        scheme = args.input.split("://", 1)[0] + "://" if fs is not None else ""
        return ds.select_columns(cols).map_batches(
            shard_rows, fn_kwargs={"prefix": args.input, "image_column": args.image_column,
                                   "scheme": scheme, "done": done}, batch_size=16, **common)
    # a task lists a few folders (a folder is one or a few requests; a task costs more), and
    # two at a time keep well ahead of the images' reading
    ds = ray.data.from_items([{"folder": u} for u in units],
                             override_num_blocks=max(1, -(-len(units) // FOLDERS_PER_TASK)))
    return ds.map_batches(list_folders, fn_kwargs={"prefix": args.input, "done": done},
                          batch_size=FOLDERS_PER_TASK, compute=ray.data.TaskPoolStrategy(size=LISTING_TASKS),
                          **common)
