"""Calibration: the aggregation thresholds chosen on a lab's own labelled images.

The cascade's thresholds were chosen on synthetic slides, and stage 1 takes some other
nuclei and fragments for plasma-cell nuclei, so counts run high. This searches, on a
labelled validation split, the cascade thresholds (``min_score``, ``touch_fraction``,
``leap_fraction``) and the minimum confidence of a kept cell (``min_nucleus_score``,
``min_cell_score``) for the best strict F1 within a budget of cytoplasm inferences, among
the settings that lose neither official mIoU nor strict recall against the current one.

That guard matters: strict F1 alone rewards dropping true cells whose masks are poor (each
counts as a false positive and a miss), so on a held-out slide the F1-best setting rejected
real plasma cells, undercounted by 19% and lost on unseen slides. A cell that is no plasma
cell at all (another nucleus, a fragment) overlaps no truth cell, so rejecting it costs
neither mIoU nor recall: the guard lets exactly those go.

It stays cheap because the networks run once per image, every scale for every nucleus, and
the cascade is replayed offline for each setting: its choice for a nucleus depends only on
that nucleus's candidates so far (``next_scale``, ``select``), so the replay gives exactly
the cells and the inference count the real cascade would. Each candidate's IoU with each
truth cell is computed once at the official grid; a setting then costs only a matching.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from segpc.config import AggregationConfig, Config
from segpc.errors import InputError
from segpc.evaluation.metrics import iou_matrix, match
from segpc.io.segpc_format import Sample, find_split, index_masks, read_split
from segpc.io.storage import filesystem, join
from segpc.method.aggregate import (
    confident,
    edge_contact,
    next_scale,
    runs_every_scale,
    select,
    touches,
)
from segpc.method.instances import to_grid
from segpc.method.segmenter import Segmenter, cell_net, nucleus_net

CASCADE = ("min_score", "touch_fraction", "leap_fraction")
CONFIDENCE = ("min_nucleus_score", "min_cell_score")
PARAMETERS = CASCADE + CONFIDENCE
# Cascade values searched (the bundle's own are always added); the confidence values come
# from the data, as low quantiles of the scores seen (see ``search_grid``).
CASCADE_GRID = {"min_score": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
                "touch_fraction": (0.01, 0.02, 0.05, 0.1),
                "leap_fraction": (0.05, 0.1, 0.2, 0.4)}
SCORE_QUANTILES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)

Grid = dict[str, tuple[float, ...]]


@dataclass(frozen=True)
class Facts:
    """What the aggregation rule reads of one candidate, and where its IoUs are. The rule's
    functions (``next_scale``, ``select``, ``confident``) read only these attributes, so they
    run on it as on a :class:`Candidate`; masks are not kept, so the candidates of 200
    camera-size images fit in memory."""

    scale: float
    score: float
    ratio: float
    edge_fraction: float
    touching: int  # cell pixels on the crop's in-image edges
    edge_length: int  # length of those edges
    nucleus_area: int
    column: int  # this candidate's column in its image's IoU matrix
    truncated: bool = False  # under the touch_fraction being replayed


@dataclass
class Observed:
    """One labelled image after every scale ran for every nucleus."""

    image_id: str
    slide_id: str | None
    ious: np.ndarray  # (truth cells, candidates) at the official 1080x1440 grid
    nucleus_scores: list[float]
    candidates: list[list[Facts]]  # per nucleus (0-based), ascending scale


def labelled_split(root: str | Path) -> tuple[Iterator[Sample], dict[str, str] | None]:
    """A labelled split's samples (lazily, images decoded) and its slides (``slides.csv``, if
    any), checked before any network runs: a split without masks cannot be calibrated on."""
    _, y_dir = find_split(root)
    if y_dir is None or not index_masks(y_dir):
        raise InputError(f"{root}: no masks (y/<id>_<k>.bmp); calibration needs a labelled split")
    table, slides = Path(root) / "slides.csv", None
    if table.is_file():
        with open(table, newline="") as f:
            slides = {row["image_id"]: row["slide_id"] for row in csv.DictReader(f)}
    return read_split(root, with_images=True), slides


def as_segmenter(model, device: str | None = None) -> Segmenter:
    """A :class:`Segmenter` as is, or one over a loaded ``Bundle``'s networks."""
    if isinstance(model, Segmenter):
        return model
    return Segmenter(model.config, nucleus_net(model, device), cell_net(model, device))


