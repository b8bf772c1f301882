"""Stain normalisation: the reference in the bundle, a stain shift undone, blank images passed
through, and the normalised image reaching both stages in the segmenter, the batch job's decode
step and the training examples."""

import cv2
import numpy as np
import pytest

from segpc.config import StainConfig, preset
from segpc.errors import InputError
from segpc.io.imaging import write_image
from segpc.io.stain import StainNormalizer, fit_reference, normalize_stain
from segpc.io.synthetic import make_image, shift_stain, write_archive
from segpc.method.crops import fit_to_input
from segpc.method.segmenter import Segmenter
from segpc.method.steps import prepare
from segpc.models.bundle import load_bundle, new_bundle, read_bundle_meta, save_bundle


@pytest.fixture(scope="module")
def images():
    """Four 'training' images and one held out, of the same synthetic lab."""
    return [make_image(np.random.default_rng([7, i]), 320, 240)[0] for i in range(5)]


@pytest.fixture(scope="module")
def references(images):
    return {m: fit_reference(images[:4], m) for m in ("macenko", "reinhard")}


def _angles(a, b) -> np.ndarray:
    """Degrees between the matching columns (stain vectors) of two 3 x 2 stain matrices."""
    a, b = np.asarray(a), np.asarray(b)
    cos = (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def hue_shift(before: np.ndarray, after: np.ndarray) -> float:
    """Mean absolute hue change (degrees) of the pixels stained (saturated) in ``before``."""
    a, b = (cv2.cvtColor(im, cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3).astype(float) for im in (before, after))
    stained = a[:, 1] > 60
    d = (b[stained, 0] - a[stained, 0]) / 256 * 360
    return float(np.abs((d + 180) % 360 - 180).mean())


def test_reference_round_trips_through_bundle_json(tmp_path, references):
    cfg = preset("tiny")
    cfg.stain = StainConfig("macenko", references["macenko"])
    save_bundle(new_bundle(cfg), str(tmp_path / "b"))
    assert read_bundle_meta(str(tmp_path / "b"))["config"]["stain"] == {"method": "macenko",
                                                                       "reference": references["macenko"]}
    assert load_bundle(str(tmp_path / "b")).config.stain == cfg.stain
    # a bundle written before stain normalisation existed (no key) normalises nothing
    save_bundle(new_bundle(preset("tiny")), str(tmp_path / "old"))
    assert load_bundle(str(tmp_path / "old")).config.stain.method == "none"
    with pytest.raises(InputError, match="without a reference"):
        cfg.stain = StainConfig("macenko", {})
        cfg.validate()


def test_shift_is_substantial_and_zero_shift_is_identity(images):
    im = images[4]
    assert np.array_equal(shift_stain(im, 0, 0), im)
    shifted = shift_stain(im, 30, -30, (1.2, 0.8))
    assert shifted.dtype == np.uint8 and shifted.shape == im.shape
    assert 5 < hue_shift(im, shifted) < 30  # another lab's purple, not another dye family


def test_macenko_brings_a_shifted_image_back_to_the_reference(images, references):
    ref = references["macenko"]
    shifted = shift_stain(images[4], 30, -30, (1.2, 0.8))
    out = StainNormalizer("macenko", ref)(shifted)
    assert out.dtype == np.uint8 and out.shape == shifted.shape
    before = _angles(fit_reference([shifted], "macenko")["HERef"], ref["HERef"])
    after = _angles(fit_reference([out], "macenko")["HERef"], ref["HERef"])
    assert before.max() > 5 and after.max() < 0.4 * before.max()
    c_before = np.abs(np.log(np.divide(fit_reference([shifted], "macenko")["maxCRef"], ref["maxCRef"])))
    c_after = np.abs(np.log(np.divide(fit_reference([out], "macenko")["maxCRef"], ref["maxCRef"])))
    assert c_after.max() < 0.5 * c_before.max()


def test_reinhard_brings_a_shifted_image_back_to_the_reference(images, references):
    ref = references["reinhard"]
    shifted = shift_stain(images[4], 30, -30, (1.2, 0.8))
    out = StainNormalizer("reinhard", ref)(shifted)
    dist = lambda im: np.linalg.norm(np.subtract(fit_reference([im], "reinhard")["means"], ref["means"]))  # noqa: E731
    assert dist(shifted) > 3 and dist(out) < 0.2 * dist(shifted)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_blank_images_come_back_unchanged(method, references):
    norm = StainNormalizer(method, references[method])
    blank = np.full((60, 80, 3), (236, 224, 228), np.uint8)
    black = np.zeros((60, 80, 3), np.uint8)
    for image in (blank, black):
        assert norm(image) is image
    assert norm.unchanged == 2
    with pytest.raises(InputError, match="RGB uint8"):
        norm(blank[..., 0])
    if method == "macenko":  # a reference needs stained pixels
        with pytest.raises(InputError, match="stained"):
            fit_reference([blank, blank], method)


def test_segmenter_and_job_decode_feed_the_normalised_image(tmp_path, images, references):
    """The U-Net's input and the cytoplasm crops come from the normalised image when the
    config holds a reference, in the segmenter and in the batch job's decode step alike."""
    from ray_jobs.stages import read_decode

    image = shift_stain(images[4], 30, -30, (1.2, 0.8))
    stain = StainConfig("macenko", references["macenko"])
    seen = {}

    def nucleus_fn(x):
        seen["nucleus"] = x.copy()
        return np.zeros(x.shape[:3], np.float32)

    cfg = preset("tiny")
    plain = Segmenter(cfg, nucleus_fn, None)
    plain.run([image], None)
    assert np.array_equal(seen["nucleus"][0], fit_to_input(image, cfg.nucleus.input_size)[0])
    cfg.stain = stain
    normalised = normalize_stain(image, stain)
    assert np.abs(normalised.astype(int) - image).mean() > 3
    Segmenter(cfg, nucleus_fn, None).run([image], None)
    assert np.array_equal(seen["nucleus"][0], fit_to_input(normalised, cfg.nucleus.input_size)[0])
    # stage 2 cuts its crops from the image prepare() keeps
    assert np.array_equal(prepare(image, cfg).image, normalised)

    path = tmp_path / "a.png"
    write_image(path, image)
    batch = {"uri": np.array([str(path)]), "image_id": np.array(["a"]), "slide_id": np.array(["s"])}
    work = read_decode(batch, None, cfg.to_dict())["work"][0].state
    assert np.array_equal(work.image, normalised)
    assert np.array_equal(work.nucleus_input, fit_to_input(normalised, cfg.nucleus.input_size)[0])


def test_training_examples_are_normalised(tmp_path, references):
    """Both stages' training examples come from the normalised image, as inference sees it."""
    from segpc.training.data import cytoplasm_source, load_sample, stain_reference
    from segpc.training.ingest import CellContexts, NucleusExamples, ref_rows
    from segpc.training.guidance import GuidanceJitter
    from segpc.training.splits import list_splits

    write_archive(tmp_path, 4, 2, seed=3, size="160x120")
    refs = list_splits(str(tmp_path)).train
    reference, ids = stain_reference(refs, "macenko", n_images=8)
    assert ids == sorted(r.image_id for r in refs)  # training images only, in a stable order
    cfg = preset("tiny")
    cfg.stain = StainConfig("macenko", reference)
    rows = ref_rows(refs[:1])
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    sample = load_sample(refs[0])
    normalised = normalize_stain(sample.image, cfg.stain)
    assert not np.array_equal(normalised, sample.image)
    x = NucleusExamples(cfg.nucleus.input_size, cfg.stain)(batch)["x"][0]
    assert np.array_equal(x, fit_to_input(normalised, cfg.nucleus.input_size)[0])
    assert np.array_equal(cytoplasm_source(sample, cfg), normalised)
    plain = preset("tiny")
    got = CellContexts(1.75, cfg, GuidanceJitter())(batch)["rgb"]
    unnormalised = CellContexts(1.75, plain, GuidanceJitter())(batch)["rgb"]
    assert len(got) == len(sample.instances) > 0
    assert all(a.shape == b.shape and not np.array_equal(a, b) for a, b in zip(got, unnormalised))


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_the_fast_normalisation_is_torchstains(references, method):
    """The project's Macenko (stain estimated on a pixel sample, unmixing by matrix products)
    and Reinhard (OpenCV's LAB) give torchstain's own results within 1 grey level, on an
    image larger than the estimation sample."""
    from segpc.io.stain import BETA, ESTIMATE_PIXELS, IO

    image = shift_stain(make_image(np.random.default_rng(5), 1024, 768)[0])
    assert image.shape[0] * image.shape[1] > ESTIMATE_PIXELS
    norm = StainNormalizer(method, references[method])
    ours = norm(image).astype(int)
    theirs = (norm._norm.normalize(image, Io=IO, beta=BETA, stains=False)[0] if method == "macenko"
              else norm._norm.normalize(image)).astype(int)
    assert norm.unchanged == 0 and not np.array_equal(ours, image)
    assert np.abs(ours - theirs).max() <= 1
