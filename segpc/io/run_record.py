"""``run.json``: what made a batch job's outputs, so that a resumed run cannot mix runs.

Written under the output prefix before any image is processed. ``--resume`` compares the
record of the run being resumed with its own and refuses when anything that changes the
results differs (the bundle's content, the rule, the inputs, the options of decoding, the
pixel size ``--mpp`` of the µm² measurements, test-time flips ``--tta``, the layout of
``masks.zarr`` ``--ome-zarr``, the tile size of whole slides ``--tile-fields``, whose grid
the tile ids name: one output never mixes two), naming each difference; other differences
(the code version, which extra files are written, the image in the OME-Zarr groups) are
reported and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

from segpc import __version__
from segpc.io.storage import filesystem, join, with_retries
from segpc.wsi.tiles import TILE_FIELDS

RUN_FILE = "run.json"
# a difference in these refuses --resume: the outputs would mix two methods or two inputs
RESULT_KEYS = ("bundle_sha256", "rule", "input", "manifest", "image_column", "max_pixels", "mpp", "tta",
               "ome_zarr", "tile_fields")
# a difference in these is reported only
NOTED_KEYS = ("segpc_version", "code_commit", "bundle", "segpc_masks", "overlays", "geojson",
              "ome_zarr_image")
# what a record written before its key existed meant: runs without test-time flips, with the
# compact masks.zarr layout, whole slides (if any) in tiles of the default size
ABSENT = {"tta": False, "ome_zarr": False, "ome_zarr_image": False, "tile_fields": TILE_FIELDS}


def bundle_checksum(meta: dict) -> str:
    """SHA-256 of a bundle's ``bundle.json`` content: it lists each weights file's SHA-256, so
    it changes whenever any network or setting does."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def code_commit() -> str | None:
    """The git commit of this checkout, when there is one (``ray job submit`` uploads no .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_record(bundle: str, bundle_meta: dict, rule: str, input: str, manifest: str | None,
               image_column: str, max_pixels: int | None, segpc_masks: bool, overlays: bool,
               geojson: bool = False, mpp: float | None = None, tta: bool = False,
               ome_zarr: bool = False, ome_zarr_image: bool = False, tile_fields: float = TILE_FIELDS) -> dict:
    return {"bundle": bundle, "bundle_sha256": bundle_checksum(bundle_meta), "rule": rule,
            "input": input.rstrip("/"), "manifest": manifest, "image_column": image_column,
            "max_pixels": max_pixels, "segpc_masks": segpc_masks, "overlays": overlays,
            "geojson": geojson, "mpp": mpp, "tta": tta, "ome_zarr": ome_zarr or ome_zarr_image,
            "ome_zarr_image": ome_zarr_image, "tile_fields": tile_fields,
            "segpc_version": __version__, "code_commit": code_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def differences(before: dict, now: dict, keys: tuple[str, ...]) -> list[str]:
    """``key: before -> now`` for each of ``keys`` that differs."""
    before, now = {**ABSENT, **before}, {**ABSENT, **now}
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def read_run_record(output: str) -> dict | None:
    fs, root = filesystem(output)
    path = join(root, RUN_FILE)
    try:
        return json.loads(with_retries(f"reading {path}", fs.cat_file, path))
    except FileNotFoundError:
        return None


def write_run_record(output: str, record: dict) -> None:
    fs, root = filesystem(output)
    path = join(root, RUN_FILE)
    with_retries(f"writing {path}", fs.makedirs, root, True)
    with_retries(f"writing {path}", fs.pipe_file, path, json.dumps(record, indent=2).encode())
