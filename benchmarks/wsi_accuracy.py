"""Whole slides against the same fields: does tiling change what a trained bundle finds?

    python benchmarks/wsi_accuracy.py [--bundle /tmp/after-tiny/bundle] [--grid 6 6]
        [--seeds 1 2 3 4 5 6] [--tile-fields 1 2 3]

Per seed, a synthetic slide of ``--grid`` rows x columns of synthetic fields of the bundle's
training field shape, 40 px of glass apart (:func:`segpc.wsi.synthetic.mosaic`), is written
as a pyramidal TIFF and segmented tile by tile (:func:`segpc.wsi.driver.segment_slide`) for
each ``--tile-fields``; the same fields are segmented one by one as field images. Each run
is scored per field against the fields' known cells (a slide cell belongs to the field
holding its nucleus centre; its masks are cut to that field): strict F1 and matched IoU
(:func:`segpc.evaluation.metrics.strict_score`), pooled over all slides, and the spread of
the per-slide differences. Seam duplicates: pairs of slide cells owned by different tiles
whose nuclei overlap at IoU > 0.5 (the same nucleus kept by two tiles because their U-Net
inputs differ beyond the margin and its centre moved across the core edge). The issue's
bound: the slide's strict F1 within 0.01 of the fields'. CPU or GPU (``--device``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on the path)
import numpy as np

from segpc.evaluation.metrics import strict_score
from segpc.method.segmenter import Segmenter
from segpc.models.bundle import bundle_imaging, read_bundle_meta
from segpc.wsi.driver import segment_slide
from segpc.wsi.slide import open_slide
from segpc.wsi.synthetic import mosaic, write_pyramidal_tiff
from segpc.wsi.tiles import TILE_FIELDS, slide_grid

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


def seam_duplicates(cells, tiles, shape) -> int:
    """Pairs of cells owned by different tiles whose nuclei overlap at IoU > 0.5."""
    from segpc.method.nucleus import Nuclei

    centres = Nuclei(shape, [c.box for c in cells], [c.nucleus for c in cells], [1.0] * len(cells)).centres()
    owner = [next(i for i, t in enumerate(tiles) if t.core[0] <= y < t.core[2] and t.core[1] <= x < t.core[3])
             for y, x in centres]
    n = 0
    for i, a in enumerate(cells):
        for j in range(i + 1, len(cells)):
            b = cells[j]
            y0, x0 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
            y1, x1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
            if owner[i] == owner[j] or y1 <= y0 or x1 <= x0:
                continue
            inter = int((a.nucleus[y0 - a.box[0]:y1 - a.box[0], x0 - a.box[1]:x1 - a.box[1]]
                         & b.nucleus[y0 - b.box[0]:y1 - b.box[0], x0 - b.box[1]:x1 - b.box[1]]).sum())
            n += inter / (int(a.nucleus.sum()) + int(b.nucleus.sum()) - inter) > 0.5
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="/tmp/after-tiny/bundle", help="a trained bundle (local folder)")
    p.add_argument("--grid", type=int, nargs=2, default=[4, 4], metavar=("ROWS", "COLS"))
    p.add_argument("--field-shape", default=None,
                   help="HxW of the fields (default: the bundle's imaging.field_shape, else 480x640)")
    p.add_argument("--tile-fields", type=float, nargs="+", default=[1, TILE_FIELDS, 3])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6],
                   help="one synthetic slide per seed; the scores pool them")
    args = p.parse_args()
    _, shape = bundle_imaging(read_bundle_meta(args.bundle))
    if args.field_shape:
        shape = tuple(int(v) for v in args.field_shape.lower().split("x"))
    fh, fw = shape or (480, 640)
    seg = Segmenter.from_bundle(args.bundle, device=args.device, batch_size=4)
    runs = ["fields"] + [f"slide, tiles of {k:g} fields" for k in args.tile_fields]
    truth, pred = {}, {r: {} for r in runs}
    per_slide = {r: [] for r in runs}
    counts = {r: {"cells": 0, "seconds": 0.0, "seam duplicates": 0} for r in runs}
    for seed in args.seeds:
        s = mosaic(*args.grid, field_size=(fw, fh), gap=GAP, seed=seed)
        mine = {f"{seed}/{i}": [c.cell for c in cells] for i, (_, cells, _) in enumerate(s.fields)}
        truth.update(mine)
        t0 = time.perf_counter()
        results = seg.segment_batch([f[0] for f in s.fields])
        got = {f"{seed}/{i}": [c.full_masks((fh, fw))[1] for c in r.cells] for i, r in enumerate(results)}
        found = {"fields": (got, sum(len(r.cells) for r in results), time.perf_counter() - t0, 0)}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "slide.tif"
            write_pyramidal_tiff(path, s.image, mpp=None, levels=3)
            for k, run in zip(args.tile_fields, runs[1:]):
                t0 = time.perf_counter()
                with open_slide(str(path)) as slide:
                    res = segment_slide(seg, slide, (fh, fw), fields_per_tile=k)
                seconds = time.perf_counter() - t0
                got = {f"{seed}/{i}": m for i, m in per_field(res.cells, s.fields, s.image.shape[:2]).items()}
                tiles = slide_grid(s.image.shape[:2], seg.config, (fh, fw), k)
                found[run] = (got, len(res.cells), seconds, seam_duplicates(res.cells, tiles, s.image.shape[:2]))
        line = [f"seed {seed}: {sum(map(len, mine.values()))} true cells"]
        for run, (got, n, seconds, dups) in found.items():
            pred[run].update(got)
            per_slide[run].append(strict_score(mine, got)["f1"])
            counts[run]["cells"] += n
            counts[run]["seconds"] += seconds
            counts[run]["seam duplicates"] += dups
            line.append(f"{run} F1 {per_slide[run][-1]:.3f}")
        print("; ".join(line), flush=True)
    rows = {r: {**strict_score(truth, pred[r]), **counts[r]} for r in runs}
    ref = rows["fields"]["f1"]
    print(f"\n{len(args.seeds)} slides of {args.grid[0]}x{args.grid[1]} fields of {fw}x{fh}, "
          f"{sum(map(len, truth.values()))} true cells")
    print("\n| run | cells found | strict F1 | precision | recall | matched IoU | F1 - fields' "
          "| per slide: min / max | seam duplicates | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        d = [a - b for a, b in zip(per_slide[name], per_slide["fields"])]
        print(f"| {name} | {r['cells']} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['matched_iou']:.3f} | {r['f1'] - ref:+.3f} | {min(d):+.3f} / {max(d):+.3f} | "
              f"{r['seam duplicates']} | {r['seconds']:.0f} |")
    worst = max(abs(r["f1"] - ref) for r in rows.values())
    print(f"\nlargest |F1 - fields' F1|, pooled: {worst:.3f} (bound 0.01: {'met' if worst <= 0.01 else 'MISSED'})")
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk != 'per_image'} for k, r in rows.items()},
                     default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
