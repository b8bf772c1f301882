"""Test helpers: a quickly trained tiny bundle, broken image files, slide-folder layouts."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from segpc.models.bundle import new_bundle, save_bundle
from segpc.config import preset
from segpc.io.segpc_format import read_split
from segpc.io.imaging import read_image
from segpc.training.data import nucleus_arrays
from segpc.training.steps import train_epoch


def synthetic_slides(tmp_path_factory, n_images: int, seed: int) -> Path:
    """A synthetic SegPC archive of small (320x240) images in 3 slides."""
    from segpc.io.synthetic import write_archive

    root = tmp_path_factory.mktemp(f"archive{n_images}")
    write_archive(root, n_images=n_images, n_slides=3, seed=seed, size="320x240")
    return root


def quick_bundle(archive: Path, out: str, epochs: int = 40) -> str:
    """A tiny bundle whose U-Net has seen the archive for a few epochs (in-process, no Ray),
    so it finds nuclei; the cytoplasm networks stay random. Enough to exercise the job."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.nucleus.threshold = 0.35  # a briefly trained U-Net is unsure; this still finds nuclei
    bundle = new_bundle(cfg, {"note": "test bundle"})
    samples = list(read_split(archive))
    for s in samples:
        s.image = read_image(s.image_path)
    arrays = nucleus_arrays(samples, cfg.nucleus.input_size)
    opt = torch.optim.Adam(bundle.nucleus.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        idx = np.random.default_rng(epoch).permutation(len(arrays))
        train_epoch(bundle.nucleus, opt, arrays, idx, 4, torch.device("cpu"), gen)
    bundle.field_shape = read_image(samples[0].image_path).shape[:2]  # what train.py records
    save_bundle(bundle, out)
    return out


def slide_of(stem: str) -> str:
    """The slide of a synthetic image id (``S01-0003`` -> ``S01``)."""
    return stem.rsplit("-", 1)[0]


def job_id(stem: str) -> str:
    """The batch job's id for a synthetic image uploaded by :func:`slide_layout`: its path
    below the input prefix (``S01/S01-0003.bmp`` -> ``S01__S01-0003``)."""
    return f"{slide_of(stem)}__{stem}"


def slide_layout(archive: Path) -> dict[str, bytes]:
    """``<slide>/<id>.bmp`` -> bytes for every image of a synthetic archive."""
    return {f"{slide_of(p.stem)}/{p.name}": p.read_bytes() for p in sorted((archive / "x").iterdir())}


def _encode(ext: str, arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    return buf.tobytes()


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a word the error message must contain)."""
    rgb = np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8)
    png, jpg, bmp = _encode(".png", rgb), _encode(".jpg", rgb), _encode(".bmp", rgb)
    return {
        "zero.bmp": (b"", "empty"),
        "truncated.bmp": (bmp[: len(bmp) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "text.png": (b"this is not an image\n", "not an image"),
        "gray.png": (_encode(".png", rgb[..., 0]), "grayscale"),
        "rgba.png": (_encode(".png", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])), "alpha"),
        "deep.tiff": (_encode(".tiff", (rgb.astype(np.uint16) * 257)), "uint16"),
        "tiny.png": (_encode(".png", rgb[:16, :16]), "too small"),
        "huge.png": (_encode(".png", np.zeros((700, 700, 3), np.uint8)), "exceeds the limit"),
    }


def upload(fs, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        fs.pipe_file(f"{prefix}/{name}", data)


def png_bytes(arr: np.ndarray) -> bytes:
    return _encode(".png", arr[..., ::-1])


def bomb_bytes(ext: str, width: int, height: int) -> bytes:
    """A small valid ``.png`` or ``.bmp`` whose header claims width x height pixels."""
    import struct
    import zlib

    data = bytearray(_encode(ext, np.zeros((8, 8, 3), np.uint8)))
    if ext == ".png":
        ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
        data[16:29] = ihdr
        data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    else:
        data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)
