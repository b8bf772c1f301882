"""Splitting touching nuclei: the core/Voronoi splitter of stage 1 against the marker watershed.

    python benchmarks/split_nuclei.py [--cache DIR] [--images 8] [--packed 40]

Each truth is a nucleus instance label map; the binary union of its instances goes through
``split_touching`` (the hand-written splitter segpc used before, kept below as the baseline,
"old") and ``split_nuclei`` (segpc/method/splitting.py, "new", given the median nucleus
diameter of the truth at that resolution, as a bundle records it). Prints per mask set:
nuclei found / true, true positives and strict F1 (one-to-one matching at IoU >= 0.5), how many of the nuclei that
touch another one are recovered, and the CPU and wall milliseconds per mask (median of 3).
Target: F1 >= 0.95 on the real mask.

Real mask: the 2-D nucleus test image that the stardist package ships
(stardist/data/images/mask2d.tif in the stardist 0.9.2 wheel on PyPI, read by
``stardist.data.test_image_nuclei_2d``): a 512x512 fluorescence field from the 2018 Data
Science Bowl (BBBC038v1, Caicedo et al., Nature Methods 2019) with its hand-drawn instance
labels: 125 nuclei (median equivalent diameter 23.7 px, areas 25-751 px) in 102 8-connected
blobs; 42 nuclei touch another one (16 pairs, 2 triples, one group of 4). BBBC038v1 images
and labels are CC0 1.0 (public domain); stardist itself is BSD-3-Clause. Nothing of it is in
this repository: the wheel (~3 MB) is downloaded with pip into the cache folder on first
use, and the file is checked against its SHA-256. The 0.5x and 3x rows are the same labels
resized with nearest neighbour: the same rule at a 320-px network map's scale and at a
camera's.

Synthetic masks: the labelled plasma-cell nuclei of ``make_image`` at 2040x1536 (camera 1).
They almost never touch (1 touching pair in ~740 nuclei), so that row only shows whether a
single nucleus is ever cut in two. The "packed" rows paste 40 of those nuclei into one
2040x1536 map, about half of them pushed into an earlier one until they touch, as in a dense
smear, and resize that map to 800x800 (the network's input) and 320x320: splitting at every
scale the method meets, and the time per image that production pays.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import tifffile
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpc.evaluation.metrics import match  # noqa: E402
from segpc.io.synthetic import make_image  # noqa: E402
from segpc.method.splitting import median_nucleus_diameter, split_nuclei  # noqa: E402

WHEEL = "stardist==0.9.2"
MEMBER = "stardist/data/images/mask2d.tif"
SHA256 = "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"
EIGHT = np.ones((3, 3), bool)


# The splitter segpc used before the watershed, unchanged: the benchmark's baseline.
def split_touching(mask: np.ndarray, core_fraction: float = 0.5, min_core_area: int = 4) -> np.ndarray:
    """Label a binary nucleus mask, splitting blobs that have two or more distance-transform cores.

    A core is a region whose distance to the background exceeds ``core_fraction`` of its
    blob's largest distance. Two round nuclei that touch have one core each, joined by a
    thin neck that the threshold cuts; one oval nucleus keeps a single core. Pixels are
    then given to the nearest core.
    """
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return labels.astype(np.int32)
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    peak = ndi.maximum(dist, labels, index=np.arange(1, n + 1))
    cores = dist > core_fraction * np.concatenate([[np.inf], peak])[labels]
    markers, n_cores = ndi.label(cores, structure=np.ones((3, 3), bool))
    if n_cores <= n:
        return labels.astype(np.int32)
    sizes = np.bincount(markers.ravel(), minlength=n_cores + 1)
    markers[sizes[markers] < min_core_area] = 0
    # Blobs without any surviving core keep their own label as marker.
    orphan = (labels > 0) & ~np.isin(labels, np.unique(labels[markers > 0]))
    markers[orphan] = labels[orphan] + n_cores
    # Each pixel goes to its nearest core (a Voronoi split inside the blob): for round nuclei
    # joined by a neck this cuts at the neck, without a watershed's plateau artefacts.
    fg = mask.astype(bool)
    _, (iy, ix) = ndi.distance_transform_edt(markers == 0, return_indices=True)
    flooded = markers[iy, ix]
    # A pixel nearer to a neighbouring blob's core stays in its own blob.
    blob_of = np.zeros(int(markers.max()) + 1, np.int64)
    blob_of[markers[markers > 0]] = labels[markers > 0]
    stray = fg & (blob_of[flooded] != labels)
    flooded[stray] = labels[stray] + int(markers.max())
    flooded[~fg] = 0
    _, relabelled = np.unique(flooded, return_inverse=True)
    return relabelled.reshape(flooded.shape).astype(np.int32)



def real_mask(cache: Path) -> np.ndarray:
    """The stardist DSB-2018 label map, labels renumbered 1..n; the wheel is fetched once."""
    path = cache / "mask2d.tif"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Pinned platform, so every machine fetches the same file.
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                        "--implementation", "cp", "-d", str(cache)], check=True)
        wheel = next(cache.glob("stardist-0.9.2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            path.write_bytes(z.read(MEMBER))
    if hashlib.sha256(path.read_bytes()).hexdigest() != SHA256:
        raise SystemExit(f"{path}: unexpected SHA-256; delete it to fetch it again")
    return consecutive(tifffile.imread(path))


def consecutive(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in order (the stardist mask skips numbers)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int32)


def resized(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize; nuclei that vanish leave no gap in the numbering."""
    small = cv2.resize(labels.astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST)
    return consecutive(small)


