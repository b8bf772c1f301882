"""``masks.zarr/<slide image_id>``: a whole slide's label masks as ONE OME-Zarr (NGFF 0.5)
pyramid, written by its tiles in parallel with no two writers on one chunk.

    <slide>/zarr.json                   plain group; ``segpc`` attributes: the view (shape,
                                        mpp, to_level0, level, factor, uri), grid_core,
                                        label_stride, levels written by tiles
    <slide>/labels/zarr.json            ``labels: [nuclei, cells]``
    <slide>/labels/{nuclei,cells}/      image-label + multiscales; levels 0, 1, ... uint32,
                                        value = ``cell_id`` of the slide's cells/ rows, 0 none

Level 0 is the analysis view (:attr:`segpc.wsi.job.SlideTile.shape`, ``mpp`` µm/px: the
scale transforms are in µm); ``to_level0`` (attribute) is the scan's level-0 pixels per
analysis pixel. Which process writes which chunk is :mod:`segpc.wsi.pyramid`: each tile
its core's chunk on every level that aligns to the cores, one finishing step
(:func:`finish_slide_masks`, after all tiles) the coarser levels, chunk by chunk from the
level above. Tiles skipped as glass write nothing: their chunks read as 0 (fill value).

Every object is encoded in memory by zarr and PUT whole (retried), nothing listed or read
by the tiles: the metadata objects are the same bytes from whichever writer, so each
writer PUTs them once per slide before its first chunk (two tiles racing write identical
bytes), and a re-run tile PUTs the same chunk objects again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from segpc.method.crops import Box
from segpc.wsi.pyramid import Level, finish_regions, pyramid, tile_region

LABEL_DTYPE = np.uint32
LABEL_NAMES = ("nuclei", "cells")
MAX_INNER = 1024  # inner chunk side of sharded levels (segpc.io.outputs.MAX_INNER_CHUNK)
LAYOUT = "whole slide: one label pyramid over the analysis view; open <slide>/labels"


@dataclass(frozen=True)
class SlideMasks:
    """What fixes a slide's pyramid: the same from every tile row and from the group's
    attributes, so every writer builds byte-identical metadata."""

    image_id: str
    shape: tuple[int, int]
    grid_core: tuple[int, int]
    mpp: float | None
    to_level0: float
    label_stride: int
    uri: str = ""
    level: int = 0
    factor: float = 1.0

    @property
    def levels(self) -> list[Level]:
        return pyramid(self.shape, self.grid_core)

    def attributes(self) -> dict:
        d = asdict(self)
        d.pop("image_id")
        return {"layout": LAYOUT, **d, "levels_by_tiles": sum(lv.by_tiles for lv in self.levels),
                "label_meaning": "0 background; value = cell_id of the slide's cells/ rows "
                                 "(tile index * label_stride + n, tile index = row * columns + col)",
                "to_level0_meaning": "scan level-0 pixels per level-0 pixel of these labels"}

    @classmethod
    def from_attributes(cls, image_id: str, attrs: dict) -> SlideMasks:
        keys = ("shape", "grid_core", "mpp", "to_level0", "label_stride", "uri", "level", "factor")
        d = {k: attrs[k] for k in keys}
        return cls(image_id, **{**d, "shape": tuple(d["shape"]), "grid_core": tuple(d["grid_core"])})

    @classmethod
    def of(cls, image_id: str, tile) -> SlideMasks:
        """From a :class:`segpc.wsi.job.SlideTile` (a slide row or any of its tile rows)."""
        return cls(image_id, tuple(tile.shape), tuple(tile.grid_core), tile.mpp, tile.to_level0,
                   tile.label_stride, tile.uri, tile.level, tile.factor)


def _divisor(side: int) -> int:
    """The largest divisor of ``side`` that is at most MAX_INNER (inner chunks tile a shard)."""
    return next(d for d in range(min(side, MAX_INNER), 0, -1) if side % d == 0)


def _array(store, name: str, level: Level):
    """A level's array: its chunk one object; a chunk over MAX_INNER px a side is a shard of
    inner chunks (byte-range reads of a region), unless its sides have no divisor >= 64."""
    import zarr
    from zarr.codecs import ZstdCodec

    inner = tuple(_divisor(c) for c in level.chunk)
    sharded = max(level.chunk) > MAX_INNER and min(inner) >= 64
    return zarr.create_array(store, name=name, shape=level.shape, dtype=LABEL_DTYPE,
                             chunks=inner if sharded else level.chunk, shards=level.chunk if sharded else None,
                             compressors=ZstdCodec(level=3), fill_value=0, dimension_names=("y", "x"),
                             config={"write_empty_chunks": True})


def metadata_objects(m: SlideMasks) -> dict[str, bytes]:
    """The group's and arrays' ``zarr.json`` objects, deepest first, the slide group's last."""
    from ome_zarr_models.v05.image_label import ImageLabelAttrs
    from ome_zarr_models.v05.image_label_types import Label
    from ome_zarr_models.v05.labels import LabelsAttrs
    from zarr.storage import MemoryStore

    from segpc.io.ngff import NGFF_VERSION, _dump, _group, _multiscale

    objects: dict = {}
    levels = m.levels
    for name in LABEL_NAMES:
        for lv in levels:
            _array(MemoryStore(objects), f"labels/{name}/{lv.k}", lv)
        _group(objects, f"labels/{name}", _dump(ImageLabelAttrs(
            version=NGFF_VERSION, image_label=Label(version=NGFF_VERSION),
            multiscales=[_multiscale(len(levels), m.mpp, False, name)])),
            {"segpc": {"label_meaning": "0 background; value = cell_id of the slide's cells/ rows",
                       "to_level0": m.to_level0}})
    _group(objects, "labels", _dump(LabelsAttrs(version=NGFF_VERSION, labels=list(LABEL_NAMES))))
    _group(objects, "", None, {"segpc": m.attributes()})
    encoded = {k: v.to_bytes() for k, v in objects.items()}
    return {k: encoded[k] for k in sorted(encoded, key=lambda k: -k.count("/"))}