def observe(segmenter: Segmenter, samples: Iterable[Sample], slides: Mapping[str, str] | None = None,
            batch_size: int = 4) -> list[Observed]:
    """Both stages once per image with every scale for every nucleus (mode "best"), as the
    segmenter runs them; a lazy ``samples`` keeps only a batch of images in memory."""
    config = copy.deepcopy(segmenter.config)
    config.aggregation.mode = "best"
    every_scale = segmenter.with_config(config)
    samples, out = iter(samples), []
    while batch := list(islice(samples, batch_size)):
        missing = [s.image_id for s in batch if s.image is None]
        if missing:
            raise InputError(f"calibration: image(s) not loaded: {', '.join(missing[:5])}")
        states = every_scale.run([s.image for s in batch])
        out += [_observed(s, st, (slides or {}).get(s.image_id)) for s, st in zip(batch, states)]
    return out


def _observed(sample: Sample, state, slide_id: str | None) -> Observed:
    shape = state.shape
    masks, candidates = [], []
    for i in range(len(state.nuclei)):
        row = []
        for c in sorted(state.candidates.get(i, []), key=lambda c: c.scale):
            touching, length = edge_contact(c.window_mask(), c.window, shape)
            row.append(Facts(c.scale, c.score, c.ratio, c.edge_fraction, touching, length,
                             c.nucleus_area, len(masks)))
            masks.append(to_grid(c.full_mask(shape)))
        candidates.append(row)
    truth = [to_grid(inst.cell) for inst in sample.instances]
    return Observed(sample.image_id, slide_id, iou_matrix(truth, masks), list(state.nuclei.scores),
                    candidates)


def at_touch_fraction(candidates: list[Facts], touch_fraction: float) -> list[Facts]:
    """The candidates with ``truncated`` as the real run decides it at ``touch_fraction``."""
    return [replace(f, truncated=touches(f.touching, f.edge_length, touch_fraction)) for f in candidates]


def replay(candidates: list[Facts], scales: tuple[float, ...], cfg: AggregationConfig
           ) -> tuple[list[Facts], int]:
    """(selected candidates, cytoplasm inferences) of one nucleus under ``cfg``: the scales
    the real run computes, each chosen by ``next_scale`` after the last, as the pipeline does."""
    if runs_every_scale(cfg):
        return select(candidates, cfg), len(candidates)
    by_scale, seen = {f.scale: f for f in candidates}, []
    scale = next_scale(seen, scales, cfg)
    while scale is not None:
        seen.append(by_scale[scale])
        scale = next_scale(seen, scales, cfg)
    return select(seen, cfg), len(seen)


def replay_image(ob: Observed, candidates: list[list[Facts]], scales: tuple[float, ...],
                 cfg: AggregationConfig) -> tuple[list[tuple[int, Facts]], int]:
    """([(nucleus, kept candidate)], inferences) of one image, confidence filter included."""
    kept, inferences = [], 0
    for i, row in enumerate(candidates):
        chosen, n = replay(row, scales, cfg)
        inferences += n
        kept += [(i, f) for f in chosen if confident(f, ob.nucleus_scores[i], cfg)]
    return kept, inferences


def image_counts(ob: Observed, columns: np.ndarray) -> tuple[int, int, int, float, float]:
    """(truth cells, kept cells, true positives, sum of each truth cell's best IoU, sum of the
    matched IoUs) of one image's kept candidates: one-to-one at IoU >= 0.5, as ``evaluate``."""
    m = ob.ious[:, columns]
    pairs = match(m)
    best = float(m.max(axis=1).sum()) if m.size else 0.0
    return m.shape[0], m.shape[1], len(pairs), best, sum(p[2] for p in pairs)


