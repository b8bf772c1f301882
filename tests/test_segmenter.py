"""The segmenter wired end to end: ground-truth 'networks' score perfectly; random ones run."""

import json

import numpy as np
import pytest

from segpc.__main__ import main
from segpc.models.bundle import new_bundle, save_bundle
from segpc.config import preset
from segpc.method.crops import extract, fit_to_input
from segpc.errors import InputError
from segpc.method.segmenter import Segmenter
from segpc.io.segpc_format import write_masks
from segpc.io.synthetic import make_image


def oracle(image_shape, truth):
    """Network stand-ins that return the truth, through the segmenter's own geometry."""
    nuclei = np.zeros(image_shape, np.float32)
    for inst in truth:
        nuclei[inst.nucleus] = 1.0

    def nucleus_fn(x):  # (N, S, S, 3) network inputs -> the truth fitted like them
        return np.stack([fit_to_input(nuclei, x.shape[1])[0] for _ in x])

    def cell_fn(scale, crops):
        out = []
        for crop in crops:
            overlap = [extract(t.nucleus, crop.window)[crop.nucleus].sum() for t in truth]
            owner = truth[int(np.argmax(overlap))]
            cell = extract(owner.cell, crop.window).astype(np.float32)
            out.append(fit_to_input(cell, crop.pixels.shape[0])[0])
        return np.stack(out)

    return nucleus_fn, cell_fn


@pytest.fixture(scope="module")
def synthetic():
    # A gap between nuclei keeps the truth's instances apart without relying on the splitter.
    return [make_image(np.random.default_rng(s), 320, 240, min_nucleus_gap=3) for s in (2, 3, 4)]


def test_ground_truth_networks_score_perfectly(synthetic, tmp_path, capsys):
    cfg = preset("tiny")
    cfg.cytoplasm.small_input, cfg.cytoplasm.large_input = 96, 128  # every crop fits unresized
    for n, (image, truth) in enumerate(synthetic):
        assert truth, "the fixture's seeds must give images with cells"
        write_masks(tmp_path / "truth", f"img{n}", truth)
        result = Segmenter(cfg, *oracle(image.shape[:2], truth)).segment(image)
        assert result.n_nuclei == len(truth) == len(result.cells)
        write_masks(tmp_path / "pred", f"img{n}", result.instances())
        # the cascade stopped early for some nuclei: not every scale ran for every nucleus
        assert result.inferences[0.5] == len(truth)
    assert sum(result.inferences.values()) < 4 * len(truth)
    assert main(["evaluate", "--truth", str(tmp_path / "truth"), "--pred", str(tmp_path / "pred")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["miou"] == 1.0 and report["f1"] == 1.0
    assert report["n_truth"] == sum(len(t) for _, t in synthetic)


def test_cascade_saves_work_over_keep_all(synthetic):
    image, truth = synthetic[0]
    cfg = preset("tiny")
    cascade = Segmenter(cfg, *oracle(image.shape[:2], truth)).segment(image)
    cfg.aggregation.mode = "keep-all"
    every = Segmenter(cfg, *oracle(image.shape[:2], truth)).segment(image)
    assert sum(every.inferences.values()) == 4 * len(truth)
    assert sum(cascade.inferences.values()) < sum(every.inferences.values())
    assert len(every.cells) >= len(cascade.cells)


def test_random_tiny_networks_give_well_formed_output(synthetic, tmp_path):
    save_bundle(new_bundle(preset("tiny")), str(tmp_path / "bundle"))
    seg = Segmenter.from_bundle(str(tmp_path / "bundle"), device="cpu", batch_size=4)
    images = [im for im, _ in synthetic]
    results = seg.segment_batch(images)
    assert len(results) == len(images)
    for image, r in zip(images, results):
        nuclei, cells = r.label_maps()
        assert nuclei.shape == cells.shape == image.shape[:2] and nuclei.dtype == np.int32
        assert sorted(c.cell_id for c in r.cells) == list(range(1, len(r.cells) + 1))
        for c in r.cells:
            y0, x0, y1, x1 = c.box
            assert c.cell.shape == c.nucleus.shape == (y1 - y0, x1 - x0)
            assert not (c.nucleus & ~c.cell).any() and c.scale in preset("tiny").cytoplasm.scales
            assert 0.0 <= c.cell_score <= 1.0 and 0.0 <= c.nucleus_score <= 1.0
        assert set(np.unique(nuclei)) <= {0, *(c.cell_id for c in r.cells)}


def test_bad_images_are_named():
    seg = Segmenter(preset("tiny"), lambda x: np.zeros(x.shape[:3]), lambda s, c: np.zeros((0, 1, 1)))
    with pytest.raises(InputError, match="image 1"):
        seg.segment_batch([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)])


def test_segment_command_on_a_folder(synthetic, tmp_path):
    from segpc.io.imaging import write_image

    save_bundle(new_bundle(preset("tiny")), str(tmp_path / "bundle"))
    folder = tmp_path / "images"
    folder.mkdir()
    for n, (image, _) in enumerate(synthetic):
        write_image(folder / f"img{n}.png", image)
    (folder / "broken.png").write_bytes(b"not an image")
    assert main(["segment", "--input", str(folder), "--bundle", str(tmp_path / "bundle"),
                 "--out", str(tmp_path / "out"), "--overlays", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in rows) == ["broken", "img0", "img1", "img2"]
    broken = next(r for r in rows if r["image_id"] == "broken")
    assert broken["status"] == "error" and "not an image" in broken["error"]
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 3
    assert main(["segment", "--input", str(tmp_path / "nowhere"), "--bundle", str(tmp_path / "bundle"),
                 "--out", str(tmp_path / "o2")]) == 2
