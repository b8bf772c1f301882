"""The stage-1 U-Net: smp's ``Unet`` with the input normalisation inside the model."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch

from segpc.models.normalize import InputNormalization


class NucleusUNet(smp.Unet):
    """RGB image in ([0, 1] floats), one nucleus logit map out. Subclassing (rather than
    wrapping) keeps smp's state_dict keys (``encoder.*``, ``decoder.*``,
    ``segmentation_head.*``); ``normalize.*`` is added."""

    def __init__(self, encoder_name: str, decoder_channels: tuple[int, ...],
                 encoder_weights: str | bool | None = None):
        super().__init__(encoder_name, encoder_weights=encoder_weights, in_channels=3, classes=1,
                         decoder_channels=decoder_channels, encoder_depth=len(decoder_channels))
        self.normalize = InputNormalization(3)
        # Nuclei cover a few percent of an image: start the output at that prior (logit -3.5,
        # p ~ 3%) instead of 50%, so early training is not spent unlearning the background.
        torch.nn.init.constant_(self.segmentation_head[0].bias, -3.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalize(x))
