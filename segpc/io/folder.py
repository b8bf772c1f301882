"""Segment a local folder of images with the single-process segmenter.

The simplest way to run a bundle on a few images (no Ray), and the reference the batch job
is compared with: writes ``<id>_<k>.bmp`` masks in the SegPC 40/20 format (scorable by
``python -m segpc evaluate``), optional QC overlays, and one JSON line per image.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from segpc.errors import InputError
from segpc.io.imaging import IMAGE_SUFFIXES, read_image, write_image
from segpc.io.inputs import folder_images
from segpc.io.overlay import draw_overlay
from segpc.method.segmenter import Segmenter
from segpc.io.segpc_format import write_masks


def list_images(folder: str | Path) -> list[Path]:
    """Images directly in ``folder``, or in ``folder/x`` for a SegPC split root."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    base = root / "x" if (root / "x").is_dir() else root
    paths = folder_images(base)
    if not paths:
        raise InputError(f"{base}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def segment_folder(input_dir: str | Path, bundle: str, out_dir: str | Path, overlays: bool = False,
                   batch_size: int = 4, device: str | None = None, tta: bool = False) -> dict:
    """Segment every image; a bad image is reported and skipped, never fatal. ``tta``:
    test-time flips in both stages."""
    paths = list_images(input_dir)
    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
    seg = Segmenter.from_bundle(bundle, device=device, batch_size=16, tta=tta)
    summary = {"images": 0, "errors": 0, "cells": 0}
    with open(out / "images.jsonl", "w") as log, tqdm(total=len(paths), unit="img") as bar:
        for i in range(0, len(paths), batch_size):
            batch, images = [], []
            for p in paths[i:i + batch_size]:
                try:
                    images.append(read_image(p))
                    batch.append(p)
                except InputError as exc:
                    log.write(json.dumps({"image_id": p.stem, "status": "error", "error": str(exc)}) + "\n")
                    summary["errors"] += 1
            t0 = time.perf_counter()
            results = seg.segment_batch(images) if images else []
            seconds = (time.perf_counter() - t0) / max(len(images), 1)
            for p, image, r in zip(batch, images, results):
                write_masks(out / "masks", p.stem, r.instances())
                if overlays:
                    write_image(out / "overlays" / f"{p.stem}.png", draw_overlay(image, *r.label_maps()))
                log.write(json.dumps({"image_id": p.stem, "status": "ok", "n_cells": len(r.cells),
                                      "seconds": round(seconds, 3)}) + "\n")
                summary["cells"] += len(r.cells)
            summary["images"] += len(paths[i:i + batch_size])
            bar.update(len(paths[i:i + batch_size]))
            bar.set_postfix(cells=summary["cells"], errors=summary["errors"])
    return summary