def synthetic_nuclei(n_images: int, width: int = 2040, height: int = 1536) -> list[np.ndarray]:
    """Label maps of the labelled nuclei of ``make_image`` (seeds 0..n_images-1)."""
    maps = []
    for i in range(n_images):
        _, cells = make_image(np.random.default_rng([5, i]), width, height)
        lab = np.zeros((height, width), np.int32)
        for k, cell in enumerate(cells, 1):
            lab[cell.nucleus] = k
        maps.append(lab)
    return maps


def contact(out: np.ndarray, nuc: np.ndarray, y: int, x: int) -> int | None:
    """Where ``nuc`` pasted at (y, x) would lie among the nuclei of ``out``: None off the map
    (a 1 px margin kept), 0 apart, 1 touching (8-connected), 2 overlapping."""
    h, w = nuc.shape
    if y < 1 or x < 1 or y + h + 1 > out.shape[0] or x + w + 1 > out.shape[1]:
        return None
    if (out[y:y + h, x:x + w][nuc] > 0).any():
        return 2
    near = ndi.binary_dilation(out[y - 1:y + h + 1, x - 1:x + w + 1] > 0, structure=EIGHT)
    return int(near[1:-1, 1:-1][nuc].any())


def packed(maps: list[np.ndarray], n: int, rng: np.random.Generator, touch: float = 0.5,
           press: float = 0.25) -> np.ndarray:
    """``n`` nuclei cut from ``maps`` pasted into one map of their shape. A fraction
    ``touch`` slides towards an earlier nucleus until the two are 8-connected, then on by up
    to ``press`` of its size; the earlier one keeps the shared pixels, so they meet along a
    flat contact, as pressed nuclei do (and as the real labels show). The rest land apart."""
    shapes = [lab[box] == k for lab in maps for k, box in enumerate(ndi.find_objects(lab), 1) if box]
    out, centres = np.zeros(maps[0].shape, np.int32), []
    for _ in range(20 * n):
        if len(centres) == n:
            break
        nuc = shapes[rng.integers(len(shapes))]
        h, w = nuc.shape
        if centres and rng.random() < touch:
            (cy, cx), phi = centres[rng.integers(len(centres))], rng.uniform(0, 2 * np.pi)
            # 1 px steps change the Chebyshev gap by at most 1, so the slide meets "touching".
            slide = [(round(cy + r * np.sin(phi) - h / 2), round(cx + r * np.cos(phi) - w / 2))
                     for r in np.arange(2 * (h + w), -1.0, -1.0)]
            hit = next(i for i, at in enumerate(slide) if contact(out, nuc, *at) != 0)
            if contact(out, nuc, *slide[hit]) != 1:
                continue
            y, x = slide[min(hit + round(rng.uniform(0, press) * min(h, w)), len(slide) - 1)]
            if contact(out, nuc, y, x) is None:
                continue
        else:
            y, x = rng.integers(1, out.shape[0] - h - 1), rng.integers(1, out.shape[1] - w - 1)
            if contact(out, nuc, y, x) != 0:
                continue
        window = out[y:y + h, x:x + w]
        own = nuc & (window == 0)
        if own.sum() < 0.6 * nuc.sum() or ndi.label(own, structure=EIGHT)[1] != 1:
            continue  # mostly hidden, or cut in two by an earlier nucleus
        window[own] = len(centres) + 1
        centres.append((y + h / 2, x + w / 2))
    return consecutive(out)


