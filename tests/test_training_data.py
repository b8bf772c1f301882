"""Training data without Ray: listing, decoding, crops like inference, guidance jitter,
augmentation and the ingest stages' batches."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from segpc.config import preset
from segpc.errors import InputError
from segpc.io.imaging import equalize
from segpc.io.synthetic import write_archive
from segpc.method.crops import box_or_none, crop_window
from segpc.method.cytoplasm import crop_input
from segpc.training.augment import augment, transforms
from segpc.training.data import OTHERS, OWN, cell_contexts, cell_example, load_sample, true_nucleus_crops
from segpc.training.guidance import GuidanceJitter, jitter_guidance
from segpc.training.ingest import CellContexts, CellCrops, NucleusExamples, augment_examples, ref_rows
from segpc.training.splits import cached, list_splits


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    write_archive(root, n_images=6, n_slides=3, seed=5, size="320x240")
    return root


def _bmp(path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = cv2.imencode(".bmp", arr)[1]
    path.write_bytes(buf.tobytes())


def _segpc_root(tmp_path):
    """train/ and a validation/ whose y/ is nested one level deeper; ids with '_' and '-',
    gaps in k, a 3-channel mask, an image without masks and a stray file."""
    image = np.full((64, 80, 3), 200, np.uint8)
    mask = np.zeros((64, 80), np.uint8)
    mask[10:30, 10:30], mask[15:25, 15:25] = 20, 40
    for split, y_dir in (("train", "train/y"), ("validation", "validation/validation/y")):
        for image_id in ("a_1-2", "b"):
            _bmp(tmp_path / split / "x" / f"{image_id}.bmp", image)
        _bmp(tmp_path / y_dir / "a_1-2_2.bmp", mask)
        _bmp(tmp_path / y_dir / "a_1-2_5.bmp", np.dstack([mask] * 3))
        (tmp_path / y_dir / "notes.png").write_bytes(cv2.imencode(".png", mask)[1].tobytes())
    return tmp_path


def test_listing_keeps_the_segpc_quirks(tmp_path):
    with pytest.warns(UserWarning, match="not named <id>_<k>"):
        splits = list_splits(str(_segpc_root(tmp_path)))
    assert splits.layout == "segpc"
    for refs in (splits.train, splits.validation):
        assert [r.image_id for r in refs] == ["a_1-2", "b"]
        assert [k for k, _ in refs[0].masks] == [2, 5] and refs[1].masks == ()
    sample = load_sample(splits.validation[0])
    assert [inst.k for inst in sample.instances] == [2, 5]
    assert sample.instances[1].nucleus.sum() == 100 and sample.instances[1].cell.sum() == 400


def test_listing_refuses_what_it_cannot_train_on(tmp_path, flat):
    with pytest.raises(InputError, match="not found"):
        list_splits(str(tmp_path / "missing"))
    assert not list_splits(str(flat), val_fraction=0).has_validation
    splits = list_splits(str(flat))
    assert splits.layout == "flat" and {splits.slides[r.image_id] for r in splits.validation} == {"S03"}
    assert not {r.image_id for r in splits.train} & {r.image_id for r in splits.validation}
    _bmp(tmp_path / "x" / "S01-0001.bmp", np.zeros((64, 80, 3), np.uint8))
    _bmp(tmp_path / "y" / "S01-0001_1.bmp", np.zeros((32, 80), np.uint8))
    with pytest.raises(InputError, match="mask is 32x80"):
        load_sample(list_splits(str(tmp_path), val_fraction=0).train[0])


@pytest.mark.s3
def test_listing_and_reading_from_object_storage(s3_bucket, flat, tmp_path):
    from segpc.io.storage import filesystem

    fs, _ = filesystem(s3_bucket)
    fs.put(f"{flat}/", s3_bucket.removeprefix("s3://") + "/", recursive=True)
    remote, local = list_splits(s3_bucket), list_splits(str(flat))
    assert [r.image_id for r in remote.validation] == [r.image_id for r in local.validation]
    assert remote.validation[0].image_uri.startswith("s3://")
    copy = cached(remote.validation, str(tmp_path))
    assert "://" not in copy[0].image_uri
    a, b = load_sample(remote.validation[0]), load_sample(copy[0])
    assert np.array_equal(a.image, b.image) and len(a.instances) == len(b.instances)


@pytest.mark.parametrize("equalized", [False, True])
def test_context_crops_are_the_inference_crops(flat, equalized):
    """Cut from a cell's stored context, the crop is byte for byte what inference cuts from
    the whole (equalised) image around the same nucleus, at every scale."""
    cfg = preset("tiny")
    cfg.cytoplasm.equalize = equalized
    sample = load_sample(list_splits(str(flat)).train[0])
    for scale in cfg.cytoplasm.scales:
        contexts = cell_contexts(sample, scale, cfg)
        truth = true_nucleus_crops(sample, scale, cfg)
        assert len(contexts) == len(truth) == len(sample.instances) > 0
        for ctx, (inst, crop) in zip(contexts, truth):
            x, y = cell_example(ctx, scale, cfg)
            assert np.array_equal(x, crop.pixels)
            assert y.shape == x.shape[:2] and set(np.unique(y)) <= {0, 1} and y.sum() >= inst.nucleus.sum() // 4


def test_guidance_jitter_moves_the_window_like_a_unet_nucleus(flat):
    """A perturbed nucleus is one component near the true one, often not equal to it, and
    its crop (window from its own box) equals inference's crop around that same nucleus."""
    cfg, jitter, scale = preset("tiny"), GuidanceJitter(), 1.75
    sample = load_sample(list_splits(str(flat)).train[1])
    image = sample.image
    rng = np.random.default_rng(0)
    ious, changed = [], 0
    for inst, ctx in zip(sample.instances, cell_contexts(sample, scale, cfg, jitter)):
        box = box_or_none(inst.nucleus)
        m = jitter.margin_px(box)
        wy0, wx0, _, _ = crop_window((box[0] - m, box[1] - m, box[2] + m, box[3] + m), scale)
        own = (ctx.planes & OWN) > 0
        for _ in range(20):
            state = rng.bit_generator.state
            x, _ = cell_example(ctx, scale, cfg, rng, jitter)
            rng.bit_generator.state = state  # replay the same draw to see the guidance itself
            g = jitter_guidance(own, (ctx.planes & OTHERS) > 0, ctx.allowed, rng, jitter)
            assert ndi.label(g, np.ones((3, 3)))[1] == 1
            ious.append((g & own).sum() / (g | own).sum())
            changed += not np.array_equal(g, own)
            full = np.zeros(image.shape[:2], np.uint8)
            ys, xs = np.nonzero(g)
            full[ys + wy0, xs + wx0] = 1
            gy0, gx0, gy1, gx1 = box_or_none(g)
            inference = crop_input(image, full, 1, (gy0 + wy0, gx0 + wx0, gy1 + wy0, gx1 + wx0), scale, cfg.cytoplasm)
            assert np.array_equal(x, inference.pixels)
    assert changed > len(ious) // 2 and np.median(ious) > 0.6 and min(ious) > 0.2


