"""Where training data comes from: a SegPC root (train/, validation/) or a flat archive.

A flat archive (``python -m segpc synth``: x/, y/, slides.csv) is split by slide, never by
image, so validation images come from slides the networks have not seen. Remote roots are
copied once to a local cache; every worker then reads its own copy.
"""

from __future__ import annotations

import csv
import hashlib
import math
import shutil
import tempfile
from pathlib import Path

from segpc.errors import InputError
from segpc.io.imaging import read_image
from segpc.io.segpc_format import Sample, find_split, list_image_ids, read_split
from segpc.io.storage import filesystem


def localize(uri: str, cache_dir: str | None = None) -> Path:
    """A local folder holding ``uri``'s files: the path itself, or a cached copy of a remote one."""
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise InputError(f"{uri}: not found")
    base = Path(cache_dir or tempfile.gettempdir()) / "segpc-cache"
    local = base / hashlib.sha1(uri.encode()).hexdigest()[:16]
    done = local / ".complete"
    if not done.exists():
        tmp = local.with_suffix(".partial")
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        if local.exists():
            shutil.rmtree(local)
        tmp.rename(local)
        done.touch()
    return local


def slide_of(root: Path) -> dict[str, str]:
    """image_id -> slide_id from slides.csv, or from the id's ``<slide>-<n>`` prefix."""
    table = root / "slides.csv"
    if table.exists():
        with open(table, newline="") as f:
            return {row["image_id"]: row["slide_id"] for row in csv.DictReader(f)}
    return {i: i.rsplit("-", 1)[0] for i in list_image_ids(root)}


def split_ids(root: Path, val_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) of a flat archive: whole slides held out, last first."""
    ids = list_image_ids(root)
    slides = slide_of(root)
    order = sorted({slides.get(i, i) for i in ids})
    if len(order) >= 2:
        n_val = max(1, math.floor(len(order) * val_fraction + 0.5))
        held = set(order[-n_val:])
        val = [i for i in ids if slides.get(i, i) in held]
    else:
        val = ids[-max(1, math.floor(len(ids) * val_fraction + 0.5)):]
    train = [i for i in ids if i not in set(val)]
    if not train or not val:
        raise InputError(f"{root}: too few images ({len(ids)}) for a train/validation split")
    return train, val


def split_parts(root: Path, val_fraction: float = 0.25) -> list[tuple[Path, list[str] | None]]:
    """[(train split root, ids or None for all), (validation root, ids or None)]."""
    if (root / "train").is_dir():
        if not (root / "validation").is_dir():
            raise InputError(f"{root}: has train/ but no validation/ split")
        return [(root / "train", None), (root / "validation", None)]
    find_split(root)
    tr_ids, val_ids = split_ids(root, val_fraction)
    return [(root, tr_ids), (root, val_ids)]


def iter_samples(root: Path, ids: list[str] | None = None):
    """Samples of a split one at a time (masks decoded, images not), checked for training:
    read_split checks every mask's size against its image header before any decoding."""
    wanted = None if ids is None else set(ids)
    n = labelled = 0
    for s in read_split(root):
        if wanted is None or s.image_id in wanted:
            n += 1
            labelled += bool(s.instances)
            yield s
    if not n:
        raise InputError(f"{root}: empty split")
    if not labelled:
        raise InputError(f"{root}: no masks (y/<id>_<k>.bmp) for any image; cannot train")


def data_summary(root: Path, val_fraction: float = 0.25) -> tuple[int, int, int]:
    """(training images, training cells, validation images), holding one image at a time:
    the driver checks the data without loading it."""
    (tr_root, tr_ids), (val_root, val_ids) = split_parts(root, val_fraction)
    images = cells = 0
    for s in iter_samples(tr_root, tr_ids):
        images, cells = images + 1, cells + len(s.instances)
    return images, cells, sum(1 for _ in iter_samples(val_root, val_ids))


def training_data(root: Path, val_fraction: float = 0.25) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) samples with images decoded."""
    train, val = ([s for s in iter_samples(r, ids)] for r, ids in split_parts(root, val_fraction))
    for s in (*train, *val):
        s.image = read_image(s.image_path)
    return train, val
