"""Synthetic Jenner-Giemsa bone-marrow aspirate images in SegPC layout (tests, demos, smoke runs).

The images pose the real task: labelled plasma cells (blue cytoplasm, eccentric dark nucleus)
whose cytoplasm/nucleus area ratios follow the four-peaked histogram the crop scales are tuned
to (METHOD.md 4), touching and overlapping each other, among unlabelled look-alikes
(lymphocytes, neutrophils, myelocytes, red cells), under per-image stain and light changes.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from segpc.errors import InputError
from segpc.io.imaging import MAX_PIXELS, write_image
from segpc.method.crops import Box
from segpc.method.instances import Instance

CAMERAS = {"camera1": (2040, 1536), "camera2": (2560, 1920)}
# Lognormal components of the cytoplasm/nucleus area ratio: (median, sigma, weight).
RATIO_MODES = ((0.35, 0.35, 0.25), (1.6, 0.2, 0.35), (3.2, 0.06, 0.22), (4.2, 0.06, 0.18))
MAX_SCALE = 3.0  # the largest crop scale: every cell must fit inside its crop window
REF_WIDTH = 640  # nucleus diameters are 14-26 px at this width, and scale linearly with it
PALETTE = {  # RGB before the per-image stain jitter
    "background": (236, 224, 228), "rbc": (222, 156, 166), "rbc_pale": (238, 204, 208),
    "plasma_cyto": (100, 102, 188), "hof": (188, 186, 230), "plasma_nuc": (72, 30, 112),
    "lympho_cyto": (172, 196, 232), "lympho_nuc": (62, 36, 100),
    "granulo_cyto": (222, 194, 214), "granulo_nuc": (116, 64, 152),
}
Poly = np.ndarray  # (n, 2) float x, y


def parse_size(size: str) -> list[tuple[int, int]]:
    """'WxH', 'camera1', 'camera2' or 'mixed' (both cameras) -> list of (width, height)."""
    s = str(size).strip().lower()
    if s == "mixed":
        return [CAMERAS["camera1"], CAMERAS["camera2"]]
    if s in CAMERAS:
        return [CAMERAS[s]]
    m = re.fullmatch(r"(\d+)x(\d+)", s)
    if not m or min(int(m[1]), int(m[2])) < 64 or int(m[1]) * int(m[2]) > MAX_PIXELS:
        raise InputError(f"size {size!r}: expected WxH (each side >= 64, at most {MAX_PIXELS} "
                         "pixels), camera1, camera2 or mixed")
    return [(int(m[1]), int(m[2]))]


def _stain(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One hue/saturation/brightness change of the whole palette, plus a little per colour."""
    rgb = np.array([list(PALETTE.values())], np.float32) / 255
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-12, 12) + rng.normal(0, 3, len(PALETTE))) % 360
    hsv[..., 1] *= rng.uniform(0.85, 1.2) * rng.uniform(0.92, 1.08, len(PALETTE))
    hsv[..., 2] *= rng.uniform(0.9, 1.05) * rng.uniform(0.96, 1.04, len(PALETTE))
    rgb = cv2.cvtColor(np.clip(hsv, 0, [360, 1, 1]).astype(np.float32), cv2.COLOR_HSV2RGB)
    return dict(zip(PALETTE, rgb[0] * 255))


def _contour(rng: np.random.Generator, a: float, b: float, angle: float, wobble: float = 0.05,
             n: int = 64) -> Poly:
    """An ellipse with low-frequency radial noise: cells are smooth but never perfect circles."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = a * b / np.hypot(b * np.cos(t), a * np.sin(t))
    k = np.arange(2, 6)[:, None]
    waves = rng.normal(0, wobble, (4, 1)) / k * np.cos(k * t + rng.uniform(0, 7, (4, 1)))
    r = r * (1 + waves.sum(0))
    return np.stack([r * np.cos(t + angle), r * np.sin(t + angle)], 1)


def _area(p: Poly) -> float:
    return 0.5 * abs(float(p[:, 0] @ np.roll(p[:, 1], 1) - p[:, 1] @ np.roll(p[:, 0], 1)))


def _inside(pts: np.ndarray, poly: Poly) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over any leading axes of ``pts`` (..., 2)."""
    x, y = pts[..., 0, None], pts[..., 1, None]
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = ((y0 > y) != (y1 > y)) & (x < (x1 - x0) * (y - y0) / (y1 - y0) + x0)
    return cross.sum(-1) % 2 == 1


def _ratio(rng: np.random.Generator) -> float:
    w = np.array([m[2] for m in RATIO_MODES])
    med, sigma, _ = RATIO_MODES[rng.choice(len(RATIO_MODES), p=w / w.sum())]
    return float(np.clip(med * np.exp(rng.normal(0, sigma)), 0.05, 5.0))


