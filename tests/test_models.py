"""Attention DeepLabv3+ as METHOD.md section 5 states it, and the U-Net factory."""

import pytest
import torch

from segpc.config import CytoplasmConfig, NucleusConfig, preset
from segpc.errors import InputError
from segpc.models import build_cytoplasm_model, build_nucleus_model
from segpc.models.attention_deeplab import AttentionASPP, SqueezeExcitation

TINY = preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_cytoplasm_model(TINY.cytoplasm)


def test_five_branches_share_one_squeeze_excitation(model):
    aspp = model.aspp
    assert isinstance(aspp, AttentionASPP) and len(aspp.branches) == 5
    se_blocks = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    assert len(se_blocks) == 1  # one instance, so one set of weights for all branches
    calls = []
    handle = aspp.se.register_forward_hook(lambda *a: calls.append(1))
    model.eval()(torch.zeros(1, 4, 64, 64))
    handle.remove()
    assert len(calls) == 5


def test_se_sizes_at_paper_width():
    se = SqueezeExcitation(256)
    assert [l.out_features for l in se.fc if isinstance(l, torch.nn.Linear)] == [32, 256]


def test_three_d_fusion_over_the_five_levels(model):
    conv3d = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(conv3d) == 1 and conv3d[0].kernel_size == (1, 1, 5)
    assert model.adapter.in_channels == 4 and model.adapter.out_channels == 3
    assert model.adapter.kernel_size == (1, 1)


@pytest.mark.parametrize("size", [256, 384])
def test_output_shape_for_both_input_sizes(model, size):
    out = model.eval()(torch.zeros(2, 4, size, size))
    assert out.shape == (2, 1, size, size)


def test_gradients_reach_every_parameter(model):
    model.train()
    x = torch.randn(2, 4, 64, 64)
    model(x).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_any_smp_encoder_name_works():
    m = build_cytoplasm_model(CytoplasmConfig(encoder="resnet18", aspp_channels=16,
                                              low_level_channels=8))
    assert m.eval()(torch.zeros(1, 4, 64, 64)).shape == (1, 1, 64, 64)


def test_unet_and_bad_encoder_names():
    unet = build_nucleus_model(TINY.nucleus).eval()
    assert unet(torch.zeros(1, 3, 128, 128)).shape == (1, 1, 128, 128)
    with pytest.raises(InputError, match="no-such-encoder"):
        build_nucleus_model(NucleusConfig(encoder="no-such-encoder"))
    with pytest.raises(InputError, match="no-such-encoder"):
        build_cytoplasm_model(CytoplasmConfig(encoder="no-such-encoder"))


def test_channels_last_conversion_skips_the_3d_fusion(model):
    from segpc.models.runner import to_channels_last

    model.eval()
    x = torch.randn(1, 4, 64, 64)
    before = model(x)
    to_channels_last(model)  # model.to(memory_format=channels_last) raises on the Conv3d
    assert model.adapter.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), before)
