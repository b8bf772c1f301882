"""The batch job's outputs under one ``--output`` URI, written idempotently.

``images/`` and ``cells/`` are Parquet parts written in pairs (one pair per batch, one
name): cells first, then the label masks, overlays, SegPC masks and GeoJSON cells, and the ``images/``
part last. An image counts as done only once its ``images/`` row exists; ``--resume``
deletes ``cells/`` parts left without their ``images/`` part by an interruption and skips
the done images, so the finished set is complete and duplicate-free.

A part's name is a hash of its images' ids: a batch written again (a Ray task retried after
its worker died half-way) overwrites its own files instead of adding duplicates. Every
write retries transient storage failures (:func:`segpc.io.storage.with_retries`).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from segpc.io.imaging import encode_png
from segpc.io.inputs import InputImage
from segpc.io.overlay import draw_overlay
from segpc.method.results import ImageResult
from segpc.io.storage import arrow_filesystem, filesystem, join, storage_options, with_retries

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("slide_id", pa.string()), ("source_uri", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("n_cells", pa.int32()), ("n_nuclei", pa.int32()), ("cytoplasm_inferences", pa.int32()),
    ("seconds", pa.float64()),
    # the image's share of the slide statistics: slides.parquet is reduced from these rows,
    # never from cells/ (one row per image instead of one per cell)
    ("cell_area_sum", pa.int64()), ("cell_area_sq_sum", pa.float64()), ("nucleus_area_sum", pa.int64()),
    ("ratio_sum", pa.float64()),
    # whole slides (null for field images, and in parts written before slides were read):
    # kind "slide" (the slide file's own row: its grid), "tile" (a tile analysed; width and
    # height are its core's), "glass" (a tile read and found bare); mpp = µm per pixel of
    # the row's image (fields: --mpp); tiles / tiles_skipped on slide rows (the grid, the
    # tiles skipped as glass before reading); core_area_px on tile rows
    ("kind", pa.string()), ("mpp", pa.float64()), ("tiles", pa.int32()), ("tiles_skipped", pa.int32()),
    ("core_area_px", pa.int64()),
])
# error_kind: "image" (the file is not a usable image: retrying cannot help) or "storage"
# (it could not be read: missing, access denied, an outage; --retry-errors tries again)
CELLS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("slide_id", pa.string()), ("cell_id", pa.int32()),
    ("y0", pa.int32()), ("x0", pa.int32()), ("y1", pa.int32()), ("x1", pa.int32()),
    ("nucleus_area", pa.int64()), ("cell_area", pa.int64()), ("cytoplasm_area", pa.int64()),
    ("ratio", pa.float64()), ("scale", pa.float64()), ("nucleus_score", pa.float64()),
    ("cell_score", pa.float64()), ("truncated", pa.bool_()),
    # masks of the cell's box (y1-y0 rows, x1-x0 columns), row-major, np.packbits
    ("nucleus_mask", pa.binary()), ("cell_mask", pa.binary()),
    # tiles of whole slides: the box in the slide's level-0 pixels (null for field images);
    # areas in µm² where the pixel size is known (the slide's, or --mpp for fields)
    ("slide_y0", pa.int64()), ("slide_x0", pa.int64()), ("slide_y1", pa.int64()), ("slide_x1", pa.int64()),
    ("nucleus_area_um2", pa.float64()), ("cell_area_um2", pa.float64()),
])


# what ``OutputWriter.write`` returns per image: enough for progress lines and the summary
SUMMARY_COLUMNS = ("image_id", "slide_id", "status", "error", "n_cells")


@dataclass
class Placement:
    """Where a slide-derived row lies: for a tile, its core's top-left in the slide's analysis
    pixels (cells/ boxes are relative to it) and the scale to level 0; for a slide row, its
    grid. See :mod:`segpc.wsi.job`."""

    kind: str  # "slide" | "tile" | "glass"
    mpp: float | None  # µm per analysis pixel
    origin: tuple[int, int] = (0, 0)
    to_level0: float = 1.0
    core_area_px: int | None = None
    tiles: int | None = None
    tiles_skipped: int | None = None
    tile: object | None = None  # the row's segpc.wsi.job.SlideTile


@dataclass
class ImageRecord:
    """Everything known about one input image at the end of the pipeline."""

    input: InputImage
    status: str  # "ok" | "error"
    error: str = ""
    width: int = 0
    height: int = 0
    seconds: float = 0.0
    result: ImageResult | None = None
    image: np.ndarray | None = None  # for overlays
    error_kind: str = ""  # "image" or "storage" for an error (see above)
    placement: Placement | None = None  # rows of whole slides; None for field images


def unpack_mask(bits: bytes, box: tuple[int, int, int, int]) -> np.ndarray:
    """Inverse of the ``cells/`` mask encoding: a bool (y1-y0, x1-x0) array."""
    y0, x0, y1, x1 = box
    n = (y1 - y0) * (x1 - x0)
    return np.unpackbits(np.frombuffer(bits, np.uint8), count=n).astype(bool).reshape(y1 - y0, x1 - x0)


class OutputWriter:
    """Writes batches of :class:`ImageRecord` (one pair of Parquet parts per batch)."""

    def __init__(self, output: str, segpc_masks: bool = False, overlays: bool = False,
                 geojson: bool = False, mpp: float | None = None, ome_zarr: bool = False,
                 ome_zarr_image: bool = False):
        self.output, self.segpc_masks, self.overlays = output.rstrip("/"), segpc_masks, overlays
        self.geojson, self.mpp = geojson, mpp  # mpp: micrometres per pixel, for the _um2 measurements
        # masks.zarr/<id> as an OME-Zarr image group (segpc.io.ngff), the RGB image in it too
        self.ome_zarr, self.ome_zarr_image = ome_zarr or ome_zarr_image, ome_zarr_image
        self.fs, self.root = filesystem(self.output)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="segpc-write")
        self.group_written = False
        self.slides_created: set[str] = set()  # slides whose pyramid metadata this writer PUT

    def write(self, records: list[ImageRecord]) -> list[dict]:
        if not records:
            return []
        if not self.group_written:  # once per writer, not per image
            write_masks_group(self.output, self.ome_zarr)
            self.group_written = True
        for r in records:  # a slide's own row creates its label pyramid (tiles may come first)
            if r.placement is not None and r.placement.kind == "slide" and r.status == "ok":
                self._slide_masks(r.input.image_id, r.placement.tile)
        part = part_name([r.input.image_id for r in records])
        cells = [row for r in records if r.result is not None for row in _cell_rows(r, self.mpp)]
        self._parquet(f"cells/{part}", pa.Table.from_pylist(cells, schema=CELLS_SCHEMA))
        # the images' files at once: on object storage each is a few round trips
        list(self.pool.map(self._per_image_files, [r for r in records if r.result is not None]))
        rows = [_image_row(r, self.mpp) for r in records]
        self._parquet(f"images/{part}", pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
        return [{k: row[k] for k in SUMMARY_COLUMNS} for row in rows]

    def _parquet(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        put_object(self.fs, join(self.root, name), buf.getvalue())

    def _slide_masks(self, slide_image_id: str, tile):
        """The slide's :class:`segpc.io.slide_masks.SlideMasks`, its metadata PUT once per
        writer (the same bytes from any writer: racing tiles are harmless)."""
        from segpc.io.slide_masks import SlideMasks, write_slide_metadata

        m = SlideMasks.of(slide_image_id, tile)
        if slide_image_id not in self.slides_created:
            write_slide_metadata(self.output, m)
            self.slides_created.add(slide_image_id)
        return m

    def _tile_files(self, r: ImageRecord) -> None:
        """A tile's share of its slide's outputs: its core's chunks of the slide's label
        pyramid, and its cells as a part of the slide's GeoJSON (merged after the job)."""
        from segpc.io.slide_masks import LABEL_DTYPE, write_tile_masks
        from segpc.wsi.job import slide_of

        tile, slide = r.placement.tile, slide_of(r.input.image_id)
        nuclei, cells = r.result.label_maps(LABEL_DTYPE)
        write_tile_masks(self.output, self._slide_masks(slide, tile), tile.core, nuclei, cells)
        if self.geojson:
            from segpc.io.slide_geojson import part_path, tile_part

            put_object(self.fs, join(self.root, part_path(slide, r.input.image_id)),
                 tile_part(r.result, r.input.image_id, slide, tile.core[:2], tile.to_level0, tile.mpp))

    def _per_image_files(self, r: ImageRecord) -> None:
        if r.placement is not None:  # a tile of a whole slide (slide rows have no result)
            return self._tile_files(r)
        nuclei, cells = r.result.label_maps(np.uint16 if len(r.result.cells) < 65535 else np.int32)
        if self.ome_zarr:  # each PUT retried
            from segpc.io.ngff import write_ngff_masks

            write_ngff_masks(self.output, r.input.image_id, nuclei, cells,
                             r.image if self.ome_zarr_image else None, self.mpp)
        else:
            write_label_masks(self.output, r.input.image_id, nuclei, cells)
        if self.overlays and r.image is not None:
            put_object(self.fs, join(self.root, "overlays", f"{r.input.image_id}.png"),
                 encode_png(draw_overlay(r.image, nuclei, cells)))
        if self.segpc_masks:
            pattern = join(self.root, "segpc", f"{r.input.image_id}_*.bmp")
            for old in with_retries(f"listing {pattern}", self.fs.glob, pattern):
                with_retries(f"removing {old}", self.fs.rm, old)
            for inst in r.result.instances():
                put_object(self.fs, join(self.root, "segpc", f"{r.input.image_id}_{inst.k}.bmp"),
                     _bmp(inst.to_segpc_mask()))
        if self.geojson:  # QuPath cell objects; an image without cells gets an empty collection
            from segpc.io.geojson import geojson_bytes

            put_object(self.fs, join(self.root, "geojson", f"{r.input.image_id}.geojson"),
                 geojson_bytes(r.result, r.input.image_id, self.mpp))


