"""Calibration: the offline replay is the real cascade; a sweep removes low-score false cells;
the calibrated bundle loads with its settings and provenance; bad input is refused."""

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from segpc.__main__ import main
from segpc.config import preset
from segpc.errors import InputError
from segpc.evaluation.calibration import (
    at_touch_fraction,
    calibrate,
    observe,
    replay_image,
    write_calibrated,
)
from segpc.evaluation.metrics import evaluate
from segpc.io.imaging import write_image
from segpc.io.segpc_format import Sample, write_masks
from segpc.io.synthetic import make_image
from segpc.method.crops import extract, fit_to_input
from segpc.method.instances import to_grid
from segpc.method.segmenter import Segmenter
from segpc.models.bundle import load_bundle, new_bundle, read_bundle_meta, save_bundle

FALSE_SCORE = 0.6  # nucleus probability of the injected false nuclei


def false_nuclei(truth, shape, n, seed):
    """Discs of radius 6 far from every labelled cell: other nuclei and fragments."""
    taken = ndi.binary_dilation(np.any([t.cell for t in truth], axis=0), iterations=12)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    rng, discs = np.random.default_rng(seed), []
    for _ in range(200):
        if len(discs) == n:
            break
        y, x = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= 36
        if not (disc & taken).any():
            discs.append(disc)
            taken |= ndi.binary_dilation(disc, iterations=12)
    return discs


def networks(shape, truth, extra=()):
    """Oracle stand-ins: the true nuclei (probability 1) and ``extra`` discs (FALSE_SCORE);
    each crop's cell is its owner's true cell, or for a false nucleus a disc around it, at a
    confidence that varies with the crop, so the cascade's choices depend on ``min_score``."""
    nuclei = np.zeros(shape, np.float32)
    for inst in truth:
        nuclei[inst.nucleus] = 1.0
    for disc in extra:
        nuclei[disc] = FALSE_SCORE

    def nucleus_fn(x):  # (N, S, S, 3) network inputs -> the map fitted like them
        return np.stack([fit_to_input(nuclei, x.shape[1])[0] for _ in x])

    def cell_fn(scale, crops):
        out = []
        for crop in crops:
            overlap = [extract(t.nucleus, crop.window)[crop.nucleus].sum() for t in truth]
            if max(overlap, default=0):
                cell = extract(truth[int(np.argmax(overlap))].cell, crop.window)
            else:
                cell = ndi.binary_dilation(crop.nucleus, iterations=4)
            sure = 0.75 + 0.25 * ((crop.window[0] * 7 + crop.window[1] * 3 + int(scale * 4)) % 10) / 10
            out.append(fit_to_input(cell.astype(np.float32) * sure, crop.pixels.shape[0])[0])
        return np.stack(out)

    return nucleus_fn, cell_fn


def tiny_config():
    cfg = preset("tiny")
    cfg.cytoplasm.small_input, cfg.cytoplasm.large_input = 96, 128  # every crop fits unresized
    return cfg


@pytest.fixture(scope="module")
def scenes():
    """Three synthetic images, their truth, and false nuclei to inject."""
    out = []
    for seed in (2, 3, 4):
        image, truth = make_image(np.random.default_rng(seed), 320, 240, min_nucleus_gap=3)
        out.append((image, truth, false_nuclei(truth, image.shape[:2], 2, seed)))
    return out


class Stacked:
    """Oracle networks for several images, one image per call: the U-Net's input tells
    which image it is, and the crops that follow are that image's."""

    def __init__(self, scenes, inject, size):
        self.nets = [(fit_to_input(image, size)[0], networks(image.shape[:2], truth, extra if inject else ()))
                     for image, truth, extra in scenes]
        self.current = None

    def nucleus_fn(self, x):
        assert len(x) == 1, "one image at a time: each has its own oracle"
        self.current = next(nets for fitted, nets in self.nets if np.array_equal(fitted, x[0]))
        return self.current[0](x)

    def cell_fn(self, scale, crops):
        return self.current[1](scale, crops)


def score(segmenter, samples):
    """The real segmenter's strict and official scores and its cytoplasm inferences."""
    truth, pred, inferences = {}, {}, 0
    for s in samples:
        result = segmenter.segment(s.image)
        truth[s.image_id] = [inst.cell for inst in s.instances]
        pred[s.image_id] = [inst.cell for inst in result.instances()]
        inferences += sum(result.inferences.values())
    return {**evaluate(truth, pred), "cytoplasm_inferences": inferences}


