"""Attention DeepLabv3+ (METHOD.md section 5), as the authors' Keras code builds it.

Published code: github.com/bmdeep/SegPC2021, ``src/models/model_cyt.py`` (``Deeplabv3pa``).
With C = ``aspp_channels`` (256 published), the network is, in order:

- input normalisation: RGB by the encoder's mean/std, the guidance channel unchanged;
- a 1x1 convolution (no bias) from the 4-channel crop to 3 channels, so a 3-channel
  (pretrained) encoder fits; it starts as identity on RGB and zero on guidance;
- the encoder at output stride 16;
- ASPP, 5 branches: 1x1 conv; three atrous 3x3 separable convs (rates 6/12/18); image
  pooling (global mean, 1x1 conv, spread over the map). Each: BN, ReLU;
- each branch refined: two 3x3 conv (C, ReLU) -> dropout 0.5 -> concatenate with the
  branch's input -> two 3x3 conv (C, ReLU);
- ONE squeeze-excitation block, shared by the 5 branches: global mean -> FC C (ReLU) ->
  FC C/8 (ReLU) -> FC C (sigmoid), no biases; each branch multiplied by its weights;
- the 5 branches stacked on a new axis and fused by a (1, 1, 5) 3D convolution (C, ReLU,
  no bias), then two 3x3 conv (C, ReLU) -> BN -> ReLU -> dropout 0.1;
- DeepLabv3+ decoder: upsample to stride 4, concatenate the stride-4 encoder features
  projected to ``low_level_channels`` (48) by 1x1 conv, BN, ReLU; two 3x3 separable convs
  (C, BN and ReLU after the depthwise and after the pointwise part);
- head at stride 4: two 3x3 conv (C/4, 64 published, ReLU) -> 3x3 conv (2) -> 1x1
  conv to one logit (the whole cell; the published net ends in a sigmoid here, we keep
  logits for the loss), upsampled bilinearly to the input size.

Layers the published code initialises ``he_normal`` (refinement, SE, 3D fusion, post-fusion
and head 3x3 convolutions: ReLU stacks mostly without BN) start He-normal here too: at
PyTorch's default scale such a stack would shrink activations and gradients.
Differences from the published code, kept on purpose: bilinear resizing uses
``align_corners=False`` (TF's ``resize_bilinear`` there used True); the pooling branch
averages globally (the Keras code pools with a window of the map's size, the same for the
square crops it was built for); the encoder is any smp/timm encoder (the paper preset's
timm ``xception65`` has the published Xception-65's layers and parameter count, but its
pretrained weights are ImageNet's, not the published PASCAL VOC DeepLab's); and the
head's 2-channel 3x3 convolution has no ReLU (the published one has): two ReLU units
between the network and its one output die easily, and then nothing learns. Measured on
the tiny preset (scale 1.75, 60 synthetic training images, clean guidance, crop IoU on a
held-out slide): with the ReLU 0.000 after 9 epochs and 0.787 after 15, without it 0.716
after 3 and 0.882 after 15. Same parameters, so the parameter count is the published one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from segpc.models.normalize import InputNormalization


def _he_init(module: nn.Module) -> nn.Module:
    """Keras ``he_normal`` weights and zero biases for every conv/linear inside ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def _conv_relu(cin: int, cout: int) -> nn.Sequential:
    """Keras ``Conv2D(cout, 3, activation="relu", padding="same")``: with bias, no BN."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


def _conv_bn_relu(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


def _separable(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    """Keras ``SepConv_BN(depth_activation=True)``: depthwise 3x3 -> BN -> ReLU -> pointwise
    1x1 -> BN -> ReLU, no biases."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
        nn.BatchNorm2d(cin), nn.ReLU(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global mean -> 1x1 conv -> BN -> ReLU, spread over the map."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.project = _conv_bn_relu(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.project(x.mean(dim=(2, 3), keepdim=True))
        return pooled.expand(-1, -1, *x.shape[-2:])


class BranchRefinement(nn.Module):
    """Two 3x3 conv -> dropout 0.5 -> concatenate with the input -> two 3x3 conv (dense skip)."""

    def __init__(self, channels: int, dropout: float = 0.5):
        super().__init__()
        self.first = nn.Sequential(_conv_relu(channels, channels), _conv_relu(channels, channels),
                                   nn.Dropout(dropout))
        self.second = nn.Sequential(_conv_relu(2 * channels, channels), _conv_relu(channels, channels))
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.cat([x, self.first(x)], dim=1))


