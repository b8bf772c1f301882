"""Model bundle: a folder (local or object storage) that fully describes a trained model.

``bundle.json`` holds the configuration (architectures, scales, input sizes, thresholds,
preprocessing), training provenance, the imaging it was trained on (``imaging``: pixel size
``mpp`` in µm and the typical training field ``field_shape`` (H, W), each null when
unknown; bundles written before them have neither) and a SHA-256 per weights file; each network is one
``.safetensors`` file. Loading never unpickles anything: a bundle holding pickle-based files
is refused, and every weights file must match its checksum and its architecture.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from segpc import __version__
from segpc.config import Config
from segpc.errors import InputError
from segpc.models import CYTOPLASM_ARCH, NUCLEUS_ARCH, build_cytoplasm_model, build_nucleus_model
from segpc.io.storage import filesystem, join

FORMAT = "segpc-bundle"
# 2: the published Attention DeepLabv3+ (per-branch refinement, 3-layer SE, post-fusion convs)
# and input normalisation inside both networks. Version-1 weights fit neither.
FORMAT_VERSION = 2
OUTDATED = {1: "it was trained with the earlier, lighter Attention DeepLabv3+ (and without input "
               "normalisation inside the networks), whose weights do not fit this version; "
               "retrain it with this version of segpc"}
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


def network_name(scale: float | None = None) -> str:
    """``nucleus`` or ``cytoplasm-s<scale>``: the key and file stem of each network."""
    return "nucleus" if scale is None else f"cytoplasm-s{scale:g}"


@dataclass
class Bundle:
    config: Config
    nucleus: nn.Module | None
    cytoplasm: dict[float, nn.Module]
    provenance: dict = field(default_factory=dict)
    uri: str = ""
    mpp: float | None = None  # µm per pixel of the training images; None: unknown
    field_shape: tuple[int, int] | None = None  # (H, W) of the typical training field


def bundle_imaging(meta: dict) -> tuple[float | None, tuple[int, int] | None]:
    """(mpp, field_shape) from a parsed ``bundle.json``; (None, None) for older bundles. Whole
    slides are read at ``mpp`` and cut into tiles of ``field_shape``, so the networks see them
    at the scale they learnt."""
    imaging = meta.get("imaging") or {}
    mpp, shape = imaging.get("mpp"), imaging.get("field_shape")
    return (float(mpp) if mpp else None), (tuple(int(v) for v in shape) if shape else None)


def new_bundle(config: Config, provenance: dict | None = None) -> Bundle:
    """Freshly initialised networks for every stage of ``config`` (random encoder weights)."""
    config.validate()
    return Bundle(config, build_nucleus_model(config.nucleus),
                  {s: build_cytoplasm_model(config.cytoplasm) for s in config.cytoplasm.scales},
                  dict(provenance or {}))


def save_bundle(bundle: Bundle, uri: str) -> None:
    """Write weights first and ``bundle.json`` last, so a half-written bundle never loads."""
    fs, root = filesystem(uri)
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{uri}: bundle folder is not writable ({exc})") from None
    networks = {}
    nets = {network_name(): (NUCLEUS_ARCH, None, bundle.nucleus)}
    nets.update({network_name(s): (CYTOPLASM_ARCH, s, m) for s, m in bundle.cytoplasm.items()})
    for name, (arch, scale, model) in nets.items():
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        data = save_safetensors(state)
        with fs.open(join(root, f"{name}.safetensors"), "wb") as f:
            f.write(data)
        networks[name] = {"architecture": arch, "scale": scale, "file": f"{name}.safetensors",
                          "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "segpc_version": __version__,
            "config": bundle.config.to_dict(), "networks": networks,
            "provenance": bundle.provenance,
            "imaging": {"mpp": bundle.mpp,
                        "field_shape": list(bundle.field_shape) if bundle.field_shape else None}}
    with fs.open(join(root, "bundle.json"), "w") as f:
        json.dump(meta, f, indent=2)


def read_bundle_meta(uri: str) -> dict:
    """The parsed, checked ``bundle.json`` of a bundle folder."""
    fs, root = filesystem(uri)
    try:
        with fs.open(join(root, "bundle.json"), "r") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{uri}: not a model bundle (no bundle.json)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{uri}/bundle.json: invalid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{uri}/bundle.json: not a {FORMAT} file")
    version = meta.get("format_version")
    if isinstance(version, int) and version in OUTDATED:
        raise InputError(f"{uri}: bundle format version {version} is no longer supported: "
                         f"{OUTDATED[version]}")
    if version != FORMAT_VERSION:
        raise InputError(f"{uri}: bundle format version {version} is not "
                         f"supported (this segpc reads version {FORMAT_VERSION})")
    return meta


def load_bundle(uri: str, device: str | torch.device = "cpu", scales: list[float] | None = None,
                nucleus: bool = True) -> Bundle:
    """Load a bundle for inference (eval mode), optionally only some of its networks
    (``scales=[]`` and ``nucleus=False`` let one pipeline stage load only its own)."""
    meta = read_bundle_meta(uri)
    config = Config.from_dict(meta["config"])
    fs, root = filesystem(uri)
    pickles = [p for p in fs.ls(root, detail=False) if p.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise InputError(f"{uri}: refusing a bundle that contains pickle-based files {pickles}; "
                         "weights must be .safetensors")
    wanted = list(config.cytoplasm.scales if scales is None else scales)
    unknown = [s for s in wanted if s not in config.cytoplasm.scales]
    if unknown:
        raise InputError(f"{uri}: bundle has no cytoplasm network for scale(s) {unknown}")
    unet = _load_network(fs, root, uri, meta, network_name(), NUCLEUS_ARCH,
                         build_nucleus_model(config.nucleus), device) if nucleus else None
    cytoplasm = {s: _load_network(fs, root, uri, meta, network_name(s), CYTOPLASM_ARCH,
                                  build_cytoplasm_model(config.cytoplasm), device) for s in wanted}
    return Bundle(config, unet, cytoplasm, meta.get("provenance", {}), uri, *bundle_imaging(meta))


def _load_network(fs, root: str, uri: str, meta: dict, name: str, arch: str, model: nn.Module,
                  device) -> nn.Module:
    entry = meta.get("networks", {}).get(name)
    if entry is None:
        raise InputError(f"{uri}: bundle.json lists no network {name!r}")
    if entry.get("architecture") != arch:
        raise InputError(f"{uri}: network {name!r} is a {entry.get('architecture')!r}, expected {arch!r}")
    path = join(root, entry["file"])
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{uri}: weights file {entry['file']} is missing") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise InputError(f"{uri}: weights file {entry['file']} does not match its checksum in "
                         "bundle.json (corrupt or tampered)")
    try:
        state = load_safetensors(data)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors and torch raise several types
        raise InputError(f"{uri}: weights file {entry['file']} does not fit the {arch} "
                         f"described in bundle.json: {str(exc)[:300]}") from None
    return model.to(device).eval()
