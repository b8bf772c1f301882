"""The CUDA path, checked and timed on a GPU machine (run by hand where a GPU is lent).

    python benchmarks/gpu_check.py --bundle BUNDLE [--ray] [--images 200]

1. inference through NetworkRunner (bf16 autocast, channels_last for the U-Net, pinned-memory copies)
   against fp32 on the same GPU: throughput ratio and the largest probability difference,
   for the paper-size networks (U-Net at 800x800; Attention DeepLabv3+ at 256 and 384);
2. training steps with mixed precision against fp32 (paper-size cytoplasm network);
3. the single-process segmenter with a trained tiny bundle on GPU against CPU;
4. with --ray: the Ray batch job with GPU actor pools (--gpus 1) on the same images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from segpc.config import preset  # noqa: E402
from segpc.models import build_cytoplasm_model, build_nucleus_model  # noqa: E402
from segpc.models.runner import NetworkRunner, to_channels_last  # noqa: E402


def timed(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def inference(results: dict) -> None:
    cfg = preset("paper")
    cases = [("unet-800", build_nucleus_model(cfg.nucleus), (16, 3, 800, 800)),
             ("adeeplab-256", build_cytoplasm_model(cfg.cytoplasm), (64, 4, 256, 256)),
             ("adeeplab-384", build_cytoplasm_model(cfg.cytoplasm), (64, 4, 384, 384))]
    for name, model, shape in cases:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        layout = {"channels_last": name.startswith("unet")}  # as the segmenter runs them
        amp = NetworkRunner(model, "cuda", batch_size=shape[0], amp=True, **layout)
        fp32 = NetworkRunner(model, "cuda", batch_size=shape[0], amp=False, **layout)
        t_amp, t_fp32 = timed(lambda: amp(x)), timed(lambda: fp32(x))
        diff = float(np.abs(amp(x) - fp32(x)).max())
        results[name] = {"amp_items_per_s": shape[0] / t_amp, "fp32_items_per_s": shape[0] / t_fp32,
                         "speedup": t_fp32 / t_amp, "max_prob_diff": diff, "dtype": str(amp.amp_dtype)}
        print(name, json.dumps(results[name]), flush=True)


def training(results: dict) -> None:
    from segpc.training.data import Arrays
    from segpc.training.steps import train_epoch

    cfg = preset("paper")
    n = 128
    rng = np.random.default_rng(0)
    arrays = Arrays(rng.integers(0, 255, (n, 384, 384, 4), np.uint8), rng.integers(0, 2, (n, 384, 384), np.uint8))
    for amp in (True, False):
        model = to_channels_last(build_cytoplasm_model(cfg.cytoplasm).cuda())
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        gen = torch.Generator().manual_seed(0)
        train_epoch(model, opt, arrays, np.arange(32), 16, torch.device("cuda"), gen, amp=amp)  # warm-up
        stats = train_epoch(model, opt, arrays, np.arange(n), 16, torch.device("cuda"), gen, amp=amp)
        results[f"train-adeeplab-384-{'amp' if amp else 'fp32'}"] = stats
        print("train", amp, json.dumps(stats), flush=True)


def segmenter(results: dict, bundle: str, images: list[np.ndarray]) -> None:
    from segpc.method.segmenter import Segmenter

    counts = {}
    for device, amp in (("cuda", True), ("cuda-fp32", False), ("cpu", None)):
        seg = Segmenter.from_bundle(bundle, device=device.split("-")[0], batch_size=64, amp=amp)
        seg.segment_batch(images[:8])
        t0 = time.perf_counter()
        counts[device] = [len(r.cells) for i in range(0, len(images), 16) for r in seg.segment_batch(images[i:i + 16])]
        dt = time.perf_counter() - t0
        results[f"segmenter-{device}"] = {"images_per_s": len(images) / dt, "cells": sum(counts[device])}
        print("segmenter", device, json.dumps(results[f"segmenter-{device}"]), flush=True)
    same = sum(a == b for a, b in zip(counts["cuda"], counts["cpu"]))
    results["bf16-vs-fp32-same-cell-count-images"] = f"{same}/{len(images)}"
    print("images with the same cell count on GPU (bf16) and CPU (fp32):", f"{same}/{len(images)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--ray", action="store_true")
    p.add_argument("--skip-networks", action="store_true", help="skip parts 1 and 2")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "bf16": torch.cuda.is_bf16_supported()}
    print(json.dumps(results), flush=True)
    if not args.skip_networks:
        inference(results)
        training(results)
    from segpc.io.synthetic import write_archive

    work = Path(tempfile.mkdtemp())
    write_archive(work / "a", args.images, 4, seed=3, size="640x480")
    from segpc.io.imaging import read_image

    paths = sorted((work / "a" / "x").iterdir())
    segmenter(results, args.bundle, [read_image(p) for p in paths])
    if args.ray:
        for p in paths:
            dest = work / "in" / p.stem.split("-")[0] / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())
        from ray_jobs.segment import main as segment_main

        t0 = time.perf_counter()
        rc = segment_main(["--input", str(work / "in"), "--output", str(work / "out"), "--bundle", args.bundle,
                           "--gpus", "1", "--progress-every", "50"])
        dt = time.perf_counter() - t0
        results["ray-job-gpu"] = {"rc": rc, "images_per_s": len(paths) / dt, "seconds": dt}
        print("ray job", json.dumps(results["ray-job-gpu"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