class SqueezeExcitation(nn.Module):
    """Global mean -> FC C (ReLU) -> FC C/8 (ReLU) -> FC C (sigmoid), no biases; multiplied in
    (256 -> 256 -> 32 -> 256 at paper size)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc = _he_init(nn.Sequential(
            nn.Linear(channels, channels, bias=False), nn.ReLU(),
            nn.Linear(channels, hidden, bias=False), nn.ReLU(),
            nn.Linear(hidden, channels, bias=False), nn.Sigmoid(),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


class AttentionASPP(nn.Module):
    """5 ASPP branches, each refined and re-weighted by one shared SE block, fused by a
    (1, 1, 5) 3D convolution, then two 3x3 conv -> BN -> ReLU -> dropout."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, int, int],
                 dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList([
            _conv_bn_relu(in_channels, channels),
            *(_separable(in_channels, channels, r) for r in rates),
            ImagePooling(in_channels, channels),
        ])
        self.refine = nn.ModuleList(BranchRefinement(channels) for _ in self.branches)
        self.se = SqueezeExcitation(channels)  # one instance: shared by all 5 branches
        self.fuse = nn.Sequential(
            _he_init(nn.Conv3d(channels, channels, kernel_size=(1, 1, len(self.branches)), bias=False)),
            nn.ReLU(),
        )
        self.project = nn.Sequential(
            _he_init(nn.Sequential(_conv_relu(channels, channels), _conv_relu(channels, channels))),
            nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = [self.se(refine(branch(x))) for branch, refine in zip(self.branches, self.refine)]
        stacked = torch.stack(levels, dim=-1)  # (N, C, H, W, 5): the kernel spans the last axis
        return self.project(self.fuse(stacked).squeeze(-1))


class AttentionDeepLabV3Plus(nn.Module):
    """4-channel crop in ([0, 1] floats), one logit map (the whole cell) out, at the input's
    size. ``encoder_weights``: ``None`` or what smp's ``get_encoder`` takes (see
    ``segpc.models.encoders``)."""

    def __init__(self, encoder_name: str = "resnet34", in_channels: int = 4,
                 aspp_channels: int = 256, atrous_rates: tuple[int, int, int] = (6, 12, 18),
                 low_level_channels: int = 48, encoder_weights: str | bool | None = None):
        super().__init__()
        self.normalize = InputNormalization(in_channels)
        self.adapter = nn.Conv2d(in_channels, 3, kernel_size=1, bias=False)
        with torch.no_grad():  # identity on RGB, zero on guidance: pretrained filters see RGB as trained
            self.adapter.weight.zero_()
            self.adapter.weight[:, :3, 0, 0] = torch.eye(3)
        self.encoder = get_encoder(encoder_name, in_channels=3, depth=5, weights=encoder_weights,
                                   output_stride=16)
        enc = self.encoder.out_channels
        c = aspp_channels
        self.aspp = AttentionASPP(enc[-1], c, tuple(atrous_rates))
        self.low_level = _conv_bn_relu(enc[2], low_level_channels)
        self.decoder = nn.Sequential(_separable(c + low_level_channels, c), _separable(c, c))
        head = max(c // 4, 1)
        # The published head narrows to 2 channels before the 1x1 output; without their ReLU
        # (see the module docstring: two ReLU units there die and stall training).
        self.head = nn.Sequential(
            _he_init(nn.Sequential(_conv_relu(c, head), _conv_relu(head, head), nn.Conv2d(head, 2, 3, padding=1))),
            nn.Conv2d(2, 1, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features = self.encoder(self.adapter(self.normalize(x)))
        high = self.aspp(features[-1])
        low = self.low_level(features[2])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.head(self.decoder(torch.cat([high, low], dim=1)))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)
