"""The label masks' layout: one sharded Zarr v3 array per image, two objects, no listing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from fsspec.implementations.memory import MemoryFileSystem

from segpc.io.outputs import (
    MASK_CHANNELS,
    ImageRecord,
    OutputWriter,
    read_label_masks,
    write_label_masks,
    zarr_store,
)


def label_maps(h: int, w: int, n: int, dtype=np.uint16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sparse nucleus and cell label maps: ``n`` discs, value = cell id."""
    rng = np.random.default_rng(seed)
    nuclei, cells = np.zeros((h, w), dtype), np.zeros((h, w), dtype)
    yy, xx = np.mgrid[:h, :w]
    for k, (y, x) in enumerate(rng.uniform(0, 1, (n, 2)) * (h, w), 1):
        d2 = (yy - y) ** 2 + (xx - x) ** 2
        cells[d2 < 30**2] = k
        nuclei[d2 < 15**2] = k
    return nuclei, cells


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("shape", [(1920, 2560), (1536, 2040), (240, 320), (1, 1)])
def test_label_masks_round_trip_in_at_most_three_objects(tmp_path, shape):
    nuclei, cells = label_maps(*shape, n=12)
    write_label_masks(str(tmp_path), "img-1", nuclei, cells)
    got_nuclei, got_cells = read_label_masks(str(tmp_path), "img-1")
    assert got_nuclei.dtype == np.uint16 and got_cells.dtype == np.uint16
    assert np.array_equal(got_nuclei, nuclei) and np.array_equal(got_cells, cells)
    objects = files_under(tmp_path / "masks.zarr" / "img-1")
    assert len(objects) <= 3, objects
    assert objects == ["c/0/0/0", "zarr.json"]  # one shard (the whole image) and its metadata
    arr = zarr.open_array(store=zarr_store(str(tmp_path)), path="img-1", mode="r")
    assert arr.shape == (2, *shape) and arr.attrs["channels"] == list(MASK_CHANNELS)
    assert "cell_id" in arr.attrs["label_meaning"]
    # inner chunks of at most 1024 px a side: a part of the image reads alone
    assert arr.chunks[0] == 1 and max(arr.chunks[1:]) <= 1024 and arr.shards[1:] >= shape
    y, x = shape[0] // 3, shape[1] // 3
    assert np.array_equal(arr[1, y:y + 50, x:x + 70], cells[y:y + 50, x:x + 70])


def test_many_cells_keep_int32_and_a_rewrite_replaces_the_image(tmp_path):
    nuclei, cells = label_maps(200, 300, n=5, dtype=np.int32)
    cells[0, 0] = nuclei[0, 0] = 70000  # beyond uint16
    write_label_masks(str(tmp_path), "a", nuclei, cells)
    got_nuclei, _ = read_label_masks(str(tmp_path), "a")
    assert got_nuclei.dtype == np.int32 and got_nuclei[0, 0] == 70000
    # written again (a retried batch, --resume): other labels, other dtype, no cell at all
    empty = np.zeros((200, 300), np.uint16)
    write_label_masks(str(tmp_path), "a", empty, empty)
    got_nuclei, got_cells = read_label_masks(str(tmp_path), "a")
    assert got_nuclei.dtype == np.uint16 and not got_nuclei.any() and not got_cells.any()
    assert files_under(tmp_path / "masks.zarr" / "a") == ["c/0/0/0", "zarr.json"]


class CountingFS(MemoryFileSystem):
    """An in-memory filesystem of its own that records the calls made to it from outside
    (not the ones its methods make to each other)."""

    protocol = "countmem"
    store: dict = {}
    pseudo_dirs = [""]
    calls: list[str] = []
    depth = 0

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr
        cls = type(self)

        def counted(*args, **kwargs):
            if cls.depth == 0:
                cls.calls.append(name)
            cls.depth += 1
            try:
                return attr(*args, **kwargs)
            finally:
                cls.depth -= 1

        return counted


def test_an_image_is_two_puts_and_the_group_one_per_writer():
    import fsspec

    from segpc.io.inputs import InputImage
    from segpc.method.results import ImageResult

    fsspec.register_implementation("countmem", CountingFS, clobber=True)
    CountingFS.store.clear()
    CountingFS.calls.clear()
    nuclei, cells = label_maps(480, 640, n=4)
    write_label_masks("countmem://out", "img", nuclei, cells)
    assert CountingFS.calls == ["pipe_file", "pipe_file"]  # no listing, no exists, no delete

    # the writer adds the group's zarr.json once, whatever the number of batches
    CountingFS.calls.clear()
    writer = OutputWriter("countmem://out")
    for batch in range(3):
        records = [ImageRecord(InputImage(f"x/{batch}-{i}.png", f"{batch}-{i}", "s"), "ok", "", 640, 480, 0.1,
                               ImageResult((480, 640), [], 0, {})) for i in range(4)]
        writer.write(records)
    # per batch: cells/ part, 4 x (shard, zarr.json), images/ part; plus the group once
    assert CountingFS.calls.count("pipe_file") == 1 + 3 * (2 + 4 * 2)
    assert set(CountingFS.calls) == {"pipe_file"}
    group = zarr.open_group(store=zarr_store("countmem://out"), mode="r")
    assert sorted(group.array_keys()) == sorted(["img", *(f"{b}-{i}" for b in range(3) for i in range(4))])
    CountingFS.store.clear()
