"""segpc: myeloma plasma-cell segmentation (SegPC-2021 multi-scale Attention DeepLabv3+).

The method as a library. It imports torch, numpy and OpenCV, never Ray: the Ray jobs in
``ray_jobs`` only wire these pieces into distributed stages.

The names users need are here: ``from segpc import Segmenter, load_bundle, read_image,
unpack_mask, read_label_masks``. They load on first use, so ``import segpc`` stays light (no torch).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "Segmenter": "segpc.method.segmenter",
    "load_bundle": "segpc.models.bundle",
    "save_bundle": "segpc.models.bundle",
    "read_image": "segpc.io.imaging",
    "unpack_mask": "segpc.io.outputs",
    "read_label_masks": "segpc.io.outputs",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'segpc' has no attribute {name!r}")
