"""Test-time flips (``--tta``): the runner averages the probabilities of the input as is,
flipped left-right, up-down and both, each flipped back. No Ray, toy networks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from segpc.io.run_record import RESULT_KEYS, differences, run_record
from segpc.method.cytoplasm import CropInput
from segpc.config import preset
from segpc.method.segmenter import cell_net, nucleus_net
from segpc.models.runner import NetworkRunner, flip_batch, unflip_mean


def conv(channels: int, kernel: np.ndarray) -> nn.Module:
    """One bias-free convolution with ``kernel`` on every input channel, summed: (N, C, H, W) -> (N, 1, H, W)."""
    k = kernel.shape[0]
    m = nn.Conv2d(channels, 1, k, padding=k // 2, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.stack([kernel] * channels)[None].astype(np.float32)))
    return m


class Shifted(nn.Module):
    """Not flip-equivariant in any way: a lopsided kernel plus a ramp over rows and columns,
    with each channel weighted differently."""

    def __init__(self, channels: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        ramp = torch.linspace(-1, 1, h)[:, None] + 0.5 * torch.linspace(-1, 1, w)[None]
        return 3 * self.conv(x) + ramp


def pixels(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def hand_mean(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The mean of the four flipped-back sigmoid outputs, flipping the NHWC input in numpy."""
    plain = NetworkRunner(model, "cpu", batch_size=64)
    outs = [plain(x), plain(x[:, :, ::-1])[:, :, ::-1], plain(x[:, ::-1])[:, ::-1],
            plain(x[:, ::-1, ::-1])[:, ::-1, ::-1]]
    return np.mean(outs, axis=0)


SYMMETRIC = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16 - 0.2