def _eccentric_cell(rng: np.random.Generator, d: float, ratio: float) -> tuple[Poly, Poly]:
    """Nucleus at the origin; cell of area (1+ratio) x nucleus, shifted so the nucleus sits
    near its edge, yet inside the nucleus box padded by MAX_SCALE*h/2 (the largest crop)."""
    asp, ang = rng.uniform(1.0, 1.3), rng.uniform(0, np.pi)
    nuc = _contour(rng, d / 2 * asp**0.5, d / 2 / asp**0.5, ang)
    lo, hi = nuc.min(0), nuc.max(0)
    pad = MAX_SCALE * (hi - lo) / 2 - 1.5  # 1.5 px for rasterisation
    for _ in range(12):
        casp = rng.uniform(1.0, 1.25)
        cell = _contour(rng, casp**0.5, casp**-0.5, ang + rng.normal(0, 0.3), 0.07)
        cell *= np.sqrt(_area(nuc) * (1 + ratio) / _area(cell))
        u = np.array([np.cos(phi := rng.uniform(0, 2 * np.pi)), np.sin(phi)])
        offs = np.linspace(0, np.abs(cell).max(), 24)  # slide the nucleus towards the edge...
        fits = np.cumprod(_inside(nuc + offs[:, None, None] * u, cell).all(1))
        off = rng.uniform(0.55, 1.0) * offs[fits.sum() - 1] if fits.any() else 0.0  # ...stay inside
        shifted = cell - off * u
        if (shifted.min(0) >= lo - pad).all() and (shifted.max(0) <= hi + pad).all():
            return nuc, shifted
    return nuc, np.clip(cell, lo - pad, hi + pad)  # rare: flatten to the window


def _box(polys: list[Poly], width: int, height: int, margin: int = 2) -> Box:
    pts = np.concatenate(polys)
    x0, y0 = np.floor(pts.min(0)).astype(int) - margin
    x1, y1 = np.ceil(pts.max(0)).astype(int) + margin + 1
    return max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)


def _open3(mask: np.ndarray) -> np.ndarray:
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)


