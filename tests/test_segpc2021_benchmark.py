"""benchmarks/segpc2021.py, the real-data reproduction, on small synthetic stand-ins in SegPC
layout with the tiny preset: the whole recipe (train, calibrate, batch job twice, score), and
the scoring of a bundle whose U-Net finds the stand-in's nuclei."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from segpc.io.synthetic import write_archive

pytestmark = pytest.mark.ray
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "segpc2021.py"


def _run(argv: list[str], capsys) -> dict:
    spec = importlib.util.spec_from_file_location("segpc2021_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _check_scores(report: dict, n_images: int, true_cells: int) -> None:
    for rule in ("cascade", "keep-all"):
        r = report["results"][rule]
        assert r["true_cells"] == r["n_truth"] == true_cells and r["errors"] == 0
        assert r["n_images"] == n_images and 0 <= r["miou"] <= 1
        assert r["n_pred"] == r["counted"]  # every counted cell was scored
    # keep-all runs every scale for every nucleus the U-Net found (the same nuclei both times)
    keep_all, cascade = report["results"]["keep-all"], report["results"]["cascade"]
    assert keep_all["nuclei"] == cascade["nuclei"] and keep_all["cytoplasm_inferences"] == 4 * keep_all["nuclei"]


def test_the_whole_recipe_runs_on_a_stand_in(ray_local, tmp_path, capsys):
    data = tmp_path / "segpc2021"
    write_archive(data / "train", 6, 2, seed=3, size="320x240")
    truth_ids = write_archive(data / "validation", 3, 1, seed=4, size="320x240")
    # one scale of the four is trained (each costs a TorchTrainer run, ~25 s here; every scale
    # is the same code, and tests/test_train.py trains 0.5, a small-input scale): the others
    # stay untrained, and the jobs still run all four
    report = _run(["--data", str(data), "--work", str(tmp_path / "work"), "--preset", "tiny",
                   "--epochs", "1", "--nucleus-epochs", "2", "--scales", "1.75"], capsys)
    _check_scores(report, len(truth_ids), sum(1 for _ in (data / "validation" / "y").iterdir()))
    assert report["train_s"] > 0
    meta = json.loads((tmp_path / "work" / "bundle" / "bundle.json").read_text())
    assert meta["provenance"]["calibration"]["images"] == len(truth_ids)
    training = meta["provenance"]["training"]
    assert sorted(training) == ["cytoplasm-s1.75", "nucleus"]
    assert (training["nucleus"]["epochs"], training["cytoplasm-s1.75"]["epochs"]) == (2, 1)


def test_a_bundle_is_scored_against_the_validation_masks(ray_local, archive, bundle, tmp_path, capsys):
    data = tmp_path / "segpc2021"
    for split in ("train", "validation"):
        shutil.copytree(archive, data / split)
    n_images, true_cells = len(list((archive / "x").iterdir())), len(list((archive / "y").iterdir()))
    report = _run(["--data", str(data), "--work", str(tmp_path / "work"), "--bundle", bundle], capsys)
    _check_scores(report, n_images, true_cells)
    cascade = report["results"]["cascade"]
    assert cascade["nuclei"] > 0  # its U-Net finds the nuclei; its cytoplasm networks are random
    assert cascade["cytoplasm_inferences"] >= cascade["nuclei"]  # each nucleus: at least its first scale
    assert report["train_s"] is None
