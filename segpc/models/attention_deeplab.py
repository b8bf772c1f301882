"""Attention DeepLabv3+ (METHOD.md section 5): DeepLabv3+ whose ASPP is re-weighted and fused.

Two attention levels replace DeepLabv3+'s concatenate-and-project:
1. each of the 5 ASPP branches is refined by a 3x3 convolution and re-weighted channel-wise
   by ONE squeeze-excitation block shared by all branches;
2. the 5 re-weighted branches are stacked on a new axis and fused per pixel by a 3D
   convolution with kernel (1, 1, 5).
The input is the 4-channel crop (RGB + this instance's nucleus); a 1x1 convolution maps it to
3 channels so any 3-channel segmentation-models-pytorch encoder (and its weights) fits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.deeplabv3.decoder import (
    ASPPConv,
    ASPPPooling,
    SeparableConv2d,
)
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn


def _conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class SqueezeExcitation(nn.Module):
    """Global pool -> FC C -> FC C/8 -> FC C sigmoid (256 -> 32 -> 256 at paper size)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


class AttentionASPP(nn.Module):
    """ASPP with per-branch refinement, a shared SE block and a (1,1,5) 3D-conv fusion."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, int, int],
                 dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList([
            _conv_bn_relu(in_channels, channels, 1),
            *(ASPPConv(in_channels, channels, r) for r in rates),
            ASPPPooling(in_channels, channels),
        ])
        self.refine = nn.ModuleList(_conv_bn_relu(channels, channels) for _ in self.branches)
        self.se = SqueezeExcitation(channels)  # one instance: shared by all 5 branches
        self.fuse = nn.Sequential(
            nn.Conv3d(channels, channels, kernel_size=(1, 1, len(self.branches)), bias=False),
            nn.BatchNorm3d(channels),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = [self.se(refine(branch(x))) for branch, refine in zip(self.branches, self.refine)]
        stacked = torch.stack(levels, dim=-1)  # (N, C, H, W, 5)
        return self.dropout(self.fuse(stacked).squeeze(-1))


class AttentionDeepLabV3Plus(nn.Module):
    """4-channel crop in, one logit map (the whole cell) out, at the input's size."""

    def __init__(self, encoder_name: str = "resnet34", in_channels: int = 4,
                 aspp_channels: int = 256, atrous_rates: tuple[int, int, int] = (6, 12, 18),
                 low_level_channels: int = 48, encoder_weights: str | None = None):
        super().__init__()
        self.adapter = nn.Conv2d(in_channels, 3, kernel_size=1)
        self.encoder = get_encoder(encoder_name, in_channels=3, depth=5,
                                   weights=encoder_weights, output_stride=16)
        enc = self.encoder.out_channels
        self.aspp = AttentionASPP(enc[-1], aspp_channels, tuple(atrous_rates))
        self.low_level = _conv_bn_relu(enc[2], low_level_channels, 1)
        self.decoder = nn.Sequential(
            SeparableConv2d(aspp_channels + low_level_channels, aspp_channels, 3, padding=1,
                            bias=False),
            nn.BatchNorm2d(aspp_channels),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(aspp_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features = self.encoder(self.adapter(x))
        high = self.aspp(features[-1])
        low = self.low_level(features[2])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.head(self.decoder(torch.cat([high, low], dim=1)))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)