def _bmp(mask: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".bmp", mask)
    return buf.tobytes()


def part_name(image_ids: list[str]) -> str:
    """The Parquet part name of a batch: the same images always give the same name."""
    digest = hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"


def put_object(fs, path: str, data: bytes) -> None:
    """Whole-object write, retried: on object storage one PUT (no folder to make: s3fs's
    ``makedirs`` would cost a HEAD and a LIST of the bucket); on local disks via a temp name
    and rename, so readers never see half a file."""
    def write() -> None:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        else:
            fs.pipe_file(path, data)

    with_retries(f"writing {path}", write)


def _image_row(r: ImageRecord, mpp: float | None = None) -> dict:
    res, p = r.result, r.placement
    cells = res.cells if res else []
    areas = np.array([c.cell_area for c in cells], np.float64)
    return {"image_id": r.input.image_id, "slide_id": r.input.slide_id, "source_uri": r.input.uri,
            "status": r.status, "error": r.error or None,
            "error_kind": (r.error_kind or "image") if r.status != "ok" else None,
            "width": r.width or None, "height": r.height or None, "n_cells": len(cells),
            "n_nuclei": res.n_nuclei if res else 0,
            "cytoplasm_inferences": sum(res.inferences.values()) if res else 0,
            "seconds": round(r.seconds, 4), "cell_area_sum": int(areas.sum()),
            "cell_area_sq_sum": float((areas ** 2).sum()),
            "nucleus_area_sum": int(sum(c.nucleus_area for c in cells)),
            "ratio_sum": float(sum(c.ratio for c in cells)),
            "kind": p.kind if p else None, "mpp": p.mpp if p else mpp,
            "tiles": p.tiles if p else None, "tiles_skipped": p.tiles_skipped if p else None,
            "core_area_px": p.core_area_px if p else None}


