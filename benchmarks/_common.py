"""Shared by the benchmarks: a synthetic archive laid out in slide folders."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpc.synthetic import write_archive  # noqa: E402


def slide_folders(work: Path, n_images: int, n_slides: int, seed: int, size: str) -> tuple[Path, Path]:
    """(archive in SegPC layout, the same images as <slide>/<id>.bmp)."""
    archive, folders = work / f"archive-{n_images}", work / f"input-{n_images}"
    write_archive(archive, n_images, n_slides, seed=seed, size=size)
    for p in sorted((archive / "x").iterdir()):
        dest = folders / p.stem.rsplit("-", 1)[0] / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    return archive, folders
