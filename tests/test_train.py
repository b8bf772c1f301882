"""Ray Train fed by Ray Data on a tiny synthetic archive: two gloo workers per stage, the
ingest's shards, --final with checkpoints and resume, and bad inputs stopping before work."""

import json
import threading

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ray_jobs.train import main as train_main
from ray_jobs.train import training_dataset
from segpc.config import preset
from segpc.evaluation.validation import TRUE_NUCLEI
from segpc.io.synthetic import write_archive
from segpc.models import build_cytoplasm_model, build_nucleus_model
from segpc.models.bundle import load_bundle, new_bundle, read_bundle_meta, save_bundle
from segpc.training.data import nucleus_diameters
from segpc.training.splits import list_splits

pytestmark = pytest.mark.ray

FAST = ["--preset", "tiny", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--num-workers", "2"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    write_archive(root, n_images=12, n_slides=3, seed=5, size="320x240")
    return root


def _history(bundle: str, network: str) -> list[dict]:
    return read_bundle_meta(bundle)["provenance"]["training"][network]["history"]


def _changed(trained: dict, initial: dict) -> float:
    """Share of the floating-point tensors that training moved."""
    keys = [k for k, v in initial.items() if v.is_floating_point() and "normalize" not in k]
    return sum(not torch.equal(trained[k], initial[k]) for k in keys) / len(keys)


def test_two_worker_training_of_each_stage(ray_local, archive, tmp_path):
    out = str(tmp_path / "bundle")
    assert train_main(["--data", str(archive), "--out", out, "--stage", "nucleus", "--equalize",
                       "--stain-normalize", "macenko", *FAST]) == 0
    stain = read_bundle_meta(out)["config"]["stain"]
    assert train_main(["--data", str(archive), "--out", out, "--stage", "cytoplasm",
                       "--scales", "0.5", "--equalize", "--stain-normalize", "macenko", "--mpp", "0.4",
                       *FAST]) == 0
    splits = list_splits(str(archive))
    # the stain reference: fitted on training images only, kept when a stage is retrained
    assert stain["method"] == "macenko" and np.array(stain["reference"]["HERef"]).shape == (3, 2)
    assert read_bundle_meta(out)["config"]["stain"] == stain
    assert set(read_bundle_meta(out)["provenance"]["stain"]["images"]) <= {r.image_id for r in splits.train}
    n_val_cells = sum(r.n_cells for r in splits.validation)
    for network, n in (("nucleus", len(splits.train)), ("cytoplasm-s0.5", sum(r.n_cells for r in splits.train))):
        hist = _history(out, network)
        assert [h["epoch"] for h in hist] == [1, 2]
        for h in hist:
            # each worker streamed an equal share of the examples, and no example twice
            assert h["shard_rows"] == [n // 2, n // 2] and h["distinct_rows"] == 2 * (n // 2)
            # validated every epoch, on the held-out slide's cells
            assert 0 <= h["val_miou"] <= 1 and 0 <= h["val_f1"] <= 1 and h["val_n_truth"] == n_val_cells
    bundle = load_bundle(out)
    cfg = bundle.config
    assert cfg.cytoplasm.equalize and read_bundle_meta(out)["provenance"]["equalize"]
    # the splitter's scale: the training nuclei's median diameter at the U-Net's input, kept
    # when only the cytoplasm networks are retrained
    d = np.concatenate([nucleus_diameters(r, cfg.nucleus.input_size) for r in splits.train])
    assert cfg.nucleus.diameter == pytest.approx(np.median(d), abs=0.01) != preset("tiny").nucleus.diameter
    assert read_bundle_meta(out)["provenance"]["nucleus_diameter"]["nuclei"] == len(d)
    # what whole slides are read at: the training fields' shape (measured with the nuclei, kept
    # by the cytoplasm run) and the pixel size --mpp gave
    assert (bundle.field_shape, bundle.mpp) == ((240, 320), 0.4)
    # the networks trained (workers start from the seed's weights, as here) ...
    torch.manual_seed(0)
    assert _changed(bundle.nucleus.state_dict(), build_nucleus_model(cfg.nucleus).state_dict()) > 0.9
    torch.manual_seed(0)
    assert _changed(bundle.cytoplasm[0.5].state_dict(), build_cytoplasm_model(cfg.cytoplasm).state_dict()) > 0.9
    # ... and the bundle holds each run's best weights
    ckpt = sorted(p for p in (tmp_path / "bundle-checkpoints" / "nucleus").glob("checkpoint_*") if p.is_dir())[-1]
    best = load_file(str(ckpt / "best.safetensors"))
    assert all(torch.equal(v, best[k]) for k, v in bundle.nucleus.state_dict().items())
    validation = read_bundle_meta(out)["provenance"]["validation"]
    assert {"scale 0.5", "scale 3", "cascade", "keep-all", TRUE_NUCLEI} <= set(validation)
    found = validation["keep-all"]["n_nuclei"]
    assert validation["keep-all"]["cytoplasm_inferences"] == 4 * found
    assert validation["scale 0.5"]["cytoplasm_inferences"] == found
    assert validation[TRUE_NUCLEI]["n_nuclei"] == validation[TRUE_NUCLEI]["n_truth"] == n_val_cells
    # calibrated on the validation split at the end: the bundle holds the chosen setting
    calibration = read_bundle_meta(out)["provenance"]["calibration"]
    assert calibration["images"] == len(splits.validation) and calibration["truth_cells"] == n_val_cells
    assert {k: getattr(cfg.aggregation, k) for k in calibration["chosen"]["setting"]} == \
        calibration["chosen"]["setting"]
    gap = read_bundle_meta(out)["provenance"]["true_nuclei_gap"]
    assert gap["f1"] == pytest.approx(validation[TRUE_NUCLEI]["f1"] - validation["cascade"]["f1"], abs=1e-4)


def test_ray_data_ingest_gives_each_worker_its_share(ray_local, archive):
    """Two consumers of one epoch get equal, disjoint shares of uint8 batches; the next
    epoch re-runs the augmentation over the same materialised examples."""
    cfg = preset("tiny")
    refs = list_splits(str(archive)).train
    ds = training_dataset(refs, "cytoplasm", 1.75, cfg)
    n = sum(r.n_cells for r in refs)
    seen, first = {0: [], 1: []}, {}

    def consume(i, it):
        for b in it.iter_torch_batches(batch_size=4):
            assert b["x"].dtype == torch.uint8 and tuple(b["x"].shape[1:]) == (96, 96, 4)
            assert b["y"].dtype == torch.uint8 and tuple(b["y"].shape[1:]) == (96, 96)
            assert set(torch.unique(b["x"][..., 3]).tolist()) <= {0, 255}
            seen[i].extend(b["row"].tolist())
            first.update({int(r): x for r, x in zip(b["row"], b["x"])})

    threads = [threading.Thread(target=consume, args=(i, it))
               for i, it in enumerate(ds.streaming_split(2, equal=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen[0]) == len(seen[1]) == n // 2 and not set(seen[0]) & set(seen[1])
    again = {int(r): x for b in ds.iter_torch_batches(batch_size=8) for r, x in zip(b["row"], b["x"])}
    assert len(again) == n and set(seen[0]) | set(seen[1]) <= set(again)
    assert sum(not torch.equal(again[r], first[r]) for r in first) >= 0.8 * len(first)


def test_final_run_trains_on_everything_and_resumes(ray_local, archive, tmp_path, monkeypatch):
    """--final: the epochs chosen on the split, train + validation data, encoder weights from
    a file; interrupted after its first checkpoint, it continues only with --resume."""
    cfg = preset("tiny")
    chosen = str(tmp_path / "split-run")
    save_bundle(new_bundle(cfg, {"training": {"cytoplasm-s0.5": {"best_epoch": 2}}}), chosen)
    torch.manual_seed(1)
    weights = str(tmp_path / "encoder.safetensors")
    encoder = build_cytoplasm_model(cfg.cytoplasm).encoder.state_dict()
    save_file({k: v.clone().contiguous() for k, v in encoder.items()}, weights)
    out = str(tmp_path / "final")
    args = ["--data", str(archive), "--out", out, "--stage", "cytoplasm", "--scales", "0.5", "--final",
            "--epochs-from", chosen, "--encoder-weights", weights, *FAST[:2], "--batch-size", "8",
            "--num-workers", "1", "--max-failures", "0"]
    monkeypatch.setenv("SEGPC_FAULT", "epoch@1")
    assert train_main(args) == 1  # interrupted after its first checkpoint
    monkeypatch.delenv("SEGPC_FAULT")
    assert train_main(args) == 2  # an earlier run exists: resuming must be asked for
    ckpt = tmp_path / "final-checkpoints" / "cytoplasm-s0.5-final"
    first = sorted(p for p in ckpt.glob("checkpoint_*") if p.is_dir())
    epoch1 = json.loads((first[0] / "state.json").read_text())["history"][0]
    assert train_main(args + ["--resume"]) == 0
    meta = read_bundle_meta(out)["provenance"]
    hist = meta["training"]["cytoplasm-s0.5"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and meta["network_epochs"] == {"cytoplasm-s0.5": 2}
    assert hist[0] == epoch1  # epoch 1 came from the checkpoint, it was not trained again
    splits = list_splits(str(archive))
    assert all(h["shard_rows"] == [sum(r.n_cells for r in splits.train + splits.validation)] for h in hist)
    assert not any("val_f1" in h for h in hist) and meta["final"] and meta["validation"] == {}
    assert meta["encoders"]["cytoplasm"]["encoder_weights"] == weights
    assert len(meta["encoders"]["cytoplasm"]["sha256"]) == 64


def test_bad_inputs_stop_before_training(ray_local, archive, tmp_path, capsys):
    no_masks = tmp_path / "nomasks"
    (no_masks / "x").mkdir(parents=True)
    for p in list((archive / "x").iterdir())[:4]:
        (no_masks / "x" / p.name).write_bytes(p.read_bytes())
    base = ["--out", str(tmp_path / "b"), "--epochs", "1"]

    def refused(argv: list[str], words: str) -> None:
        assert train_main(argv) == 2
        assert words in capsys.readouterr().err

    refused(["--data", str(no_masks), *base], "no masks")
    refused(["--data", str(tmp_path / "missing"), *base], "not found")
    refused(["--data", str(archive), *base, "--use-gpu"], "needs as many GPUs")
    refused(["--data", str(archive), *base, "--final", "--val-fraction", "0"], "no validation split")
    refused(["--data", str(archive), *base[:2], "--final"], "--epochs-from")
    refused(["--data", str(archive), *base, "--final", "--epochs-from", str(tmp_path)], "neither a bundle")
    refused(["--data", str(archive), *base, "--encoder-weights", str(tmp_path / "none.safetensors")],
            "none.safetensors: not found")
    (tmp_path / "text.safetensors").write_text("not weights")
    refused(["--data", str(archive), *base, "--encoder-weights", str(tmp_path / "text.safetensors")],
            "not a readable safetensors file")
    ro = tmp_path / "ro"
    ro.write_text("a file, not a folder")
    refused(["--data", str(archive), "--out", str(ro / "bundle"), "--epochs", "1"], "not writable")
    # a bundle's networks all see one stain: no retraining into it with another setting
    plain = str(tmp_path / "plain")
    save_bundle(new_bundle(preset("tiny")), plain)
    refused(["--data", str(archive), "--out", plain, "--epochs", "1", "--stain-normalize", "reinhard"],
            "stain normalisation 'none'")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    # a mask that does not fit its image is found by the decoding tasks, before any worker:
    # in the training split (decoded for training) and in the validation split (checked)
    for name, pick in (("train", 0), ("validation", -1)):
        bad = tmp_path / f"badmask-{name}"
        for sub in ("x", "y"):
            (bad / sub).mkdir(parents=True)
            for p in (archive / sub).iterdir():
                (bad / sub / p.name).write_bytes(p.read_bytes())
        victim = sorted((bad / "y").iterdir())[pick]
        cv2.imwrite(str(victim), np.zeros((10, 10), np.uint8))
        out = tmp_path / f"c-{name}"
        refused(["--data", str(bad), "--out", str(out), "--stage", "nucleus", "--epochs", "1"],
                f"{victim.name}: mask is 10x10")
        assert not (tmp_path / f"c-{name}-checkpoints" / "nucleus").exists()