def _cell_rows(r: ImageRecord, mpp: float | None = None) -> list[dict]:
    from segpc.wsi.job import level0_box

    p = r.placement
    mpp = p.mpp if p else mpp
    um2 = None if mpp is None else mpp * mpp
    rows = []
    for c in r.result.cells:
        y0, x0, y1, x1 = c.box
        slide = level0_box(c.box, p.origin, p.to_level0) if p else (None,) * 4
        rows.append({"image_id": r.input.image_id, "slide_id": r.input.slide_id, "cell_id": c.cell_id,
                     "y0": y0, "x0": x0, "y1": y1, "x1": x1, "nucleus_area": c.nucleus_area,
                     "cell_area": c.cell_area, "cytoplasm_area": c.cell_area - c.nucleus_area,
                     "ratio": c.ratio, "scale": c.scale, "nucleus_score": c.nucleus_score,
                     "cell_score": c.cell_score, "truncated": c.truncated,
                     "nucleus_mask": np.packbits(c.nucleus).tobytes(),
                     "cell_mask": np.packbits(c.cell).tobytes(),
                     **dict(zip(("slide_y0", "slide_x0", "slide_y1", "slide_x1"), slide)),
                     "nucleus_area_um2": None if um2 is None else c.nucleus_area * um2,
                     "cell_area_um2": None if um2 is None else c.cell_area * um2})
    return rows