def region_objects(m: SlideMasks, level: Level, box: Box, nuclei: np.ndarray,
                   cells: np.ndarray) -> dict[str, bytes]:
    """The chunk objects (keys below ``<slide>/``) of ``box`` of ``level``, one chunk."""
    from zarr.storage import MemoryStore

    y0, x0, y1, x1 = box
    out = {}
    for name, data in zip(LABEL_NAMES, (nuclei, cells)):
        objects: dict = {}
        _array(MemoryStore(objects), f"labels/{name}/{level.k}", level)[y0:y1, x0:x1] = data
        out.update({k: v.to_bytes() for k, v in objects.items() if not k.endswith("zarr.json")})
    return out


def tile_objects(m: SlideMasks, core: Box, nuclei: np.ndarray, cells: np.ndarray) -> dict[str, bytes]:
    """A tile's chunks: on each tile-written level, its core's level-k pixels
    (``labels[::2**k, ::2**k]``; the core starts on a multiple of ``2**k``)."""
    if nuclei.shape != (core[2] - core[0], core[3] - core[1]) or cells.shape != nuclei.shape:
        raise ValueError(f"label maps {nuclei.shape} do not fit the core {core}")
    out = {}
    for lv in m.levels:
        if lv.by_tiles:
            s = 2 ** lv.k
            out.update(region_objects(m, lv, tile_region(lv, core), nuclei[::s, ::s], cells[::s, ::s]))
    return out


def _put_all(output: str, image_id: str, objects: dict[str, bytes]) -> None:
    from segpc.io.outputs import put_object
    from segpc.io.storage import filesystem, join

    fs, root = filesystem(output)
    for key, data in objects.items():
        put_object(fs, join(root, "masks.zarr", image_id, key), data)


def write_slide_metadata(output: str, m: SlideMasks) -> None:
    """Create the slide's group and arrays (idempotent: the same bytes every time)."""
    _put_all(output, m.image_id, metadata_objects(m))


def write_tile_masks(output: str, m: SlideMasks, core: Box, nuclei: np.ndarray, cells: np.ndarray) -> None:
    """A tile's share of the slide's pyramid; the metadata must exist (or come later, before
    anyone reads)."""
    _put_all(output, m.image_id, tile_objects(m, core, nuclei.astype(LABEL_DTYPE, copy=False),
                                              cells.astype(LABEL_DTYPE, copy=False)))


def read_slide_meta(output: str, image_id: str) -> SlideMasks | None:
    """The slide's pyramid from its group's attributes; None if it has none (yet)."""
    import zarr

    from segpc.io.outputs import zarr_store

    try:
        group = zarr.open_group(store=zarr_store(output), path=image_id, mode="r", zarr_format=3)
    except FileNotFoundError:
        return None
    attrs = dict(group.attrs).get("segpc", {})
    return SlideMasks.from_attributes(image_id, attrs) if attrs.get("layout") == LAYOUT else None


def finish_slide_masks(output: str, m: SlideMasks) -> int:
    """Write the levels no tile writes, each chunk from the level above taken every other
    pixel: one chunk of FINISH_CHUNK px and its source (twice that a side) in memory at a
    time. Run after every tile of the slide; idempotent. Returns the chunks written."""
    import zarr

    from segpc.io.outputs import zarr_store
    from segpc.io.storage import with_retries

    write_slide_metadata(output, m)  # a slide whose tiles were all glass has no other writer
    store, n = zarr_store(output), 0
    opened: dict = {}
    for lv, (y0, x0, y1, x1) in finish_regions(m.levels):
        src = []
        for name in LABEL_NAMES:
            key = (name, lv.k - 1)
            if key not in opened:
                opened[key] = zarr.open_array(store=store, path=f"{m.image_id}/labels/{name}/{lv.k - 1}",
                                              mode="r", zarr_format=3)
            arr = opened[key]
            block = with_retries(f"reading {m.image_id} level {lv.k - 1}", arr.__getitem__,
                                 (slice(2 * y0, 2 * y1), slice(2 * x0, 2 * x1)))
            src.append(block[::2, ::2])
        _put_all(output, m.image_id, region_objects(m, lv, (y0, x0, y1, x1), *src))
        n += 1
    return n


def read_slide_masks(group, box: Box | None = None, level: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(nuclei, cells) of ``box`` (the level's pixels; None: all) from a slide's group."""
    sel = (slice(None), slice(None)) if box is None else (slice(box[0], box[2]), slice(box[1], box[3]))
    return tuple(group[f"labels/{name}/{level}"][sel] for name in LABEL_NAMES)
