"""``masks.zarr/<image_id>`` as an OME-Zarr (NGFF 0.5, Zarr v3) image group (``--ome-zarr``):
what napari's OME-Zarr plugin and other NGFF readers open without code.

    <image_id>/zarr.json               the image group: NGFF ``multiscales`` + ``omero`` with
                                       ``--ome-zarr-image``, else a plain group (no image data)
    <image_id>/0, 1, ...               the RGB image (c, y, x), one level each (--ome-zarr-image)
    <image_id>/labels/zarr.json        ``labels: [nuclei, cells]``
    <image_id>/labels/{nuclei,cells}/  label images: ``image-label`` + ``multiscales``, levels
                                       0, 1, ... (y, x); value = cell_id of cells/ rows, 0 none

Level k is level 0 taken every 2**k-th pixel (nearest: label values stay cell ids, no
interpolation), down to the first level whose longer side is at most LEVEL_MAX_SIDE px: a
camera image (2560 x 1920) has 3 levels (2560, 1280, 640). napari draws a zoomed-out view
from the smallest level that still fills the screen, so a whole-image overview reads one
small array instead of the full-resolution one; below ~1000 px a level no longer saves a
read worth its two objects (each level is its shard and its zarr.json).

The metadata is built from ome-zarr-models' validated (pydantic) NGFF 0.5 models; the
arrays are written by zarr itself into a memory store, each level ONE shard of zstd inner
chunks of at most MAX_INNER_CHUNK px (the compact layout's), then PUT one object at a time
(:func:`segpc.io.outputs.put_object`: retried, nothing listed or read). Data first, metadata
after, deepest first, the image group's ``zarr.json`` last. ome-zarr-py's own writer is not
used: it computes pyramids through dask, and the ``labels`` group it writes lacks the
``version`` key that NGFF 0.5 (and ome-zarr-models) require.

Pixel size: with ``--mpp`` the axes are in micrometres and level k's scale is
``mpp * 2**k``; without it the unit is left out and the scale is ``2**k`` pixels.
"""

from __future__ import annotations

import numpy as np

NGFF_VERSION = "0.5"
LEVEL_MAX_SIDE = 1024
LABEL_NAMES = ("nuclei", "cells")
RGB = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))