def score_columns(obs: list[Observed], columns: list[np.ndarray], cache: dict | None = None) -> dict:
    """Official mIoU, strict precision/recall/F1 and count errors of the candidates kept per
    image. ``cache`` remembers each image's counts per kept set: most settings of a sweep
    keep the same cells in most images, so most matchings are done once."""
    cache = {} if cache is None else cache
    n_truth = n_pred = tp = 0
    best_sum = matched = 0.0
    slide_counts: dict[str, list[int]] = {}
    for k, (ob, cols) in enumerate(zip(obs, columns)):
        key = (k, cols.tobytes())
        if key not in cache:
            cache[key] = image_counts(ob, cols)
        t, p, hits, best, pair_sum = cache[key]
        n_truth, n_pred, tp = n_truth + t, n_pred + p, tp + hits
        best_sum, matched = best_sum + best, matched + pair_sum
        if ob.slide_id is not None:
            counts = slide_counts.setdefault(ob.slide_id, [0, 0])
            counts[0], counts[1] = counts[0] + t, counts[1] + p
    ratio = lambda a, b: a / b if b else float("nan")
    slide_error = (float(np.mean([abs(p - t) / max(t, 1) for t, p in slide_counts.values()]))
                   if slide_counts and all(ob.slide_id is not None for ob in obs) else None)
    return {"f1": ratio(2 * tp, n_truth + n_pred), "miou": ratio(best_sum, n_truth),
            "precision": ratio(tp, n_pred), "recall": ratio(tp, n_truth),
            "matched_iou": matched / tp if tp else 0.0, "tp": tp, "n_truth": n_truth,
            "n_pred": n_pred, "count_bias": ratio(n_pred - n_truth, n_truth),
            "slide_count_error": slide_error}


def search_grid(obs: list[Observed], current: AggregationConfig, given: Grid | None = None) -> Grid:
    """The values searched per parameter: ``given``'s, else the cascade grid and, for the
    confidence minima, 0 and low quantiles of the scores seen (rounded down, so the cell at
    a quantile stays). The bundle's current values are always in."""
    nucleus = [s for ob in obs for s in ob.nucleus_scores]
    cell = [f.score for ob in obs for row in ob.candidates for f in row]
    quantiles = lambda xs: tuple(np.floor(np.quantile(xs, SCORE_QUANTILES) * 1000) / 1000) if xs else ()
    grid = {**CASCADE_GRID, "min_nucleus_score": (0.0, *quantiles(nucleus)),
            "min_cell_score": (0.0, *quantiles(cell)), **(given or {})}
    return {k: tuple(sorted({float(v) for v in values} | {float(getattr(current, k))}))
            for k, values in grid.items()}


def sweep(obs: list[Observed], scales: tuple[float, ...], base: AggregationConfig, grid: Grid) -> list[dict]:
    """One row per setting of the grid: the setting, its scores and its inferences. The
    cascade replays once per cascade setting; the confidence minima only filter its cells."""
    rows, cache = [], {}
    for tf in grid["touch_fraction"]:
        candidates = [[at_touch_fraction(row, tf) for row in ob.candidates] for ob in obs]
        for ms in grid["min_score"]:
            for lf in grid["leap_fraction"]:
                cascade = replace(base, min_score=ms, touch_fraction=tf, leap_fraction=lf,
                                  min_nucleus_score=0.0, min_cell_score=0.0)
                replayed = [replay_image(ob, c, scales, cascade) for ob, c in zip(obs, candidates)]
                inferences = sum(n for _, n in replayed)
                for mn in grid["min_nucleus_score"]:
                    for mc in grid["min_cell_score"]:
                        cfg = replace(cascade, min_nucleus_score=mn, min_cell_score=mc)
                        columns = [np.array([f.column for i, f in kept
                                             if confident(f, ob.nucleus_scores[i], cfg)], int)
                                   for ob, (kept, _) in zip(obs, replayed)]
                        rows.append({**setting_of(cfg), **score_columns(obs, columns, cache),
                                     "cytoplasm_inferences": inferences})
    return rows


