"""End-to-end validation rules on stand-in networks (no training): what each rule runs and
the score around the true nuclei."""

from __future__ import annotations

import numpy as np

from segpc.config import preset
from segpc.evaluation.validation import TRUE_NUCLEI, compare_rules
from segpc.io.synthetic import write_archive
from segpc.method.segmenter import Segmenter
from segpc.training.data import load_sample
from segpc.training.splits import list_splits


def _dark(x: np.ndarray) -> np.ndarray:
    """A stand-in U-Net: the dark (nucleus-coloured) pixels of its uint8 inputs."""
    return (x.astype(np.float32).mean(-1) < 110).astype(np.float32)


def _cell_from_guidance(scale, crops) -> np.ndarray:
    """A stand-in cytoplasm network: the whole cell is where the guidance nucleus is, grown."""
    import cv2

    grown = [cv2.dilate(c.pixels[..., 3], np.ones((9, 9), np.uint8)) for c in crops]
    return np.stack(grown).astype(np.float32) / 255.0 if crops else np.zeros((0, 1, 1), np.float32)


def test_rules_run_what_they_promise_and_true_nuclei_are_scored(tmp_path):
    write_archive(tmp_path, n_images=4, n_slides=2, seed=3, size="320x240")
    samples = [load_sample(r) for r in list_splits(str(tmp_path), val_fraction=0).train]
    n_cells = sum(len(s.instances) for s in samples)
    cfg = preset("tiny")
    out = compare_rules(Segmenter(cfg, _dark, _cell_from_guidance), iter(samples), true_nuclei=True)
    found = out["keep-all"]["n_nuclei"]
    assert found > 0 and all(m["n_nuclei"] == found for name, m in out.items() if name != TRUE_NUCLEI)
    # every scale for every nucleus, exactly; one scale once per nucleus; the cascade in between
    assert out["keep-all"]["cytoplasm_inferences"] == out["best"]["cytoplasm_inferences"] == 4 * found
    assert all(out[f"scale {s:g}"]["cytoplasm_inferences"] == found for s in cfg.cytoplasm.scales)
    assert found <= out["cascade"]["cytoplasm_inferences"] <= 4 * found
    # around the true nuclei: one nucleus per labelled cell, and every cell found
    true = out[TRUE_NUCLEI]
    assert true["n_nuclei"] == true["n_truth"] == n_cells
    assert true["n_pred"] == n_cells and true["recall"] > 0.5
