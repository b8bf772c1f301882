"""End-to-end validation of a segmenter: each scale alone, the cascade, and keep-all.

This is how a bundle is judged (and what training writes into its provenance): the rule
must beat every single scale on the strict metric, or the cascade is not worth having.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np

from segpc.config import Config
from segpc.evaluation.metrics import evaluate
from segpc.io.segpc_format import Sample
from segpc.method.crops import paste
from segpc.method.cytoplasm import candidate_from_probability, gather_inputs
from segpc.method.nucleus import find_nuclei
from segpc.method.segmenter import Segmenter
from segpc.method.steps import prepare, run_nucleus
from segpc.training.data import true_nucleus_crops


def single_scale(config: Config, scale: float) -> Config:
    """The same method with one crop scale: every nucleus gets that scale's cell."""
    cfg = copy.deepcopy(config)
    cfg.cytoplasm.scales = (scale,)
    return cfg


def with_mode(config: Config, mode: str) -> Config:
    cfg = copy.deepcopy(config)
    cfg.aggregation.mode = mode
    return cfg


def score(segmenter: Segmenter, samples: list[Sample], batch_size: int = 4) -> dict:
    """Official + strict metrics over ``samples`` and the cytoplasm inferences it took."""
    truth, pred, inferences = {}, {}, 0
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        for s, r in zip(batch, segmenter.segment_batch([s.image for s in batch])):
            truth[s.image_id] = [inst.cell for inst in s.instances]
            pred[s.image_id] = [inst.cell for inst in r.instances()]
            inferences += sum(r.inferences.values())
    out = evaluate(truth, pred)
    out.pop("per_image", None)
    out["cytoplasm_inferences"] = inferences
    return out


def compare_rules(segmenter: Segmenter, samples: list[Sample]) -> dict:
    """{"scale 0.5": {...}, ..., "cascade": {...}, "best": {...}, "keep-all": {...}}, all on
    the same samples; "best" runs every scale for every nucleus and keeps the best."""
    cfg = segmenter.config
    variants = {f"scale {s:g}": single_scale(cfg, s) for s in cfg.cytoplasm.scales}
    for mode in ("cascade", "best", "keep-all"):
        variants[mode] = with_mode(cfg, mode)
    return {name: score(segmenter.with_config(c), samples) for name, c in variants.items()}


def validate_nucleus(predict: Callable[[np.ndarray], np.ndarray], samples: list[Sample],
                     config: Config) -> dict:
    """Nucleus instances (with the full post-processing) against the true nuclei."""
    truth, pred = {}, {}
    for s in samples:
        state = prepare(s.image, config, s.image_id)
        run_nucleus([state], predict)
        nuclei = find_nuclei(state.nucleus_prob.astype(np.float32), state.shape, config.nucleus)
        truth[s.image_id] = [inst.nucleus for inst in s.instances]
        whole = (0, 0, *state.shape)
        pred[s.image_id] = [nuclei.in_window(i, whole) for i in range(len(nuclei))]
    return evaluate(truth, pred)


def validate_scale(predict: Callable[[np.ndarray], np.ndarray], samples: list[Sample],
                   scale: float, config: Config) -> dict:
    """One scale alone, on crops around the true nuclei: its cells against the true cells."""
    truth, pred = {}, {}
    for s in samples:
        crops = [crop for _, crop in true_nucleus_crops(s, scale, config)]
        probs = predict(gather_inputs(crops)) if crops else []
        shape = s.image.shape[:2]
        pred[s.image_id] = [
            paste(candidate_from_probability(prob, crop, shape, config.cytoplasm, config.aggregation).cell,
                  crop.window, shape) for crop, prob in zip(crops, probs)]
        truth[s.image_id] = [inst.cell for inst in s.instances]
    return evaluate(truth, pred)
