"""The method as pipeline steps over one image's state: what runs where.

A step is either a network call (:func:`run_nucleus`, :func:`run_cells`: stack the inputs,
run, keep the outputs; nothing else) or CPU work on one image (:func:`prepare`,
:func:`find`, :func:`take_candidates`, :func:`finish`). The segmenter chains them in one
process; the Ray batch job runs the network steps in GPU actors and the CPU steps in CPU
stages, on the same state, so a GPU never waits for numpy.

The state stays small on its way: the image is dropped once stage 1 has cut, per nucleus,
the in-image part of its largest crop window (every smaller window lies inside it), and
each network's inputs and outputs are dropped once used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from segpc.config import Config
from segpc.errors import InputError
from segpc.io.imaging import equalize
from segpc.io.stain import normalize_stain
from segpc.method.aggregate import Candidate, confident, next_scale, runs_every_scale, select
from segpc.method.crops import Box, Fit, clip_box, crop_window, fit_at_factor, fit_to_input, plan_fit
from segpc.method.cytoplasm import CropInput, candidate_from_probability, crop_from
from segpc.method.nucleus import Nuclei, find_nuclei
from segpc.method.results import Cell, ImageResult

# (N, S, S, 3) uint8 network inputs -> (N, S, S) nucleus probabilities
NucleusNet = Callable[[np.ndarray], np.ndarray]
# (scale, crops) -> (N, S, S) whole-cell probabilities
CellNet = Callable[[float, list[CropInput]], np.ndarray]


@dataclass
class ImageState:
    """One image between the steps."""

    shape: tuple[int, int]  # (H, W)
    # RGB uint8 as read, in the reference stain if the bundle has one; dropped after `find`
    # unless kept (overlays)
    image: np.ndarray | None
    nucleus_input: np.ndarray | None = None  # uint8 (S, S, 3): the U-Net's input, until it ran
    fit: Fit | None = None  # where the image lies in that input
    # a whole-slide tile: the pixel count of a training field on the U-Net's map (the nucleus
    # size rule's reference), and the core (only nuclei centred there are segmented)
    map_pixels: int | None = None
    region: Box | None = None
    nucleus_prob: np.ndarray | None = None  # float16: the U-Net's map over the image, its resolution
    nuclei: Nuclei | None = None
    # per nucleus: (pixels, origin) of its largest window's in-image part, until it is done
    patches: list[tuple[np.ndarray, tuple[int, int]] | None] = field(default_factory=list)
    crops: dict[int, CropInput] = field(default_factory=dict)  # nucleus -> its next crop
    probs: dict[int, np.ndarray] = field(default_factory=dict)  # nucleus -> its crop's output
    candidates: dict[int, list[Candidate]] = field(default_factory=dict)
    inferences: dict[float, int] = field(default_factory=dict)  # cytoplasm crops run per scale


def prepare(image: np.ndarray, config: Config, name: str = "image",
            field_shape: tuple[int, int] | None = None, region: Box | None = None) -> ImageState:
    """The U-Net's input: the image in the bundle's reference stain (if it has one), fitted
    aspect-preserving into its square (CPU). Both stages see the normalised image.

    A whole-slide tile gives ``field_shape`` (the bundle's training field): the tile, larger
    than a field, is resized by the factor a field is, so the U-Net sees it at the scale it
    learnt; ``region`` (its core) limits the cells to the nuclei centred there."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"{name}: expected RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    image = normalize_stain(image, config.stain, name)
    if field_shape is None:
        x, fit = fit_to_input(image, config.nucleus.input_size)
        return ImageState(image.shape[:2], image, x, fit, region=region)
    field = plan_fit(*field_shape, config.nucleus.input_size)
    x, fit = fit_at_factor(image, field.factor)
    return ImageState(image.shape[:2], image, x, fit, map_pixels=field.inner_h * field.inner_w, region=region)


def run_nucleus(states: list[ImageState], net: NucleusNet) -> None:
    """Network only: the U-Net over the batch's prepared inputs, one call per input shape
    (fields' squares; whole-slide tiles' larger inputs)."""
    groups: dict[tuple, list[ImageState]] = {}
    for s in states:
        if s.nucleus_input is not None:
            groups.setdefault(s.nucleus_input.shape, []).append(s)
    for group in groups.values():
        for s, p in zip(group, net(np.stack([s.nucleus_input for s in group]))):
            f = s.fit
            s.nucleus_prob = p[f.top:f.top + f.inner_h, f.left:f.left + f.inner_w].astype(np.float16)
            s.nucleus_input = None


def find(state: ImageState, config: Config, keep_image: bool = False, nuclei: Nuclei | None = None) -> None:
    """Stage 1 after its network (CPU): nucleus instances, each nucleus's pixels for its crops,
    and the crops of the first scale. Given ``nuclei`` (the truth's, when judging stage 2
    alone) take the place of the U-Net's."""
    if nuclei is None:
        nuclei = find_nuclei(state.nucleus_prob.astype(np.float32), state.shape, config.nucleus, state.map_pixels)
    if state.region is not None:  # a slide tile: its own nuclei only, before any crop is cut
        nuclei = nuclei.centred_in(state.region)
    state.nuclei, state.nucleus_prob = nuclei, None
    source = equalize(state.image) if config.cytoplasm.equalize else state.image
    largest = max(config.cytoplasm.scales)
    for box in state.nuclei.boxes:
        cy0, cx0, cy1, cx1 = clip_box(crop_window(box, largest), state.shape)
        state.patches.append((source[cy0:cy1, cx0:cx1].copy(), (cy0, cx0)))
    if not keep_image:
        state.image = None
    for i in range(len(state.nuclei)):
        _queue(state, i, config)


def run_cells(states: list[ImageState], scale: float, net: CellNet) -> None:
    """Network only: one scale's network over the crops queued for it in the batch."""
    todo = [(s, i) for s in states for i, c in s.crops.items() if c.scale == scale]
    if not todo:
        return
    for (s, i), p in zip(todo, net(scale, [s.crops[i] for s, i in todo])):
        s.probs[i] = p.astype(np.float16)


def take_candidates(state: ImageState, scale: float, config: Config) -> None:
    """After one scale's network (CPU): its cell candidates, and the crops of the scale each
    of those nuclei goes to next (the cascade's choice)."""
    for i in [i for i, c in state.crops.items() if c.scale == scale and i in state.probs]:
        crop, prob = state.crops.pop(i), state.probs.pop(i)
        cand = candidate_from_probability(prob, crop, state.shape, config.cytoplasm, config.aggregation)
        state.candidates.setdefault(i, []).append(cand)
        state.inferences[scale] = state.inferences.get(scale, 0) + 1
        _queue(state, i, config)


def _queue(state: ImageState, i: int, config: Config) -> None:
    """Cut nucleus ``i``'s crop for the next scale it needs, or let go of its pixels."""
    scales, done = config.cytoplasm.scales, state.candidates.get(i, [])
    if runs_every_scale(config.aggregation):
        scale = scales[len(done)] if len(done) < len(scales) else None
    else:
        scale = next_scale(done, scales, config.aggregation)
    if scale is None:
        state.patches[i] = None
        return
    window = crop_window(state.nuclei.boxes[i], scale)
    pixels, origin = state.patches[i]
    state.crops[i] = crop_from(pixels, origin, state.nuclei.in_window(i, window), window, scale,
                               state.shape, config.cytoplasm)


def finish(state: ImageState, config: Config) -> ImageResult:
    """Aggregation (CPU): the cells kept for this image, numbered 1..n."""
    cells: list[Cell] = []
    nuclei = state.nuclei
    for i in range(len(nuclei)):
        for cand in select(sorted(state.candidates.get(i, []), key=lambda c: c.scale), config.aggregation):
            if confident(cand, nuclei.scores[i], config.aggregation):
                cells.append(_to_cell(len(cells) + 1, i, cand, nuclei))
    return ImageResult(state.shape, cells, len(nuclei), dict(state.inferences))


def _to_cell(cell_id: int, i: int, cand: Candidate, nuclei: Nuclei) -> Cell:
    wy0, wx0, _, _ = cand.window
    mask = cand.window_mask()
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = (wy0 + r0, wx0 + c0, wy0 + r1, wx0 + c1)
    return Cell(cell_id, i + 1, box, nuclei.in_window(i, box), mask[r0:r1, c0:c1].copy(), cand.scale,
                nuclei.scores[i], cand.score, cand.ratio, cand.truncated)
