"""Whole slides through the batch job: throughput against the same pixels as field images,
and peak memory for a slide and a slide 4x its size.

    python benchmarks/wsi_scale.py [--bundle /tmp/after-tiny/bundle] [--megapixels 50 200] [--tile-fields 2 3]

A synthetic slide of about N megapixels is a grid of synthetic fields of the bundle's
training field shape (:func:`segpc.io.synthetic.make_image`), edge to edge, with a share
of the grid positions (``--glass``) left bare glass (the larger slide: the smaller one's
grid scaled on each side); it is written as a tiled pyramidal TIFF
(levels 1, 1/4, 1/16, the pixel size in its tags) strip by strip, so this script never holds
the slide in memory. The non-glass fields are also written as PNG field images (one folder).
With several ``--tile-fields``, the slide jobs run once per tile size against one fields run.

Each job is a fresh process running ``ray_jobs.segment.run`` (its own local Ray, local
folders in and out); the summed PSS of that process and every process it starts (Ray's
included; shared pages such as the object store counted once) is sampled, and each
process's own peak kept. The benchmark's own memory is not measured.

Throughput (the first size, and the steady state: the larger run's extra pixels over its
extra time, so the start-up of Ray and the actors cancels): megapixels *analysed* per second. For the slide, the cores of
the tiles analysed (glass tiles skipped on the small level are not counted; a tile reads
its core plus a margin, which is not counted either); for the fields, the fields' pixels
(the glass positions were never written as fields). Both are near the slide's non-glass
area; the figures are per analysed pixel of each. Memory: the slide job at both sizes
(target: the larger within 1.3x).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from _common import process_tree, pss_kib

from segpc.wsi.tiles import TILE_FIELDS

ROOT = Path(__file__).resolve().parents[1]
TILE = 160  # TIFF tile side: divides 480x640 fields, so a field row is whole tile rows
LEVEL_STEP = 4  # pyramid levels 1, 1/4, 1/16, as scanners write them
JOB = """import json, sys
from ray_jobs.common import job_environment
from ray_jobs.segment import parse_args, run
args = parse_args(sys.argv[1:])
with job_environment(args):
    summary = run(args)
print("WSI_SCALE_SUMMARY " + json.dumps(summary), flush=True)
"""


def prepare_bundle(src: str, work: Path, mpp: float, field_shape: tuple[int, int]) -> tuple[str, float, tuple[int, int]]:
    """A copy of the bundle whose ``imaging`` is set (the job tiles slides at its pixel size
    and field shape); returns (path, mpp, field_shape) as the job will use them."""
    from segpc.models.bundle import bundle_imaging

    dest = work / "bundle"
    shutil.copytree(src, dest)
    meta = json.loads((dest / "bundle.json").read_text())
    have_mpp, have_shape = bundle_imaging(meta)
    if have_mpp is None or have_shape is None:
        meta["imaging"] = {"mpp": have_mpp or mpp, "field_shape": list(have_shape or field_shape)}
        (dest / "bundle.json").write_text(json.dumps(meta, indent=2))
        print(f"bundle {src} records no {'pixel size' if have_mpp is None else 'field shape'}: "
              f"its copy says imaging = {meta['imaging']}")
    mpp_, shape = bundle_imaging(meta)
    return str(dest), mpp_, shape


def grid(megapixels: float, field_shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of fields for a near-square slide of about ``megapixels``."""
    fh, fw = field_shape
    n = megapixels * 1e6 / (fh * fw)
    rows = max(1, round(math.sqrt(n * fw / fh)))
    return rows, max(1, round(n / rows))


