"""Official and strict metrics: hand-computed cases, matching vs brute force, folders, CLI."""

from __future__ import annotations

import itertools
import json
import math

import cv2
import numpy as np
import pytest

from segpc.__main__ import main
from segpc.errors import InputError
from segpc.evaluation.metrics import evaluate, iou_matrix, match, official_score, strict_score
from segpc.io.segpc_format import evaluate_folders
from segpc.method.instances import GRID, to_grid

KEYS = {"miou", "precision", "recall", "f1", "matched_iou", "n_truth", "n_pred", "n_images"}


def box(r0, r1, c0, c1, shape=GRID):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


T1, T2 = box(0, 10, 0, 10), box(100, 120, 100, 120)
HALF = box(0, 10, 5, 15)  # overlaps T1 in 10x5 = 50 px; union 150 -> IoU 1/3


def test_partial_overlap_iou():
    assert official_score({"a": [T1]}, {"a": [HALF]})["miou"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(iou_matrix([T1, T2], [HALF, T2, box(0, 0, 0, 0)]),
                               [[1 / 3, 0, 0], [0, 1, 0]])


def test_duplicates_are_free():
    one = official_score({"a": [T1]}, {"a": [HALF]})
    two = official_score({"a": [T1]}, {"a": [HALF, HALF, T2]})
    assert one["miou"] == two["miou"] == pytest.approx(1 / 3)
    assert two["n_pred"] == 3
    # and one predicted cell may serve several truth cells: two halves of a box, IoU 0.5 each
    merged = official_score({"a": [box(0, 10, 0, 10), box(0, 10, 10, 20)]}, {"a": [box(0, 10, 0, 20)]})
    assert merged["miou"] == 0.5


def test_missed_cell_and_missing_image_score_zero():
    assert official_score({"a": [T1, T2]}, {"a": [T1]})["miou"] == 0.5
    # image b missing from the prediction: its 2 cells score 0 -> 1/3; c is counted in n_pred only
    r = official_score({"a": [T1], "b": [T1, T2]}, {"a": [T1], "c": [T1, T2]})
    assert r["miou"] == pytest.approx(1 / 3)
    assert (r["n_truth"], r["n_pred"]) == (3, 3)
    assert r["per_image"]["b"]["miou"] == 0 and "c" not in r["per_image"]


def test_no_truth_cells_is_nan():
    assert math.isnan(official_score({"a": []}, {"a": [T1]})["miou"])


def test_resize_to_grid_matters():
    # 540x720 -> 1080x1440 is exactly x2: a 10x10 box becomes 20x20 = 400 px, inside a 40x40
    # truth box at the grid -> 400 / 1600 (compared unresized it would be 100 / 1600).
    assert official_score({"a": [box(0, 40, 0, 40)]}, {"a": [box(0, 10, 0, 10, (540, 720))]})["miou"] == 0.25
    # 2040x1536 camera: dst row r samples src floor(r * 1536/1080) = floor(r * 64/45) and col c
    # samples floor(c * 2040/1440) = floor(c * 17/12). Rows [0,60) -> r < 42.19 -> 43 rows;
    # cols [0,30) -> c < 21.18 -> 22 cols: 946 px. Predicting 43x11 at the grid -> IoU 0.5.
    truth = box(0, 60, 0, 30, (1536, 2040))
    assert to_grid(truth).sum() == 43 * 22
    assert official_score({"a": [truth]}, {"a": [box(0, 43, 0, 22)]})["miou"] == 1.0
    assert official_score({"a": [truth]}, {"a": [box(0, 43, 0, 11)]})["miou"] == 0.5
    # 2560x1920 camera: factor 16/9 both ways: rows r < 33.75 -> 34, cols c < 16.875 -> 17
    assert official_score({"a": [box(0, 60, 0, 30, (1920, 2560))]}, {"a": [box(0, 34, 0, 17)]})["miou"] == 1.0


def _brute_force(iou, threshold):
    """Max total IoU over one-to-one assignments, counting only pairs >= threshold."""
    t, p = iou.shape
    w = np.where(iou >= threshold, iou, 0.0)
    if t > p:
        w = w.T
        t, p = p, t
    best, best_tp = 0.0, 0
    for perm in itertools.permutations(range(p), t):
        vals = [w[i, j] for i, j in enumerate(perm)]
        total = sum(vals)
        if total > best + 1e-12:
            best, best_tp = total, sum(v > 0 for v in vals)
    return best, best_tp


def test_match_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        t, p = rng.integers(0, 6, size=2)
        iou = rng.random((t, p)) * (rng.random((t, p)) < 0.6)
        threshold = rng.choice([0.3, 0.5, 0.7])
        pairs = match(iou, threshold)
        assert len({i for i, _, _ in pairs}) == len({j for _, j, _ in pairs}) == len(pairs)
        assert all(v >= threshold and v == iou[i, j] for i, j, v in pairs)
        best, best_tp = _brute_force(iou, threshold)
        assert sum(v for _, _, v in pairs) == pytest.approx(best)
        assert len(pairs) == best_tp


def test_match_threshold_before_assignment():
    # Raw max-sum picks (0,0)+(1,1) = 1.35 with one TP; the two-TP assignment is better.
    iou = np.array([[0.9, 0.5], [0.55, 0.45]])
    assert sorted(match(iou, 0.5)) == [(0, 1, 0.5), (1, 0, 0.55)]


def test_strict_hand_cases():
    r = strict_score({"a": [T1, T2]}, {"a": [T1, T1, T2]})  # a duplicate of T1
    assert r["precision"] == pytest.approx(2 / 3)
    assert (r["recall"], r["matched_iou"]) == (1.0, 1.0)
    assert r["f1"] == pytest.approx(0.8)  # 2 * 2 / (2 + 3)
    low = strict_score({"a": [T1]}, {"a": [HALF]})  # IoU 1/3 < 0.5: no TP
    assert (low["precision"], low["recall"], low["f1"], low["matched_iou"]) == (0, 0, 0, 0)
    none = strict_score({"a": [T1]}, {})
    assert math.isnan(none["precision"]) and none["recall"] == 0 and none["f1"] == 0


def test_evaluate_is_strict_json():
    r = evaluate({"a": [T1, T2], "b": []}, {"a": [T1, HALF]})
    assert KEYS <= set(r)
    assert (r["n_images"], r["miou"], r["precision"], r["recall"]) == (2, 0.5, 0.5, 0.5)
    assert r["per_image"]["b"]["miou"] is None
    json.dumps(r, allow_nan=False)


# --------------------------------------------------------------------------- folders and CLI

def _mask(r0, r1, c0, c1, shape=(60, 80)):
    m = np.zeros(shape, np.uint8)
    m[r0:r1, c0:c1] = 20
    m[r0 + 2:r1 - 2, c0 + 2:c1 - 2] = 40
    return m


@pytest.fixture
def folders(tmp_path):
    """A split root (x/ with an unlabelled image, y/) and a perfect prediction folder."""
    truth = {"16_1": [_mask(5, 20, 5, 25), _mask(30, 50, 40, 70)], "17": [_mask(0, 10, 0, 10)]}
    for image_id in ("16_1", "17", "18"):
        (tmp_path / "t" / "x").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "t" / "x" / f"{image_id}.bmp"), np.zeros((60, 80, 3), np.uint8))
    for d in ("t/y", "p"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        for image_id, masks in truth.items():
            for k, m in enumerate(masks, 1):
                cv2.imwrite(str(tmp_path / d / f"{image_id}_{k}.bmp"), m)
    return tmp_path / "t", tmp_path / "p"


def test_evaluate_folders_perfect(folders):
    truth, pred = folders
    r = evaluate_folders(truth, pred)
    assert KEYS <= set(r) and r["n_pred_unknown_images"] == 0
    assert (r["miou"], r["f1"], r["n_truth"], r["n_pred"], r["n_images"]) == (1.0, 1.0, 3, 3, 3)
    plain = evaluate_folders(truth / "y", pred)  # plain mask folder: only ids with masks
    assert (plain["miou"], plain["n_images"]) == (1.0, 2)
    json.dumps(r, allow_nan=False)


def test_evaluate_folders_partial_and_unknown(folders):
    truth, pred = folders
    (pred / "17_1.bmp").unlink()
    cv2.imwrite(str(pred / "99_1.bmp"), _mask(0, 10, 0, 10))
    with pytest.warns(UserWarning, match="99"):
        r = evaluate_folders(truth, pred)
    assert r["miou"] == pytest.approx(2 / 3) and r["n_pred"] == 2
    assert r["n_pred_unknown_images"] == 1 and r["precision"] == 1.0


def test_evaluate_folders_bad_input(folders, tmp_path):
    truth, pred = folders
    with pytest.raises(InputError, match="nope"):
        evaluate_folders(tmp_path / "nope", pred)
    with pytest.raises(InputError, match="nope"):
        evaluate_folders(truth, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        evaluate_folders(tmp_path / "empty", pred)


def test_cli_evaluate(folders, capsys, tmp_path):
    truth, pred = folders
    assert main(["evaluate", "--truth", str(truth), "--pred", str(pred)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert KEYS <= set(out) and out["miou"] == 1.0
    assert main(["evaluate", "--truth", str(tmp_path / "nope"), "--pred", str(pred)]) == 2
    assert "nope" in capsys.readouterr().err