def zarr_store(output: str):
    """The ``masks.zarr`` store of an output URI (local folder or fsspec URL)."""
    from zarr.storage import FsspecStore, LocalStore

    url = join(output, "masks.zarr")
    if "://" not in url or url.startswith("file://"):
        return LocalStore(url.removeprefix("file://"))
    opts = storage_options(url)
    return FsspecStore.from_url(url, storage_options={**opts, "asynchronous": True})


# ``masks.zarr/<image_id>``: one Zarr v3 array (2, H, W) per image, channel 0 the nuclei and 1
# the cells, in ONE shard (one object) of zstd-compressed inner chunks of at most
# MAX_INNER_CHUNK px a side, so a reader can fetch a part of a large image by byte ranges.
# Two objects per image: the shard, then the array's zarr.json; the group's zarr.json at
# masks.zarr/ is written once per writer. With --ome-zarr, an OME-Zarr image group instead
# (segpc.io.ngff: labels/nuclei and labels/cells, a pyramid, more objects).
MASK_CHANNELS = ("nuclei", "cells")
MASK_ATTRIBUTES = {"channels": list(MASK_CHANNELS),
                   "label_meaning": "0 background; value = cell_id of cells/ rows"}
MAX_INNER_CHUNK = 1024


def inner_chunk(n: int) -> int:
    """Equal inner chunks of at most MAX_INNER_CHUNK px covering ``n`` px (1920 -> 2 x 960,
    2560 -> 3 x 854): the shard, a whole number of them, reaches past the image by fewer
    pixels than it has chunks (zarr's edge chunks, 0 there)."""
    parts = -(-n // MAX_INNER_CHUNK)
    return -(-n // parts)


def one_shard_array(store, data: np.ndarray, dims: tuple[str, ...], name: str | None = None,
                    attributes: dict | None = None) -> None:
    """``data`` (…, H, W) into ``store`` as ONE shard of zstd inner chunks of at most
    MAX_INNER_CHUNK px a side, one per leading index (a channel): the mask arrays of both
    layouts (this module's and :mod:`segpc.io.ngff`'s).

    Empty inner chunks are written too (``write_empty_chunks``): zarr's test for them
    compares each chunk with the fill value, which costs more than compressing a sparse
    chunk, and an image without cells then still has its shard (a rewrite replaces it).
    """
    import zarr
    from zarr.codecs import ZstdCodec

    chunks = (*(1,) * (data.ndim - 2), *(inner_chunk(n) for n in data.shape[-2:]))
    shard = (*data.shape[:-2], *(c * -(-n // c) for c, n in zip(chunks[-2:], data.shape[-2:])))
    arr = zarr.create_array(store, name=name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shard,
                            compressors=ZstdCodec(level=3), fill_value=0, dimension_names=dims,
                            attributes=attributes, config={"write_empty_chunks": True})
    arr[...] = data


def encode_label_masks(nuclei: np.ndarray, cells: np.ndarray) -> dict[str, bytes]:
    """The objects of one image's mask array: ``{"c/0/0/0": shard, "zarr.json": metadata}``,
    encoded in memory by zarr itself."""
    from zarr.storage import MemoryStore

    if nuclei.shape != cells.shape or nuclei.ndim != 2:
        raise ValueError(f"label maps of one image must be two (H, W) arrays: {nuclei.shape}, {cells.shape}")
    objects: dict = {}
    one_shard_array(MemoryStore(objects), np.stack([nuclei, cells.astype(nuclei.dtype, copy=False)]),
                    ("channel", "y", "x"), attributes=MASK_ATTRIBUTES)
    return {k: v.to_bytes() for k, v in objects.items()}


LAYOUTS = {False: "one array per image: <image_id> (2, H, W), channel 0 nuclei, 1 cells",
           True: "OME-Zarr (NGFF 0.5): one image group per image: <image_id>/labels/{nuclei,cells}"}


def _group_metadata(ome_zarr: bool = False) -> bytes:
    """``masks.zarr/zarr.json``: the group that holds one array (or NGFF group) per image."""
    import zarr
    from zarr.storage import MemoryStore

    objects: dict = {}
    zarr.create_group(MemoryStore(objects), attributes={"layout": LAYOUTS[ome_zarr]})
    return objects["zarr.json"].to_bytes()


def write_label_masks(output: str, image_id: str, nuclei: np.ndarray, cells: np.ndarray) -> None:
    """``masks.zarr/<image_id>``: two PUTs, the shard first and the array's ``zarr.json``
    last; nothing is listed, read or deleted. The shard's key is the same whatever the
    image's size, so a rewrite replaces both objects."""
    fs, root = filesystem(output)
    objects = encode_label_masks(nuclei, cells)
    for key in sorted(objects, key=lambda k: k == "zarr.json"):
        put_object(fs, join(root, "masks.zarr", image_id, key), objects[key])


def write_masks_group(output: str, ome_zarr: bool = False) -> None:
    """``masks.zarr/zarr.json`` (one PUT; the same bytes every time for a layout)."""
    fs, root = filesystem(output)
    put_object(fs, join(root, "masks.zarr", "zarr.json"), _group_metadata(ome_zarr))


def read_label_masks(output: str, image_id: str, box: tuple[int, int, int, int] | None = None,
                     level: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(nuclei, cells) label maps of one image, or of ``box`` of it (y0, x0, y1, x1), in any
    layout: the node at ``masks.zarr/<image_id>`` is an array (:func:`write_label_masks`) or
    an OME-Zarr group (:func:`segpc.io.ngff.write_ngff_masks`; a whole slide's pyramid,
    :mod:`segpc.io.slide_masks`), read at ``level`` (0: full resolution; groups only)."""
    import zarr

    def read() -> tuple[np.ndarray, np.ndarray]:
        node = zarr.open(store=zarr_store(output), path=image_id, mode="r", zarr_format=3)
        if isinstance(node, zarr.Group):
            from segpc.io.slide_masks import read_slide_masks

            return read_slide_masks(node, box, level)
        if level:
            raise ValueError(f"masks.zarr/{image_id} is one array: it has no level {level}")
        sel = (slice(None),) * 2 if box is None else (slice(box[0], box[2]), slice(box[1], box[3]))
        data = node[(slice(None), *sel)]
        return data[0], data[1]

    return with_retries(f"reading masks.zarr/{image_id}", read)


# ------------------------------------------------------------------------------ resume


def done_images(output: str) -> pa.Table:
    """``image_id`` of every image that has its ``images/`` row (ok or error): the one column
    resume reads."""
    return read_table(output, "images", ["image_id"])


def has_results(output: str) -> bool:
    """Whether ``images/`` holds any part: one listing, no part read."""
    fs, root = filesystem(output)
    return bool(_parts(fs, join(root, "images")))


def done_image_ids(output: str) -> set[str]:
    """Images that already have their ``images/`` row (ok or error)."""
    return set(done_images(output).column("image_id").to_pylist())


def remove_orphan_cells(output: str) -> int:
    """Delete ``cells/`` parts whose ``images/`` twin was never written (interrupted batch)."""
    fs, root = filesystem(output)
    images = {p.rsplit("/", 1)[-1] for p in _parts(fs, join(root, "images"))}
    orphans = [p for p in _parts(fs, join(root, "cells")) if p.rsplit("/", 1)[-1] not in images]
    for p in orphans:
        with_retries(f"removing {p}", fs.rm, p)
    return len(orphans)


def forget_errors(output: str, kinds: tuple[str, ...] = ("storage",)) -> int:
    """Drop the ``images/`` rows of images that failed for one of ``kinds``, so that a
    resumed run processes them again (``--retry-errors``); returns how many. Each part
    holding such a row is rewritten without it (its cells/ twin has no rows for them)."""
    fs, _ = filesystem(output)
    found = read_table(output, "images", ["error_kind"], with_file=True)
    hit = found.filter(pc.is_in(found.column("error_kind"), pa.array(list(kinds))))
    paths = sorted(set(hit.column("__filename").to_pylist()))
    for path in paths:
        full = with_retries(f"reading {path}", _read_one, fs, path, None)
        keep = pc.invert(pc.fill_null(pc.is_in(full.column("error_kind"), pa.array(list(kinds))), False))
        buf = io.BytesIO()
        pq.write_table(full.filter(keep), buf)
        put_object(fs, path, buf.getvalue())
    return hit.num_rows


def _parts(fs, folder: str) -> list[str]:
    def listing() -> list[str]:
        fs.invalidate_cache(folder)
        if not fs.exists(folder):
            return []
        return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet"))

    return with_retries(f"listing {folder}", listing)


def _read_one(fs, path: str, columns: list[str] | None) -> pa.Table:
    return pq.read_table(pa.BufferReader(fs.cat_file(path)), columns=columns)


def read_table(output: str, name: str, columns: list[str] | None = None,
               max_parts: int | None = None, with_file: bool = False) -> pa.Table:
    """All parts of ``images`` or ``cells`` as one table (empty table with the schema if none),
    or ``max_parts`` of them spread evenly over the names (a sample). Columns a part lacks
    (written by an older version) are null; ``with_file`` adds each row's part as
    ``__filename``. pyarrow's reader fetches the parts concurrently: an archive's output
    holds thousands."""
    fs, root = filesystem(output)
    paths = _parts(fs, join(root, name))
    if max_parts is not None and len(paths) > max_parts:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, max_parts)]
    schema = IMAGES_SCHEMA if name == "images" else CELLS_SCHEMA
    columns = list(columns or schema.names)
    if not paths:
        empty = schema.empty_table().select(columns)
        return empty.append_column("__filename", pa.array([], pa.string())) if with_file else empty
    afs, _ = arrow_filesystem(output)
    dataset = pads.dataset(paths, schema=schema, filesystem=afs, format="parquet")
    return with_retries(f"reading {output}/{name}/", lambda: dataset.to_table(
        columns=columns + (["__filename"] if with_file else [])))
