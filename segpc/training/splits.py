"""Where training data comes from: a SegPC root (train/, validation/) or a flat archive.

The driver only *lists* (one recursive listing of the root, local or ``s3://``): each image
becomes a :class:`SampleRef` (image URI and its mask URIs), and the reading and decoding
happen where the data is used (Ray Data tasks, the validating worker). The layout rules are
those of ``segpc.io.segpc_format`` (METHOD.md 1: one extra nesting level, ``<id>_<k>`` split
at the last '_', gaps in k, images without masks), applied to a listing instead of a folder
walk so that object storage needs no local copy.

A flat archive (``python -m segpc synth``: x/, y/, slides.csv) is split by slide, never by
image, so validation images come from slides the networks have not seen.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from segpc.errors import InputError
from segpc.io.imaging import IMAGE_SUFFIXES
from segpc.io.inputs import image_files
from segpc.io.storage import filesystem, read_bytes

# root/<split>/<nest>/y/<file> is the deepest layout the format allows
_MAX_DEPTH = 4


@dataclass(frozen=True)
class SampleRef:
    """One image of a split by reference: nothing is read until it is used."""

    image_id: str
    image_uri: str
    masks: tuple[tuple[int, str], ...] = ()  # (k, mask URI), sorted by k

    @property
    def n_cells(self) -> int:
        return len(self.masks)

    def to_json(self) -> str:
        return json.dumps([self.image_id, self.image_uri, [list(m) for m in self.masks]])

    @classmethod
    def from_json(cls, text: str) -> "SampleRef":
        image_id, uri, masks = json.loads(text)
        return cls(image_id, uri, tuple((int(k), u) for k, u in masks))


@dataclass
class Splits:
    """The training and validation images of a data root (validation may be empty)."""

    root: str
    train: list[SampleRef]
    validation: list[SampleRef]
    layout: str  # "segpc" (train/ and validation/ folders) or "flat" (split by slide)
    slides: dict[str, str] = field(default_factory=dict)

    @property
    def has_validation(self) -> bool:
        return bool(self.validation)


def list_splits(uri: str, val_fraction: float = 0.25) -> Splits:
    """List a data root: ``train/`` + ``validation/`` folders, or a flat archive split by slide
    (``val_fraction`` of the slides held out, the last ones; 0 holds none out)."""
    fs, root = filesystem(uri)
    try:
        if not fs.isdir(root):
            raise InputError(f"{uri}: not found (or not a folder)")
        found = fs.find(root, maxdepth=_MAX_DEPTH)
    except InputError:
        raise
    except Exception as exc:  # network, credentials, bucket names
        raise InputError(f"{uri}: cannot list the data ({type(exc).__name__}: {exc})") from None
    prefix = root.rstrip("/") + "/"
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""
    rel = {p[len(prefix):]: scheme + p for p in found if p.startswith(prefix)}
    if any(r.startswith("train/") for r in rel):
        train = _split_refs(uri, "train", rel)
        val_files = {r: u for r, u in rel.items() if r.startswith("validation/")}
        val = _split_refs(uri, "validation", rel) if val_files else []
        return Splits(uri, train, val, "segpc")
    refs = _split_refs(uri, "", rel)
    slides = _slides(fs, prefix, refs)
    train, val = split_by_slide(refs, slides, val_fraction)
    return Splits(uri, train, val, "flat", slides)


def _split_refs(uri: str, split: str, rel: dict[str, str]) -> list[SampleRef]:
    """The samples of one split root (``split`` relative to the data root; "" for the root)."""
    base = f"{split}/" if split else ""
    files = {r[len(base):]: u for r, u in rel.items() if r.startswith(base)}
    where = f"{uri.rstrip('/')}/{split}".rstrip("/")
    x_dir, y_dir = _find_split(files, where)
    images: dict[str, str] = {}
    for name in image_files(sorted(_children(files, x_dir))):
        stem = PurePosixPath(name).stem
        if stem in images:
            raise InputError(f"{where}/{x_dir}: image id {stem!r} twice")
        images[stem] = files[f"{x_dir}/{name}"]
    if not images:
        raise InputError(f"{where}: no images ({', '.join(IMAGE_SUFFIXES)}) in {x_dir}/")
    masks = _index_masks(files, y_dir, where) if y_dir else {}
    orphans = sorted(set(masks) - set(images))
    if orphans:
        warnings.warn(f"{where}/{y_dir}: masks for {len(orphans)} id(s) with no image: "
                      + ", ".join(orphans[:5]), stacklevel=3)
    return [SampleRef(i, images[i], tuple(sorted(masks.get(i, {}).items()))) for i in sorted(images)]


def _children(files: dict[str, str], folder: str) -> list[str]:
    """Names of the files directly in ``folder`` (relative)."""
    pre = folder + "/"
    return [r[len(pre):] for r in files if r.startswith(pre) and "/" not in r[len(pre):]]


def _dirs(files: dict[str, str]) -> set[str]:
    return {r.rsplit("/", 1)[0] for r in files if "/" in r}


def _below(dirs: set[str], base: str, name: str) -> list[str]:
    """Folders called ``name`` exactly one level below ``base`` ("" is the root)."""
    depth = base.count("/") + 2 if base else 1
    return sorted(d for d in dirs if d.endswith("/" + name) and d.count("/") == depth
                  and (not base or d.startswith(base + "/")))


def _find_split(files: dict[str, str], where: str) -> tuple[str, str | None]:
    """(x folder, y folder or None), relative: ``x`` or ``*/x``; y next to x, at the root,
    or one level below either (as ``segpc_format.find_split``)."""
    dirs = _dirs(files)
    if "x" in dirs:
        x_dir = "x"
    else:
        nested = _below(dirs, "", "x")
        if not nested:
            raise InputError(f"{where}: no x/ image folder (looked for x/ and */x/)")
        if len(nested) > 1:
            raise InputError(f"{where}: ambiguous split root, several x/ folders: {', '.join(nested)}")
        x_dir = nested[0]
    bases = list(dict.fromkeys([x_dir.rsplit("/", 1)[0] if "/" in x_dir else "", ""]))
    for base in bases:
        if (f"{base}/y" if base else "y") in dirs:
            return x_dir, f"{base}/y" if base else "y"
    below = sorted({d for base in bases for d in _below(dirs, base, "y")})
    if len(below) > 1:
        raise InputError(f"{where}: ambiguous split root, several y/ folders: {', '.join(below)}")
    return x_dir, (below[0] if below else None)


def _index_masks(files: dict[str, str], y_dir: str, where: str) -> dict[str, dict[int, str]]:
    """{image_id: {k: uri}} of the ``<id>_<k>.<image suffix>`` files directly in ``y_dir``."""
    index: dict[str, dict[int, str]] = {}
    skipped = []
    for name in image_files(sorted(_children(files, y_dir))):
        image_id, sep, k = PurePosixPath(name).stem.rpartition("_")
        if not sep or not image_id or not k.isdigit():
            skipped.append(name)
            continue
        by_k = index.setdefault(image_id, {})
        if int(k) in by_k:
            raise InputError(f"{where}/{y_dir}: mask {image_id}_{k} twice")
        by_k[int(k)] = files[f"{y_dir}/{name}"]
    if skipped:
        warnings.warn(f"{where}/{y_dir}: skipped {len(skipped)} file(s) not named <id>_<k>: "
                      + ", ".join(skipped[:5]), stacklevel=3)
    return index


def _slides(fs, prefix: str, refs: list[SampleRef]) -> dict[str, str]:
    """image_id -> slide_id from slides.csv, or from the id's ``<slide>-<n>`` prefix."""
    try:
        text = fs.cat_file(prefix + "slides.csv").decode()
    except FileNotFoundError:
        return {r.image_id: r.image_id.rsplit("-", 1)[0] for r in refs}
    return {row["image_id"]: row["slide_id"] for row in csv.DictReader(io.StringIO(text))}