@pytest.mark.parametrize("model", [nn.Identity(), conv(1, SYMMETRIC)], ids=["identity", "symmetric-conv"])
def test_flip_equivariant_network_is_unchanged(model):
    x = np.random.default_rng(1).random((5, 1, 24, 32), dtype=np.float32)
    plain = NetworkRunner(model, "cpu", batch_size=4)(x)
    tta = NetworkRunner(model, "cpu", batch_size=4, tta=True)(x)
    np.testing.assert_allclose(tta, plain, atol=1e-6)
    if isinstance(model, nn.Identity):
        np.testing.assert_allclose(tta, 1 / (1 + np.exp(-x[:, 0])), atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
def test_non_symmetric_network_gives_the_mean_of_the_four_flipped_back_outputs(batch_size):
    model = Shifted(3).eval()
    x = pixels(7, 20, 28, 3)  # not square: a transposed flip would not even fit
    tta = NetworkRunner(model, "cpu", batch_size=batch_size, tta=True)(x)
    plain = NetworkRunner(model, "cpu", batch_size=batch_size)(x)
    want = hand_mean(model, x)
    np.testing.assert_allclose(tta, want, atol=1e-6)
    assert np.abs(tta - plain).max() > 0.05  # the flips matter for this network
    # and the same, computed straight in torch
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        direct = [torch.sigmoid(model(t.flip(f) if f else t))[:, 0] for f in ((), (-1,), (-2,), (-2, -1))]
        direct = sum(p.flip(f) if f else p for p, f in zip(direct, ((), (-1,), (-2,), (-2, -1)))) / 4
    np.testing.assert_allclose(tta, direct.numpy(), atol=1e-6)


@pytest.mark.parametrize("x", [pixels(6, 16, 24, 3), pixels(0, 16, 24, 3),
                               np.random.default_rng(2).random((3, 4, 16, 24), dtype=np.float32)],
                         ids=["uint8-nhwc", "empty", "float-nchw"])
def test_shapes_and_dtypes_are_those_of_the_plain_runner(x):
    channels = x.shape[3] if x.dtype == np.uint8 else x.shape[1]
    model = Shifted(channels).eval()
    plain = NetworkRunner(model, "cpu", batch_size=4)(x)
    tta = NetworkRunner(model, "cpu", batch_size=4, tta=True)(x)
    assert tta.shape == plain.shape == (len(x), 16, 24)
    assert tta.dtype == plain.dtype == np.float32
    assert ((tta >= 0) & (tta <= 1)).all()


def test_cytoplasm_input_is_flipped_on_all_four_channels():
    """The guidance channel travels with the RGB: a network that reads only the guidance
    channel at a lopsided offset sees each flip of the nucleus, not the unflipped one."""
    kernel = np.zeros((5, 5), np.float32)
    kernel[0, 4] = 4.0  # looks up and to the right
    model = nn.Conv2d(4, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 3] = torch.from_numpy(kernel)  # guidance channel only
    x = np.zeros((1, 16, 16, 4), np.uint8)
    x[0, 4:7, 3:5, 3] = 255  # an off-centre nucleus
    x[0, ..., :3] = pixels(1, 16, 16, 3)[0]  # RGB the network ignores
    tta = NetworkRunner(model, "cpu", tta=True)(x)
    np.testing.assert_allclose(tta, hand_mean(model, x), atol=1e-6)
    # flipping the RGB alone would leave the guidance where it is: another answer
    wrong = []
    plain = NetworkRunner(model, "cpu")
    for f in ((), (2,), (1,), (1, 2)):
        y = x.copy()
        y[..., :3] = np.flip(x[..., :3], f) if f else x[..., :3]
        wrong.append(np.flip(plain(y), f) if f else plain(y))
    assert np.abs(tta - np.mean(wrong, axis=0)).max() > 0.1


def test_flip_batch_and_unflip_mean_invert():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    flipped = flip_batch(t)
    assert flipped.shape == (8, 3, 4, 5)
    assert torch.equal(flipped[2:4], t.flip(-1)) and torch.equal(flipped[4:6], t.flip(-2))
    assert torch.equal(flipped[6:], t.flip(-2, -1))
    assert torch.equal(unflip_mean(flipped[:, 1]), t[:, 1])


def test_segmenter_networks_pass_tta_to_every_runner():
    torch.manual_seed(0)
    bundle = SimpleNamespace(nucleus=Shifted(3).eval(), cytoplasm={0.5: Shifted(4).eval(), 1.0: Shifted(4).eval()},
                             config=preset("tiny"))
    assert nucleus_net(bundle, "cpu", tta=True).tta and not nucleus_net(bundle, "cpu").tta
    x = pixels(3, 12, 12, 4, seed=5)
    crops = [CropInput(p, (0, 0, 12, 12), None, None, 1.0) for p in x]
    got = cell_net(bundle, "cpu", tta=True)(1.0, crops)
    np.testing.assert_allclose(got, hand_mean(bundle.cytoplasm[1.0], x), atol=1e-6)


def test_tta_is_a_result_key_and_old_records_mean_without():
    assert "tta" in RESULT_KEYS
    rec = run_record("b", {"config": {}}, "cascade", "in", None, "image", None, False, False, tta=True)
    assert rec["tta"] is True
    old = {k: v for k, v in rec.items() if k != "tta"}  # a run.json from before the flag
    assert differences(old, {**rec, "tta": False}, RESULT_KEYS) == []
    assert differences(old, rec, RESULT_KEYS) == ["tta: False -> True"]


def test_batch_job_takes_the_flag():
    from ray_jobs.segment import parse_args

    base = ["--input", "in", "--output", "out", "--bundle", "b"]
    assert parse_args(base + ["--tta"]).tta and not parse_args(base).tta


class _FakeDataset:
    """Records each map_batches stage of build_pipeline (no Ray cluster)."""

    def __init__(self):
        self.stages = []

    def map_batches(self, fn, **kw):
        self.stages.append((getattr(fn, "__name__", str(fn)), kw))
        return self


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "split"])
def test_build_pipeline_gives_every_network_actor_the_flag(monkeypatch, fuse):
    import ray_jobs.listing
    from ray_jobs.plan import Plan
    from ray_jobs.segment import build_pipeline, parse_args

    ds = _FakeDataset()
    monkeypatch.setattr(ray_jobs.listing, "input_dataset", lambda *a, **k: ds)
    plan = Plan(fuse, 1, 1, 1, 1, 0.0, 0.0, 1.0, 1.0, 1, 4, 1, 2.0)
    args = parse_args(["--input", "in", "--output", "out", "--bundle", "b", "--tta"])
    build_pipeline(args, plan, preset("tiny"))
    actors = {name: kw["fn_constructor_kwargs"] for name, kw in ds.stages
              if name in ("Segment", "NucleusNet", "CellNet")}
    assert set(actors) == ({"Segment"} if fuse else {"NucleusNet", "CellNet"})
    assert all(kw["tta"] is True for kw in actors.values())
