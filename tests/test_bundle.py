"""Model bundle: round trip (local and real S3), and refusal of anything unsafe or mismatched."""

import json

import pytest
import torch

from segpc.models.bundle import load_bundle, new_bundle, read_bundle_meta, save_bundle
from segpc.config import preset
from segpc.errors import InputError


@pytest.fixture(scope="module")
def tiny_bundle():
    torch.manual_seed(0)
    return new_bundle(preset("tiny"), {"data": "test", "epochs": 0})


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_round_trip(tiny_bundle, tmp_path):
    save_bundle(tiny_bundle, str(tmp_path / "b"))
    meta = read_bundle_meta(str(tmp_path / "b"))
    assert meta["provenance"] == {"data": "test", "epochs": 0}
    assert set(meta["networks"]) == {"nucleus", "cytoplasm-s0.5", "cytoplasm-s1.75",
                                     "cytoplasm-s2.6", "cytoplasm-s3"}
    loaded = load_bundle(str(tmp_path / "b"))
    assert loaded.config == tiny_bundle.config
    assert _same_weights(loaded.nucleus, tiny_bundle.nucleus)
    for s in tiny_bundle.cytoplasm:
        assert _same_weights(loaded.cytoplasm[s], tiny_bundle.cytoplasm[s])
    only = load_bundle(str(tmp_path / "b"), scales=[1.75])
    assert list(only.cytoplasm) == [1.75]


def test_imaging_travels_with_the_bundle_and_older_bundles_say_unknown(tmp_path):
    from dataclasses import replace

    b = replace(new_bundle(preset("tiny")), mpp=0.25, field_shape=(1536, 2040))
    save_bundle(b, str(tmp_path / "b"))
    assert read_bundle_meta(str(tmp_path / "b"))["imaging"] == {"mpp": 0.25, "field_shape": [1536, 2040]}
    loaded = load_bundle(str(tmp_path / "b"))
    assert (loaded.mpp, loaded.field_shape) == (0.25, (1536, 2040))
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    del meta["imaging"]  # a bundle written before the imaging was recorded
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    loaded = load_bundle(str(tmp_path / "b"))
    assert (loaded.mpp, loaded.field_shape) == (None, None)


@pytest.mark.s3
def test_s3_round_trip(tiny_bundle, s3_bucket):
    uri = f"{s3_bucket}/bundles/tiny"
    save_bundle(tiny_bundle, uri)
    loaded = load_bundle(uri)
    assert _same_weights(loaded.cytoplasm[2.6], tiny_bundle.cytoplasm[2.6])


def test_tampered_weights_are_refused(tiny_bundle, tmp_path):
    save_bundle(tiny_bundle, str(tmp_path))
    f = tmp_path / "cytoplasm-s2.6.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum"):
        load_bundle(str(tmp_path))


def test_pickles_are_refused(tiny_bundle, tmp_path):
    save_bundle(tiny_bundle, str(tmp_path))
    torch.save({"x": 1}, tmp_path / "extra.pt")
    with pytest.raises(InputError, match="pickle"):
        load_bundle(str(tmp_path))


def test_mismatched_architecture_is_refused(tiny_bundle, tmp_path):
    save_bundle(tiny_bundle, str(tmp_path))
    meta = json.loads((tmp_path / "bundle.json").read_text())
    meta["config"]["cytoplasm"]["aspp_channels"] = 48  # weights were saved at 32
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="does not fit"):
        load_bundle(str(tmp_path))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=99), "version 99"),
    (lambda m: m.update(format="other"), "not a segpc-bundle"),
    (lambda m: m["networks"].pop("cytoplasm-s3"), "no network 'cytoplasm-s3'"),
    (lambda m: m["networks"]["nucleus"].update(architecture="fpn"), "'fpn'"),
    (lambda m: m["config"]["aggregation"]["windows"].pop("3.0"), "no plausibility window"),
])
def test_bad_bundle_json_is_refused(tiny_bundle, tmp_path, edit, message):
    save_bundle(tiny_bundle, str(tmp_path))
    meta = json.loads((tmp_path / "bundle.json").read_text())
    edit(meta)
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=message):
        load_bundle(str(tmp_path))


def test_version_1_bundles_are_refused_with_the_reason(tiny_bundle, tmp_path):
    save_bundle(tiny_bundle, str(tmp_path))
    meta = json.loads((tmp_path / "bundle.json").read_text())
    meta["format_version"] = 1
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"version 1 .*earlier, lighter Attention DeepLabv3\+.*retrain"):
        load_bundle(str(tmp_path))


def test_input_normalisation_travels_with_the_bundle(tmp_path):
    torch.manual_seed(0)
    bundle = new_bundle(preset("tiny"))
    bundle.cytoplasm[0.5].normalize.set((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    save_bundle(bundle, str(tmp_path))
    loaded = load_bundle(str(tmp_path), scales=[0.5, 1.75], nucleus=False)
    assert loaded.cytoplasm[0.5].normalize.std.flatten().tolist() == [0.25, 0.25, 0.25, 1.0]
    assert loaded.cytoplasm[1.75].normalize.std.flatten().tolist()[:3] != [0.25, 0.25, 0.25]


def test_missing_files_and_folders(tiny_bundle, tmp_path):
    with pytest.raises(InputError, match="no bundle.json"):
        load_bundle(str(tmp_path / "nowhere"))
    save_bundle(tiny_bundle, str(tmp_path / "b"))
    (tmp_path / "b" / "nucleus.safetensors").unlink()
    with pytest.raises(InputError, match="missing"):
        load_bundle(str(tmp_path / "b"))
    with pytest.raises(InputError, match="no cytoplasm network for scale"):
        load_bundle(str(tmp_path / "b"), scales=[9.0])