def samples_of(scenes):
    return [Sample(f"img{n}", Path(f"img{n}.bmp"), truth, image)
            for n, (image, truth, _) in enumerate(scenes)]


def variants(cfg):
    """The bundle's setting and others that change the cascade's path and the kept cells."""
    agg = cfg.aggregation
    return [agg, replace(agg, min_score=0.5), replace(agg, min_score=0.97, touch_fraction=0.1),
            replace(agg, leap_fraction=0.01), replace(agg, min_cell_score=0.85, min_nucleus_score=0.7),
            replace(agg, mode="best", min_score=0.8), replace(agg, mode="keep-all")]


def assert_replay_is_real(segmenter_for, samples, cfg, settings):
    observed = observe(segmenter_for(cfg), samples, batch_size=1)
    scales = tuple(cfg.cytoplasm.scales)
    paths = set()
    for agg in settings:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.aggregation = agg
        for s, ob in zip(samples, observed):
            real = segmenter_for(run_cfg).segment(s.image)
            candidates = [at_touch_fraction(row, agg.touch_fraction) for row in ob.candidates]
            kept, inferences = replay_image(ob, candidates, scales, agg)
            assert inferences == sum(real.inferences.values())
            assert [(i + 1, f.scale) for i, f in kept] == [(c.nucleus_id, c.scale) for c in real.cells]
            truth = [to_grid(inst.cell) for inst in s.instances]
            for (_, f), inst in zip(kept, real.instances()):  # the same masks: the same IoUs
                cell = to_grid(inst.cell)
                ious = [(t & cell).sum() / (t | cell).sum() for t in truth]
                np.testing.assert_allclose(ob.ious[:, f.column], ious)
            paths.add((agg.min_score, agg.mode, inferences, len(kept)))
    return paths


def test_replay_equals_the_real_cascade_with_oracle_networks(scenes):
    cfg = tiny_config()
    stacked = Stacked(scenes, True, cfg.nucleus.input_size)
    paths = assert_replay_is_real(lambda c: Segmenter(c, stacked.nucleus_fn, stacked.cell_fn),
                                  samples_of(scenes), cfg, variants(cfg))
    assert len({p[2] for p in paths}) > 3  # the variants took different paths


def test_replay_equals_the_real_cascade_with_a_trained_bundle(archive, bundle):
    from segpc.io.segpc_format import read_split

    samples = list(read_split(archive, with_images=True))[:2]
    loaded = Segmenter.from_bundle(bundle, device="cpu", batch_size=1)  # batch-independent floats
    agg = loaded.config.aggregation
    settings = [agg, replace(agg, min_score=0.5, leap_fraction=0.05),
                replace(agg, min_nucleus_score=0.6, min_cell_score=0.6)]
    assert_replay_is_real(loaded.with_config, samples, loaded.config, settings)


def test_calibration_rejects_low_score_false_nuclei(scenes):
    cfg = tiny_config()
    stacked = Stacked(scenes, True, cfg.nucleus.input_size)
    segmenter = Segmenter(cfg, stacked.nucleus_fn, stacked.cell_fn)
    samples = samples_of(scenes)
    chosen, report = calibrate(segmenter, samples, slides={"img0": "A", "img1": "A", "img2": "B"},
                               batch_size=1)
    before, after = report["default"]["scores"], report["chosen"]["scores"]
    # the report's scores are those of the real segmenter under each setting
    real = score(segmenter, samples)
    assert (before["f1"], before["miou"], before["n_pred"]) == (
        pytest.approx(real["f1"], abs=1e-4), pytest.approx(real["miou"], abs=1e-4), real["n_pred"])
    assert before["cytoplasm_inferences"] == real["cytoplasm_inferences"]
    tuned = score(segmenter.with_config(replace(cfg, aggregation=chosen)), samples)
    assert after["f1"] == pytest.approx(tuned["f1"], abs=1e-4)
    assert after["cytoplasm_inferences"] == tuned["cytoplasm_inferences"]

    assert FALSE_SCORE < chosen.min_nucleus_score <= 1.0
    assert before["precision"] < 1.0 and after["precision"] == 1.0
    assert after["recall"] == before["recall"] and after["f1"] > before["f1"]
    assert after["cytoplasm_inferences"] <= before["cytoplasm_inferences"]
    assert after["slide_count_error"] == 0.0 < before["slide_count_error"]
    assert report["separation"]["auc_nucleus_score"] == 1.0
    assert report["separation"]["false_without_truth"] == report["separation"]["false_cells"] == 6
    assert report["budget"]["rule"] == "the current setting's"
    assert report["settings_searched"] == np.prod([len(v) for v in report["grid"].values()])