def test_augmentation_changes_pixels_and_keeps_mask_and_guidance_aligned():
    yy, xx = np.mgrid[:96, :96]
    cell = (((yy - 50) / 30) ** 2 + ((xx - 44) / 20) ** 2 <= 1).astype(np.uint8)
    nucleus = (((yy - 56) / 10) ** 2 + ((xx - 40) / 9) ** 2 <= 1)
    rgb = np.where(cell[..., None] > 0, [150, 90, 170], [235, 225, 230]).astype(np.uint8)
    rgb[nucleus] = (70, 30, 110)
    x = np.dstack([rgb, nucleus.astype(np.uint8) * 255])
    transforms().set_random_seed(0)
    changed, moved = 0, 0
    for _ in range(50):
        ax, ay = augment(x, cell)
        assert ax.shape == x.shape and ax.dtype == np.uint8 and ay.shape == cell.shape
        assert set(np.unique(ay)) <= {0, 1} and set(np.unique(ax[..., 3])) <= {0, 255}
        inside, guide = ay > 0, ax[..., 3] > 0
        # the guidance moved with the target: the nucleus is still inside its cell
        assert (guide & inside).sum() >= 0.95 * guide.sum() > 0
        # and so did the pixels: the cell-coloured region lies where the target is (the
        # corners a rotation brings in are zero, as padding is at inference)
        total = ax[..., :3].astype(int).sum(-1)
        coloured = (total < 3 * 200) & (total > 30)
        assert (coloured & inside).sum() / (coloured | inside).sum() > 0.6
        assert np.abs(np.argwhere(coloured).mean(0) - np.argwhere(inside).mean(0)).max() < 1.5
        changed += not np.array_equal(ax[..., :3], rgb)
        moved += not np.array_equal(ay, cell)
    assert changed == 50 and moved >= 45


def test_ingest_stages_make_batches_of_the_right_shape(flat):
    cfg = preset("tiny")
    refs = list_splits(str(flat)).train
    rows = ref_rows(refs)
    batch = {"index": np.array([r["index"] for r in rows]), "ref": np.array([r["ref"] for r in rows], object)}
    examples = augment_examples(NucleusExamples(cfg.nucleus.input_size)(batch))
    assert examples["x"].shape == (len(refs), 320, 320, 3) and examples["x"].dtype == np.uint8
    assert examples["y"].shape == (len(refs), 320, 320) and list(examples["row"]) == list(range(len(refs)))
    for scale, size in ((0.5, 64), (3.0, 96)):
        contexts = CellContexts(scale, cfg, GuidanceJitter())(batch)
        crops = CellCrops(scale, cfg, GuidanceJitter())(contexts)
        n = sum(r.n_cells for r in refs)
        assert crops["x"].shape == (n, size, size, 4) and crops["x"].dtype == np.uint8
        assert crops["y"].shape == (n, size, size) and crops["y"].dtype == np.uint8
        assert len(set(crops["row"].tolist())) == n
        assert all(set(np.unique(g)) == {0, 255} for g in crops["x"][..., 3])


def test_equalized_contexts_use_the_equalized_image(flat):
    cfg = preset("tiny")
    cfg.cytoplasm.equalize = True
    sample = load_sample(list_splits(str(flat)).train[0])
    ctx = cell_contexts(sample, 0.5, cfg)[0]
    plain = cell_contexts(sample, 0.5, preset("tiny"))[0]
    eq = equalize(sample.image)
    assert not np.array_equal(ctx.rgb, plain.rgb)
    assert set(map(tuple, ctx.rgb.reshape(-1, 3))) <= set(map(tuple, eq.reshape(-1, 3))) | {(0, 0, 0)}
