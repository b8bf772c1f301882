"""Shared by the benchmarks: a synthetic archive in slide folders; a job run with its memory sampled."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpc.io.synthetic import write_archive  # noqa: E402


def job_parser(doc: str, images: int, size: str = "640x480") -> argparse.ArgumentParser:
    """The options every batch-job benchmark takes: a trained bundle, how many images, what size."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="a trained bundle (local folder)")
    p.add_argument("--images", type=int, default=images)
    p.add_argument("--size", default=size, help="image size, WIDTHxHEIGHT")
    return p


def slide_folders(work: Path, n_images: int, n_slides: int, seed: int, size: str) -> tuple[Path, Path]:
    """(archive in SegPC layout, the same images as <slide>/<id>.bmp)."""
    archive, folders = work / f"archive-{n_images}", work / f"input-{n_images}"
    write_archive(archive, n_images, n_slides, seed=seed, size=size)
    for p in sorted((archive / "x").iterdir()):
        dest = folders / p.stem.rsplit("-", 1)[0] / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    return archive, folders


def single_process(folder: Path, bundle: str, out: str, device: str = "cpu", batch: int = 8,
                   segpc_masks: bool = False) -> float:
    """Seconds for one process to segment and write every image under ``folder`` (model load
    included): the baseline the Ray job is compared with."""
    from segpc.io.imaging import read_image
    from segpc.io.inputs import list_inputs
    from segpc.io.outputs import ImageRecord, OutputWriter
    from segpc.method.segmenter import Segmenter

    t0 = time.perf_counter()
    seg = Segmenter.from_bundle(bundle, device=device)
    writer = OutputWriter(out, segpc_masks=segpc_masks)
    items = list_inputs(str(folder))
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        images = [read_image(it.uri) for it in chunk]
        results = seg.segment_batch(images)
        writer.write([ImageRecord(it, "ok", "", im.shape[1], im.shape[0], 0.0, r)
                      for it, im, r in zip(chunk, images, results)])
    return time.perf_counter() - t0


def process_tree(root: int) -> set[int]:
    """``root`` and every process it started, transitively: this benchmark's Ray, not another's."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    seen, todo = {root}, [root]
    while todo:
        for kid in children.get(todo.pop(), []):
            if kid not in seen:
                seen.add(kid)
                todo.append(kid)
    return seen


def pss_kib(pid: int) -> int:
    try:
        for line in (Path("/proc") / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_sampled(cmd: list[str], env: dict | None = None, every_s: float = 0.2,
                log: Path | None = None) -> tuple[int, float, list[tuple[float, float]]]:
    """Run ``cmd`` (from the repository root), sampling the summed PSS (proportional set size:
    shared pages such as Ray's object store counted once) of it and every process it starts.
    Returns (exit status, wall seconds, [(seconds since start, MiB)])."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    samples: list[tuple[float, float]] = []

    def sample() -> None:
        while proc.poll() is None:
            samples.append((time.time() - t0, sum(pss_kib(p) for p in process_tree(proc.pid)) / 1024))
            time.sleep(every_s)

    thread = threading.Thread(target=sample)
    thread.start()
    proc.wait()
    thread.join()
    if log:
        out.close()
    return proc.returncode, time.time() - t0, samples
