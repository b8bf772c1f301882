"""The cascade and keep-all rules, on hand-built candidates."""

import numpy as np
import pytest

from segpc.method.aggregate import Candidate, cytoplasm_ratio, next_scale, select, truncation
from segpc.config import AggregationConfig


def cand(scale, ratio, truncated=False, nucleus_area=100, score=0.95, edge=0.0):
    cell = np.zeros((40, 40), bool)
    cell.flat[: int(round(nucleus_area * (1 + ratio)))] = True
    return Candidate(scale, (0, 0, 40, 40), cell, nucleus_area, score=score, truncated=truncated,
                     edge_fraction=edge)


CFG = AggregationConfig()


def test_ratio():
    assert cytoplasm_ratio(300, 100) == 2.0
    assert cytoplasm_ratio(80, 100) == 0.0  # never negative
    assert cand(1.75, 1.5).ratio == pytest.approx(1.5)


def test_cascade_stops_at_the_first_acceptable_scale():
    cands = [cand(0.5, 0.3), cand(1.75, 1.0), cand(2.6, 2.0), cand(3.0, 3.0)]
    assert [c.scale for c in select(cands, CFG)] == [0.5]


def test_cascade_moves_on_when_truncated_or_implausible():
    cands = [cand(0.5, 0.6, truncated=True), cand(1.75, 2.5, truncated=True), cand(2.6, 3.0)]
    assert [c.scale for c in select(cands, CFG)] == [2.6]
    # ratio 0.9 is above the 0.5 window (0-0.8): implausible at 0.5
    assert [c.scale for c in select([cand(0.5, 0.9), cand(1.75, 1.2)], CFG)] == [1.75]


def test_cascade_moves_on_when_unsure():
    cands = [cand(0.5, 0.3, score=0.7), cand(1.75, 1.0, score=0.93)]
    assert [c.scale for c in select(cands, CFG)] == [1.75]


def test_cascade_fallbacks():
    # nothing acceptable: plausible before implausible, untruncated before truncated, then score
    cands = [cand(0.5, 0.5, True, score=0.99), cand(1.75, 2.0, score=0.6), cand(2.6, 2.0, score=0.8),
             cand(3.0, 0.2, score=0.99)]
    assert [c.scale for c in select(cands, CFG)] == [2.6]
    cands = [cand(0.5, 0.9, True), cand(1.75, 0.1), cand(3.0, 0.2, score=0.97)]
    assert [c.scale for c in select(cands, CFG)] == [3.0]
    cands = [cand(0.5, 0.4, True, score=0.7), cand(1.75, 1.0, True, score=0.8)]
    assert [c.scale for c in select(cands, CFG)] == [1.75]
    assert select([], CFG) == []


def test_keep_all_returns_every_plausible_candidate():
    cfg = AggregationConfig(mode="keep-all")
    cands = [cand(0.5, 0.3), cand(1.75, 1.0), cand(2.6, 0.1), cand(3.0, 3.0, truncated=True)]
    assert [c.scale for c in select(cands, cfg)] == [0.5, 1.75, 3.0]


def test_touching_counts_only_edges_inside_the_image():
    cell = np.zeros((20, 20), bool)
    cell[0, 5:15] = True  # runs along the top edge: 10 of the 80 edge pixels
    assert truncation(cell, (10, 10, 30, 30), (100, 100), 0.02) == (True, 10 / 80)
    # the same window on the image's top border: the top edge is the image border
    assert truncation(cell, (0, 10, 20, 30), (100, 100), 0.02) == (False, 0.0)
    # a single touching pixel is not enough
    one = np.zeros((20, 20), bool)
    one[0, 5] = True
    assert not truncation(one, (10, 10, 30, 30), (100, 100), 0.02)[0]
    # a window covering the whole image has no inside edges
    assert truncation(cell, (0, 0, 20, 20), (20, 20), 0.02) == (False, 0.0)


SCALES = (0.5, 1.75, 2.6, 3.0)


def test_next_scale_walks_up_and_stops_on_an_acceptable_candidate():
    assert next_scale([], SCALES, CFG) == 0.5
    assert next_scale([cand(0.5, 0.3)], SCALES, CFG) is None
    assert next_scale([cand(0.5, 0.6, truncated=True, edge=0.05)], SCALES, CFG) == 1.75
    assert next_scale([cand(0.5, 0.9), cand(1.75, 2.0, score=0.5)], SCALES, CFG) == 2.6
    assert next_scale([cand(3.0, 2.0, truncated=True, edge=0.5)], SCALES, CFG) is None


def test_next_scale_leaps_over_one_scale_for_a_cell_far_larger_than_its_crop():
    assert next_scale([cand(0.5, 0.6, truncated=True, edge=0.1)], SCALES, CFG) == 2.6
    # never past the largest scale
    assert next_scale([cand(1.75, 2.0, truncated=True, edge=0.4)], SCALES, CFG) == 3.0
    assert next_scale([cand(2.6, 2.0, truncated=True, edge=0.4)], SCALES, CFG) == 3.0
    assert next_scale([cand(0.5, 0.6, truncated=True, edge=0.4)], (0.5, 1.75), CFG) == 1.75


def test_best_mode_keeps_one_by_the_fallback_order():
    cfg = AggregationConfig(mode="best")
    cands = [cand(0.5, 0.3, score=0.95), cand(1.75, 1.0, score=0.97), cand(2.6, 1.0, True, score=0.99)]
    assert [c.scale for c in select(cands, cfg)] == [1.75]
