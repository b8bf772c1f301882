"""Parameter counts: our networks (a preset) beside the published Keras networks.

    python benchmarks/model_size.py [--preset paper|tiny]

The published counts are computed here layer by layer from the authors' Keras code
(github.com/bmdeep/SegPC2021: ``src/models/model_cyt.py`` ``Deeplabv3pa`` with its
Xception-65 backbone, ``src/models/model_nuc.py`` ``unet_dnspro`` as ``main.ipynb`` uses it),
not by running Keras (not a dependency of this project). They were cross-checked once against
Keras 3.15 (torch backend) running a layer-for-layer port of ``Deeplabv3pa`` at 384x384x4:
57,248,433 trainable + 202,800 non-trainable, the same as below.

"trainable" is what PyTorch's ``parameters()`` counts; Keras's "total" adds BatchNorm's
moving mean and variance (buffers in PyTorch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Count:
    """Trainable and non-trainable (BatchNorm moving statistics) parameters of a Keras net."""

    def __init__(self) -> None:
        self.trainable = 0
        self.frozen = 0

    def conv(self, cin: int, cout: int, k: int = 1, bias: bool = False) -> None:
        self.trainable += k * k * cin * cout + (cout if bias else 0)

    def bn(self, c: int) -> None:
        self.trainable += 2 * c  # gamma, beta
        self.frozen += 2 * c  # moving mean, moving variance

    def sepconv_bn(self, cin: int, cout: int) -> None:
        """``SepConv_BN``: depthwise 3x3, BN, pointwise 1x1, BN; no biases."""
        self.trainable += 9 * cin
        self.bn(cin)
        self.conv(cin, cout)
        self.bn(cout)

    def xception_block(self, cin: int, depths: tuple[int, int, int], shortcut: str) -> None:
        c = cin
        for d in depths:
            self.sepconv_bn(c, d)
            c = d
        if shortcut == "conv":
            self.conv(cin, depths[-1])
            self.bn(depths[-1])


def published_attention_deeplab(in_channels: int = 4) -> Count:
    """``Deeplabv3pa`` (OS 16), with the 1x1 ``dnslayer`` from 4 to 3 channels."""
    n = Count()
    n.conv(in_channels, 3)  # dnslayer
    n.conv(3, 32, 3)  # entry_flow_conv1_1
    n.bn(32)
    n.conv(32, 64, 3)  # entry_flow_conv1_2
    n.bn(64)
    n.xception_block(64, (128, 128, 128), "conv")
    n.xception_block(128, (256, 256, 256), "conv")  # skip1 (stride 4, 256 channels)
    n.xception_block(256, (728, 728, 728), "conv")
    for _ in range(16):  # middle flow
        n.xception_block(728, (728, 728, 728), "sum")
    n.xception_block(728, (728, 1024, 1024), "conv")
    n.xception_block(1024, (1536, 1536, 2048), "none")
    c = 256
    n.conv(2048, c)  # aspp0
    n.bn(c)
    for _ in range(3):  # aspp1..3, separable atrous
        n.sepconv_bn(2048, c)
    n.conv(2048, c)  # image_pooling
    n.bn(c)
    for _ in range(5):  # per-branch refinement with the dense skip
        n.conv(c, c, 3, bias=True)
        n.conv(c, c, 3, bias=True)
        n.conv(2 * c, c, 3, bias=True)
        n.conv(c, c, 3, bias=True)
    n.trainable += c * c + c * 32 + 32 * c  # shared Dense 256, 32, 256; no biases
    n.trainable += 5 * c * c  # Conv3D (1, 1, 5), no bias
    n.conv(c, c, 3, bias=True)
    n.conv(c, c, 3, bias=True)
    n.bn(c)  # concat_projection_BN
    n.conv(256, 48)  # feature_projection0
    n.bn(48)
    n.sepconv_bn(c + 48, c)  # decoder_conv0
    n.sepconv_bn(c, c)  # decoder_conv1
    n.conv(c, 64, 3, bias=True)
    n.conv(64, 64, 3, bias=True)
    n.conv(64, 2, 3, bias=True)
    n.conv(2, 1, 1, bias=True)
    return n


def published_unet() -> Count:
    """``unet_dnspro``: plain U-Net, 3x3 convs with biases, 2x2 up-convs, no BatchNorm."""
    n = Count()
    widths = (64, 128, 256, 512)
    cin = 3
    for w in widths:  # contracting path
        n.conv(cin, w, 3, bias=True)
        n.conv(w, w, 3, bias=True)
        cin = w
    n.conv(512, 512, 3, bias=True)  # conv5
    n.conv(512, 512, 3, bias=True)
    below = 512
    for w in reversed(widths):  # expanding path: up-conv 2x2, concatenate, two 3x3
        n.conv(below, w, 2, bias=True)
        n.conv(2 * w, w, 3, bias=True)
        n.conv(w, w, 3, bias=True)
        below = w
    n.conv(64, 2, 3, bias=True)
    n.conv(2, 1, 1, bias=True)
    return n


def ours(preset_name: str) -> dict[str, tuple[int, int]]:
    """(parameters, of which in the encoder) of our networks for ``preset_name``."""
    from segpc.config import preset
    from segpc.models import build_cytoplasm_model, build_nucleus_model

    cfg = preset(preset_name)
    out = {}
    for name, model in (("U-Net", build_nucleus_model(cfg.nucleus)),
                        ("Attention DeepLabv3+", build_cytoplasm_model(cfg.cytoplasm))):
        out[name] = (sum(p.numel() for p in model.parameters()),
                     sum(p.numel() for p in model.encoder.parameters()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    args = p.parse_args()
    from segpc.config import preset

    cfg = preset(args.preset)
    published = {"U-Net": published_unet(), "Attention DeepLabv3+": published_attention_deeplab()}
    encoders = {"U-Net": cfg.nucleus.encoder, "Attention DeepLabv3+": cfg.cytoplasm.encoder}
    print(f"{'network':22} {'ours (' + args.preset + ')':>16} {'encoder':>12}  "
          f"{'published trainable':>20} {'published Keras total':>22}")
    for name, (total, enc) in ours(args.preset).items():
        pub = published[name]
        print(f"{name:22} {total:16,} {enc:12,}  {pub.trainable:20,} {pub.trainable + pub.frozen:22,}"
              f"   ({encoders[name]})")


if __name__ == "__main__":
    main()
