"""Network factories: names in, torch modules out (weights come from a bundle, never a hub)."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from segpc.config import CytoplasmConfig, NucleusConfig
from segpc.errors import InputError
from segpc.models.attention_deeplab import AttentionDeepLabV3Plus

NUCLEUS_ARCH = "unet"
CYTOPLASM_ARCH = "attention_deeplabv3plus"


def build_nucleus_model(cfg: NucleusConfig) -> nn.Module:
    """The stage-1 U-Net: RGB image in, one nucleus logit map out."""
    try:
        model = smp.Unet(cfg.encoder, encoder_weights=None, in_channels=3, classes=1,
                         decoder_channels=tuple(cfg.decoder_channels),
                         encoder_depth=len(cfg.decoder_channels))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot build nucleus U-Net with encoder {cfg.encoder!r}: {exc}") from None
    # Nuclei cover a few percent of an image: start the output at that prior (logit -3.5,
    # p ~ 3%) instead of 50%, so early training is not spent unlearning the background.
    torch.nn.init.constant_(model.segmentation_head[0].bias, -3.5)
    return model


def build_cytoplasm_model(cfg: CytoplasmConfig) -> nn.Module:
    """One scale's Attention DeepLabv3+: 4-channel crop in, one whole-cell logit map out."""
    try:
        return AttentionDeepLabV3Plus(cfg.encoder, in_channels=4, aspp_channels=cfg.aspp_channels,
                                      atrous_rates=tuple(cfg.atrous_rates),
                                      low_level_channels=cfg.low_level_channels)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot build Attention DeepLabv3+ with encoder {cfg.encoder!r}: {exc}") from None