def split_by_slide(refs: list[SampleRef], slides: dict[str, str],
                   val_fraction: float) -> tuple[list[SampleRef], list[SampleRef]]:
    """(train, validation) of a flat archive: whole slides held out, the last ones first."""
    if val_fraction <= 0:
        return list(refs), []
    order = sorted({slides.get(r.image_id, r.image_id) for r in refs})
    if len(order) >= 2:
        held = set(order[-max(1, math.floor(len(order) * val_fraction + 0.5)):])
        val_ids = {r.image_id for r in refs if slides.get(r.image_id, r.image_id) in held}
    else:
        val_ids = {r.image_id for r in refs[-max(1, math.floor(len(refs) * val_fraction + 0.5)):]}
    train = [r for r in refs if r.image_id not in val_ids]
    val = [r for r in refs if r.image_id in val_ids]
    if not train:
        raise InputError(f"too few images ({len(refs)}) for a train/validation split")
    return train, val


def check_trainable(refs: list[SampleRef], what: str) -> None:
    """A split that can be trained on: images, and masks for some of them."""
    if not refs:
        raise InputError(f"{what}: empty split")
    if not any(r.masks for r in refs):
        raise InputError(f"{what}: no masks (y/<id>_<k>.bmp) for any image; cannot train")


def cached(refs: list[SampleRef], cache_dir: str | None = None) -> list[SampleRef]:
    """The same samples with remote files copied to a local cache (once per node), so that
    what is read every epoch (the validation split) is read from object storage only once."""
    base = Path(cache_dir or tempfile.gettempdir()) / "segpc-cache"

    def local(uri: str) -> str:
        if "://" not in uri:
            return uri
        dest = base / hashlib.sha1(uri.encode()).hexdigest()[:16] / PurePosixPath(uri).name
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_suffix(dest.suffix + ".partial")
            part.write_bytes(read_bytes(uri))
            part.rename(dest)
        return str(dest)

    return [SampleRef(r.image_id, local(r.image_uri), tuple((k, local(u)) for k, u in r.masks)) for r in refs]
