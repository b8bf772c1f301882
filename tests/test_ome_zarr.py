"""``--ome-zarr``: masks.zarr/<image_id> as an OME-Zarr (NGFF 0.5) image group, read back by
ome-zarr-py's reader (the NGFF reference reader) and validated by ome-zarr-models, on a
local folder and on S3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from test_outputs import files_under

from segpc.io.ngff import encode_ngff_masks, level_count, write_ngff_masks
from segpc.io.outputs import read_label_masks, write_label_masks
from segpc.io.run_record import NOTED_KEYS, RESULT_KEYS, differences

SHAPE = (1100, 2100)  # 3 levels: 2100, 1050, 525 px wide


def label_maps(h: int, w: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` square cells with a square nucleus each, value = cell id (fast at any size)."""
    rng = np.random.default_rng(seed)
    nuclei, cells = np.zeros((h, w), np.uint16), np.zeros((h, w), np.uint16)
    for k, (y, x) in enumerate(zip(rng.integers(0, h - 60, n), rng.integers(0, w - 60, n)), 1):
        cells[y:y + 57, x:x + 59] = k
        nuclei[y + 15:y + 41, x + 13:x + 44] = k
    return nuclei, cells


def rgb(shape: tuple[int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def nodes(url: str) -> dict[str, object]:
    """ome-zarr-py's Reader from ``url``: its nodes by path below masks.zarr/."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    location = parse_url(url)
    assert location is not None, f"no Zarr at {url}"
    return {str(n.zarr.path).split("masks.zarr/", 1)[1].rstrip("/"): n for n in Reader(location)()}


def check_labels(found: dict, image_id: str, nuclei: np.ndarray, cells: np.ndarray, mpp: float | None) -> None:
    """Both label images: every level the full-resolution labels taken every 2**k-th pixel,
    ``image-label`` metadata, the pixel size of each level in its scale transform."""
    levels = level_count(nuclei.shape)
    for name, labels in (("nuclei", nuclei), ("cells", cells)):
        node = found[f"{image_id}/labels/{name}"]
        assert [type(s).__name__ for s in node.specs] == ["Label", "Multiscales"]
        assert "image-label" in node.zarr.root_attrs
        assert len(node.data) == levels
        for k, level in enumerate(node.data):
            assert np.array_equal(np.asarray(level), labels[::2 ** k, ::2 ** k]), (name, k)
        size = mpp or 1.0
        scales = [t[0] for t in node.metadata["coordinateTransformations"]]
        assert scales == [{"type": "scale", "scale": [size * 2 ** k] * 2} for k in range(levels)]
        units = [a.get("unit") for a in node.metadata["axes"]]
        assert units == (["micrometer"] * 2 if mpp else [None, None])


def test_image_and_labels_read_back_by_the_ngff_reader(tmp_path):
    from ome_zarr_models.v05.image import Image

    nuclei, cells = label_maps(*SHAPE, n=20)
    image = rgb(SHAPE)
    out = str(tmp_path)
    write_ngff_masks(out, "img-1", nuclei, cells, image, mpp=0.25)

    # opened at the image group: the RGB pyramid, then both labels (as napari shows them)
    found = nodes(f"{out}/masks.zarr/img-1")
    assert list(found) == ["img-1", "img-1/labels", "img-1/labels/nuclei", "img-1/labels/cells"]
    top = found["img-1"]
    assert [d.shape for d in top.data] == [(3, 1100, 2100), (3, 550, 1050), (3, 275, 525)]
    assert np.array_equal(np.asarray(top.data[0]), np.moveaxis(image, -1, 0))
    assert np.array_equal(np.asarray(top.data[2]), np.moveaxis(image[::4, ::4], -1, 0))
    assert [a["name"] for a in top.metadata["axes"]] == ["c", "y", "x"]
    assert [c["color"] for c in top.zarr.root_attrs["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]
    check_labels(found, "img-1", nuclei, cells, 0.25)
    assert found["img-1/labels/cells"].zarr.root_attrs["image-label"]["source"] == {"image": "../../"}

    # valid NGFF 0.5 for ome-zarr-models too (arrays, dimension names, label levels = image levels)
    model = Image.from_zarr(zarr.open_group(f"{out}/masks.zarr/img-1", mode="r"))
    assert model.labels.label_paths == ["nuclei", "cells"]

    # one object per level and array (its shard) beside each zarr.json
    keys = files_under(tmp_path / "masks.zarr" / "img-1")
    image_levels = [f"{k}/{o}" for k in range(3) for o in ("zarr.json", "c/0/0/0")]  # (c, y, x)
    label_levels = [f"{k}/{o}" for k in range(3) for o in ("zarr.json", "c/0/0")]  # (y, x)
    assert keys == sorted(["zarr.json", "labels/zarr.json", *image_levels,
                           *(f"labels/{n}/{x}" for n in ("nuclei", "cells") for x in ["zarr.json", *label_levels])])
    assert len(keys) == 22

    # the library API reads both layouts alike
    write_label_masks(out, "img-2", nuclei, cells)
    for image_id in ("img-1", "img-2"):
        got_nuclei, got_cells = read_label_masks(out, image_id)
        assert np.array_equal(got_nuclei, nuclei) and np.array_equal(got_cells, cells)


@pytest.mark.s3
def test_labels_only_over_s3(s3_bucket):
    """Without the image (the default of --ome-zarr): the image group is a plain group, so a
    reader opens the labels at <image_id>/labels; S3 writes are plain PUTs."""
    from ome_zarr_models.v05.labels import Labels

    from segpc.io.outputs import zarr_store

    nuclei, cells = label_maps(*SHAPE, n=20, seed=3)
    write_ngff_masks(s3_bucket, "img", nuclei, cells)  # no --mpp: pixel units

    assert nodes(f"{s3_bucket}/masks.zarr/img") == {}  # nothing to show at the image group
    found = nodes(f"{s3_bucket}/masks.zarr/img/labels")
    assert list(found) == ["img/labels", "img/labels/nuclei", "img/labels/cells"]
    check_labels(found, "img", nuclei, cells, None)
    assert "source" not in found["img/labels/nuclei"].zarr.root_attrs["image-label"]

    store = zarr_store(s3_bucket)
    Labels.from_zarr(zarr.open_group(store=store, path="img/labels", mode="r"))  # valid NGFF 0.5 labels
    assert "ome" not in zarr.open_group(store=store, path="img", mode="r").attrs  # no image data: no NGFF image
    got_nuclei, got_cells = read_label_masks(s3_bucket, "img")
    assert np.array_equal(got_nuclei, nuclei) and np.array_equal(got_cells, cells)


def test_pyramid_sizes_and_write_order():
    assert [level_count(s) for s in [(1920, 2560), (1024, 1024), (1025, 10), (1, 1), (4000, 3000)]] == \
        [3, 1, 2, 1, 3]
    nuclei, cells = label_maps(80, 120, n=2)
    objects = encode_ngff_masks(nuclei, cells, rgb((80, 120)))
    keys = list(objects)
    # data before metadata, deeper metadata first, the image group's zarr.json last
    first_meta = next(i for i, k in enumerate(keys) if k.endswith("zarr.json"))
    assert all(not k.endswith("zarr.json") for k in keys[:first_meta])
    assert all(k.endswith("zarr.json") for k in keys[first_meta:]) and keys[-1] == "zarr.json"
    assert keys.index("labels/nuclei/zarr.json") < keys.index("labels/zarr.json")
    meta = json.loads(objects["labels/cells/0/zarr.json"])
    assert meta["dimension_names"] == ["y", "x"] and meta["codecs"][0]["name"] == "sharding_indexed"
    with pytest.raises(ValueError, match="differ in size"):
        encode_ngff_masks(nuclei, cells, rgb((81, 120)))


def test_resume_refuses_another_mask_layout():
    assert "ome_zarr" in RESULT_KEYS and "ome_zarr_image" in NOTED_KEYS
    # a record written before the key existed was the compact layout
    assert differences({}, {"ome_zarr": True}, RESULT_KEYS) == ["ome_zarr: False -> True"]
    assert differences({}, {"ome_zarr": False}, RESULT_KEYS) == []


def test_napari_opens_both_layouts_without_code(tmp_path):
    """What ``napari --plugin napari-ome-zarr masks.zarr/<id>/labels`` shows, headless: the
    plugin's reader and napari's viewer model (no window). napari is not a dependency of the
    project: skipped unless installed (``pip install napari-ome-zarr``)."""
    reader = pytest.importorskip("napari_ome_zarr._reader")
    components = pytest.importorskip("napari.components")

    nuclei, cells = label_maps(*SHAPE, n=5)
    write_ngff_masks(str(tmp_path), "with-image", nuclei, cells, rgb(SHAPE), mpp=0.25)
    write_ngff_masks(str(tmp_path), "labels-only", nuclei, cells)
    for image_id, expected in [("with-image", ["Image"] * 3 + ["Labels"] * 2), ("labels-only", ["Labels"] * 2)]:
        path = str(tmp_path / "masks.zarr" / image_id / "labels")
        viewer = components.ViewerModel()
        for data, meta, kind in reader.napari_get_reader(path)(path):
            viewer._add_layer_from_data(data, meta, kind)
        assert [type(layer).__name__ for layer in viewer.layers] == expected
        assert all(layer.multiscale for layer in viewer.layers)
        assert np.array_equal(np.asarray(viewer.layers[-1].data[0]), cells)
