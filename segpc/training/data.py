"""Training examples of each stage, one sample at a time (plain numpy; no Ray in here).

Stage 1 learns nucleus probability on whole images fitted to the preset's input size;
stage 2 learns, per scale, the whole-cell mask on 4-channel crops around a nucleus
(METHOD.md sections 3-5). Decoding reads by URI (local or object storage), so the same
functions run in a Ray Data task, a Ray Train worker or a test.

A stage-2 sample is stored as a :class:`CellContext`: the native-resolution neighbourhood of
one labelled cell, a little larger than its crop window, so that each epoch can perturb the
guidance nucleus (and with it the crop window, as inference derives the window from the
nucleus it is given) and still cut the crop with ``crop_input``, exactly as inference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from segpc.config import Config, StainConfig
from segpc.errors import InputError
from segpc.io.imaging import decode_image, equalize
from segpc.io.segpc_format import Sample
from segpc.io.stain import normalize_stain
from segpc.io.storage import read_bytes
from segpc.method.crops import Box, box_or_none, crop_window, extract, fit_to_input, plan_fit
from segpc.method.cytoplasm import CropInput, crop_input
from segpc.method.instances import Instance
from segpc.training.guidance import GuidanceJitter, jitter_guidance
from segpc.training.splits import SampleRef

# Bit planes of a CellContext's ``planes``: one byte per pixel holds every mask it needs.
OWN, OTHERS, CELL = 1, 2, 4


@dataclass
class Arrays:
    """Inputs (N, S, S, C) uint8 and targets (N, S, S) uint8 {0, 1} of one stage, in memory
    (the in-process path: quick test bundles and the ingest benchmark's baseline)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class CellContext:
    """One labelled cell's neighbourhood: RGB (equalised if the config says so) and the masks
    (its true nucleus, the other true nuclei, its whole cell) packed in bit planes.
    ``allowed`` is the box (context pixels) a perturbed guidance nucleus must stay in: the
    context covers the crop window of any nucleus inside it."""

    rgb: np.ndarray  # uint8 (h, w, 3)
    planes: np.ndarray  # uint8 (h, w): OWN | OTHERS | CELL
    allowed: Box


# --------------------------------------------------------------------------- decoding


def load_sample(ref: SampleRef) -> Sample:
    """Read and decode one image and its masks; every mask must match the image's size."""
    image = decode_image(read_bytes(ref.image_uri), ref.image_uri)
    instances = [_read_mask(uri, k, image.shape[:2]) for k, uri in ref.masks]
    return Sample(ref.image_id, ref.image_uri, instances, image)


def _read_mask(uri: str, k: int, shape: tuple[int, int] | None) -> Instance:
    data = np.frombuffer(read_bytes(uri), np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if arr is None:
        raise InputError(f"{uri}: not a readable mask image (empty, truncated or corrupt)")
    if shape is not None and arr.shape[:2] != tuple(shape):
        raise InputError(f"{uri}: mask is {arr.shape[0]}x{arr.shape[1]} (HxW) but its image is "
                         f"{shape[0]}x{shape[1]}")
    return Instance.from_segpc_mask(arr, k=k, name=uri)


def nucleus_diameters(ref: SampleRef, size: int) -> np.ndarray:
    """Equivalent diameters of a sample's labelled nuclei, in pixels of the U-Net's input (the
    image fitted into ``size`` x ``size``): the scale stage 1's splitter is set to. Reads the
    masks only."""
    return nucleus_measures(ref, size)[0]


def nucleus_measures(ref: SampleRef, size: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """:func:`nucleus_diameters` and the sample's (H, W) (from its masks; None without any)."""
    out, shape = [], None
    for k, uri in ref.masks:
        nucleus = _read_mask(uri, k, None).nucleus
        shape = nucleus.shape[:2]
        area = int(nucleus.sum())
        if area:
            out.append(2 * np.sqrt(area / np.pi) * plan_fit(*nucleus.shape, size).factor)
    return np.array(out, np.float64), shape


def nucleus_labels(sample: Sample) -> np.ndarray:
    """Ground-truth nuclei as a label map (instance i -> i + 1; earlier instances win overlaps)."""
    h, w = sample.image.shape[:2]
    labels = np.zeros((h, w), np.int32)
    for i, inst in enumerate(sample.instances):
        labels[inst.nucleus & (labels == 0)] = i + 1
    return labels


# --------------------------------------------------------------------------- stage 1


def nucleus_example(sample: Sample, size: int, stain: StainConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole image (in the reference ``stain``, if any) and the union of its nuclei, fitted
    like the segmenter fits them."""
    union = np.zeros(sample.image.shape[:2], np.uint8)
    for inst in sample.instances:
        union[inst.nucleus] = 1
    image = normalize_stain(sample.image, stain, sample.image_id)
    return fit_to_input(image, size)[0], fit_to_input(union, size, cv2.INTER_NEAREST)[0]


def nucleus_arrays(samples: list[Sample], size: int) -> Arrays:
    """Stage-1 examples of decoded samples, stacked in memory."""
    if not samples:
        raise InputError("nucleus training: no images")
    xs, ys = zip(*(nucleus_example(s, size) for s in samples))
    return Arrays(np.stack(xs), np.stack(ys))


# --------------------------------------------------------------------------- stage 2


def cytoplasm_source(sample: Sample, config: Config) -> np.ndarray:
    """The image stage 2 cuts its crops from, as inference makes it: in the reference stain
    (``prepare``), then equalised (``find``), each if the config says so."""
    image = normalize_stain(sample.image, config.stain, sample.image_id)
    return equalize(image) if config.cytoplasm.equalize else image


def cell_contexts(sample: Sample, scale: float, config: Config,
                  jitter: GuidanceJitter | None = None) -> list[CellContext]:
    """One context per labelled cell, large enough for ``jitter``'s nuclei (a cell without
    nucleus pixels has no crop at inference either, and is left out)."""
    jitter = jitter or GuidanceJitter()
    image = cytoplasm_source(sample, config)
    out = []
    for i, inst in enumerate(sample.instances):
        box = box_or_none(inst.nucleus)
        if box is None:
            continue
        m = jitter.margin_px(box)
        region = (box[0] - m, box[1] - m, box[2] + m, box[3] + m)
        window = crop_window(region, scale)
        own = extract(inst.nucleus, window)
        others = np.zeros_like(own)
        for j, other in enumerate(sample.instances):
            if j != i:
                others |= extract(other.nucleus, window)
        planes = (own * OWN | (others & ~own) * OTHERS | extract(inst.cell, window) * CELL).astype(np.uint8)
        y0, x0 = window[:2]
        out.append(CellContext(extract(image, window), planes,
                               (region[0] - y0, region[1] - x0, region[2] - y0, region[3] - x0)))
    return out


def cell_example(ctx: CellContext, scale: float, config: Config, rng: np.random.Generator | None = None,
                 jitter: GuidanceJitter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(S, S, 4) crop and its (S, S) whole-cell target, cut by ``crop_input`` around the
    guidance nucleus: the true one, or (with ``jitter`` and ``rng``) a perturbed one whose box
    sets the window, as the U-Net's nucleus would at inference."""
    own = (ctx.planes & OWN) > 0
    guidance = own if jitter is None else jitter_guidance(own, (ctx.planes & OTHERS) > 0, ctx.allowed,
                                                          rng, jitter)
    box = box_or_none(guidance)
    crop = crop_input(ctx.rgb, guidance.view(np.uint8), 1, box, scale, config.cytoplasm)
    target = extract(((ctx.planes & CELL) > 0).view(np.uint8), crop.window)
    return crop.pixels, fit_to_input(target, crop.fit.size, cv2.INTER_NEAREST)[0]


def true_nucleus_crops(sample: Sample, scale: float, config: Config) -> list[tuple[Instance, CropInput]]:
    """Each labelled cell with its crop at ``scale``, built around its true nucleus."""
    image = cytoplasm_source(sample, config)
    labels = nucleus_labels(sample)
    boxes = ndi.find_objects(labels, max_label=len(sample.instances))
    return [(inst, crop_input(image, labels, i + 1, (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop),
                              scale, config.cytoplasm))
            for i, (inst, sl) in enumerate(zip(sample.instances, boxes)) if sl is not None]


# --------------------------------------------------------------------------- stain reference

STAIN_IMAGES = 16  # training images a stain reference is fitted on


def stain_reference(refs: list[SampleRef], method: str, n_images: int = STAIN_IMAGES) -> tuple[dict, list[str]]:
    """``method``'s stain reference fitted on up to ``n_images`` training images spread evenly
    over ``refs`` in image-id order (so a rerun or a resumed run fits the same one), and their
    ids. Pass the training split only: the validation split must not shape the model."""
    from segpc.io.stain import fit_reference

    ordered = sorted(refs, key=lambda r: r.image_id)
    if not ordered:
        raise InputError("stain reference: no training images")
    picks = [ordered[int(i)] for i in np.unique(np.linspace(0, len(ordered) - 1, min(n_images, len(ordered))).round())]
    images = (decode_image(read_bytes(r.image_uri), r.image_uri) for r in picks)
    return fit_reference(images, method), [r.image_id for r in picks]