def score(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """(true positives, true positives among nuclei that touch another one, predicted nuclei).

    IoUs come from one joint histogram of the two label maps, the same values as
    ``iou_matrix`` of the instance masks without building a full-size mask per nucleus.
    """
    nt, npred = int(truth.max()), int(pred.max())
    joint = np.bincount(truth.ravel().astype(np.int64) * (npred + 1) + pred.ravel(),
                        minlength=(nt + 1) * (npred + 1)).reshape(nt + 1, npred + 1)
    inter = joint[1:, 1:]
    iou = inter / (joint[1:].sum(1)[:, None] + joint[:, 1:].sum(0)[None] - inter)
    found = [t for t, _, _ in match(iou)]
    return len(found), int(touching(truth)[found].sum()), npred


def touching(truth: np.ndarray) -> np.ndarray:
    """Per truth nucleus (0-based): does its 8-connected blob hold another nucleus?"""
    blobs, n = ndi.label(truth > 0, structure=EIGHT)
    per_blob = np.bincount(np.unique(blobs.ravel() * (truth.max() + 1) + truth.ravel()) // (truth.max() + 1),
                           minlength=n + 1)
    owner = np.zeros(truth.max() + 1, np.int64)
    owner[truth.ravel()] = blobs.ravel()
    return per_blob[owner[1:]] > 1


def timed(split, mask: np.ndarray, repeat: int = 3) -> tuple[np.ndarray, float, float]:
    """Labels, and the median CPU and wall milliseconds of ``repeat`` runs. CPU time is what a
    busy batch machine pays per image; wall time also counts waiting for a shared core."""
    cpu, wall = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        labels = split(mask)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return labels, 1e3 * float(np.median(cpu)), 1e3 * float(np.median(wall))


def row(name: str, truths: list[np.ndarray]) -> str:
    d = median_nucleus_diameter(truths)
    n_true = sum(int(t.max()) for t in truths)
    n_touch = sum(int(touching(t).sum()) for t in truths)
    cells = []
    for split in (split_touching, lambda m: split_nuclei(m, d)):
        tp = tp_touch = n_pred = 0
        cpu = wall = 0.0
        for truth in truths:
            labels, c, t = timed(split, truth > 0)
            a, b, k = score(truth, labels)
            tp, tp_touch, n_pred, cpu, wall = tp + a, tp_touch + b, n_pred + k, cpu + c, wall + t
        f1 = 2 * tp / (n_true + n_pred)
        cells.append(f"{n_pred:4d}/{n_true:<4d} {tp:4d} {f1:6.3f} {tp_touch:3d}/{n_touch:<3d} "
                     f"{cpu / len(truths):6.0f} {wall / len(truths):6.0f}")
    h, w = truths[0].shape
    return f"{name:<17s} {f'{w}x{h}':>9s} {d:5.1f}  " + "  |  ".join(cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "segpc" / "stardist-0.9.2",
                   help="where the stardist wheel and its mask are kept")
    p.add_argument("--images", type=int, default=8, help="synthetic 2040x1536 images")
    p.add_argument("--packed", type=int, default=40, help="nuclei in the packed synthetic map")
    args = p.parse_args()

    real = real_mask(args.cache)
    maps = synthetic_nuclei(args.images)
    dense = packed(maps, args.packed, np.random.default_rng(11))
    h, w = real.shape
    sets = [("real DSB-2018", [real]), ("real, 0.5x", [resized(real, w // 2, h // 2)]),
            ("real, 3x", [resized(real, 3 * w, 3 * h)]), ("synthetic", maps),
            ("synthetic packed", [dense]), ("synthetic packed", [resized(dense, 800, 800)]),
            ("synthetic packed", [resized(dense, 320, 320)])]
    cols = "found/true   TP     F1 touching  cpu ms wall"
    print(f"{'':<35s}{'old: split_touching':<47s}|  new: split_nuclei")
    print(f"{'masks':<17s} {'size':>9s} {'diam':>5s}  {cols}  |  {cols}")
    for name, truths in sets:
        print(row(name, truths), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
