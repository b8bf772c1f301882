"""Ray Train on a tiny synthetic archive: two gloo workers per stage, checkpoints and resume."""

import json

import pytest

from ray_jobs.train import main as train_main
from segpc.models.bundle import read_bundle_meta
from segpc.io.imaging import read_image
from segpc.method.segmenter import Segmenter
from segpc.io.synthetic import write_archive

pytestmark = pytest.mark.ray

FAST = ["--preset", "tiny", "--epochs", "4", "--batch-size", "2", "--lr", "1e-3", "--num-workers", "2"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    write_archive(root, n_images=12, n_slides=3, seed=5, size="320x240")
    return root


def _history(bundle: str, network: str) -> list[dict]:
    return read_bundle_meta(bundle)["provenance"]["training"][network]["history"]


def test_two_worker_training_of_each_stage(ray_local, archive, tmp_path):
    out = str(tmp_path / "bundle")
    assert train_main(["--data", str(archive), "--out", out, "--stage", "nucleus", *FAST]) == 0
    assert train_main(["--data", str(archive), "--out", out, "--stage", "cytoplasm",
                       "--scales", "0.5", *FAST]) == 0
    for network in ("nucleus", "cytoplasm-s0.5"):
        hist = _history(out, network)
        assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
        assert hist[-1]["loss"] < hist[0]["loss"], hist
        assert all("val_miou" in h and "val_f1" in h and h["samples_per_s"] > 0 for h in hist)
    meta = read_bundle_meta(out)
    assert meta["provenance"]["num_workers"] == 2 and meta["provenance"]["data"] == str(archive)
    validation = meta["provenance"]["validation"]
    assert {"scale 0.5", "scale 3", "cascade", "keep-all"} <= set(validation)
    assert validation["keep-all"]["cytoplasm_inferences"] >= validation["cascade"]["cytoplasm_inferences"]
    # the bundle loads into the segmenter and segments an image
    image = read_image(next((archive / "x").iterdir()))
    result = Segmenter.from_bundle(out, device="cpu").segment(image)
    nuclei, cells = result.label_maps()
    assert cells.shape == image.shape[:2] and result.n_nuclei >= 0


def test_resume_continues_from_the_last_checkpoint(ray_local, archive, tmp_path, monkeypatch):
    out = str(tmp_path / "bundle")
    args = ["--data", str(archive), "--out", out, "--stage", "cytoplasm", "--scales", "0.5",
            *FAST[:2], "--epochs", "3", "--batch-size", "2", "--num-workers", "1", "--max-failures", "0"]
    monkeypatch.setenv("SEGPC_FAULT", "epoch@1")
    assert train_main(args) == 1  # interrupted after its first checkpoint
    monkeypatch.delenv("SEGPC_FAULT")
    assert train_main(args) == 2  # an earlier run exists: resuming must be asked for
    ckpt = tmp_path / "bundle-checkpoints" / "cytoplasm-s0.5"
    first = sorted(ckpt.glob("checkpoint_*"))
    epoch1 = json.loads((first[0] / "state.json").read_text())["history"][0]
    assert train_main(args + ["--resume"]) == 0
    hist = _history(out, "cytoplasm-s0.5")
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[0] == epoch1  # epoch 1 came from the checkpoint, it was not trained again


def test_bad_inputs_stop_before_training(ray_local, archive, tmp_path):
    no_masks = tmp_path / "nomasks"
    (no_masks / "x").mkdir(parents=True)
    for p in list((archive / "x").iterdir())[:4]:
        (no_masks / "x" / p.name).write_bytes(p.read_bytes())
    base = ["--out", str(tmp_path / "b"), "--epochs", "1"]
    assert train_main(["--data", str(no_masks), *base]) == 2
    assert train_main(["--data", str(tmp_path / "missing"), *base]) == 2
    assert train_main(["--data", str(archive), *base, "--use-gpu"]) == 2
    ro = tmp_path / "ro"
    ro.write_text("a file, not a folder")
    assert train_main(["--data", str(archive), "--out", str(ro / "bundle"), "--epochs", "1"]) == 2
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
