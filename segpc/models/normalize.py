"""Input normalisation inside the networks: callers feed [0, 1] floats, the encoder sees what
its (pretrained) weights were trained on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNormalization(nn.Module):
    """``(x - mean) / std`` on the RGB channels; channels after the third (the guidance mask)
    pass unchanged.

    The constants are persistent buffers, so they travel in the model's ``state_dict`` (and
    the bundle): a trained network keeps the normalisation it was trained with even if a
    library changes its defaults. They live outside ``model.encoder``, so encoder weight
    files keep exactly the encoder's keys.
    """

    def __init__(self, channels: int = 3):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))
        self.set(IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def set(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean[0, :3, 0, 0] = torch.tensor([float(v) for v in mean])
        self.std[0, :3, 0, 0] = torch.tensor([float(v) for v in std])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
