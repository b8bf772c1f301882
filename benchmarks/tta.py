"""Test-time flips (--tta): what they gain and what they cost, on slides no training step saw.

    python benchmarks/tta.py [--bundle /tmp/after-tiny/bundle] [--data /tmp/after-tiny/unseen]
        [--device cpu] [--threads 2] [--batch 4] [--stages]

The in-process segmenter with the bundle's rule (the cascade, calibrated) on the same
images without and with TTA (both stages: the nucleus U-Net and each scale's Attention
DeepLabv3+ average the probabilities of the input as is, flipped left-right, up-down and
both). Prints official mIoU, strict F1 / precision / recall, the plasma cells counted
against the truth (all images and per slide), the nuclei found, the cytoplasm crops run
and images/s (segmentation only: images decoded beforehand, one warm-up batch each),
with the images/s ratio. The variants run batch after batch in turn, so a machine whose
load changes during the run slows them alike. --stages adds TTA on one stage only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from segpc.evaluation.validation import _Tally  # noqa: E402
from segpc.method.segmenter import Segmenter, cell_net, nucleus_net  # noqa: E402
from segpc.models.bundle import load_bundle  # noqa: E402
from segpc.training.data import load_sample  # noqa: E402
from segpc.training.splits import list_splits  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="/tmp/after-tiny/bundle", help="a trained bundle (benchmarks/train_tiny.py)")
    p.add_argument("--data", default="/tmp/after-tiny/unseen", help="a labelled archive (x/, y/, slides.csv)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--batch", type=int, default=4, help="images per segment_batch call")
    p.add_argument("--runner-batch", type=int, default=16, help="network inputs per forward pass")
    p.add_argument("--stages", action="store_true", help="also TTA on the nucleus stage only, cytoplasm only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    splits = list_splits(args.data, 0.0)
    samples = [load_sample(r) for r in splits.train]
    bundle = load_bundle(args.bundle, device="cpu")
    cfg = bundle.config
    nets = {tta: (nucleus_net(bundle, args.device, args.runner_batch, tta=tta),
                  cell_net(bundle, args.device, args.runner_batch, tta=tta)) for tta in (False, True)}
    variants = {"plain": (False, False), "tta": (True, True)}
    if args.stages:
        variants.update({"tta nucleus only": (True, False), "tta cytoplasm only": (False, True)})
    segmenters = {name: Segmenter(cfg, nets[n][0], nets[c][1]) for name, (n, c) in variants.items()}
    print(f"{len(samples)} images ({samples[0].image.shape[1]}x{samples[0].image.shape[0]}), "
          f"{len({splits.slides.get(s.image_id) for s in samples})} slides, rule {cfg.aggregation.mode}, "
          f"scales {list(cfg.cytoplasm.scales)}, device {args.device}, {torch.get_num_threads()} thread(s)")

    for seg in segmenters.values():  # warm-up: first calls allocate
        seg.segment_batch([s.image for s in samples[:args.batch]])
    tallies = {name: _Tally() for name in segmenters}
    seconds = dict.fromkeys(segmenters, 0.0)
    counts = {name: {} for name in segmenters}
    for i in range(0, len(samples), args.batch):
        batch = samples[i:i + args.batch]
        for name, seg in segmenters.items():
            t0 = time.perf_counter()
            results = seg.segment_batch([s.image for s in batch])
            seconds[name] += time.perf_counter() - t0
            tallies[name].add(batch, results)
            for s, r in zip(batch, results):
                pair = counts[name].setdefault(splits.slides.get(s.image_id, "?"), [0, 0])
                pair[0] += len(r.cells)
                pair[1] += len(s.instances)

    rows = {}
    for name, tally in tallies.items():
        m = tally.result()
        rows[name] = {"f1": m["f1"], "miou": m["miou"], "precision": m["precision"], "recall": m["recall"],
                      "cells": m["n_pred"], "true_cells": m["n_truth"], "nuclei": m["n_nuclei"],
                      "crops": m["cytoplasm_inferences"], "images_per_s": len(samples) / seconds[name],
                      "slide_counts": {k: tuple(v) for k, v in sorted(counts[name].items())}}
    print(f"\n{'':<19} {'F1':>7} {'mIoU':>7} {'prec':>7} {'recall':>7} {'cells':>6} {'truth':>6} "
          f"{'err':>7} {'nuclei':>6} {'crops':>6} {'img/s':>7}")
    for name, r in rows.items():
        err = (r["cells"] - r["true_cells"]) / r["true_cells"]
        print(f"{name:<19} {r['f1']:7.4f} {r['miou']:7.4f} {r['precision']:7.4f} {r['recall']:7.4f} "
              f"{r['cells']:6d} {r['true_cells']:6d} {err:+7.1%} {r['nuclei']:6d} {r['crops']:6d} "
              f"{r['images_per_s']:7.2f}")
    for name, r in rows.items():
        print(f"{name:<19} per slide (counted/true): "
              + ", ".join(f"{k} {c}/{t} ({(c - t) / t:+.1%})" for k, (c, t) in r["slide_counts"].items()))
    plain, tta = rows["plain"], rows["tta"]
    print(f"\nTTA: F1 {tta['f1'] - plain['f1']:+.4f}, mIoU {tta['miou'] - plain['miou']:+.4f}, "
          f"images/s x{tta['images_per_s'] / plain['images_per_s']:.2f} "
          f"({plain['images_per_s'] / tta['images_per_s']:.2f}x the time)")
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "images": len(samples),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