def _raster(polys: list[Poly], box: Box, ss: int = 4) -> np.ndarray:
    """Coverage (0..1) of the union of ``polys`` in ``box``, supersampled ``ss`` times: OpenCV
    fills every pixel an edge touches, which at 1x would bloat small nuclei by ~20% in area."""
    y0, x0, y1, x1 = box
    m = np.zeros((max(y1 - y0, 0) * ss, max(x1 - x0, 0) * ss), np.uint8)
    for p in polys if m.size else ():  # one call each: fillPoly's even-odd rule would punch holes
        layer = np.zeros_like(m)
        cv2.fillPoly(layer, [np.round(((p - (x0, y0)) * ss + (ss - 1) / 2) * 16).astype(np.int32)],
                     255, cv2.LINE_8, 4)
        np.maximum(m, layer, out=m)
    if not m.size:
        return m.astype(np.float32)
    return cv2.resize(m, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _noise(rng: np.random.Generator, shape: tuple[int, int], feature: float) -> np.ndarray:
    """Smooth zero-mean noise with blobs about ``feature`` px wide (chromatin, granules, light)."""
    h, w = shape
    g = rng.standard_normal((int(h / feature) + 2, int(w / feature) + 2)).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def _paint(img: np.ndarray, box: Box, cover: np.ndarray, colour: np.ndarray, alpha: float) -> None:
    y0, x0, y1, x1 = box
    region = img[y0:y1, x0:x1]
    region += (alpha * cover)[..., None] * (colour - region)


def _paint_cell(img: np.ndarray, rng: np.random.Generator, box: Box, cell: np.ndarray,
                nuc: np.ndarray, cyto_rgb: np.ndarray, nuc_rgb: np.ndarray, f: float,
                granular: bool = False, clumps: float = 0.3, hof: np.ndarray | None = None,
                hof_rgb: np.ndarray | None = None) -> None:
    """Mottled (or granular) cytoplasm, an optional pale hof, then a nucleus with dark clumps."""
    tex = 1 + 0.06 * _noise(rng, cell.shape, 6 * f)
    if granular:
        tex += 0.07 * _noise(rng, cell.shape, 1.3 * f)
    _paint(img, box, cell, cyto_rgb * tex[..., None], 0.92)
    if hof is not None:
        _paint(img, box, hof * cell, hof_rgb, 0.7)
    chrom = 1 - clumps * np.clip(_noise(rng, cell.shape, 2.5 * f), -0.5, 1.5)
    _paint(img, box, nuc, nuc_rgb * chrom[..., None], 0.96)


def _hof(rng: np.random.Generator, nuc: Poly, cell: np.ndarray, box: Box) -> np.ndarray:
    """The pale Golgi zone next to the nucleus, on the side facing the cell's centre."""
    ys, xs = np.nonzero(cell)
    towards = np.array([xs.mean() + box[1], ys.mean() + box[0]]) - nuc.mean(0)
    rn = np.sqrt(_area(nuc) / np.pi)
    at = nuc.mean(0) + towards / (np.linalg.norm(towards) + 1e-6) * rn * 1.3
    blob = _contour(rng, 0.6 * rn, 0.45 * rn, np.arctan2(towards[1], towards[0]) + np.pi / 2) + at
    return cv2.GaussianBlur(_raster([blob], box), (0, 0), rn / 4)


def _lobes(rng: np.random.Generator, d: float) -> list[Poly]:
    """A segmented neutrophil nucleus: 3-4 small lobes along an arc."""
    n, r0, start = rng.integers(3, 5), d * rng.uniform(0.4, 0.5), rng.uniform(0, 2 * np.pi)
    t = start + np.arange(n) * rng.uniform(0.8, 1.1)
    return [_contour(rng, d * 0.27, d * 0.2, a + rng.normal(0, 0.4), 0.08)
            + r0 * np.array([np.cos(a), np.sin(a)]) for a in t]


def _distractor(rng: np.random.Generator, d: float, pal: dict) -> tuple[Poly, list[Poly], dict]:
    """An unlabelled white cell: lymphocyte (centred round nucleus, thin pale rim), neutrophil
    (lobed nucleus, pale granules) or myelocyte (eccentric nucleus, pink granular cytoplasm)."""
    kind = rng.choice(3, p=[0.4, 0.4, 0.2])
    if kind == 0:
        dn = d * rng.uniform(0.8, 1.05)
        nuc = _contour(rng, dn / 2, dn / 2 * rng.uniform(0.9, 1.0), rng.uniform(0, np.pi), 0.04)
        cell = nuc * rng.uniform(1.12, 1.35) + rng.normal(0, 0.04 * dn, 2)
        return cell, [nuc], dict(cyto_rgb=pal["lympho_cyto"], nuc_rgb=pal["lympho_nuc"],
                                 clumps=0.35)
    if kind == 1:
        dc = d * rng.uniform(1.7, 2.1)
        cell = _contour(rng, dc / 2, dc / 2 * rng.uniform(0.9, 1.0), 0.0, 0.04)
        return cell, _lobes(rng, d), dict(cyto_rgb=pal["granulo_cyto"], nuc_rgb=pal["granulo_nuc"],
                                          granular=True, clumps=0.2)
    nuc, cell = _eccentric_cell(rng, d, rng.uniform(1.2, 3.0))
    return cell, [nuc], dict(cyto_rgb=pal["granulo_cyto"], nuc_rgb=pal["granulo_nuc"],
                             granular=True, clumps=0.2)


class _Placed(NamedTuple):
    box: Box
    cell_cover: np.ndarray  # anti-aliased coverage in box, for painting
    nuc_cover: np.ndarray
    cell: np.ndarray  # binary masks in box (cell includes nucleus), for the labels
    nucleus: np.ndarray
    nuc_poly: Poly


class _Scene:
    """The image being drawn and what lies where, so that placements keep every label visible:
    no cell covers an earlier nucleus, labelled nuclei keep ``gap`` px apart, and no unlabelled
    nucleus hides under a labelled cell."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, gap: int):
        self.rng, self.width, self.height, self.f = rng, width, height, width / REF_WIDTH
        self.pal = _stain(rng)
        self.img = np.empty((height, width, 3), np.float32)
        self.img[:] = self.pal["background"]
        self.img *= (1 + 0.012 * _noise(rng, (height, width), 90 * self.f))[..., None]
        self.nuclei = np.zeros((height, width), bool)  # every nucleus placed so far
        self.blocked = np.zeros_like(self.nuclei)  # labelled nuclei, dilated by the gap
        self.labelled = np.zeros_like(self.nuclei)  # union of the labelled cells
        self.gap = gap
        self.kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2)

    def place(self, cell: Poly, nucs: list[Poly], at: np.ndarray, labelled: bool) -> _Placed | None:
        """Rasterise a cell moved to ``at`` and claim its place, or None if it breaks a rule."""
        cell, nucs = cell + at, [p + at for p in nucs]
        box = _box([cell, *nucs], self.width, self.height, margin=2 + self.gap)
        cm, nm = _raster([cell], box), _raster(nucs, box)
        cb, nb = (cm > 0.5) | (nm > 0.5), nm > 0.5
        win = np.s_[box[0]:box[2], box[1]:box[3]]
        if nb.sum() < 0.5 * sum(map(_area, nucs)) or self.nuclei[win][cb].any():
            return None  # nucleus mostly outside the image, or covering an earlier nucleus
        if (self.blocked if labelled else self.labelled)[win][nb].any():
            return None  # too near a labelled nucleus, or an unlabelled one under a label
        self.nuclei[win] |= nb
        if labelled:
            self.blocked[win] |= cv2.dilate(nb.astype(np.uint8), self.kernel).astype(bool)
            self.labelled[win] |= cb
        return _Placed(box, cm, nm, cb, nb, nucs[0])

    def rbc(self, at: np.ndarray, alpha: float, on_top: bool = False) -> None:
        """A pale red disc with a lighter centre; on top only where it hides no nucleus."""
        rng = self.rng
        rad = 20 * self.f * rng.uniform(0.5, 0.68)
        disc = _contour(rng, rad, rad * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), 0.03)
        box = _box([disc + at], self.width, self.height)
        cover = _raster([disc + at], box)
        under = self.nuclei[box[0]:box[2], box[1]:box[3]]
        if not cover.size or (on_top and under[cover > 0].any()):
            return
        _paint(self.img, box, cover, self.pal["rbc"] * (1 + 0.04 * rng.standard_normal()), alpha)
        pallor = cv2.GaussianBlur(_raster([disc * 0.45 + at], box), (0, 0), rad / 4 + 0.3)
        _paint(self.img, box, pallor, self.pal["rbc_pale"], 0.8)

    def finish(self) -> np.ndarray:
        """Uneven illumination, microscope blur and sensor noise over the whole field."""
        rng, h, w = self.rng, self.height, self.width
        yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        cx, cy = rng.uniform(-0.3, 0.3, 2)
        gx, gy = rng.uniform(-0.06, 0.06, 2)
        vignette = rng.uniform(0.02, 0.075) * ((xx - cx) ** 2 + (yy - cy) ** 2)
        light = 1 - vignette + gx * xx + gy * yy
        img = cv2.GaussianBlur(self.img * light[..., None], (0, 0), rng.uniform(0.5, 1.0) * self.f)
        img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(1.5, 3.5)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _place_plasma(scene: _Scene) -> list[_Placed]:
    """3-8 plasma cells (rarely 0-1), half of them set against an earlier one so they touch or
    overlap: the later cell lies on top, and both masks keep the whole cell."""
    rng, (w, h) = scene.rng, (scene.width, scene.height)
    placed, extent = [], []  # extent: (nucleus position, cell radius around it)
    for _ in range(rng.integers(3, 9) if rng.random() < 0.93 else rng.integers(0, 2)):
        nuc, cell = _eccentric_cell(rng, rng.uniform(14, 26) * scene.f, _ratio(rng))
        radius = float(np.hypot(*cell.T).max())
        for _try in range(40):
            if extent and rng.random() < 0.5:
                p0, r0 = extent[rng.integers(len(extent))]
                phi = rng.uniform(0, 2 * np.pi)
                step = rng.uniform(0.45, 0.9) * (r0 + radius)
                at = p0 + step * np.array([np.cos(phi), np.sin(phi)])
            else:
                at = rng.uniform(-0.2 * radius, (w + 0.2 * radius, h + 0.2 * radius))
            if got := scene.place(cell, [nuc], at, labelled=True):
                placed.append(got)
                extent.append((at, radius))
                break
    return placed


def make_image(rng: np.random.Generator, width: int, height: int,
               min_nucleus_gap: int = 0) -> tuple[np.ndarray, list[Instance]]:
    """One RGB uint8 (H, W, 3) aspirate image and its labelled plasma cells (k = 1..n).

    Nuclei of labelled cells never overlap (and stay more than ``min_nucleus_gap`` px apart
    when it is > 0). Layers: red cells, other white cells, plasma cells, a few red cells on top.
    """
    scene = _Scene(rng, width, height, min_nucleus_gap)
    n_rbc = int(rng.uniform(0.1, 0.35) * width * height / (np.pi * (11.5 * scene.f) ** 2))
    edge = 10 * scene.f  # red cells cut by the border too
    for at in rng.uniform(-edge, (width + edge, height + edge), (n_rbc, 2)):  # 10-35% of field
        scene.rbc(at, 0.85)
    plasma = _place_plasma(scene)
    for _ in range(rng.poisson(2.5)):  # unlabelled white cells, beneath the plasma cells
        cell, nucs, style = _distractor(rng, rng.uniform(14, 26) * scene.f, scene.pal)
        for _try in range(20):
            if got := scene.place(cell, nucs, rng.uniform(0, 1, 2) * (width, height), False):
                _paint_cell(scene.img, rng, got.box, got.cell_cover, got.nuc_cover, f=scene.f,
                            **style)
                break
    instances = []
    for k, p in enumerate(plasma, 1):
        tint = {n: scene.pal[n] * rng.uniform(0.93, 1.07)
                for n in ("plasma_cyto", "plasma_nuc", "hof")}
        hof = None
        if rng.random() < 0.55 and p.cell.sum() > 1.8 * p.nucleus.sum():
            hof = _hof(rng, p.nuc_poly, p.cell, p.box)
        _paint_cell(scene.img, rng, p.box, p.cell_cover, p.nuc_cover, tint["plasma_cyto"],
                    tint["plasma_nuc"], scene.f, hof=hof, hof_rgb=tint["hof"])
        full = np.zeros((2, height, width), bool)
        full[:, p.box[0]:p.box[2], p.box[1]:p.box[3]] = p.nucleus, p.cell
        # Masks are made invariant to the 3x3 opening of the method's post-processing, as
        # smooth hand-drawn outlines are, so a perfect prediction survives it unchanged.
        nucleus = _open3(full[0])
        instances.append(Instance(nucleus=nucleus, cell=_open3(full[1]) | nucleus, k=k))
    for at in rng.uniform(0, 1, (max(1, n_rbc // 12), 2)) * (width, height):
        scene.rbc(at, 0.7, on_top=True)
    return scene.finish(), instances


def write_archive(out, n_images: int, n_slides: int = 1, seed: int = 0,
                  size: str = "640x480") -> list[str]:
    """Write ``out/x/<id>.bmp``, ``out/y/<id>_<k>.bmp`` and ``out/slides.csv``; return the ids.

    Image i comes from its own generator seeded by (seed, i), so it is the same whatever
    ``n_images`` is; images go round-robin to slides S01..S<n_slides>.
    """
    sizes = parse_size(size)
    if n_images < 1:
        raise InputError(f"number of images must be >= 1, got {n_images}")
    if not 1 <= n_slides <= n_images:
        raise InputError(f"number of slides must be between 1 and the number of images "
                         f"({n_images}), got {n_slides}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    root = Path(out)
    (root / "x").mkdir(parents=True, exist_ok=True)
    (root / "y").mkdir(exist_ok=True)
    rows = []
    for i in range(n_images):
        slide = f"S{i % n_slides + 1:02d}"
        image_id = f"{slide}-{i + 1:04d}"
        width, height = sizes[i % len(sizes)]
        rgb, cells = make_image(np.random.default_rng([seed, i]), width, height)
        write_image(root / "x" / f"{image_id}.bmp", rgb)
        for stale in (root / "y").glob(f"{image_id}_*.bmp"):  # left by an earlier, other run
            stale.unlink()
        for cell in cells:
            write_image(root / "y" / f"{image_id}_{cell.k}.bmp", cell.to_segpc_mask())
        rows.append((image_id, slide))
    with open(root / "slides.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image_id", "slide_id"), *rows])
    return [r[0] for r in rows]


def _rotate(v: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    """``v`` turned about ``axis`` (Rodrigues), its length kept."""
    k = axis / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    return v * np.cos(t) + np.cross(k, v) * np.sin(t) + k * np.dot(k, v) * (1 - np.cos(t))


def shift_stain(rgb: np.ndarray, h_degrees: float = 20.0, e_degrees: float = -20.0,
                density: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``rgb`` as another lab's stain would colour it: deconvolved with scikit-image's HED stain
    matrix (``skimage.color.hed_from_rgb``, the matrix of ``rgb2hed``), then rebuilt with the
    hematoxylin- and eosin-like vectors turned about the grey axis of optical density (another
    dye, another batch: a change of hue) and their amounts scaled by ``density``. The residual
    (DAB) channel and negative amounts are kept, which ``rgb2hed``/``combine_stains`` clip, so
    zero shift gives the image back."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    od = -np.log((rgb.astype(np.float64) + 1) / 256)
    hed = od @ hed_from_rgb
    hed[..., :2] *= density
    matrix = rgb_from_hed.copy()
    grey = np.ones(3)
    matrix[0] = _rotate(matrix[0], grey, h_degrees)
    matrix[1] = _rotate(matrix[1], grey, e_degrees)
    out = 256 * np.exp(-(hed @ matrix)) - 1
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
