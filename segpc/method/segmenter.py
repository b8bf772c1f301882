"""Single-process two-stage inference: images in, plasma cells out.

:class:`Segmenter` chains the steps of :mod:`segpc.method.steps` in one process: it is the
simplest way to run a bundle, and the baseline the batch job is measured against. The
networks enter as plain callables on network inputs, so tests can swap them.
"""

from __future__ import annotations

import numpy as np

from segpc.config import Config
from segpc.method.crops import Box
from segpc.method.cytoplasm import gather_inputs
from segpc.method.nucleus import Nuclei
from segpc.method.results import ImageResult
from segpc.method.steps import (CellNet, ImageState, NucleusNet, find, finish, prepare, run_cells,
                                run_nucleus, take_candidates)


def nucleus_net(bundle, device: str | None = None, batch_size: int = 16, amp: bool | None = None,
                tta: bool = False) -> NucleusNet:
    """The bundle's U-Net as a :data:`NucleusNet` on ``device`` (CUDA if present by default);
    ``tta``: averaged over test-time flips (see :class:`segpc.models.runner.NetworkRunner`)."""
    from segpc.models.runner import NetworkRunner

    size = bundle.config.nucleus.input_size
    return NetworkRunner(bundle.nucleus, device, batch_size, amp, tta, pixels_per_pass=batch_size * size * size)


def cell_net(bundle, device: str | None = None, batch_size: int = 16, amp: bool | None = None,
             tta: bool = False) -> CellNet:
    """The bundle's loaded cytoplasm networks as one :data:`CellNet` (``tta`` as in :func:`nucleus_net`)."""
    from segpc.models.runner import NetworkRunner

    runners = {s: NetworkRunner(m, device, batch_size, amp, tta, channels_last=False)
               for s, m in bundle.cytoplasm.items()}
    return lambda scale, crops: runners[scale](gather_inputs(crops))


class Segmenter:
    """Both stages and the cascade, in one process, for a batch of RGB images."""

    def __init__(self, config: Config, nucleus_fn: NucleusNet, cell_fn: CellNet):
        config.validate()
        self.config, self.nucleus_fn, self.cell_fn = config, nucleus_fn, cell_fn

    @classmethod
    def from_bundle(cls, uri: str, device: str | None = None, batch_size: int = 16,
                    amp: bool | None = None, tta: bool = False) -> "Segmenter":
        """``tta``: both stages average their probabilities over test-time flips (4x the network time)."""
        from segpc.models.bundle import load_bundle

        bundle = load_bundle(uri, device="cpu")
        return cls(bundle.config, nucleus_net(bundle, device, batch_size, amp, tta),
                   cell_net(bundle, device, batch_size, amp, tta))

    def with_config(self, config: Config) -> "Segmenter":
        """The same networks under other settings (fewer scales, another aggregation mode)."""
        return Segmenter(config, self.nucleus_fn, self.cell_fn)

    def segment(self, image: np.ndarray) -> ImageResult:
        return self.segment_batch([image])[0]

    def segment_batch(self, images: list[np.ndarray], nuclei: list[Nuclei] | None = None,
                      field_shape: tuple[int, int] | None = None,
                      regions: list[Box | None] | None = None) -> list[ImageResult]:
        """Crops of all nuclei of the batch run together per scale; the cascade sends a
        nucleus to the next scale only while its candidate needs a larger crop."""
        return [finish(st, self.config) for st in self.run(images, nuclei, field_shape, regions)]

    def run(self, images: list[np.ndarray], nuclei: list[Nuclei] | None = None,
            field_shape: tuple[int, int] | None = None,
            regions: list[Box | None] | None = None) -> list[ImageState]:
        """Every step but the aggregation: each image's nuclei and all its candidates. Given
        ``nuclei`` (one per image) replace stage 1, to judge stage 2 on its own. Whole-slide
        tiles give ``field_shape`` and their cores as ``regions`` (:func:`prepare`)."""
        cfg = self.config
        regions = regions or [None] * len(images)
        states = [prepare(im, cfg, f"image {n}", field_shape, r) for n, (im, r) in enumerate(zip(images, regions))]
        if nuclei is None:
            run_nucleus(states, self.nucleus_fn)
        for n, st in enumerate(states):
            find(st, cfg, nuclei=None if nuclei is None else nuclei[n])
        for scale in cfg.cytoplasm.scales:
            run_cells(states, scale, self.cell_fn)
            for st in states:
                take_candidates(st, scale, cfg)
        return states
