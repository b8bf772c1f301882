"""Where a whole-slide tile's time goes, step by step, against the same pixels as fields.

    python benchmarks/wsi_steps.py [--bundle /tmp/after-tiny/bundle] [--grid 6 6] [--tile-fields 2]
        [--s3]

One process, one torch thread, no Ray. A synthetic slide of ``--grid`` fields of the
bundle's training field shape, edge to edge (:func:`segpc.wsi.synthetic.mosaic`), is
segmented twice with the pipeline's own steps (:mod:`segpc.method.steps`): as its fields
(PNG bytes decoded) and as the tiles of :func:`segpc.wsi.tiles.slide_grid` (read boxes from
a pyramidal TIFF, the U-Net at a field's scale, only the nuclei a tile owns kept). Each step's
seconds per analysed megapixel (a field's pixels, a tile's core) are printed, and the ratio
fields / tiles of the totals (>= 1: tiles no slower). With ``--s3`` the reading alone is also
timed from a local SeaweedFS (``ray_jobs.local_s3``): tiles by range reads of several block
sizes, fields as one GET each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _common  # noqa: F401  (puts the repository on the path)
import cv2
import numpy as np
import torch

from segpc.method.segmenter import Segmenter
from segpc.method.steps import find, finish, prepare, run_cells, run_nucleus, take_candidates
from segpc.models.bundle import bundle_imaging, read_bundle_meta
from segpc.wsi.resolution import SlideView
from segpc.wsi.slide import open_slide
from segpc.wsi.synthetic import mosaic, write_pyramidal_tiff
from segpc.wsi.tiles import TILE_FIELDS, slide_grid


def timed_steps(seg: Segmenter, images: list[np.ndarray], at: list[dict], times: dict, tag: str) -> None:
    """The pipeline's steps over ``images`` (``at``: prepare's per-image arguments), each
    step's seconds added to ``times[(tag, step)]``."""
    cfg = seg.config
    t = time.perf_counter()

    def tick(step: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[(tag, step)] += now - t
        t = now

    states = [prepare(im, cfg, "x", **kw) for im, kw in zip(images, at)]
    tick("prepare")
    run_nucleus(states, seg.nucleus_fn)
    tick("U-Net")
    for st in states:
        find(st, cfg)
    tick("nucleus search")
    for scale in cfg.cytoplasm.scales:
        run_cells(states, scale, seg.cell_fn)
        tick("cytoplasm networks")
        for st in states:
            take_candidates(st, scale, cfg)
        tick("candidates")
    for r in [finish(st, cfg) for st in states]:
        r.label_maps(np.uint32)
    tick("finish, label maps")


def s3_reads(path: Path, fields: list[bytes], shape: tuple[int, int], config, field_shape, k: float) -> None:
    """Reading alone from a local SeaweedFS: the tiles' read boxes by range reads, the fields' PNGs."""
    from ray_jobs.local_s3 import LocalS3
    from segpc.io.storage import filesystem, read_bytes

    server = LocalS3().start()
    saved = dict(os.environ)
    os.environ.update(server.env())
    try:
        fs, _ = filesystem("s3://wsi-steps")
        fs.mkdir("wsi-steps")
        fs.put_file(str(path), "wsi-steps/slide.tif")
        for i, data in enumerate(fields):
            fs.pipe_file(f"wsi-steps/f/{i}.png", data)
        tiles = slide_grid(shape, config, field_shape, k)
        cores = sum((t.core[2] - t.core[0]) * (t.core[3] - t.core[1]) for t in tiles) / 1e6
        for block in (256 * 1024, 1024 * 1024, 4096 * 1024):
            with open_slide("s3://wsi-steps/slide.tif", block_size=block) as slide:
                view, t0 = SlideView.at(slide, None, None), time.perf_counter()
                for t in tiles:
                    view.read(t.read)
                dt = time.perf_counter() - t0
            print(f"s3 tiles, {block // 1024}-KiB range reads: {1000 * dt / cores:.0f} ms per analysed MP")
        t0 = time.perf_counter()
        for i in range(len(fields)):
            cv2.imdecode(np.frombuffer(read_bytes(f"s3://wsi-steps/f/{i}.png"), np.uint8), cv2.IMREAD_COLOR)
        mp = len(fields) * field_shape[0] * field_shape[1] / 1e6
        print(f"s3 fields, one GET + PNG decode each: {1000 * (time.perf_counter() - t0) / mp:.0f} ms per analysed MP")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="/tmp/after-tiny/bundle", help="a trained bundle (local folder)")
    p.add_argument("--grid", type=int, nargs=2, default=[6, 6], metavar=("ROWS", "COLS"))
    p.add_argument("--tile-fields", type=float, default=TILE_FIELDS)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--s3", action="store_true", help="also time the reading from a local SeaweedFS")
    args = p.parse_args()
    torch.set_num_threads(1)
    _, shape = bundle_imaging(read_bundle_meta(args.bundle))
    fh, fw = shape or (480, 640)
    seg = Segmenter.from_bundle(args.bundle, device="cpu", batch_size=4)
    s = mosaic(*args.grid, field_size=(fw, fh), gap=0, seed=args.seed)
    times: dict = defaultdict(float)
    pngs = [cv2.imencode(".png", f[0][..., ::-1])[1].tobytes() for f in s.fields]
    t0 = time.perf_counter()
    images = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy() for b in pngs]
    times[("fields", "read")] += time.perf_counter() - t0
    timed_steps(seg, images, [{}] * len(images), times, "fields")
    field_mp = sum(im.shape[0] * im.shape[1] for im in images) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        write_pyramidal_tiff(path, s.image, mpp=None, levels=3)
        with open_slide(str(path)) as slide:
            view = SlideView.at(slide, None, None)
            tiles = slide_grid(view.shape, seg.config, (fh, fw), args.tile_fields)
            t0 = time.perf_counter()
            reads = [view.read(t.read) for t in tiles]
            times[("tiles", "read")] += time.perf_counter() - t0
        timed_steps(seg, reads, [{"field_shape": (fh, fw), "region": t.core_box_in_read} for t in tiles],
                    times, "tiles")
        core_mp = sum((t.core[2] - t.core[0]) * (t.core[3] - t.core[1]) for t in tiles) / 1e6
        print(f"{len(images)} fields of {fw}x{fh} ({field_mp:.1f} MP) against {len(tiles)} tiles of "
              f"{args.tile_fields:g} fields ({core_mp:.1f} MP of cores)\n")
        print("| step | fields, ms per MP | tiles, ms per MP | tiles / fields |")
        print("|---|---|---|---|")
        steps = list(dict.fromkeys(step for _, step in times))
        for step in steps:
            f, t = 1000 * times[("fields", step)] / field_mp, 1000 * times[("tiles", step)] / core_mp
            print(f"| {step} | {f:.1f} | {t:.1f} | {t / f:.2f}x |")
        total_f = sum(times[("fields", st)] for st in steps) / field_mp
        total_t = sum(times[("tiles", st)] for st in steps) / core_mp
        print(f"| total | {1000 * total_f:.0f} | {1000 * total_t:.0f} | {total_t / total_f:.2f}x |")
        print(f"\nthroughput per analysed MP, tiles against fields: {total_f / total_t:.2f}x")
        if args.s3:
            s3_reads(path, pngs, view.shape, seg.config, (fh, fw), args.tile_fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
