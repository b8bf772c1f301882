"""Camera-size images: where the time goes per image, and the Ray job against one process.

    python benchmarks/camera_size.py [--images 8] [--preset tiny|paper] [--bundle B] [--ray N]
        [--device cpu|cuda]

Synthetic images of both SegPC cameras (2040x1536 and 2560x1920). Part 1 runs the
single-process pipeline step by step (one torch thread on a CPU) and prints the time per
image of each step: the networks, and everything else (the CPU work of stage 1, crops,
candidates, aggregation, label maps and writes).

* Without ``--bundle`` the preset's networks run with random weights (their time is real),
  and their outputs are replaced by the synthetic truth seen through the network's own
  geometry (the truth fitted to the network input): every later step then does the work a
  well-trained model causes, and the comparison does not depend on how a model was trained.
* With ``--bundle`` a trained bundle runs as it is.

Part 2 (``--ray N`` with ``--bundle``): N images per camera through the Ray batch job and
through the single process (default torch threads; on a GPU bf16 autocast), same images,
same outputs; prints the images/s of both and their ratio, and on a GPU the GPU's busy
fraction (NVML, sampled every 0.1 s) over the middle 80% of each run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import single_process  # noqa: E402
from segpc.config import preset  # noqa: E402
from segpc.io.imaging import read_image, write_image  # noqa: E402
from segpc.io.inputs import InputImage  # noqa: E402
from segpc.io.outputs import ImageRecord, OutputWriter  # noqa: E402
from segpc.io.synthetic import make_image, write_archive  # noqa: E402
from segpc.method import steps  # noqa: E402
from segpc.method.crops import extract, fit_to_input  # noqa: E402
from segpc.method.cytoplasm import gather_inputs  # noqa: E402
from segpc.models.bundle import load_bundle, new_bundle  # noqa: E402
from segpc.models.runner import NetworkRunner  # noqa: E402

NETWORK_STEPS = ("nucleus network", "cytoplasm networks")


class Clock:
    """Seconds per named step, summed over the run."""

    def __init__(self):
        self.s: dict[str, float] = defaultdict(float)

    def __call__(self, step: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.s[step] += time.perf_counter() - t0
        return out


def oracle_nets(bundle, clock: Clock, device: str):
    """Nucleus and cell callables: the real networks run (timed), the truth comes out."""
    unet = NetworkRunner(bundle.nucleus, device, 8)
    cells = {s: NetworkRunner(m, device, 32) for s, m in bundle.cytoplasm.items()}
    current: list = []  # (shape, truth) of the image being run

    def nucleus_net(x: np.ndarray) -> np.ndarray:
        clock("nucleus network", unet, x)
        out = []
        for shape, truth in current:
            union = np.zeros(shape, np.float32)
            for t in truth:
                union[t.nucleus] = 1.0
            out.append(fit_to_input(union, x.shape[1])[0])
        return np.stack(out)

    def cell_net(scale: float, crops: list) -> np.ndarray:
        clock("cytoplasm networks", cells[scale], gather_inputs(crops))
        truth = current[0][1]
        out = []
        for crop in crops:
            overlap = [extract(t.nucleus, crop.window)[crop.nucleus].sum() for t in truth] or [0]
            cell = extract(truth[int(np.argmax(overlap))].cell, crop.window).astype(np.float32) \
                if truth else np.zeros(crop.nucleus.shape, np.float32)
            out.append(fit_to_input(cell, crop.fit.size)[0])
        return np.stack(out)

    return nucleus_net, cell_net, current


def single_process_by_step(paths: list[Path], truths: list[list], bundle, oracle: bool,
                           out: str, device: str) -> tuple[dict[str, float], dict]:
    """The segmenter's steps one by one, each timed; returns seconds per step and counts."""
    torch.set_num_threads(1)
    cfg = bundle.config
    clock = Clock()
    if oracle:
        nucleus_net, cell_net, current = oracle_nets(bundle, clock, device)
    else:
        unet = NetworkRunner(bundle.nucleus, device, 8)
        cells = {s: NetworkRunner(m, device, 32) for s, m in bundle.cytoplasm.items()}
        nucleus_net = lambda x: clock("nucleus network", unet, x)  # noqa: E731
        cell_net = lambda scale, crops: clock("cytoplasm networks", cells[scale], gather_inputs(crops))  # noqa: E731
        current = []
    writer = OutputWriter(out)
    counts = {"images": 0, "nuclei": 0, "cells": 0, "inferences": 0}
    # the first image warms up (imports, allocator, first network calls) and is not counted
    for n, (path, truth) in enumerate(zip([paths[0], *paths], [truths[0], *truths])):
        if n == 1:
            clock.s.clear()
            counts = dict.fromkeys(counts, 0)
        image = clock("decode", read_image, path)
        current[:] = [(image.shape[:2], truth)]
        state = clock("stage 1: fit input", steps.prepare, image, cfg)
        steps.run_nucleus([state], nucleus_net)
        clock("stage 1: instances + first crops", steps.find, state, cfg)
        for scale in cfg.cytoplasm.scales:
            steps.run_cells([state], scale, cell_net)
            clock("candidates + next crops", steps.take_candidates, state, scale, cfg)
        result = clock("aggregation", steps.finish, state, cfg)
        clock("label maps", result.label_maps)  # the writer builds them again: timed apart
        record = ImageRecord(InputImage(str(path), f"img{n}", "S01"), "ok", "", image.shape[1],
                             image.shape[0], 0.0, result)
        clock("writes", writer.write, [record])
        counts["images"] += 1
        counts["nuclei"] += result.n_nuclei
        counts["cells"] += len(result.cells)
        counts["inferences"] += sum(result.inferences.values())
    return dict(clock.s), counts


