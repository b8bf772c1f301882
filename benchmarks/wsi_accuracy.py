"""Whole slides against the same fields: does tiling change what a trained bundle finds?

    python benchmarks/wsi_accuracy.py [--bundle /tmp/after-tiny/bundle] [--grid 4 4] [--tile-fields 1 2 3]

A synthetic slide of ``--grid`` rows x columns of synthetic fields of the bundle's training
field shape, 40 px of glass apart (:func:`segpc.wsi.synthetic.mosaic`), is written as a
pyramidal TIFF and segmented tile by tile (:func:`segpc.wsi.driver.segment_slide`) for each
``--tile-fields``; the same fields are segmented one by one as field images. Each run is
scored per field against the fields' known cells (a slide cell belongs to the field holding
its nucleus centre; its masks are cut to that field): strict F1 and matched IoU
(:func:`segpc.evaluation.metrics.strict_score`), and the cell counts. The issue's bound:
the slide's strict F1 within 0.01 of the fields'. CPU or GPU (``--device``); one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001  (puts the repository on the path)
import numpy as np

from segpc.evaluation.metrics import strict_score
from segpc.method.segmenter import Segmenter
from segpc.models.bundle import bundle_imaging, read_bundle_meta
from segpc.wsi.driver import segment_slide
from segpc.wsi.slide import open_slide
from segpc.wsi.synthetic import mosaic, write_pyramidal_tiff
from segpc.wsi.tiles import TILE_FIELDS

GAP = 40


def per_field(cells, fields, shape) -> dict[str, list[np.ndarray]]:
    """Slide cells as per-field lists of field-sized cell masks (by nucleus centre)."""
    from segpc.method.nucleus import Nuclei

    out = {str(i): [] for i in range(len(fields))}
    for c in cells:
        (cy, cx), = Nuclei(shape, [c.box], [c.nucleus], [1.0]).centres()
        for i, (rgb, _, (y, x)) in enumerate(fields):
            h, w = rgb.shape[:2]
            if y <= cy < y + h and x <= cx < x + w:
                m = np.zeros((h, w), bool)
                y0, x0, y1, x1 = c.box
                ty0, tx0, ty1, tx1 = max(y0, y), max(x0, x), min(y1, y + h), min(x1, x + w)
                m[ty0 - y:ty1 - y, tx0 - x:tx1 - x] = c.cell[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]
                out[str(i)].append(m)
                break
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="/tmp/after-tiny/bundle", help="a trained bundle (local folder)")
    p.add_argument("--grid", type=int, nargs=2, default=[4, 4], metavar=("ROWS", "COLS"))
    p.add_argument("--field-shape", default=None,
                   help="HxW of the fields (default: the bundle's imaging.field_shape, else 480x640)")
    p.add_argument("--tile-fields", type=float, nargs="+", default=[1, TILE_FIELDS, 3])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    _, shape = bundle_imaging(read_bundle_meta(args.bundle))
    if args.field_shape:
        shape = tuple(int(v) for v in args.field_shape.lower().split("x"))
    fh, fw = shape or (480, 640)
    seg = Segmenter.from_bundle(args.bundle, device=args.device, batch_size=4)
    s = mosaic(*args.grid, field_size=(fw, fh), gap=GAP, seed=args.seed)
    truth = {str(i): [c.cell for c in cells] for i, (_, cells, _) in enumerate(s.fields)}
    n_truth = sum(map(len, truth.values()))
    print(f"slide {s.image.shape[1]}x{s.image.shape[0]} px: {len(s.fields)} fields of {fw}x{fh}, "
          f"{n_truth} true cells", flush=True)
    rows = {}
    t0 = time.perf_counter()
    results = seg.segment_batch([f[0] for f in s.fields])
    pred = {str(i): [c.full_masks((fh, fw))[1] for c in r.cells] for i, r in enumerate(results)}
    rows["fields"] = {**strict_score(truth, pred), "cells": sum(len(r.cells) for r in results),
                      "seconds": time.perf_counter() - t0}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        write_pyramidal_tiff(path, s.image, mpp=None, levels=3)
        for k in args.tile_fields:
            t0 = time.perf_counter()
            with open_slide(str(path)) as slide:
                res = segment_slide(seg, slide, (fh, fw), fields_per_tile=k)
            pred = per_field(res.cells, s.fields, s.image.shape[:2])
            rows[f"slide, tiles of {k:g} fields"] = {**strict_score(truth, pred), "cells": len(res.cells),
                                                     "tiles": res.tiles_analysed,
                                                     "seconds": time.perf_counter() - t0}
    ref = rows["fields"]["f1"]
    print("\n| run | cells found | strict F1 | precision | recall | matched IoU | F1 - fields' | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['cells']} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['matched_iou']:.3f} | {r['f1'] - ref:+.3f} | {r['seconds']:.0f} |")
    worst = max(abs(r["f1"] - ref) for r in rows.values())
    print(f"\nlargest |F1 - fields' F1|: {worst:.3f} (bound 0.01: {'met' if worst <= 0.01 else 'MISSED'})")
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk != 'per_image'} for k, r in rows.items()},
                     default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
