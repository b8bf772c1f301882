"""Network factories: names in, torch modules out.

Trained weights come from a bundle; an encoder's starting weights from ``encoder_weights``
(``None`` random, ``"imagenet"`` the libraries' loaders, or an encoder weight file's URI: see
``segpc.models.encoders``).
"""

from __future__ import annotations

from torch import nn

from segpc.config import CytoplasmConfig, NucleusConfig
from segpc.models.attention_deeplab import AttentionDeepLabV3Plus
from segpc.models.encoders import encoder_provenance, with_encoder_weights
from segpc.models.unet import NucleusUNet

NUCLEUS_ARCH = "unet"
CYTOPLASM_ARCH = "attention_deeplabv3plus"

__all__ = ["CYTOPLASM_ARCH", "NUCLEUS_ARCH", "AttentionDeepLabV3Plus", "NucleusUNet",
           "build_cytoplasm_model", "build_nucleus_model", "encoder_provenance"]


def build_nucleus_model(cfg: NucleusConfig, encoder_weights: str | None = None) -> nn.Module:
    """The stage-1 U-Net: RGB image in ([0, 1]), one nucleus logit map out."""
    return with_encoder_weights(
        lambda weights: NucleusUNet(cfg.encoder, tuple(cfg.decoder_channels), weights),
        cfg.encoder, encoder_weights, "nucleus U-Net")


def build_cytoplasm_model(cfg: CytoplasmConfig, encoder_weights: str | None = None) -> nn.Module:
    """One scale's Attention DeepLabv3+: 4-channel crop in ([0, 1]), one whole-cell logit map out."""
    return with_encoder_weights(
        lambda weights: AttentionDeepLabV3Plus(cfg.encoder, in_channels=4,
                                               aspp_channels=cfg.aspp_channels,
                                               atrous_rates=tuple(cfg.atrous_rates),
                                               low_level_channels=cfg.low_level_channels,
                                               encoder_weights=weights),
        cfg.encoder, encoder_weights, "Attention DeepLabv3+")
