"""The synthetic archive: layout, determinism, and the properties the method relies on."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from segpc.__main__ import main
from segpc.errors import InputError
from segpc.io.imaging import read_image
from segpc.io.synthetic import make_image, parse_size, write_archive


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _images(seed: int, n: int, size=(320, 240), gap: int = 0):
    return [make_image(np.random.default_rng([seed, i]), *size, min_nucleus_gap=gap)
            for i in range(n)]


def test_same_seed_same_bytes_and_image_i_independent_of_count(tmp_path):
    a = write_archive(tmp_path / "a", 3, seed=5, size="320x240")
    b = write_archive(tmp_path / "b", 3, seed=5, size="320x240")
    assert a == b
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    write_archive(tmp_path / "c", 3, seed=6, size="320x240")
    fa, fc = _files(tmp_path / "a"), _files(tmp_path / "c")
    assert all(fa[f"x/{i}.bmp"] != fc[f"x/{i}.bmp"] for i in a)
    write_archive(tmp_path / "d", 5, seed=5, size="320x240")
    fd = _files(tmp_path / "d")
    assert all(fa[f"x/{i}.bmp"] == fd[f"x/{i}.bmp"] for i in a)


def test_layout_masks_and_slides(tmp_path):
    ids = write_archive(tmp_path / "deep" / "out", 6, n_slides=3, seed=1)
    root = tmp_path / "deep" / "out"
    assert len(set(ids)) == 6
    assert sorted(p.stem for p in (root / "x").glob("*.bmp")) == sorted(ids)
    with open(root / "slides.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    slides = {r["image_id"]: r["slide_id"] for r in rows}
    assert set(slides) == set(ids) and len(rows) == 6
    assert {i.split("-")[0] for i in ids} == {"S01", "S02", "S03"}
    assert all(i.startswith(s + "-") for i, s in slides.items())
    n_masks = 0
    for image_id in ids:
        h, w = read_image(root / "x" / f"{image_id}.bmp").shape[:2]
        assert (w, h) == (640, 480)
        for p in (root / "y").glob(f"{image_id}_*.bmp"):
            m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            assert m.dtype == np.uint8 and m.shape == (h, w)
            assert set(np.unique(m)) <= {0, 20, 40} and (m == 40).any()
            n_masks += 1
    assert n_masks >= 6


@pytest.mark.parametrize("bad", [dict(n_images=0), dict(n_images=2, n_slides=0),
                                 dict(n_images=2, n_slides=3), dict(n_images=1, size="big")])
def test_bad_arguments_raise_input_error(tmp_path, bad):
    with pytest.raises(InputError):
        write_archive(tmp_path, **bad)


@pytest.mark.parametrize("gap", [0, 3])
def test_instances_nested_and_nuclei_apart(gap):
    for img, cells in _images(3, 12, gap=gap):
        assert img.shape == (240, 320, 3) and img.dtype == np.uint8
        assert [c.k for c in cells] == list(range(1, len(cells) + 1))
        for i, a in enumerate(cells):
            assert a.nucleus.any() and not (a.nucleus & ~a.cell).any()
            dist = cv2.distanceTransform((~a.nucleus).astype(np.uint8), cv2.DIST_L2, 5)
            for b in cells[i + 1:]:
                assert not (a.nucleus & b.nucleus).any()
                if gap:
                    assert dist[b.nucleus].min() >= gap


def test_ratio_histogram_has_four_modes_and_cells_fit_largest_crop():
    ratios, h, w = [], 240, 320
    for _, cells in _images(7, 100, size=(w, h)):
        for c in cells:
            ys, xs = np.nonzero(c.nucleus)
            cy, cx = np.nonzero(c.cell)
            if cy.min() == 0 or cx.min() == 0 or cy.max() == h - 1 or cx.max() == w - 1:
                continue  # clipped by the image border
            ph = round(3.0 * (ys.max() - ys.min() + 1) / 2)
            pw = round(3.0 * (xs.max() - xs.min() + 1) / 2)
            assert ys.min() - ph <= cy.min() and cy.max() <= ys.max() + ph
            assert xs.min() - pw <= cx.min() and cx.max() <= xs.max() + pw
            ratios.append((c.cell.sum() - c.nucleus.sum()) / c.nucleus.sum())
    counts, _ = np.histogram(ratios, [0, 0.8, 2.4, 3.7, 5.2])
    assert len(ratios) > 200
    assert (counts >= 0.08 * len(ratios)).all(), counts
    assert max(ratios) <= 5.2


def test_unlabelled_cells_outside_the_masks():
    dark = 0
    for img, cells in _images(4, 10, size=(640, 480)):
        labelled = np.zeros(img.shape[:2], np.uint8)
        for c in cells:
            labelled |= c.cell
        outside = cv2.dilate(labelled, np.ones((7, 7), np.uint8)) == 0
        r, g, b = np.moveaxis(img.astype(int), 2, 0)
        dark += int((outside & ((r + g + b) < 330)).sum())  # white-cell nuclei, unlabelled
        assert (outside & (r - g > 40) & (r - b > 25)).sum() > 5000  # red cells
    assert dark > 500


def test_parse_size():
    assert parse_size("640x480") == [(640, 480)]
    assert parse_size(" 100X80 ") == [(100, 80)]
    assert parse_size("camera1") == [(2040, 1536)]
    assert parse_size("camera2") == [(2560, 1920)]
    assert parse_size("mixed") == [(2040, 1536), (2560, 1920)]
    for bad in ["", "640", "640x", "x480", "-640x480", "640x480x3", "camera3", "10x10",
                "99999x99999"]:
        with pytest.raises(InputError, match="size"):
            parse_size(bad)


def test_mixed_archive_has_both_cameras(tmp_path):
    ids = write_archive(tmp_path, 2, seed=0, size="mixed")
    shapes = {read_image(tmp_path / "x" / f"{i}.bmp").shape[:2] for i in ids}
    assert shapes == {(1536, 2040), (1920, 2560)}


def test_cli(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--images", "3", "--slides", "2", "--seed", "1"]) == 0
    assert len(list((out / "x").glob("*.bmp"))) == 3
    assert (out / "slides.csv").read_text().splitlines()[0] == "image_id,slide_id"
    assert main(["synth", "--out", str(tmp_path / "none"), "--images", "0"]) == 2
    assert "error" in capsys.readouterr().err