def setting_of(cfg: AggregationConfig | dict) -> dict[str, float]:
    """The searched parameters of a config or of a table row."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return {k: float(get(k)) for k in PARAMETERS}


def _rank(row: dict, current: dict[str, float]) -> tuple:
    """Best strict F1, then official mIoU, then fewer inferences, then closest to the current
    setting: a tie never moves the bundle away from what it had."""
    changed = sum(row[k] != v for k, v in current.items())
    return row["f1"], row["miou"], -row["cytoplasm_inferences"], -changed


def separation(obs: list[Observed], scales: tuple[float, ...], cfg: AggregationConfig) -> dict:
    """How well each per-cell fact tells true cells (IoU >= 0.5 with a truth cell) from false
    ones among the cells the cascade under ``cfg`` selects, before any confidence minimum:
    AUC, 0.5 = chance, 1 = larger values are always the true cells, 0 = always the false.
    ``false_without_truth``: false cells on no plasma cell at all (IoU < 0.1 with every one);
    the others are plasma cells with a poor mask."""
    open_cfg = replace(cfg, min_nucleus_score=0.0, min_cell_score=0.0)
    facts, truth, best = [], [], []
    for ob in obs:
        candidates = [at_touch_fraction(row, cfg.touch_fraction) for row in ob.candidates]
        for i, f in replay_image(ob, candidates, scales, open_cfg)[0]:
            facts.append({"nucleus_score": ob.nucleus_scores[i], "cell_score": f.score,
                          "nucleus_area": f.nucleus_area, "ratio": f.ratio, "scale": f.scale,
                          "truncated": float(f.truncated), "edge_fraction": f.edge_fraction})
            best.append(float(ob.ious[:, f.column].max()) if ob.ious.shape[0] else 0.0)
            truth.append(best[-1] >= 0.5)
    truth = np.array(truth, bool)
    out: dict = {"true_cells": int(truth.sum()), "false_cells": int((~truth).sum()),
                 "false_without_truth": int(sum(b < 0.1 for b in best))}
    if truth.all() or not truth.any():
        return out
    for name in facts[0]:
        ranks = rankdata([f[name] for f in facts])
        n_pos, n_neg = truth.sum(), (~truth).sum()
        out[f"auc_{name}"] = round(float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)), 4)
    return out


def calibrate(model, samples: Iterable[Sample], budget: float | None = None,
              slides: Mapping[str, str] | None = None, data: str = "", tolerance: float = 0.0,
              grid: Grid | None = None, top: int = 15, device: str | None = None,
              batch_size: int = 4) -> tuple[AggregationConfig, dict]:
    """The aggregation settings with the best strict F1 on ``samples`` (labelled, images
    loaded; a list or a lazy iterable) within ``budget`` cytoplasm inferences per detected
    nucleus (None: no more than the current setting takes) and losing at most ``tolerance``
    of official mIoU and of strict recall against the current setting; and a report for
    provenance.

    ``model``: a :class:`Segmenter` or a loaded ``Bundle``. ``slides``: image_id -> slide_id,
    for the per-slide count error. ``data``: how the report names the samples.
    """
    segmenter = as_segmenter(model, device)
    current = segmenter.config.aggregation
    scales = tuple(segmenter.config.cytoplasm.scales)
    obs = observe(segmenter, samples, slides, batch_size)
    n_truth = sum(ob.ious.shape[0] for ob in obs)
    if not n_truth:
        raise InputError(f"calibration data {data}: no labelled cells (y/<id>_<k>.bmp masks)")
    grid = search_grid(obs, current, grid)
    rows = sweep(obs, scales, current, grid)
    now = setting_of(current)
    default = next(r for r in rows if setting_of(r) == now)
    n_nuclei = sum(len(ob.candidates) for ob in obs)
    limit = default["cytoplasm_inferences"] if budget is None else budget * n_nuclei
    within = [r for r in rows if r["cytoplasm_inferences"] <= limit]
    if not within:
        least = min(r["cytoplasm_inferences"] for r in rows)
        raise InputError(f"calibration budget {budget} inferences per nucleus is below what any "
                         f"setting needs ({least / max(n_nuclei, 1):.2f} per nucleus)")
    floor = {"miou": default["miou"] - tolerance, "recall": default["recall"] - tolerance}
    # a budget below the current setting's may leave nothing as good as it: then the best within
    guarded = [r for r in within if all(r[k] >= v for k, v in floor.items())]
    eligible = guarded or within
    ranked = sorted(eligible, key=lambda r: _rank(r, now), reverse=True)
    best = ranked[0]
    chosen = replace(current, **setting_of(best))
    report = {
        "data": data, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "images": len(obs), "truth_cells": n_truth, "nuclei": n_nuclei,
        "slides": len({ob.slide_id for ob in obs if ob.slide_id is not None}),
        "budget": {"cytoplasm_inferences": round(limit, 1),
                   "per_nucleus": round(limit / max(n_nuclei, 1), 4),
                   "rule": "the current setting's" if budget is None else f"{budget} per nucleus"},
        "guard": {"tolerance": tolerance, **{f"min_{k}": round(v, 4) for k, v in floor.items()},
                  "met": bool(guarded)},
        "chosen": {"setting": setting_of(best), "scores": _scores(best)},
        "default": {"setting": now, "scores": _scores(default)},
        "separation": separation(obs, scales, chosen),
        "grid": {k: list(v) for k, v in grid.items()}, "settings_searched": len(rows),
        "table": [_round(r) for r in ranked[:top]],
    }
    return chosen, report


def _scores(row: dict) -> dict:
    return {k: v for k, v in _round(row).items() if k not in PARAMETERS}


def _round(row: dict) -> dict:
    """JSON-ready: 4 decimals, NaN as None (bundle.json is strict JSON)."""
    fix = lambda v: (None if math.isnan(v) else round(v, 4)) if isinstance(v, float) else v
    return {k: fix(v) for k, v in row.items()}


_COLUMNS = [("min_score", "min_sc", "{:7.3f}"), ("touch_fraction", "touch", "{:6.3f}"),
            ("leap_fraction", "leap", "{:5.2f}"), ("min_nucleus_score", "min_nuc", "{:8.3f}"),
            ("min_cell_score", "min_cell", "{:8.3f}"), ("f1", "F1", "{:7.4f}"),
            ("miou", "mIoU", "{:7.4f}"), ("precision", "prec", "{:7.4f}"),
            ("recall", "recall", "{:7.4f}"), ("n_pred", "cells", "{:6d}"),
            ("count_bias", "count", "{:+7.1%}"), ("slide_count_error", "slide_err", "{:9.1%}"),
            ("cytoplasm_inferences", "crops", "{:7d}")]


def format_table(report: dict) -> str:
    """The report's rows, best first within the budget (``*`` marks the current setting),
    and the current setting's row last."""
    width = lambda fmt: len(fmt.format(0))

    def line(mark: str, row: dict) -> str:
        return mark + " " + " ".join("-".rjust(width(fmt)) if row.get(k) is None else fmt.format(row[k])
                                     for k, _, fmt in _COLUMNS)

    default = report["default"]["setting"]
    lines = ["  " + " ".join(title.rjust(width(fmt)) for _, title, fmt in _COLUMNS)]
    lines += [line("*" if setting_of(r) == default else " ", r) for r in report["table"]]
    lines.append(line("=", {**default, **report["default"]["scores"]}) + "  current setting")
    return "\n".join(lines)