def print_steps(title: str, seconds: dict[str, float], counts: dict) -> dict:
    n = counts["images"]
    nets = sum(v for k, v in seconds.items() if k in NETWORK_STEPS)
    rest = sum(v for k, v in seconds.items() if k not in NETWORK_STEPS)
    print(f"\n{title}: {n} images, {counts['nuclei'] / n:.1f} nuclei, {counts['cells'] / n:.1f} cells, "
          f"{counts['inferences'] / n:.1f} cytoplasm inferences per image")
    for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<28} {1000 * v / n:8.1f} ms/image")
    print(f"  {'networks':<28} {1000 * nets / n:8.1f} ms/image")
    print(f"  {'everything else (CPU work)':<28} {1000 * rest / n:8.1f} ms/image")
    return {"ms_per_image": {k: 1000 * v / n for k, v in seconds.items()},
            "networks_ms": 1000 * nets / n, "rest_ms": 1000 * rest / n, **counts}


class GPUBusy:
    """The GPU's busy fraction sampled by NVML while a block runs (None without a GPU)."""

    def __init__(self, device: str):
        self.samples: list[float] = []
        self.handle = None
        if device.startswith("cuda"):
            import pynvml  # nvidia-ml-py: the project's `gpu` extra

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

    def __enter__(self) -> "GPUBusy":
        if self.handle is not None:
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100)
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.running = False
            self.thread.join()

    def steady(self) -> float | None:
        """Mean busy fraction over the middle 80% of the run (start-up and drain left out)."""
        n = len(self.samples)
        middle = self.samples[n // 10:n - n // 10]
        return float(np.mean(middle)) if middle else None


def ray_vs_single(folder: Path, bundle: str, work: Path, n: int, device: str) -> dict:
    """The Ray job and the single process over the same folder; both write the same outputs."""
    from ray_jobs.segment import parse_args
    from ray_jobs.segment import run as segment_run

    torch.set_num_threads(torch.get_num_interop_threads())
    with GPUBusy(device) as busy_single:
        t_single = single_process(folder, bundle, str(work / "single"), device,
                                  batch=16 if device.startswith("cuda") else 4)
    t0 = time.perf_counter()
    with GPUBusy(device) as busy_ray:
        summary = segment_run(parse_args(["--input", str(folder), "--output", str(work / "ray"),
                                          "--bundle", bundle, "--progress-every", "100000"]))
    t_ray = time.perf_counter() - t0
    print(f"\nsingle process: {n / t_single:.2f} images/s ({t_single:.1f}s, model load included)")
    print(f"Ray job:        {n / t_ray:.2f} images/s ({t_ray:.1f}s, Ray and actor start included); "
          f"its pipeline {n / summary['pipeline_s']:.2f} images/s")
    print(f"ratio Ray / single process: {t_single / t_ray:.2f}x end to end, "
          f"{t_single / summary['pipeline_s']:.2f}x for the pipeline alone")
    out = {"single_s": t_single, "ray_s": t_ray, "pipeline_s": summary["pipeline_s"], "ratio": t_single / t_ray}
    if busy_ray.handle is not None:
        out.update(gpu_busy_single=busy_single.steady(), gpu_busy_ray=busy_ray.steady())
        print(f"GPU busy (steady state): single process {out['gpu_busy_single']:.0%}, "
              f"Ray job {out['gpu_busy_ray']:.0%}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="images per camera for the per-step timing")
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    p.add_argument("--bundle", default=None, help="a trained bundle (default: random weights + truth)")
    p.add_argument("--ray", type=int, default=0, help="images per camera for the Ray vs single comparison")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the networks run (default: cuda when present)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segpc-camera-"))
    bundle = load_bundle(args.bundle) if args.bundle else new_bundle(preset(args.preset))
    report = {}
    for camera, (w, h) in (("camera1", (2040, 1536)), ("camera2", (2560, 1920))):
        paths, truths = [], []
        for i in range(args.images):
            image, truth = make_image(np.random.default_rng([31, i, w]), w, h)
            path = work / camera / f"{i}.bmp"  # SegPC's format
            path.parent.mkdir(parents=True, exist_ok=True)
            write_image(path, image)
            paths.append(path)
            truths.append(truth)
        seconds, counts = single_process_by_step(paths, truths, bundle, args.bundle is None,
                                                 str(work / f"out-{camera}"), args.device)
        report[camera] = print_steps(f"{camera} {w}x{h}, {args.preset if not args.bundle else args.bundle}"
                                     f"{' (random weights, truth outputs)' if not args.bundle else ''}",
                                     seconds, counts)
    if args.ray:
        if not args.bundle:
            p.error("--ray needs --bundle (the Ray job loads a bundle)")
        archive = work / "archive"
        write_archive(archive, 2 * args.ray, 2, seed=41, size="mixed")
        folder = work / "ray-input"
        for src in sorted((archive / "x").iterdir()):
            dest = folder / src.stem.rsplit("-", 1)[0] / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
        report["ray"] = ray_vs_single(folder, args.bundle, work, 2 * args.ray, args.device)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
