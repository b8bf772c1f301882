"""Where an encoder's starting weights come from: random, the libraries' ImageNet weights, or
an encoder weight file (local or ``s3://``) for clusters without internet.

``encoder_weights`` everywhere is one of
- ``None``: random initialisation;
- ``"imagenet"``: the libraries' own loaders (smp's hub repos, timm's default pretrained tag
  for ``tu-`` encoders), with their caches and offline switches (``HF_HOME``,
  ``HF_HUB_OFFLINE=1``) as huggingface_hub documents them;
- anything else: the URI of a safetensors file holding ``model.encoder.state_dict()``, as
  ``python -m segpc export-encoder`` writes it. Nothing is unpickled.

Files carry metadata (encoder name, weight tag, mean/std) so a model started from one
normalises its input as the weights expect.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable

import segmentation_models_pytorch as smp
import timm
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from segmentation_models_pytorch.encoders import get_encoder, get_preprocessing_params
from torch import nn

from segpc.errors import InputError
from segpc.io.storage import filesystem, read_bytes
from segpc.models.normalize import IMAGENET_MEAN, IMAGENET_STD

IMAGENET = "imagenet"
FILE_FORMAT = "segpc-encoder"
OFFLINE_HINT = ("without internet, fill the library cache (HF_HOME) on a machine with internet "
                "and set HF_HUB_OFFLINE=1, or run `python -m segpc export-encoder --encoder NAME "
                "--weights imagenet --out FILE.safetensors` there and pass the file")


def library_weights(encoder: str, encoder_weights: str | None) -> str | bool | None:
    """What smp's loaders take for ``encoder_weights``: ``"imagenet"``, ``True`` for timm
    (``tu-``) encoders, or ``None`` (random; a file is loaded afterwards)."""
    if encoder_weights != IMAGENET:
        return None
    return True if encoder.startswith("tu-") else IMAGENET


def weights_tag(encoder: str) -> str:
    """The library's name for ``encoder``'s ImageNet weights (a hub repo and revision)."""
    if encoder.startswith("tu-"):
        cfg = timm.models.get_pretrained_cfg(encoder[3:])
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise InputError(f"timm has no pretrained weights for encoder {encoder!r}")
        return f"timm {timm.__version__}: {cfg.hf_hub_id or cfg.url}"
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get(IMAGENET)
    if settings is None:
        raise InputError(f"segmentation_models_pytorch has no ImageNet weights for encoder {encoder!r}")
    return (f"segmentation_models_pytorch {smp.__version__}: "
            f"{settings.get('repo_id')}@{settings.get('revision')}")


def normalization(encoder: str, encoder_weights: str | None,
                  metadata: dict | None = None) -> tuple[list[float], list[float]]:
    """(mean, std) of RGB in [0, 1] that ``encoder``'s weights expect: a weight file's own
    (``metadata`` as :func:`read_encoder_file` returns it),
    timm's pretrained config for ``tu-`` encoders, smp's preprocessing parameters for its
    ImageNet weights; ImageNet statistics otherwise (random weights need no particular one)."""
    if metadata and "mean" in metadata and "std" in metadata:
        return metadata["mean"], metadata["std"]
    if encoder.startswith("tu-"):
        cfg = timm.models.get_pretrained_cfg(encoder[3:])
        if cfg is not None:
            return list(cfg.mean), list(cfg.std)
    elif encoder_weights == IMAGENET:  # reads the config the loader has just cached
        params = get_preprocessing_params(encoder, pretrained=IMAGENET)
        return list(params["mean"]), list(params["std"])
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def _read(uri: str) -> bytes:
    try:
        return read_bytes(uri)
    except (OSError, ValueError) as exc:
        raise InputError(f"encoder weights {uri}: cannot read ({type(exc).__name__}: {exc})") from None


def _metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header (its first 8 bytes give its size)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


def read_encoder_file(uri: str) -> tuple[dict, dict]:
    """(tensors, metadata) of an encoder weight file, the metadata's mean/std as lists of
    floats; ``InputError`` if it is unreadable or not a safetensors file."""
    data = _read(uri)
    try:
        state = load_safetensors(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise InputError(f"encoder weights {uri}: not a safetensors file ({exc})") from None
    for key in ("mean", "std"):
        if key in metadata:
            values = _three_floats(metadata[key])
            if values is None:
                raise InputError(f"encoder weights {uri}: metadata {key!r} is not 3 numbers "
                                 f"({metadata[key]!r})")
            metadata[key] = values
    return state, metadata


def _three_floats(text: str) -> list[float] | None:
    try:
        values = [float(v) for v in json.loads(text)]
    except (ValueError, TypeError):
        return None
    return values if len(values) == 3 else None


def load_encoder_state(encoder: nn.Module, state: dict, uri: str, name: str,
                       metadata: dict | None = None) -> None:
    """Copy ``state`` into ``encoder``; every key and shape must match, or ``InputError``
    naming the file and the first mismatches."""
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = sorted(k for k in state if k not in own)  # a file's order is its own
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        held = (metadata or {}).get("encoder")
        problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("shape mismatches", shapes)) if items]
        raise InputError(f"encoder weights {uri} do not fit encoder {name!r}"
                         f"{f' (the file holds {held!r})' if held else ''}: {'; '.join(problems)}")
    encoder.load_state_dict(state, strict=True)


def with_encoder_weights(build: Callable[[str | bool | None], nn.Module], encoder: str,
                         encoder_weights: str | None, what: str) -> nn.Module:
    """``build(library_weights)``, then its encoder started from ``encoder_weights`` and its
    input normalisation set to what those weights expect. Every failure is an ``InputError``."""
    state, metadata = ({}, {}) if encoder_weights in (None, IMAGENET) else read_encoder_file(encoder_weights)
    library = library_weights(encoder, encoder_weights)
    if library is not None:
        weights_tag(encoder)  # refuses, by name, an encoder the library has no weights for
    # Building fails on names and sizes; downloading library weights on anything (hub, network).
    failures = (KeyError, ValueError, RuntimeError) if library is None else Exception
    try:
        model = build(library)
        mean, std = normalization(encoder, encoder_weights, metadata)
    except failures as exc:
        if library is None:
            raise InputError(f"cannot build {what} with encoder {encoder!r}: {exc}") from None
        raise InputError(f"cannot load ImageNet weights for {what} encoder {encoder!r} "
                         f"({type(exc).__name__}: {str(exc)[:300]}); {OFFLINE_HINT}") from None
    if state:
        load_encoder_state(model.encoder, state, encoder_weights, encoder, metadata)
    model.normalize.set(mean, std)
    return model


def encoder_provenance(encoder_weights: str | None, encoder: str | None = None) -> dict:
    """What an encoder started from, for a bundle's provenance: ``random``; ``imagenet`` with
    the library versions (and, given ``encoder``, the library's weight tag); or a file's URI
    with its SHA-256 and the metadata it carries."""
    if encoder_weights is None:
        return {"encoder_weights": "random"}
    if encoder_weights == IMAGENET:
        out = {"encoder_weights": IMAGENET, "libraries": {
            "segmentation_models_pytorch": smp.__version__, "timm": timm.__version__}}
        if encoder is not None:
            out["weights_tag"] = weights_tag(encoder)
        return out
    data = _read(encoder_weights)
    try:
        metadata = _metadata(data)
    except ValueError:  # not a safetensors file: building refuses it, provenance just records it
        metadata = {}
    return {"encoder_weights": encoder_weights, "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), **{k: metadata[k] for k in ("encoder", "weights_tag") if k in metadata}}


def export_encoder(encoder: str, out: str, encoder_weights: str = IMAGENET) -> dict:
    """Write ``encoder``'s library weights as an encoder weight file (run where the libraries
    can download); returns what was written."""
    if encoder_weights != IMAGENET:
        raise InputError(f"export-encoder: weights {encoder_weights!r} are not a library's; "
                         "only 'imagenet' is exported")
    tag = weights_tag(encoder)
    try:
        module = get_encoder(encoder, in_channels=3, depth=5,
                             weights=library_weights(encoder, encoder_weights))
        mean, std = normalization(encoder, encoder_weights)
    except Exception as exc:  # noqa: BLE001 - unknown names, hub and network errors alike
        raise InputError(f"cannot load ImageNet weights of encoder {encoder!r} "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from None
    # clone: safetensors refuses tensors that share memory
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    metadata = {"format": FILE_FORMAT, "encoder": encoder, "weights_tag": tag,
                "mean": json.dumps(mean), "std": json.dumps(std)}
    data = save_safetensors(state, metadata=metadata)
    fs, path = filesystem(out)
    try:
        if posixpath.dirname(path):
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc})") from None
    return {"out": out, "encoder": encoder, "weights_tag": tag, "tensors": len(state),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