def check_destination(bundle_uri: str, out_uri: str | None) -> None:
    """Refuse, before any work, an ``--out`` that already holds a bundle (the source included)."""
    if out_uri is None:
        return
    fs, root = filesystem(out_uri)
    if fs.exists(join(root, "bundle.json")):
        raise InputError(f"{out_uri}: already holds a bundle; choose another --out, or leave it out "
                         f"to calibrate {bundle_uri} in place")


def write_calibrated(bundle_uri: str, aggregation: AggregationConfig, report: dict,
                     out_uri: str | None = None) -> str:
    """Store the chosen settings and ``provenance["calibration"]`` in the bundle's
    ``bundle.json``, in place or in a copy at ``out_uri`` (weights copied byte for byte,
    checked against their SHA-256). bundle.json is written last, as ``save_bundle`` does."""
    from segpc.models.bundle import read_bundle_meta

    meta = read_bundle_meta(bundle_uri)
    config = Config.from_dict(meta["config"])
    config.aggregation = aggregation
    config.validate()
    meta["config"] = config.to_dict()
    meta.setdefault("provenance", {})["calibration"] = report
    check_destination(bundle_uri, out_uri)
    target = out_uri or bundle_uri
    fs_in, root_in = filesystem(bundle_uri)
    fs_out, root_out = filesystem(target)
    if out_uri:
        fs_out.makedirs(root_out, exist_ok=True)
        for entry in meta.get("networks", {}).values():
            with fs_in.open(join(root_in, entry["file"]), "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise InputError(f"{bundle_uri}: weights file {entry['file']} does not match its checksum")
            with fs_out.open(join(root_out, entry["file"]), "wb") as f:
                f.write(data)
    with fs_out.open(join(root_out, "bundle.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return target
