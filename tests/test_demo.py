"""The demo's whole path at a small size: synthetic data in S3 -> Ray Train -> batch job -> report."""

import json

import pandas as pd
import pytest

from ray_jobs.demo import main as demo_main
from segpc.io.storage import filesystem
from segpc.models.bundle import read_bundle_meta

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def test_demo_end_to_end_small(s3_server, ray_local, tmp_path, capsys):
    work = tmp_path / "demo"
    # one cytoplasm scale trained of four (a TorchTrainer run each, ~25 s here; every scale
    # is the same code): training still reads the bucket and writes bundle and checkpoints there
    rc = demo_main(["--workdir", str(work), "--bucket", "segpc-tests", "--images-train", "8",
                    "--images", "4", "--slides", "2", "--size", "320x240", "--epochs", "1",
                    "--nucleus-epochs", "2", "--scales", "3"])
    assert rc == 0
    bundle = json.loads((work / "results" / "run.json").read_text())["bundle"]  # the one it trained
    assert bundle.startswith("s3://segpc-tests/")
    assert sorted(read_bundle_meta(bundle)["provenance"]["training"]) == ["cytoplasm-s3", "nucleus"]
    fs, root = filesystem(bundle)
    assert fs.glob(f"{root}-checkpoints/cytoplasm-s3/checkpoint_*/state.json")
    out = capsys.readouterr().out
    assert "plasma cells per slide" in out and "evaluation against the synthetic truth" in out
    slides = pd.read_parquet(work / "results" / "slides.parquet")
    assert sorted(slides.slide_id) == ["S01", "S02"] and slides.images.sum() == 4
    assert (work / "results" / "report" / "index.html").is_file()
    assert len(list((work / "results" / "overlays").glob("*.png"))) == 4
    # the demo's job runs with --ome-zarr-image: an OME-Zarr image group (image + labels) per image
    groups = list((work / "results" / "masks.zarr").glob("*/labels/zarr.json"))
    assert len(groups) == 4 and all((g.parent.parent / "0" / "zarr.json").is_file() for g in groups)
    # and --geojson: one QuPath FeatureCollection per image, a cell object per cells/ row
    cells = pd.read_parquet(work / "results" / "cells", columns=["image_id"])
    for path in (work / "results" / "geojson").glob("*.geojson"):
        doc = json.loads(path.read_text())
        assert doc["type"] == "FeatureCollection"
        assert len(doc["features"]) == (cells.image_id == path.stem).sum()
    assert len(list((work / "results" / "geojson").glob("*.geojson"))) == 4
