"""Attention DeepLabv3+ as METHOD.md section 5 and the published Keras code build it, the
U-Net factory, and encoder starting weights (files, object storage, the offline ImageNet path)."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from segpc.config import CytoplasmConfig, NucleusConfig, preset
from segpc.errors import InputError
from segpc.models import build_cytoplasm_model, build_nucleus_model, encoder_provenance
from segpc.models.attention_deeplab import AttentionASPP, BranchRefinement, SqueezeExcitation

TINY = preset("tiny")
C = TINY.cytoplasm.aspp_channels
TINY_ENCODER = TINY.cytoplasm.encoder
assert TINY.nucleus.encoder == TINY_ENCODER  # one encoder file fits both tiny networks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_cytoplasm_model(TINY.cytoplasm)


def convs(module: nn.Module, kind: type = nn.Conv2d) -> list:
    return [m for m in module.modules() if isinstance(m, kind)]


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


@pytest.mark.parametrize("channels, widths", [(256, [256, 32, 256]), (C, [C, C // 8, C])])
def test_se_is_three_fully_connected_layers_without_biases(channels, widths):
    se = SqueezeExcitation(channels)
    fcs = [m for m in se.fc if isinstance(m, nn.Linear)]
    assert [f.out_features for f in fcs] == widths
    assert [f.in_features for f in fcs] == [channels] + widths[:2]
    assert all(f.bias is None for f in fcs)
    assert [type(m) for m in se.fc if not isinstance(m, nn.Linear)] == [nn.ReLU, nn.ReLU, nn.Sigmoid]


def test_each_branch_is_refined_by_four_convs_with_a_dense_skip(model):
    assert len(model.aspp.refine) == 5 and all(isinstance(r, BranchRefinement) for r in model.aspp.refine)
    for refine in model.aspp.refine:
        cs = convs(refine)
        assert [c.kernel_size for c in cs] == [(3, 3)] * 4
        assert [(c.in_channels, c.out_channels) for c in cs] == [(C, C), (C, C), (2 * C, C), (C, C)]
        assert all(c.bias is not None for c in cs)  # Keras Conv2D default, no BN after them
        assert [m.p for m in refine.modules() if isinstance(m, nn.Dropout)] == [0.5]
    # the third conv sees the branch's input concatenated with the first two convs' output
    seen = {}
    refine = model.aspp.refine[0]
    h1 = refine.register_forward_hook(lambda m, i, o: seen.update(branch=i[0]))
    h2 = convs(refine)[2].register_forward_hook(lambda m, i, o: seen.update(third=i[0]))
    model.eval()(torch.rand(1, 4, 64, 64))
    h1.remove(), h2.remove()
    assert seen["third"].shape[1] == 2 * C
    torch.testing.assert_close(seen["third"][:, :C], seen["branch"])


def test_fusion_post_fusion_decoder_and_head(model):
    conv3d = convs(model, nn.Conv3d)
    assert len(conv3d) == 1 and conv3d[0].kernel_size == (1, 1, 5) and conv3d[0].bias is None
    assert (conv3d[0].in_channels, conv3d[0].out_channels) == (C, C)
    assert isinstance(model.aspp.fuse[1], nn.ReLU)
    project = model.aspp.project
    assert [(c.kernel_size, c.in_channels, c.out_channels) for c in convs(project)] == [((3, 3), C, C)] * 2
    assert [type(m) for m in project][1:] == [nn.BatchNorm2d, nn.ReLU, nn.Dropout]
    assert project[-1].p == 0.1
    low = convs(model.low_level)
    assert len(low) == 1 and low[0].kernel_size == (1, 1)
    assert low[0].out_channels == TINY.cytoplasm.low_level_channels
    depthwise = [c for c in convs(model.decoder) if c.groups > 1]
    assert len(depthwise) == 2 and all(c.groups == c.in_channels for c in depthwise)
    head = convs(model.head)
    assert [(c.kernel_size, c.out_channels) for c in head] == [((3, 3), C // 4), ((3, 3), C // 4),
                                                              ((3, 3), 2), ((1, 1), 1)]
    assert model.adapter.in_channels == 4 and model.adapter.out_channels == 3
    assert model.adapter.kernel_size == (1, 1) and model.adapter.bias is None


def test_paper_preset_has_the_published_parameter_count():
    # benchmarks/model_size.py computes the published Keras Deeplabv3pa layer by layer:
    # 57,248,433 trainable parameters; timm's xception65 is the same Xception-65.
    m = build_cytoplasm_model(preset("paper").cytoplasm)
    assert sum(p.numel() for p in m.parameters()) == 57_248_433


@pytest.mark.parametrize("size", [64, 96, 256, 384])
def test_output_shape_for_every_input_size(model, size):
    out = model.eval()(torch.zeros(2, 4, size, size))
    assert out.shape == (2, 1, size, size)


def test_gradients_reach_every_parameter(model):
    model.train()
    torch.manual_seed(1)
    x = torch.rand(2, 4, 64, 64)
    model(x).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    model.zero_grad()
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
    with pytest.raises(InputError, match="tu-no-such-encoder"):  # refused before any download
        build_cytoplasm_model(CytoplasmConfig(encoder="tu-no-such-encoder"), "imagenet")


def test_channels_last_conversion_skips_the_3d_fusion(model):
    from segpc.models.runner import to_channels_last

    model.eval()
    x = torch.randn(1, 4, 64, 64)
    before = model(x)
    to_channels_last(model)  # model.to(memory_format=channels_last) raises on the Conv3d
    assert model.adapter.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), before)


# --- input normalisation and the 4 -> 3 adapter ------------------------------------------


def test_adapter_starts_as_identity_on_rgb_and_zero_on_guidance():
    torch.manual_seed(0)
    m = build_cytoplasm_model(TINY.cytoplasm).eval()
    w = m.adapter.weight[:, :, 0, 0]
    torch.testing.assert_close(w, torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1))
    rgb = torch.rand(2, 3, 64, 64)
    guidance = (torch.rand(2, 1, 64, 64) > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(m(torch.cat([rgb, guidance], 1)),
                                   m(torch.cat([rgb, torch.zeros_like(guidance)], 1)))


def test_encoders_see_rgb_normalised_by_their_own_mean_and_std():
    import timm

    cfg = timm.models.get_pretrained_cfg(TINY_ENCODER[3:])
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    rgb = torch.rand(1, 3, 64, 64)
    for m, x in ((build_cytoplasm_model(TINY.cytoplasm), torch.cat([rgb, torch.ones(1, 1, 64, 64)], 1)),
                 (build_nucleus_model(TINY.nucleus), rgb)):
        seen = {}
        handle = m.encoder.register_forward_pre_hook(lambda mod, i: seen.update(x=i[0]))
        m.eval()(x)
        handle.remove()
        torch.testing.assert_close(seen["x"], (rgb - mean) / std)
        # the constants travel in the state_dict (and the bundle), outside the encoder's keys
        assert {"normalize.mean", "normalize.std"} <= set(m.state_dict())
        assert not any(k.startswith("normalize") for k in m.encoder.state_dict())


# --- encoder starting weights ------------------------------------------------------------


def fresh_encoder(name: str = TINY_ENCODER, seed: int = 123) -> dict:
    torch.manual_seed(seed)
    enc = get_encoder(name, in_channels=3, depth=5, weights=None)
    return {k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    state = fresh_encoder()
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    save_file(state, str(path))
    return path, state


def assert_encoder_is(model: nn.Module, state: dict) -> None:
    own = model.encoder.state_dict()
    assert own.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_encoder_weights_from_a_file(encoder_file):
    path, state = encoder_file
    torch.manual_seed(0)  # not the file's seed: a random encoder would differ
    assert_encoder_is(build_cytoplasm_model(TINY.cytoplasm, encoder_weights=str(path)), state)
    assert_encoder_is(build_nucleus_model(TINY.nucleus, encoder_weights=str(path)), state)
    with pytest.raises(AssertionError):
        assert_encoder_is(build_cytoplasm_model(TINY.cytoplasm), state)


@pytest.mark.s3
def test_encoder_weights_from_object_storage(encoder_file, s3_bucket):
    from segpc.io.storage import filesystem

    path, state = encoder_file
    uri = f"{s3_bucket}/encoders/tiny.safetensors"
    fs, key = filesystem(uri)
    fs.pipe_file(key, path.read_bytes())
    assert_encoder_is(build_cytoplasm_model(TINY.cytoplasm, encoder_weights=uri), state)
    with pytest.raises(InputError, match="missing.safetensors"):
        build_cytoplasm_model(TINY.cytoplasm, encoder_weights=f"{s3_bucket}/missing.safetensors")


def test_a_file_for_another_encoder_is_refused(tmp_path):
    other = tmp_path / "mobilenet075.safetensors"
    save_file(fresh_encoder("tu-mobilenetv3_small_075"), str(other))
    with pytest.raises(InputError, match=r"mobilenet075\.safetensors do not fit .*shape mismatches"):
        build_cytoplasm_model(TINY.cytoplasm, encoder_weights=str(other))
    # a whole model's state_dict is not an encoder's: every key differs
    whole = tmp_path / "whole-model.safetensors"
    save_file({k: v.contiguous() for k, v in build_nucleus_model(TINY.nucleus).state_dict().items()},
              str(whole))
    with pytest.raises(InputError, match=r"whole-model\.safetensors do not fit .*missing keys: "
                                         r"model\.conv_stem\.weight.*unexpected keys: decoder\."):
        build_nucleus_model(TINY.nucleus, encoder_weights=str(whole))


def test_missing_and_pickled_files_are_refused(tmp_path):
    with pytest.raises(InputError, match="nowhere.safetensors: cannot read"):
        build_nucleus_model(TINY.nucleus, encoder_weights=str(tmp_path / "nowhere.safetensors"))
    pickled = tmp_path / "encoder.pth"
    torch.save(fresh_encoder(), pickled)
    with pytest.raises(InputError, match="encoder.pth: not a safetensors file"):
        build_nucleus_model(TINY.nucleus, encoder_weights=str(pickled))


def test_export_encoder_command_writes_what_the_factories_read(tmp_path, monkeypatch):
    """The command run where the libraries can download; here their loader is replaced by
    a seeded random encoder (no downloads in tests)."""
    import segpc.models.encoders as encoders
    from segpc.__main__ import main

    def offline_get_encoder(name, weights=None, **kw):
        assert weights is True  # timm (tu-) encoders: the library's default pretrained tag
        torch.manual_seed(7)
        return get_encoder(name, weights=None, **kw)

    monkeypatch.setattr(encoders, "get_encoder", offline_get_encoder)
    out = tmp_path / "sub" / "enc.safetensors"
    assert main(["export-encoder", "--encoder", TINY_ENCODER, "--weights", "imagenet",
                 "--out", str(out)]) == 0
    monkeypatch.undo()
    torch.manual_seed(7)
    expected = {k: v for k, v in get_encoder(TINY_ENCODER, weights=None).state_dict().items()}
    m = build_cytoplasm_model(TINY.cytoplasm, encoder_weights=str(out))
    assert_encoder_is(m, expected)
    prov = encoder_provenance(str(out))
    assert prov["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert prov["encoder"] == TINY_ENCODER and "mobilenetv3_small_050" in prov["weights_tag"]


def test_file_metadata_sets_the_normalisation(tmp_path):
    path = tmp_path / "enc.safetensors"
    save_file(fresh_encoder(), str(path), metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]"})
    m = build_cytoplasm_model(TINY.cytoplasm, encoder_weights=str(path))
    assert m.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5, 0.0]
    assert m.normalize.std.flatten().tolist() == [0.25, 0.25, 0.25, 1.0]


def test_encoder_provenance(encoder_file):
    path, _ = encoder_file
    assert encoder_provenance(None) == {"encoder_weights": "random"}
    imagenet = encoder_provenance("imagenet", TINY_ENCODER)
    assert imagenet["encoder_weights"] == "imagenet"
    assert "timm/mobilenetv3_small_050.lamb_in1k" in imagenet["weights_tag"]
    assert "smp-hub/resnet34.imagenet@" in encoder_provenance("imagenet", "resnet34")["weights_tag"]
    assert encoder_provenance(str(path)) == {"encoder_weights": str(path), "bytes": path.stat().st_size,
                                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    with pytest.raises(InputError, match="cannot read"):
        encoder_provenance(str(path) + ".missing")


def test_imagenet_offline_without_a_cache_is_a_clear_error(tmp_path):
    """The libraries' own offline switch: no download is tried, the message says what to do."""
    code = ("from segpc.config import preset\nfrom segpc.errors import InputError\n"
            "from segpc.models import build_nucleus_model\n"
            "try:\n    build_nucleus_model(preset('tiny').nucleus, 'imagenet')\n"
            "except InputError as e:\n    print('INPUT-ERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "INPUT-ERROR" in run.stdout, run.stderr[-2000:]
    assert "export-encoder" in run.stdout and TINY_ENCODER in run.stdout
    assert not any(p.is_file() and p.stat().st_size > 10_000 for p in tmp_path.rglob("*"))
