"""The batch job's stages: small callables over batches of rows, each calling segpc steps.

A row carries ``uri, image_id, slide_id, status, error, width, height, seconds`` and ``work``,
a :class:`Work` holding the image's :class:`segpc.method.steps.ImageState` between stages.

GPU actors (:class:`NucleusNet`, :class:`CellNet`) only run networks; decoding, stage-1
post-processing, crops, candidates, aggregation and writes run in CPU tasks and actors, so
a GPU's next batch is always ready. On CPU-only clusters :class:`Segment` runs every step
of an image in one actor (no hand-over between processes for work that shares the same CPUs).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ray_jobs.faults import maybe_die
from segpc.errors import InputError


@dataclass
class Work:
    """The heavy part of a row, carried as one Python object between stages."""

    state: object | None = None  # segpc.method.steps.ImageState; None when the image failed


class GPUUnavailable(RuntimeError):
    """An actor that Ray gave a GPU sees none: the job stops rather than run on the CPU."""


def object_column(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _states(batch: dict) -> list:
    return [w.state for w in batch["work"] if w.state is not None]


def _charge(batch: dict, seconds: float) -> None:
    """Spread a stage's time over the batch's images (the per-image ``seconds`` column)."""
    rows = [i for i, w in enumerate(batch["work"]) if w.state is not None]
    if rows:
        batch["seconds"] = batch["seconds"].astype(float)
        batch["seconds"][rows] += seconds / len(rows)


# ----------------------------------------------------------------------------- CPU tasks


def read_decode(batch: dict, max_pixels: int | None, config: dict) -> dict:
    """Fetch (with retries), decode and validate each image, and fit it into the U-Net's
    input; failures become error rows. A tile of a whole slide is read from the slide by range
    reads (its read box, at its level); a slide's own row reads nothing."""
    from segpc.config import Config
    from segpc.io.imaging import MAX_PIXELS, decode_image
    from segpc.io.storage import read_bytes
    from segpc.method.steps import prepare
    from segpc.wsi.job import GLASS, SLIDE, SlideTile, is_glass, read_tile
    from segpc.wsi.slide import check_not_slide_bytes

    cfg = Config.from_dict(config)
    n = len(batch["uri"])
    shard_bytes = batch.pop("data", None)  # rows of Parquet shards bring their bytes along
    tiles = batch["tile"].copy() if "tile" in batch else np.full(n, "", dtype=object)
    status, error, kind, width, height, seconds, work = [], [], [], [], [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        try:
            tile = SlideTile.from_json(tiles[i]) if tiles[i] else None
            if tile is not None and tile.kind == SLIDE:  # the slide's own row: its grid, or why not
                if tile.error:
                    raise (InputError if tile.error_kind == "image" else OSError)(tile.error)
                work.append(Work())
                status.append("ok"), error.append(""), width.append(tile.shape[1]), height.append(tile.shape[0])
                kind.append("")
                seconds.append(time.perf_counter() - t0)
                continue
            if tile is not None:
                image = read_tile(tile)
                if is_glass(image, tile):  # no small level to test on: the core's own pixels
                    tiles[i], image = replace(tile, kind=GLASS).to_json(), None
            else:
                data = shard_bytes[i] if shard_bytes is not None else read_bytes(batch["uri"][i])
                if shard_bytes is not None:
                    check_not_slide_bytes(data, batch["uri"][i])
                image = decode_image(data, batch["uri"][i], max_pixels or MAX_PIXELS)
            # a tile is seen at the scale of the bundle's fields, and segments the nuclei it owns
            at = {"field_shape": tile.field, "region": tile.tile.core_box_in_read} if tile is not None else {}
            work.append(Work(prepare(image, cfg, batch["uri"][i], **at) if image is not None else None))
            h, w = tile.core_shape if tile is not None else image.shape[:2]  # a tile's image is its core
            status.append("ok"), error.append(""), width.append(w), height.append(h)
            kind.append("")
        except (InputError, OSError) as exc:  # StorageUnavailable is neither: it stops the job
            status.append("error"), error.append(str(exc)), width.append(0), height.append(0)
            # the file itself is bad, or it could not be read (missing, denied): --retry-errors
            kind.append("image" if isinstance(exc, InputError) else "storage")
            work.append(Work())
        seconds.append(time.perf_counter() - t0)
    return {**batch, "tile": tiles, "status": np.array(status), "error": np.array(error),
            "error_kind": np.array(kind),
            "width": np.array(width),
            "height": np.array(height), "seconds": np.array(seconds), "work": object_column(work)}


def _each_image(batch: dict, config: dict, step: Callable) -> dict:
    """``step(state, config)`` on each image of the batch that is still being worked on; the
    time is charged to them."""
    from segpc.config import Config

    cfg, t0 = Config.from_dict(config), time.perf_counter()
    for st in _states(batch):
        step(st, cfg)
    _charge(batch, time.perf_counter() - t0)
    return batch


def find_nuclei(batch: dict, config: dict, keep_image: bool) -> dict:
    """Stage 1 after the U-Net: nucleus instances and the first crops."""
    from segpc.method.steps import find

    return _each_image(batch, config, lambda st, cfg: find(st, cfg, keep_image))


def take_candidates(batch: dict, scale: float, config: dict) -> dict:
    """After one scale's network: its candidates and the crops each nucleus needs next."""
    from segpc.method.steps import take_candidates as take

    return _each_image(batch, config, lambda st, cfg: take(st, scale, cfg))


# ----------------------------------------------------------------------------- actors


class _Networks:
    """Shared actor set-up: explicit torch threads, the bundle's networks loaded once from its
    URI, and a GPU that is there when Ray gave one."""

    def _load(self, bundle_uri: str, threads: int, scales: list[float] | None, nucleus: bool, rule: str):
        import torch

        from segpc.models.bundle import load_bundle

        _check_gpu()
        torch.set_num_threads(max(1, threads))
        self.bundle = load_bundle(bundle_uri, device="cpu", scales=scales, nucleus=nucleus)
        self.config = self.bundle.config
        self.config.aggregation.mode = rule


def _check_gpu() -> None:
    """Stop, naming the node, when Ray gave this actor a GPU that torch cannot see (a CPU
    build of torch, a driver mismatch): running on the CPU unnoticed would be 50x slower."""
    import ray
    import torch

    ids = ray.get_gpu_ids()
    if ids and not torch.cuda.is_available():
        raise GPUUnavailable(
            f"node {socket.gethostname()} ({ray.util.get_node_ip_address()}): Ray gave this actor "
            f"GPU {ids} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but torch "
            f"{torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device. The job "
            "stops instead of running on the CPU: install a CUDA build of torch that matches the "
            "node's driver (nvidia-smi), or run without --gpus on a CPU cluster.")


class NucleusNet(_Networks):
    """GPU actor: the U-Net, nothing else."""

    def __init__(self, bundle_uri: str, threads: int, rule: str, batch_size: int, tta: bool = False):
        from segpc.method.segmenter import nucleus_net

        self._load(bundle_uri, threads, [], True, rule)
        self.net = nucleus_net(self.bundle, None, batch_size, tta=tta)

    def __call__(self, batch: dict) -> dict:
        from segpc.method.steps import run_nucleus

        maybe_die("nucleus")
        t0 = time.perf_counter()
        run_nucleus(_states(batch), self.net)
        _charge(batch, time.perf_counter() - t0)
        return batch


class CellNet(_Networks):
    """GPU actor: one scale's Attention DeepLabv3+ over the crops queued for it."""

    def __init__(self, bundle_uri: str, scale: float, threads: int, rule: str, batch_size: int,
                 tta: bool = False):
        from segpc.method.segmenter import cell_net

        self._load(bundle_uri, threads, [scale], False, rule)
        self.scale = scale
        self.net = cell_net(self.bundle, None, batch_size, tta=tta)

    def __call__(self, batch: dict) -> dict:
        from segpc.method.steps import run_cells

        maybe_die("cytoplasm")
        t0 = time.perf_counter()
        run_cells(_states(batch), self.scale, self.net)
        _charge(batch, time.perf_counter() - t0)
        return batch


class Segment(_Networks):
    """CPU actor (CPU-only clusters): every step of an image, from reading and decoding,
    networks included, to the aggregation and the writes of the batch. Decoding here and not
    in a task keeps each camera image (10-15 MB) out of the object store: at camera size the
    round trip cost as much CPU as segmenting."""

    def __init__(self, bundle_uri: str, threads: int, rule: str, batch_size: int, output: str,
                 segpc_masks: bool, overlays: bool, max_pixels: int | None = None,
                 geojson: bool = False, mpp: float | None = None, tta: bool = False,
                 ome_zarr: bool = False, ome_zarr_image: bool = False):
        from segpc.method.segmenter import Segmenter, cell_net, nucleus_net

        self._load(bundle_uri, threads, None, True, rule)
        self.segmenter = Segmenter(self.config, nucleus_net(self.bundle, "cpu", batch_size, tta=tta),
                                   cell_net(self.bundle, "cpu", batch_size * 4, tta=tta))
        self.keep_image, self.max_pixels = overlays or ome_zarr_image, max_pixels
        self.decode_config = self.config.to_dict()  # read_decode's argument, built once per actor
        self.write = Finalize(self.config.to_dict(), output, segpc_masks, overlays, rule, geojson, mpp,
                              ome_zarr, ome_zarr_image)

    def __call__(self, batch: dict) -> dict:
        from segpc.method.steps import find, run_cells, run_nucleus, take_candidates

        batch = read_decode(batch, self.max_pixels, self.decode_config)
        cfg, states = self.config, _states(batch)
        t0 = time.perf_counter()
        maybe_die("nucleus")
        run_nucleus(states, self.segmenter.nucleus_fn)
        for st in states:
            find(st, cfg, self.keep_image)
        maybe_die("cytoplasm")
        for scale in cfg.cytoplasm.scales:
            run_cells(states, scale, self.segmenter.cell_fn)
            for st in states:
                take_candidates(st, scale, cfg)
        _charge(batch, time.perf_counter() - t0)
        return self.write(batch)


class Finalize:
    """CPU actor: the last scale's candidates, aggregation, label masks and all writes of a
    batch (``images/`` part last). It needs no torch, so it starts in a fraction of the time
    the model actors take, while they are starting too."""

    def __init__(self, config: dict, output: str, segpc_masks: bool, overlays: bool, rule: str,
                 geojson: bool = False, mpp: float | None = None, ome_zarr: bool = False,
                 ome_zarr_image: bool = False):
        from segpc.config import Config
        from segpc.io.outputs import OutputWriter

        self.config = Config.from_dict(config)
        self.config.aggregation.mode = rule
        self.writer = OutputWriter(output, segpc_masks, overlays, geojson, mpp, ome_zarr, ome_zarr_image)

    def __call__(self, batch: dict) -> dict:
        from segpc.io.inputs import InputImage
        from segpc.io.outputs import SUMMARY_COLUMNS, ImageRecord
        from segpc.method.steps import finish, take_candidates
        from segpc.wsi.job import SlideTile, placement, tile_result

        records = []
        last = self.config.cytoplasm.scales[-1]
        tiles = batch.get("tile", np.full(len(batch["work"]), "", dtype=object))
        for i, w in enumerate(batch["work"]):
            t0 = time.perf_counter()
            result = None
            tile = SlideTile.from_json(tiles[i]) if tiles[i] else None
            if w.state is not None:
                take_candidates(w.state, last, self.config)  # no-op when a fused actor did it
                result = finish(w.state, self.config)
                if tile is not None:  # a tile of a whole slide: its owned cells, in its core
                    result = tile_result(result, tile)
            records.append(ImageRecord(
                InputImage(batch["uri"][i], batch["image_id"][i], batch["slide_id"][i]),
                batch["status"][i], batch["error"][i], int(batch["width"][i]), int(batch["height"][i]),
                float(batch["seconds"][i]) + time.perf_counter() - t0, result,
                w.state.image if w.state is not None else None, batch["error_kind"][i],
                placement(tile) if tile is not None else None))
        rows = self.writer.write(records)  # [] for an empty batch (all rows filtered on resume)
        maybe_die("write")  # the worst moment: written, but Ray has not heard back
        return {k: np.array([r[k] if r[k] is not None else "" for r in rows], dtype=object if k != "n_cells" else int)
                for k in SUMMARY_COLUMNS}
