"""End-to-end validation of a segmenter: each scale alone, the cascade, keep-all, and the
bundle's rule around the true nuclei.

This is how a bundle is judged (and what training writes into its provenance): the rule
must beat every single scale on the strict metric, or the cascade is not worth having. The
score around the true nuclei (stage 1 replaced by the truth) beside the end-to-end one says
how much of what is lost, is lost in stage 1: the F1 gap the guidance jitter is meant to close.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from segpc.config import Config
from segpc.evaluation.metrics import evaluate
from segpc.io.segpc_format import Sample
from segpc.method.crops import paste
from segpc.method.cytoplasm import candidate_from_probability, gather_inputs
from segpc.method.nucleus import Nuclei, find_nuclei
from segpc.method.results import ImageResult
from segpc.method.segmenter import Segmenter
from segpc.method.steps import prepare, run_nucleus
from segpc.training.data import nucleus_labels, true_nucleus_crops

TRUE_NUCLEI = "true nuclei"


def single_scale(config: Config, scale: float) -> Config:
    """The same method with one crop scale: every nucleus gets that scale's cell."""
    cfg = copy.deepcopy(config)
    cfg.cytoplasm.scales = (scale,)
    return cfg


def with_mode(config: Config, mode: str) -> Config:
    cfg = copy.deepcopy(config)
    cfg.aggregation.mode = mode
    return cfg


class _Tally:
    """Truth and predicted cells of one variant, gathered batch by batch."""

    def __init__(self) -> None:
        self.truth: dict[str, list[np.ndarray]] = {}
        self.pred: dict[str, list[np.ndarray]] = {}
        self.inferences = self.nuclei = 0

    def add(self, samples: list[Sample], results: list[ImageResult]) -> None:
        for s, r in zip(samples, results):
            self.truth[s.image_id] = [inst.cell for inst in s.instances]
            self.pred[s.image_id] = [inst.cell for inst in r.instances()]
            self.inferences += sum(r.inferences.values())
            self.nuclei += r.n_nuclei

    def result(self) -> dict:
        out = evaluate(self.truth, self.pred)
        out.pop("per_image", None)
        out["cytoplasm_inferences"] = self.inferences
        out["n_nuclei"] = self.nuclei
        return out


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score(segmenter: Segmenter, samples: Iterable[Sample], batch_size: int = 4) -> dict:
    """Official + strict metrics over ``samples``, the cytoplasm inferences it took and the
    nuclei stage 1 found."""
    tally = _Tally()
    for batch in _batches(samples, batch_size):
        tally.add(batch, segmenter.segment_batch([s.image for s in batch]))
    return tally.result()


def compare_rules(segmenter: Segmenter, samples: Iterable[Sample], true_nuclei: bool = False,
                  batch_size: int = 4) -> dict:
    """{"scale 0.5": {...}, ..., "cascade": {...}, "best": {...}, "keep-all": {...}}, all on
    the same samples (read once, so they may stream); "best" runs every scale for every
    nucleus and keeps the best. ``true_nuclei`` adds ``"true nuclei"``: the segmenter's own
    rule with stage 1 replaced by the true nucleus instances."""
    cfg = segmenter.config
    variants = {f"scale {s:g}": single_scale(cfg, s) for s in cfg.cytoplasm.scales}
    for mode in ("cascade", "best", "keep-all"):
        variants[mode] = with_mode(cfg, mode)
    tallies = {name: _Tally() for name in [*variants, *([TRUE_NUCLEI] if true_nuclei else [])]}
    for batch in _batches(samples, batch_size):
        images = [s.image for s in batch]
        for name, c in variants.items():
            tallies[name].add(batch, segmenter.with_config(c).segment_batch(images))
        if true_nuclei:
            tallies[TRUE_NUCLEI].add(batch, segment_around_truth(segmenter, batch))
    return {name: t.result() for name, t in tallies.items()}


def true_nuclei(sample: Sample) -> Nuclei:
    """The labelled nuclei of a sample as stage 1's result (score 1; an earlier instance
    keeps the pixels two nuclei share, as the U-Net's instances never overlap)."""
    labels = nucleus_labels(sample)
    boxes, masks = [], []
    for i in range(len(sample.instances)):
        own = labels == i + 1
        rows, cols = np.flatnonzero(own.any(1)), np.flatnonzero(own.any(0))
        if rows.size:
            y0, x0, y1, x1 = int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
            boxes.append((y0, x0, y1, x1))
            masks.append(own[y0:y1, x0:x1])
    return Nuclei(labels.shape, boxes, masks, [1.0] * len(boxes))


def segment_around_truth(segmenter: Segmenter, samples: list[Sample]) -> list[ImageResult]:
    """Stage 2 and the aggregation of ``segmenter`` around each sample's true nuclei."""
    return segmenter.segment_batch([s.image for s in samples], [true_nuclei(s) for s in samples])


def validate_nucleus(predict: Callable[[np.ndarray], np.ndarray], samples: Iterable[Sample],
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


def validate_scale(predict: Callable[[np.ndarray], np.ndarray], samples: Iterable[Sample],
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