def level_count(shape: tuple[int, ...]) -> int:
    """Pyramid levels of an (…, H, W) array: halve until the longer side <= LEVEL_MAX_SIDE."""
    side, levels = max(shape[-2:]), 1
    while side > LEVEL_MAX_SIDE:
        side, levels = -(-side // 2), levels + 1
    return levels


def downsample(data: np.ndarray, level: int) -> np.ndarray:
    """Level ``level`` of an (…, H, W) array: every 2**level-th pixel (nearest)."""
    step = 2 ** level
    return data[..., ::step, ::step]


def _axes(mpp: float | None, channel: bool) -> list:
    from ome_zarr_models.v05.axes import Axis

    unit = {"unit": "micrometer"} if mpp else {}
    space = [Axis(name=n, type="space", **unit) for n in ("y", "x")]
    return ([Axis(name="c", type="channel")] if channel else []) + space


def _multiscale(levels: int, mpp: float | None, channel: bool, name: str):
    """NGFF ``multiscales[0]``: one dataset per level, its scale the pixel size there
    (stride sampling keeps pixel k*2**level at k*2**level: no translation)."""
    from ome_zarr_models.v05.multiscales import Dataset, Multiscale

    datasets = []
    for k in range(levels):
        size = (mpp or 1.0) * 2 ** k
        datasets.append(Dataset.build(path=str(k), scale=([1.0] if channel else []) + [size, size],
                                      translation=None))
    return Multiscale(axes=_axes(mpp, channel), datasets=datasets, name=name, type="nearest",
                      metadata={"description": "level k: level 0 taken every 2**k-th pixel (array[::2**k, ::2**k])"})


def _dump(model) -> dict:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def _group(objects: dict, path: str, ome: dict | None, extra: dict | None = None) -> None:
    import zarr
    from zarr.storage import MemoryStore

    attrs = {**({"ome": ome} if ome is not None else {}), **(extra or {})}
    own: dict = {}  # apart: zarr already wrote a bare zarr.json here for the arrays below
    zarr.create_group(MemoryStore(own), attributes=attrs)
    objects[f"{path}/zarr.json".lstrip("/")] = own["zarr.json"]


def _levels(objects: dict, path: str, data: np.ndarray, levels: int, dims: tuple[str, ...]) -> None:
    """Each level of ``data`` as ``path/<k>``, one shard each
    (:func:`segpc.io.outputs.one_shard_array`, as the compact layout's arrays)."""
    from zarr.storage import MemoryStore

    from segpc.io.outputs import one_shard_array

    for k in range(levels):
        one_shard_array(MemoryStore(objects), np.ascontiguousarray(downsample(data, k)), dims,
                        name=f"{path}/{k}".lstrip("/"))


def encode_ngff_masks(nuclei: np.ndarray, cells: np.ndarray, image: np.ndarray | None = None,
                      mpp: float | None = None, name: str = "") -> dict[str, bytes]:
    """The objects of one image's NGFF group, keys relative to ``<image_id>/``, in the order
    to write them (data, then metadata deepest first, the image group's last). ``image``: the
    (H, W, 3) uint8 RGB picture, written as the NGFF image when given."""
    from ome_zarr_models.common.omero import Channel, Omero, Window
    from ome_zarr_models.v05.image import ImageAttrs
    from ome_zarr_models.v05.image_label import ImageLabelAttrs
    from ome_zarr_models.v05.image_label_types import Label, Source
    from ome_zarr_models.v05.labels import LabelsAttrs

    if nuclei.shape != cells.shape or nuclei.ndim != 2:
        raise ValueError(f"label maps of one image must be two (H, W) arrays: {nuclei.shape}, {cells.shape}")
    if image is not None and image.shape[:2] != nuclei.shape:
        raise ValueError(f"image {image.shape} and label maps {nuclei.shape} differ in size")
    levels = level_count(nuclei.shape)
    objects: dict = {}
    for label, data in zip(LABEL_NAMES, (nuclei, cells.astype(nuclei.dtype, copy=False))):
        _levels(objects, f"labels/{label}", data, levels, ("y", "x"))
        # source: the image these labels belong to, only when there is one (NGFF: a path to it)
        image_label = Label(version=NGFF_VERSION, source=Source(image="../../") if image is not None else None)
        _group(objects, f"labels/{label}", _dump(ImageLabelAttrs(
            version=NGFF_VERSION, image_label=image_label,
            multiscales=[_multiscale(levels, mpp, False, label)])),
            {"segpc": {"label_meaning": "0 background; value = cell_id of cells/ rows"}})
    _group(objects, "labels", _dump(LabelsAttrs(version=NGFF_VERSION, labels=list(LABEL_NAMES))))
    if image is None:
        # no image data: a plain group (an NGFF image needs its multiscales arrays); readers
        # open the labels at <image_id>/labels
        _group(objects, "", None, {"segpc": {"layout": "OME-Zarr labels only: open <image_id>/labels"}})
    else:
        _levels(objects, "", np.moveaxis(image, -1, 0), levels, ("c", "y", "x"))
        window = Window(min=0, max=255, start=0, end=255)
        omero = Omero(channels=[Channel(color=color, window=window, label=lab, active=True)
                                for lab, color in RGB])
        _group(objects, "", _dump(ImageAttrs(version=NGFF_VERSION, multiscales=[_multiscale(levels, mpp, True, name)],
                                             omero={**_dump(omero), "rdefs": {"model": "color"}})))
    encoded = {k: v.to_bytes() for k, v in objects.items()}
    order = sorted(encoded, key=lambda k: (k.endswith("zarr.json"), -k.count("/")))
    return {k: encoded[k] for k in order}


def write_ngff_masks(output: str, image_id: str, nuclei: np.ndarray, cells: np.ndarray,
                     image: np.ndarray | None = None, mpp: float | None = None) -> None:
    """``masks.zarr/<image_id>`` as an NGFF group: one PUT per object (see the module doc);
    nothing listed, read or deleted. A rewrite of the same image replaces every object."""
    from segpc.io.outputs import put_object
    from segpc.io.storage import filesystem, join

    fs, root = filesystem(output)
    for key, data in encode_ngff_masks(nuclei, cells, image, mpp, image_id).items():
        put_object(fs, join(root, "masks.zarr", image_id, key), data)