def write_slide(path: Path, rows: int, cols: int, field_shape: tuple[int, int], mpp: float, glass: float,
                seed: int, fields_dir: Path | None = None, compression: str = "zlib") -> dict:
    """A pyramidal TIFF of ``rows`` x ``cols`` synthetic fields, a ``glass`` share of them
    left bare, generated and written one field row at a time (the small levels are kept
    whole: 1/16 of the slide's pixels). The non-glass fields also go to ``fields_dir`` as
    PNG when given."""
    import tifffile

    from segpc.io.synthetic import PALETTE, make_image

    fh, fw = field_shape
    if fh % TILE or fw % TILE:
        raise SystemExit(f"field shape {field_shape} must be a multiple of {TILE} px")
    height, width = rows * fh, cols * fw
    rng = np.random.default_rng([seed, 1])
    empty = set(rng.choice(rows * cols, size=round(glass * rows * cols), replace=False).tolist())
    background = np.array(PALETTE["background"], np.float32)
    small = [np.zeros((height // LEVEL_STEP ** k, width // LEVEL_STEP ** k, 3), np.uint8) for k in (1, 2)]
    if fields_dir:
        fields_dir.mkdir(parents=True, exist_ok=True)

    def tiles():
        for r in range(rows):
            noise = np.random.default_rng([seed, 2, r]).normal(0, 1.5, (fh, width, 3))
            strip = np.clip(background + noise, 0, 255).astype(np.uint8)
            for c in range(cols):
                if r * cols + c in empty:
                    continue
                rgb, _ = make_image(np.random.default_rng([seed, r, c]), fw, fh)
                strip[:, c * fw:(c + 1) * fw] = rgb
                if fields_dir:
                    cv2.imwrite(str(fields_dir / f"field-{r:03d}-{c:03d}.png"), rgb[..., ::-1])
            for k, level in enumerate(small, start=1):
                s = LEVEL_STEP ** k
                level[r * fh // s:(r + 1) * fh // s] = cv2.resize(strip, (width // s, fh // s),
                                                                  interpolation=cv2.INTER_AREA)
            for y in range(0, fh, TILE):
                for x in range(0, width, TILE):
                    yield strip[y:y + TILE, x:x + TILE]

    opts = {"tile": (TILE, TILE), "photometric": "rgb", "compression": compression}
    with tifffile.TiffWriter(str(path), bigtiff=True) as tw:
        tw.write(tiles(), shape=(height, width, 3), dtype=np.uint8, subifds=len(small),
                 resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **opts)
        for level in small:
            tw.write(level, subfiletype=1, **opts)
    return {"megapixels": height * width / 1e6, "shape": (height, width), "grid": (rows, cols),
            "fields": rows * cols - len(empty), "glass_fields": len(empty),
            "field_megapixels": (rows * cols - len(empty)) * fh * fw / 1e6}


def run_job(input_dir: Path, output: Path, bundle: str, log: Path, every_s: float,
            extra: tuple[str, ...] = ()) -> dict:
    """One batch job in a fresh process (its own Ray): its summary, wall time, and peak PSS
    (MiB): summed over the driver and every process it started, the driver alone, and the
    largest single other process."""
    cmd = [sys.executable, "-c", JOB, "--input", str(input_dir), "--output", str(output),
           "--bundle", bundle, "--progress-every", "100000", *extra]
    t0 = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        peaks = {"total": 0.0, "driver": 0.0, "worker": 0.0}

        def sample() -> None:
            while proc.poll() is None:
                pss = {p: pss_kib(p) / 1024 for p in process_tree(proc.pid)}
                peaks["total"] = max(peaks["total"], sum(pss.values()))
                peaks["driver"] = max(peaks["driver"], pss.get(proc.pid, 0.0))
                others = [m for p, m in pss.items() if p != proc.pid]
                peaks["worker"] = max(peaks["worker"], max(others, default=0.0))
                time.sleep(every_s)

        thread = threading.Thread(target=sample)
        thread.start()
        proc.wait()
        thread.join()
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"the job failed (exit {proc.returncode}); its log: {log}\n{text[-3000:]}")
    summary = json.loads(text.rsplit("WSI_SCALE_SUMMARY ", 1)[1].splitlines()[0])
    return {**summary, "process_s": wall, "peak_mib": peaks}


def tile_geometry(bundle: str, field_shape: tuple[int, int],
                  fields_per_tile: float) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(margin, core shape, read shape) of the slide's tiles: the job's own rule."""
    from segpc.config import Config
    from segpc.models.bundle import read_bundle_meta
    from segpc.wsi.tiles import slide_grid, tile_margin

    config = Config.from_dict(read_bundle_meta(bundle)["config"])
    inner = next(t for t in slide_grid((10 ** 4, 10 ** 4), config, field_shape, fields_per_tile)
                 if t.row == 1 and t.col == 1)
    y0, x0, y1, x1 = inner.core  # a tile inside the slide: its read box not clipped at an edge
    return tile_margin(config, field_shape), (y1 - y0, x1 - x0), inner.shape


def analysed(output: Path) -> dict:
    """Pixels analysed and cells found, from the job's images/ table: a tile counts its core
    (``core_area_px``), a field its whole image; slide and glass rows count nothing."""
    from segpc.io.outputs import read_table

    t = read_table(str(output), "images").to_pandas()
    ok = t[t.status == "ok"]
    kind = ok.get("kind", None)
    if kind is None or kind.isna().all():
        px = float((ok.width * ok.height).sum())
        return {"megapixels": px / 1e6, "images": len(ok), "cells": int(ok.n_cells.sum()),
                "errors": int((t.status != "ok").sum())}
    tiles = ok[kind == "tile"]
    slide = ok[kind == "slide"]
    return {"megapixels": float(tiles.core_area_px.sum()) / 1e6, "images": len(tiles),
            "cells": int(tiles.n_cells.sum()),
            "tiles": int(slide.tiles.sum()), "tiles_skipped": int(slide.tiles_skipped.sum()),
            "glass_rows": int((kind == "glass").sum()), "errors": int((t.status != "ok").sum())}


def slide_run(mp: float, k: float, ks: list[float]) -> str:
    return f"slide {mp:g} MP" + (f", tiles of {k:g} fields" if len(ks) > 1 else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="/tmp/after-tiny/bundle", help="a trained bundle (local folder)")
    p.add_argument("--megapixels", type=float, nargs=2, default=[50, 200], metavar=("SMALL", "LARGE"),
                   help="slide sizes: throughput and memory at SMALL, memory at LARGE")
    p.add_argument("--mpp", type=float, default=0.5,
                   help="µm per pixel of the slides (and of the bundle's copy, if it records none)")
    p.add_argument("--field-shape", default="480x640",
                   help="HxW of the fields (and of the bundle's copy's field shape, if it records none)")
    p.add_argument("--glass", type=float, default=0.1, help="share of the grid left bare glass")
    p.add_argument("--tile-fields", type=float, nargs="+", default=[TILE_FIELDS],
                   help="the job's --tile-fields: the slide runs once per value, against one fields run")
    p.add_argument("--sample-every", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--keep", default=None,
                   help="a new work folder to keep (slides, fields, outputs, job logs; default: a temporary one, removed)")
    args = p.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="segpc-wsi-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"--keep {work}: the folder must be new or empty")
    fh, fw = (int(v) for v in args.field_shape.lower().split("x"))
    bundle, mpp, field_shape = prepare_bundle(args.bundle, work, args.mpp, (fh, fw))
    small, large = args.megapixels
    rows, cols = grid(small, field_shape)
    k = math.sqrt(large / small)  # the large slide: the small one's grid, each side scaled
    slides = {}
    for i, (mp, (r, c)) in enumerate(((small, (rows, cols)), (large, (round(rows * k), round(cols * k))))):
        folder = work / f"slide-{mp:g}"
        folder.mkdir()
        t0 = time.time()
        slides[mp] = write_slide(folder / f"WSI{mp:g}.tif", r, c, field_shape, mpp, args.glass, seed=7,
                                 fields_dir=work / f"fields-{mp:g}" / "F01")
        print(f"slide {mp:g} MP: {slides[mp]['shape'][1]}x{slides[mp]['shape'][0]} px, "
              f"{slides[mp]['fields']} fields + {slides[mp]['glass_fields']} glass, written in "
              f"{time.time() - t0:.0f}s", flush=True)

    runs = {}
    jobs = [(f"fields {mp:g} MP", work / f"fields-{mp:g}", ()) for mp in (small, large)]
    jobs += [(slide_run(mp, k, args.tile_fields), work / f"slide-{mp:g}", ("--tile-fields", f"{k:g}"))
             for k in args.tile_fields for mp in (small, large)]
    for name, input_dir, extra in jobs:
        out = work / f"out-{name.replace(' ', '-').replace(',', '')}"
        r = run_job(input_dir, out, bundle, work / f"{out.name}.log", args.sample_every, extra)
        r["analysed"] = analysed(out)
        runs[name] = r
        a, m = r["analysed"], r["peak_mib"]
        print(f"{name}: {a['images']} images, {a['megapixels']:.1f} MP analysed, {a['cells']} cells, "
              f"{a['errors']} errors; pipeline {r['pipeline_s']:.0f}s, process {r['process_s']:.0f}s; "
              f"peak PSS {m['total']:.0f} MiB (driver {m['driver']:.0f}, largest other {m['worker']:.0f})",
              flush=True)

    def rate(r: dict, key: str) -> float:
        return r["analysed"]["megapixels"] / r[key]

    def marginal(a: dict, b: dict, what: str) -> float:  # the large run's extra work over its extra time
        return (b["analysed"][what] - a["analysed"][what]) / (b["pipeline_s"] - a["pipeline_s"])

    print("\n| run | analysed MP | images | cells | MP/s pipeline | MP/s end to end | images/s pipeline "
          "| peak PSS sum | driver | largest other |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        a, m = r["analysed"], r["peak_mib"]
        print(f"| {name} | {a['megapixels']:.1f} | {a['images']} | {a['cells']} | {rate(r, 'pipeline_s'):.2f} | "
              f"{rate(r, 'process_s'):.2f} | {a['images'] / r['pipeline_s']:.2f} | {m['total']:.0f} MiB | "
              f"{m['driver']:.0f} MiB | {m['worker']:.0f} MiB |")
    f, f_big = runs[f"fields {small:g} MP"], runs[f"fields {large:g} MP"]
    fields_steady = {"mp_s": marginal(f, f_big, "megapixels"), "images_s": marginal(f, f_big, "images")}
    print(f"\nfields, steady state (the {large:g}-MP run's extra pixels over its extra pipeline time, start-up "
          f"cancelled): {fields_steady['mp_s']:.2f} MP/s ({fields_steady['images_s']:.1f} images/s)")
    results = {}
    for k in args.tile_fields:
        s, big = runs[slide_run(small, k, args.tile_fields)], runs[slide_run(large, k, args.tile_fields)]
        ratio = {key: rate(s, key) / rate(f, key) for key in ("pipeline_s", "process_s")}
        per_image = (s["analysed"]["images"] / s["pipeline_s"]) / (f["analysed"]["images"] / f["pipeline_s"])
        steady = {"slide_mp_s": marginal(s, big, "megapixels"), "tiles_s": marginal(s, big, "images")}
        steady["ratio"] = steady["slide_mp_s"] / fields_steady["mp_s"]
        growth = {key: big["peak_mib"][key] / s["peak_mib"][key] for key in ("total", "driver", "worker")}
        margin, core, read = tile_geometry(bundle, field_shape, k)
        read_px = s["analysed"]["images"] * read[0] * read[1] / 1e6
        print(f"\n--tile-fields {k:g}: throughput slide / fields (target >= 0.9x): {ratio['pipeline_s']:.2f}x "
              f"pipeline, {ratio['process_s']:.2f}x end to end; steady state {steady['slide_mp_s']:.2f} MP/s "
              f"({steady['tiles_s']:.1f} tiles/s): {steady['ratio']:.2f}x. The tiles read {read_px:.1f} MP for "
              f"{s['analysed']['megapixels']:.1f} MP of cores ({read_px / s['analysed']['megapixels']:.2f}x: a "
              f"{margin} px margin around {core[0]}x{core[1]} cores in {read[0]}x{read[1]} reads); per image "
              f"(a tile against a field): {per_image:.2f}x")
        print(f"  peak memory {large:g} MP / {small:g} MP (target <= 1.3x): sum {growth['total']:.2f}x, "
              f"driver {growth['driver']:.2f}x, largest other process {growth['worker']:.2f}x")
        results[f"{k:g}"] = {"throughput_ratio": ratio, "per_image_ratio": per_image, "steady_state": steady,
                             "memory_ratio": growth, "margin": margin, "core": core, "read": read,
                             "tile_read_megapixels": read_px}
    print(json.dumps({"slides": slides, "runs": runs, "fields_steady_state": fields_steady,
                      "tile_fields": results, "work": str(work)}, default=str))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
