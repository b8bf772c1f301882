"""The official SegPC-2021 metric and a strict one-to-one metric beside it (METHOD.md 2).

Both are computed on cell masks (nucleus | cytoplasm) resized with nearest-neighbour to the
official 1080x1440 grid, so a score here equals the leaderboard's for the same masks. The
official metric does not penalise false positives or duplicates; the strict metric
(one-to-one matching, precision/recall/F1 at IoU >= 0.5) shows what it hides.

Undefined ratios (0/0: miou with no truth cells, precision with no predictions, ...) are
NaN in the pure functions and ``null`` in ``evaluate``'s output, which is strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from segpc.errors import InputError
from segpc.method.crops import box_or_none
from segpc.method.instances import to_grid

Masks = Mapping[str, list[np.ndarray]]


def iou_matrix(truth: list[np.ndarray], pred: list[np.ndarray]) -> np.ndarray:
    """(T, P) IoU of bool masks of one shape; an empty mask has IoU 0 with everything.

    Intersections are counted only inside the overlap of the two bounding boxes: cells are
    small, so this is a few thousand pixels a pair instead of 1.5 million.
    """
    out = np.zeros((len(truth), len(pred)))
    if not truth or not pred:
        return out
    shapes = {m.shape for m in (*truth, *pred)}
    if len(shapes) > 1:
        raise InputError(f"iou_matrix: masks of different shapes {sorted(shapes)}")
    truth = [m.astype(bool, copy=False) for m in truth]
    pred = [m.astype(bool, copy=False) for m in pred]
    tb, pb = [box_or_none(m) for m in truth], [box_or_none(m) for m in pred]
    area = lambda m, b: 0 if b is None else int(np.count_nonzero(m[b[0]:b[2], b[1]:b[3]]))
    ta = [area(m, b) for m, b in zip(truth, tb)]
    pa = [area(m, b) for m, b in zip(pred, pb)]
    for i, (t, b) in enumerate(zip(truth, tb)):
        for j, (p, c) in enumerate(zip(pred, pb)):
            if b is None or c is None:
                continue
            r0, c0, r1, c1 = max(b[0], c[0]), max(b[1], c[1]), min(b[2], c[2]), min(b[3], c[3])
            inter = 0
            if r0 < r1 and c0 < c1:
                inter = int(np.count_nonzero(t[r0:r1, c0:c1] & p[r0:r1, c0:c1]))
            out[i, j] = inter / (ta[i] + pa[j] - inter)
    return out


def image_ious(truth: list[np.ndarray], pred: list[np.ndarray]) -> np.ndarray:
    """IoU matrix of one image's cells after resizing each mask to the grid separately."""
    return iou_matrix([to_grid(m) for m in truth], [to_grid(m) for m in pred])


def match(iou: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """One-to-one (truth, pred, iou) pairs with IoU >= threshold, maximising their total IoU.

    Entries under the threshold are zeroed first, so a sub-threshold pair can never displace
    a true positive in the optimum (plain max-sum on raw IoU can).
    """
    if iou.size == 0:
        return []
    weights = np.where(iou >= threshold, iou, 0.0)
    rows, cols = linear_sum_assignment(weights, maximize=True)
    return [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols) if iou[r, c] >= threshold]


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _official(ious: Mapping[str, np.ndarray], n_pred_other: int) -> dict:
    per_image, total, n_truth, n_pred = {}, 0.0, 0, n_pred_other
    for image_id, m in ious.items():
        best = m.max(axis=1) if m.shape[1] else np.zeros(m.shape[0])
        total += float(best.sum())
        n_truth += m.shape[0]
        n_pred += m.shape[1]
        per_image[image_id] = {"n_truth": m.shape[0], "n_pred": m.shape[1],
                               "sum_iou": float(best.sum()), "miou": _ratio(float(best.sum()), m.shape[0])}
    return {"miou": _ratio(total, n_truth), "n_truth": n_truth, "n_pred": n_pred, "per_image": per_image}


def _strict(ious: Mapping[str, np.ndarray], threshold: float, n_pred_other: int) -> dict:
    per_image, matched, n_truth, n_pred = {}, [], 0, n_pred_other
    for image_id, m in ious.items():
        pairs = match(m, threshold)
        matched += [p[2] for p in pairs]
        n_truth += m.shape[0]
        n_pred += m.shape[1]
        per_image[image_id] = {"n_truth": m.shape[0], "n_pred": m.shape[1], "tp": len(pairs)}
    tp = len(matched)
    return {"precision": _ratio(tp, n_pred), "recall": _ratio(tp, n_truth),
            "f1": _ratio(2 * tp, n_truth + n_pred), "matched_iou": float(np.mean(matched)) if tp else 0.0,
            "tp": tp, "n_truth": n_truth, "n_pred": n_pred, "iou_threshold": threshold,
            "per_image": per_image}


def _all_ious(truth: Masks, pred: Masks) -> tuple[dict[str, np.ndarray], int]:
    """Per truth image IoU matrices, and the number of predicted cells on other images."""
    ious = {i: image_ious(list(cells), list(pred.get(i, []))) for i, cells in truth.items()}
    return ious, sum(len(cells) for i, cells in pred.items() if i not in truth)


def official_score(truth: Masks, pred: Masks) -> dict:
    """The leaderboard metric: mean over truth cells of the max IoU with any predicted cell of
    the same image (0 if none or the image is missing). No one-to-one, no threshold, so
    duplicates and false positives are free.

    ``truth``/``pred``: {image_id: [cell mask, ...]} as bool arrays of any size (each is
    resized to 1080x1440 separately). Returns miou (NaN if there is no truth cell),
    n_truth, n_pred (predictions on images absent from ``truth`` included) and per_image.
    """
    ious, other = _all_ious(truth, pred)
    return _official(ious, other)


def strict_score(truth: Masks, pred: Masks, iou_threshold: float = 0.5) -> dict:
    """One-to-one matching per image (see ``match``) at the 1080x1440 grid.

    precision = TP / n_pred, recall = TP / n_truth, f1 = 2 TP / (n_truth + n_pred) (NaN when
    the denominator is 0), matched_iou = mean IoU of the TP pairs (0 if none). Predictions
    on images absent from ``truth`` count as false positives.
    """
    ious, other = _all_ious(truth, pred)
    return _strict(ious, iou_threshold, other)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def summarize(ious: Mapping[str, np.ndarray], iou_threshold: float = 0.5, n_pred_other: int = 0) -> dict:
    """Both metrics from per-image IoU matrices (keys = the truth images), as strict JSON."""
    official = _official(ious, n_pred_other)
    strict = _strict(ious, iou_threshold, n_pred_other)
    per_image = {i: {**official["per_image"][i], **strict["per_image"][i]} for i in ious}
    out = {"miou": official["miou"], "precision": strict["precision"], "recall": strict["recall"],
           "f1": strict["f1"], "matched_iou": strict["matched_iou"], "tp": strict["tp"],
           "n_truth": official["n_truth"], "n_pred": official["n_pred"], "n_images": len(ious),
           "iou_threshold": iou_threshold, "per_image": per_image}
    return _json_safe(out)


def evaluate(truth: Masks, pred: Masks, iou_threshold: float = 0.5) -> dict:
    """Official miou and the strict metric in one JSON-safe dict (undefined ratios -> None).

    n_images is the number of truth images; per_image holds each truth image's counts.
    """
    ious, other = _all_ious(truth, pred)
    return summarize(ious, iou_threshold, other)
