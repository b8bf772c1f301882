"""Single-process two-stage inference: images in, plasma cells out.

The pieces (``find_nuclei``, ``run_scale``, ``assemble``) are what the Ray stages call one
at a time; :class:`Segmenter` chains them in one process and is the baseline the batch job
is measured against. The networks enter as plain callables, so tests can swap them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from segpc.method.aggregate import Candidate, confident, next_scale, runs_every_scale, select
from segpc.config import Config
from segpc.method.crops import Box, fit_to_input, unfit
from segpc.method.cytoplasm import CropInput, candidate_from_probability, crop_input, gather_inputs
from segpc.errors import InputError
from segpc.io.imaging import equalize
from segpc.method.instances import Instance
from segpc.method.nucleus import nucleus_instances

# images -> per-image nucleus probability maps at full size
NucleusFn = Callable[[list[np.ndarray]], list[np.ndarray]]
# (scale, crops) -> (N, S, S) whole-cell probabilities
CellFn = Callable[[float, list[CropInput]], np.ndarray]


@dataclass
class Nuclei:
    """Stage-1 result for one image: labels 1..n and per-nucleus box, area and score."""

    labels: np.ndarray  # int32 (H, W)
    boxes: list[Box]
    areas: list[int]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass
class Cell:
    """One segmented plasma cell; masks are cropped to ``box`` (the cell's tight box)."""

    cell_id: int
    nucleus_id: int
    box: Box
    nucleus: np.ndarray
    cell: np.ndarray
    scale: float
    nucleus_score: float
    cell_score: float
    ratio: float
    truncated: bool

    @property
    def nucleus_area(self) -> int:
        return int(self.nucleus.sum())

    @property
    def cell_area(self) -> int:
        return int(self.cell.sum())

    def full_masks(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        y0, x0, y1, x1 = self.box
        nuc, cell = np.zeros(shape, bool), np.zeros(shape, bool)
        nuc[y0:y1, x0:x1], cell[y0:y1, x0:x1] = self.nucleus, self.cell
        return nuc, cell


@dataclass
class ImageResult:
    shape: tuple[int, int]
    cells: list[Cell]
    n_nuclei: int = 0
    inferences: dict[float, int] = field(default_factory=dict)  # cytoplasm crops run per scale

    def instances(self) -> list[Instance]:
        out = []
        for c in self.cells:
            nuc, cell = c.full_masks(self.shape)
            out.append(Instance(nuc, cell, k=c.cell_id, meta={"scale": c.scale}))
        return out

    def label_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """int32 (H, W) nucleus and cell label maps, value = cell_id.

        Cells may overlap; larger cells are painted first so a smaller cell lying on a
        larger one stays visible, and each cell's own nucleus is painted last.
        """
        nuclei, cells = np.zeros(self.shape, np.int32), np.zeros(self.shape, np.int32)
        for c in sorted(self.cells, key=lambda c: -c.cell_area):
            y0, x0, y1, x1 = c.box
            cells[y0:y1, x0:x1][c.cell] = c.cell_id
        for c in self.cells:
            y0, x0, y1, x1 = c.box
            cells[y0:y1, x0:x1][c.nucleus] = c.cell_id
            nuclei[y0:y1, x0:x1][c.nucleus] = c.cell_id
        return nuclei, cells


def nucleus_inputs(images: list[np.ndarray], size: int) -> tuple[np.ndarray, list]:
    """Fit each RGB image aspect-preserving into a (size, size) input; (N, 3, S, S) float32."""
    fitted = [fit_to_input(im, size) for im in images]
    x = np.stack([f[0] for f in fitted]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return np.ascontiguousarray(x), [f[1] for f in fitted]


def nucleus_probabilities(images: list[np.ndarray], net: Callable[[np.ndarray], np.ndarray],
                          size: int) -> list[np.ndarray]:
    """Run the U-Net on a batch of images; probability maps back at each image's full size."""
    if not images:
        return []
    x, fits = nucleus_inputs(images, size)
    return [unfit(p, f) for p, f in zip(net(x), fits)]


def find_nuclei(prob: np.ndarray, config: Config) -> Nuclei:
    """Stage-1 post-processing and per-nucleus facts for one image."""
    cfg = config.nucleus
    labels = nucleus_instances(prob, cfg.threshold, cfg.min_area, cfg.min_area_at ** 2,
                               cfg.split_touching)
    boxes, areas, scores = [], [], []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        own = labels[sl] == i
        boxes.append((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
        areas.append(int(own.sum()))
        scores.append(float(prob[sl][own].mean()))
    return Nuclei(labels, boxes, areas, scores)


def assemble(shape: tuple[int, int], nuclei: Nuclei, candidates: dict[int, list[Candidate]],
             config: Config) -> list[Cell]:
    """Apply the aggregation rule per nucleus and number the kept cells 1..n."""
    cells: list[Cell] = []
    for i in range(len(nuclei)):
        for cand in select(sorted(candidates.get(i, []), key=lambda c: c.scale), config.aggregation):
            if confident(cand, nuclei.scores[i], config.aggregation):
                cells.append(_to_cell(len(cells) + 1, i, cand, nuclei, shape))
    return cells


def _to_cell(cell_id: int, i: int, cand: Candidate, nuclei: Nuclei, shape: tuple[int, int]) -> Cell:
    wy0, wx0, _, _ = cand.window
    rows = np.flatnonzero(cand.cell.any(1))
    cols = np.flatnonzero(cand.cell.any(0))
    y0, y1 = wy0 + int(rows[0]), wy0 + int(rows[-1]) + 1
    x0, x1 = wx0 + int(cols[0]), wx0 + int(cols[-1]) + 1
    cell = cand.cell[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]
    nucleus = nuclei.labels[y0:y1, x0:x1] == i + 1
    return Cell(cell_id, i + 1, (y0, x0, y1, x1), nucleus, cell.copy(), cand.scale,
                nuclei.scores[i], cand.score, cand.ratio, cand.truncated)


def nucleus_fn(bundle, device: str | None = None, batch_size: int = 16,
               amp: bool | None = None) -> NucleusFn:
    """The bundle's U-Net as a :data:`NucleusFn` on ``device`` (CUDA if present by default)."""
    from segpc.models.runner import NetworkRunner

    runner = NetworkRunner(bundle.nucleus, device, batch_size, amp)
    size = bundle.config.nucleus.input_size
    return lambda images: nucleus_probabilities(images, runner, size)


def cell_fn(bundle, device: str | None = None, batch_size: int = 16, amp: bool | None = None) -> CellFn:
    """The bundle's loaded cytoplasm networks as one :data:`CellFn`."""
    from segpc.models.runner import NetworkRunner

    runners = {s: NetworkRunner(m, device, batch_size, amp) for s, m in bundle.cytoplasm.items()}
    return lambda scale, crops: runners[scale](gather_inputs(crops))


class Segmenter:
    """Both stages and the cascade, in one process, for a batch of RGB images."""

    def __init__(self, config: Config, nucleus_fn: NucleusFn, cell_fn: CellFn):
        config.validate()
        self.config, self.nucleus_fn, self.cell_fn = config, nucleus_fn, cell_fn

    @classmethod
    def from_bundle(cls, uri: str, device: str | None = None, batch_size: int = 16,
                    amp: bool | None = None) -> "Segmenter":
        from segpc.models.bundle import load_bundle

        bundle = load_bundle(uri, device="cpu")
        return cls(bundle.config, nucleus_fn(bundle, device, batch_size, amp),
                   cell_fn(bundle, device, batch_size, amp))

    def with_config(self, config: Config) -> "Segmenter":
        """The same networks under other settings (fewer scales, another aggregation mode)."""
        return Segmenter(config, self.nucleus_fn, self.cell_fn)

    def segment(self, image: np.ndarray) -> ImageResult:
        return self.segment_batch([image])[0]

    def segment_batch(self, images: list[np.ndarray]) -> list[ImageResult]:
        """Crops of all nuclei of the batch run together per scale; the cascade sends a
        nucleus to the next scale only while its candidate needs a larger crop."""
        states = detect(images, self.nucleus_fn, self.config)
        for scale in self.config.cytoplasm.scales:
            run_scale(states, scale, self.cell_fn, self.config)
        return [finish(st, self.config) for st in states]


# The steps below are the whole method, one call per pipeline stage: the segmenter chains
# them in one process; the Ray batch job runs each in its own actor pool on the same state.


@dataclass
class ImageState:
    """One image between the stages: its nuclei and the cell candidates found so far."""

    image: np.ndarray  # RGB uint8, as read
    source: np.ndarray  # what the crops are cut from (equalised when the config says so)
    nuclei: Nuclei
    candidates: dict[int, list[Candidate]] = field(default_factory=dict)
    inferences: dict[float, int] = field(default_factory=dict)


def detect(images: list[np.ndarray], nucleus_fn: NucleusFn, config: Config) -> list[ImageState]:
    """Stage 1 for a batch of images."""
    for n, im in enumerate(images):
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise InputError(f"image {n}: expected RGB uint8 (H, W, 3), got {im.dtype} {im.shape}")
    probs = nucleus_fn(images) if images else []
    return [ImageState(im, equalize(im) if config.cytoplasm.equalize else im, find_nuclei(p, config))
            for im, p in zip(images, probs)]


def pending(state: ImageState, scale: float, config: Config) -> list[int]:
    """Nuclei (0-based) that go to ``scale``: all of them outside the cascade; in it, those
    whose candidates so far send them there."""
    if runs_every_scale(config.aggregation):
        return list(range(len(state.nuclei)))
    scales = config.cytoplasm.scales
    return [i for i in range(len(state.nuclei))
            if next_scale(state.candidates.get(i, []), scales, config.aggregation) == scale]


def run_scale(states: list[ImageState], scale: float, cell_fn: CellFn, config: Config) -> None:
    """One scale for the pending nuclei of a batch of images, in one network call."""
    todo = [(st, i) for st in states for i in pending(st, scale, config)]
    crops = [crop_input(st.source, st.nuclei.labels, i + 1, st.nuclei.boxes[i], scale, config.cytoplasm)
             for st, i in todo]
    if not crops:
        return
    for (st, i), crop, prob in zip(todo, crops, cell_fn(scale, crops)):
        cand = candidate_from_probability(prob, crop, st.image.shape[:2], config.cytoplasm,
                                          config.aggregation)
        st.candidates.setdefault(i, []).append(cand)
        st.inferences[scale] = st.inferences.get(scale, 0) + 1


def finish(state: ImageState, config: Config) -> ImageResult:
    """Aggregation: the cells kept for this image."""
    shape = state.image.shape[:2]
    return ImageResult(shape, assemble(shape, state.nuclei, state.candidates, config),
                       len(state.nuclei), dict(state.inferences))
