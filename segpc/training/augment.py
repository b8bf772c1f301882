"""On-the-fly augmentation of training batches in torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stain- and orientation-invariances of a smear: flips, 90-degree turns, +-10% zoom,
    and per-image colour jitter of the RGB channels (brightness, contrast, channel gains)."""
    b = x.shape[0]
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(dev)

    k = int(torch.randint(0, 4, (1,), generator=gen))
    x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (2, 3))
    flip = rand(b) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    y = torch.where(flip[:, None, None, None], y.flip(3), y)
    zoom = 1.0 + (rand(b) - 0.5) * 0.2
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    rgb = x[:, :3]
    gain = 1.0 + (rand(b, 3, 1, 1) - 0.5) * 0.2
    bright = (rand(b, 1, 1, 1) - 0.5) * 0.16
    contrast = 1.0 + (rand(b, 1, 1, 1) - 0.5) * 0.3
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    rgb = ((rgb - mean) * contrast + mean) * gain + bright
    return torch.cat([rgb.clamp(0, 1), x[:, 3:]], 1), y