def test_a_budget_limits_the_inferences(scenes):
    cfg = tiny_config()
    stacked = Stacked(scenes, False, cfg.nucleus.input_size)
    segmenter = Segmenter(cfg, stacked.nucleus_fn, stacked.cell_fn)
    _, report = calibrate(segmenter, samples_of(scenes), budget=2.0, batch_size=1)
    spent = report["chosen"]["scores"]["cytoplasm_inferences"]
    assert spent <= 2.0 * report["nuclei"] < report["default"]["scores"]["cytoplasm_inferences"]
    assert report["budget"]["per_nucleus"] == 2.0
    assert report["guard"]["met"]  # as good as the current setting, with fewer crops
    # scale 0.5 always cuts the oracle's cells, so no setting gets by with one crop a nucleus
    with pytest.raises(InputError, match="below what any setting needs"):
        calibrate(segmenter, samples_of(scenes), budget=1.0, batch_size=1)


def test_samples_without_cells_are_refused(scenes):
    cfg = tiny_config()
    stacked = Stacked(scenes, True, cfg.nucleus.input_size)
    segmenter = Segmenter(cfg, stacked.nucleus_fn, stacked.cell_fn)
    empty = [replace(s, instances=[]) for s in samples_of(scenes)]
    with pytest.raises(InputError, match="no labelled cells"):
        calibrate(segmenter, empty, batch_size=1)


@pytest.fixture(scope="module")
def split(scenes, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    (root / "x").mkdir()
    for n, (image, truth, _) in enumerate(scenes):
        write_image(root / "x" / f"img{n}.png", image)
        write_masks(root / "y", f"img{n}", truth)
    return root


def test_calibrate_command_writes_a_loadable_copy(split, tmp_path, capsys):
    source, out = str(tmp_path / "bundle"), str(tmp_path / "calibrated")
    save_bundle(new_bundle(tiny_config()), source)
    before = {p.name: p.read_bytes() for p in Path(source).iterdir()}
    assert main(["calibrate", "--bundle", source, "--data", str(split), "--out", out,
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "current setting" in printed and "F1" in printed
    assert {p.name: p.read_bytes() for p in Path(source).iterdir()} == before  # untouched

    loaded = load_bundle(out)
    meta = read_bundle_meta(out)
    calibration = loaded.provenance["calibration"]
    chosen = calibration["chosen"]["setting"]
    assert {k: getattr(loaded.config.aggregation, k) for k in chosen} == chosen
    assert calibration["data"] == str(split) and calibration["images"] == 3
    assert {"date", "default", "grid", "separation"} <= set(calibration)
    for entry in meta["networks"].values():  # weights copied byte for byte
        data = (Path(out) / entry["file"]).read_bytes()
        assert data == before[entry["file"]] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    # calibrating in place changes bundle.json only
    assert write_calibrated(out, loaded.config.aggregation, {"again": True}) == out
    assert read_bundle_meta(out)["provenance"]["calibration"] == {"again": True}
    assert json.loads(json.dumps(calibration)) == calibration


def test_calibrate_command_refuses_bad_input(split, tmp_path, capsys):
    bundle = str(tmp_path / "bundle")
    save_bundle(new_bundle(tiny_config()), bundle)
    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "x").mkdir(parents=True)
    (unlabelled / "x" / "img0.png").write_bytes((split / "x" / "img0.png").read_bytes())
    assert main(["calibrate", "--bundle", bundle, "--data", str(unlabelled)]) == 2
    assert "masks" in capsys.readouterr().err
    assert main(["calibrate", "--bundle", str(tmp_path / "nowhere"), "--data", str(split)]) == 2
    assert "bundle" in capsys.readouterr().err
    assert main(["calibrate", "--bundle", bundle, "--data", str(split), "--out", bundle]) == 2
    assert "already holds a bundle" in capsys.readouterr().err
