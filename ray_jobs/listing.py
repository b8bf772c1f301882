"""The job's input as a Ray Data dataset, listed by parallel tasks, one per slide folder.

The driver makes one listing request (the prefix's top level) and holds one row per slide
folder; the folders are listed, and the images already done dropped, by tasks that stream
their rows into the pipeline, so the first image is read while the listing goes on. Parquet
shards are listed the same way and read row group by row group; a manifest by one task, in
chunks. Rows: ``uri, image_id, slide_id, tile`` (and ``data``, the image bytes, for shards).

Whole-slide files among a folder's files (:func:`segpc.wsi.slide.is_whole_slide`) are not
field images: each is handed to a task of its own (a quarter CPU, like the listing tasks)
that opens the slide's directory, chooses its level, lays the tile grid, runs the tissue
test on a small level and returns the slide's own row and one row per tile to analyse
(:func:`segpc.wsi.job.slide_tiles`), their geometry as JSON in ``tile`` ("" for fields).
A whole slide named in a manifest is handed on the same way (its slide_id the manifest's).
A whole slide cannot come as bytes in a Parquet shard (it is read by range requests from
its own file): such a row is an error row (:func:`segpc.wsi.slide.check_not_slide_bytes`).
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np

from segpc.errors import InputError
from segpc.io.imaging import IMAGE_SUFFIXES
from segpc.wsi.slide import SLIDE_SUFFIXES
from segpc.wsi.tiles import TILE_FIELDS


FOLDERS_PER_TASK = 8
LISTING_TASKS = 2
ROWS_PER_CHUNK = 1024
SLIDE_CPUS = 0.25
LIST_CPUS = 0.25  # every listing task's share: they must never wait for the actors' CPUs
TIFF_CHECKS = 8  # threads reading TIFF directories (is it a slide?) in a listing task


def _rows(items, tiles: list[str] | None = None) -> dict:
    return {"uri": np.array([it.uri for it in items], dtype=object),
            "image_id": np.array([it.image_id for it in items], dtype=object),
            "slide_id": np.array([it.slide_id for it in items], dtype=object),
            "tile": np.array(tiles if tiles is not None else [""] * len(items), dtype=object)}


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


def list_folders(batch: dict, prefix: str, done: list, slides: dict | None = None):
    """Map task: the images of each slide folder in the batch, minus those already done;
    then the rows of each whole slide found, as its own task returns them."""
    from segpc.io.inputs import folder_files, input_files, inputs_of

    items = [it for folder in batch["folder"] for it in inputs_of(input_files(folder_files(prefix, str(folder))), prefix)]
    yield from _fields_then_slides(items, done, slides)


def _fields_then_slides(items: list, done: list, slides: dict | None, named: bool = False):
    """The rows of the field images among ``items`` (minus those done), then each whole
    slide's rows as its own task (:func:`slide_rows`) returns them: one rule for inputs
    listed from folders and from a manifest (``named``: the items' slide_id is the
    manifest's, kept; a folder's slide is the file itself)."""
    fields, wsis = split_slides(items)
    rows = _rows(fields)
    yield _take(rows, _not_done(rows["image_id"], done))
    if not wsis:
        return
    import ray

    task = ray.remote(num_cpus=SLIDE_CPUS, max_retries=3)(slide_rows)
    pending = [task.remote(it.uri, it.image_id, done, slide=it.slide_id if named else None,
                           **(slides or {})) for it in wsis]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


def split_slides(items: list) -> tuple[list, list]:
    """(field images, whole slides) among the inputs (:func:`segpc.wsi.slide.is_whole_slide`:
    by suffix, and for TIFFs by their directory, a few range reads each, some at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    from segpc.wsi.slide import is_whole_slide

    def slide(it) -> bool:
        try:
            return is_whole_slide(it.uri)
        except Exception:  # unreadable: the read stage reports it as a bad image
            return False

    with ThreadPoolExecutor(TIFF_CHECKS) as pool:
        flags = list(pool.map(slide, items))
    fields, wsis = [it for it, f in zip(items, flags) if not f], [it for it, f in zip(items, flags) if f]
    vms = [it.uri for it in wsis if it.uri.lower().endswith(".vms")]
    if vms:  # a Hamamatsu VMS slide's JPEG pieces are parts of it, not field images
        from segpc.io.storage import filesystem
        from segpc.wsi.local_copy import vms_parts

        parts = set()
        for uri in vms:
            try:
                parts.update(vms_parts(uri))
            except (InputError, OSError, UnicodeError):
                pass  # the slide's own task reports it
        fields = [it for it in fields if filesystem(it.uri)[1] not in parts]
    return fields, wsis


def slide_rows(uri: str, image_id: str, done: list, config: dict | None = None,
               field_shape: tuple[int, int] | None = None, target_mpp: float | None = None,
               mpp: float | None = None, fields_per_tile: float = TILE_FIELDS,
               slide: str | None = None) -> dict:
    """Task: a whole slide's own row and its tiles' rows, minus those already done; a slide
    that cannot be opened or tiled gives its own row only, as an error. ``slide``: the
    manifest's slide_id (else the file name, :func:`segpc.wsi.slide.slide_id`)."""
    from segpc.config import Config
    from segpc.io.inputs import InputImage
    from segpc.wsi.job import slide_error, slide_tiles, tile_id
    from segpc.wsi.slide import slide_id

    sid = slide or slide_id(uri)
    try:
        head, tiles = slide_tiles(uri, Config.from_dict(config), field_shape, target_mpp, mpp,
                                  fields_per_tile=fields_per_tile)
    except (InputError, OSError) as exc:  # StorageUnavailable is neither: it stops the job
        head, tiles = slide_error(uri, exc), []
    items = [InputImage(uri, image_id, sid)] + [InputImage(uri, tile_id(image_id, t.row, t.col), sid) for t in tiles]
    rows = _rows(items, [t.to_json() for t in [head, *tiles]])
    return _take(rows, _not_done(rows["image_id"], done))


def manifest_rows(batch: dict, prefix: str, done: list, slides: dict | None = None):
    """Map task: the rows of the manifest(s) in the batch, minus those done, in chunks; a
    whole slide named in a manifest becomes its slide row and tile rows, as in a folder."""
    from segpc.io.inputs import manifest_inputs, read_manifest

    for uri in batch["manifest"]:
        rows = read_manifest(str(uri))
        for i in range(0, len(rows), ROWS_PER_CHUNK):
            yield from _fields_then_slides(manifest_inputs(rows[i:i + ROWS_PER_CHUNK], prefix), done, slides,
                                           named=True)


def list_shards(batch: dict, prefix: str) -> dict:
    """Map task: the Parquet shards of each folder in the batch."""
    from segpc.io.inputs import folder_files, parquet_files

    base = prefix.rstrip("/")
    shards = [f"{base}/{rel}" for folder in batch["folder"] for rel in parquet_files(folder_files(prefix, str(folder)))]
    return {"shard": np.array(shards, dtype=object)}


def shard_rows(batch: dict, prefix: str, image_column: str, done: list):
    """Map task: each shard's rows -> the read stage's columns (bytes in ``data``), minus
    those done, a few row groups' worth at a time (a shard may hold gigabytes)."""
    import pyarrow.parquet as pq

    from ray_jobs.stages import object_column
    from segpc.io.inputs import shard_inputs
    from segpc.io.storage import filesystem

    for shard in batch["shard"]:
        fs, path = filesystem(str(shard))
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            check_shard_columns(str(shard), pf.schema_arrow.names, image_column)
            cols = ["image_id", image_column] + (["slide_id"] if "slide_id" in pf.schema_arrow.names else [])
            for rb in pf.iter_batches(batch_size=16, columns=cols):
                d = rb.to_pydict()
                rows = _rows(shard_inputs(d["image_id"], d.get("slide_id"), str(shard), prefix))
                keep = _not_done(rows["image_id"], done)
                rows = _take(rows, keep)
                rows["data"] = object_column([b for b, k in zip(d[image_column], keep) if k])
                yield rows


def check_shard_columns(shard: str, names: list[str], image_column: str) -> None:
    if "image_id" not in names or image_column not in names:
        raise InputError(f"{shard}: Parquet shards need the columns image_id and {image_column} "
                         "(--image-column)")


def input_kind(prefix: str) -> tuple[str, list[str], str | None]:
    """("images" | "shards", slide folders (plus the root's own files as ``""``), the first
    shard found): decided from the top level and, if that holds no files, the first
    folder's listing."""
    from segpc.io.inputs import ROOT_FILES, folder_files, input_files, parquet_files, top_level

    folders, files = top_level(prefix)
    base = prefix.rstrip("/")
    if input_files(files):
        return "images", [ROOT_FILES, *folders], None
    if parquet_files(files):
        return "shards", [ROOT_FILES, *folders], f"{base}/{parquet_files(files)[0]}"
    if folders:
        first = folder_files(prefix, folders[0])
        if input_files(first):
            return "images", folders, None
        if parquet_files(first):
            return "shards", folders, f"{base}/{parquet_files(first)[0]}"
        if len(folders) > 1:
            return "images", folders, None  # the first folder is empty; the others may not be
    raise InputError(f"{prefix}: no images ({', '.join(IMAGE_SUFFIXES)}), whole slides "
                     f"({', '.join(SLIDE_SUFFIXES)}) or Parquet shards found")


def input_dataset(args: argparse.Namespace, done_ref, env: dict | None, slides: dict | None = None,
                  rows_per_block: int | None = None):
    """The dataset of images to do (``done_ref``: object-store ref of the done ids, or None;
    ``slides``: :func:`slide_rows`'s settings from the bundle and the flags), in blocks of
    ``rows_per_block`` rows (:func:`in_blocks`; None: as listed).
    Every task here asks for a quarter of a CPU: Ray Data's own file readers ask for a whole
    one, which a small cluster's actors may leave no room for."""
    listed = _listed(args, done_ref, env, slides)
    return listed if rows_per_block is None else in_blocks(listed, rows_per_block)


def _listed(args: argparse.Namespace, done_ref, env: dict | None, slides: dict | None):
    import ray

    from segpc.io.inputs import check_manifest_columns, manifest_columns

    done = [done_ref]
    common = {"batch_format": "numpy", "runtime_env": env, "num_cpus": LIST_CPUS}
    if args.manifest:
        check_manifest_columns(args.manifest, manifest_columns(args.manifest))
        return ray.data.from_items([{"manifest": args.manifest}]).map_batches(
            manifest_rows, fn_kwargs={"prefix": args.input, "done": done, "slides": slides}, batch_size=1, **common)
    kind, units, first_shard = input_kind(args.input)
    # a task lists a few folders (a folder is one or a few requests; a task costs more), and
    # two at a time keep well ahead of the images' reading
    ds = ray.data.from_items([{"folder": u} for u in units],
                             override_num_blocks=max(1, -(-len(units) // FOLDERS_PER_TASK)))
    listing = {"batch_size": FOLDERS_PER_TASK, "compute": ray.data.TaskPoolStrategy(size=LISTING_TASKS), **common}
    if kind == "shards":
        from segpc.io.storage import filesystem

        fs, path = filesystem(first_shard)
        with fs.open(path, "rb") as f:  # a wrong --image-column stops the job before any work
            import pyarrow.parquet as pq

            check_shard_columns(first_shard, pq.read_schema(f).names, args.image_column)
        return ds.map_batches(list_shards, fn_kwargs={"prefix": args.input}, **listing).map_batches(
            shard_rows, fn_kwargs={"prefix": args.input, "image_column": args.image_column, "done": done},
            batch_size=1, **common)
    return ds.map_batches(list_folders, fn_kwargs={"prefix": args.input, "done": done, "slides": slides},
                          **listing)


def in_blocks(ds, rows: int):
    """``ds`` (ending in a listing ``map_batches``) with each listing task's output cut into
    blocks of at most ``rows`` rows, inside that task.

    Why: Ray Data gathers what one listing task yields into large blocks, and an actor pool
    hands a whole block to one actor; a whole slide's tile rows (one task's output) would all
    go to one actor. Ray's streaming repartition cuts them, but as an operator of its own its
    tasks ask for a whole CPU, which the actors of a small cluster leave none of, and even at
    a listing's share it is one more operator to schedule beside the actors (a test job once
    waited past the no-progress limit). Given the listing's remote arguments and compute,
    Ray fuses it into the listing task, so the graph keeps its operators. Ray 2.60 has no
    public argument for either, so the plan's operator gets them; where a Ray version lacks
    those fields, the blocks stay as listed (correct, less spread).
    """
    listing = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    cut = ds.repartition(target_num_rows_per_block=rows)
    op = getattr(getattr(cut, "_logical_plan", None), "dag", None)
    if (type(op).__name__ != "StreamingRepartition" or not isinstance(getattr(op, "ray_remote_args", None), dict)
            or not hasattr(op, "compute") or not isinstance(getattr(listing, "ray_remote_args", None), dict)):
        return ds
    object.__setattr__(op, "ray_remote_args", dict(listing.ray_remote_args))
    object.__setattr__(op, "compute", listing.compute)
    return cut
