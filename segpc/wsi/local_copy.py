"""Local copies of remote whole slides, for OpenSlide (it reads local files only).

A slide that tiffslide reads (SVS, NDPI, SCN, BIF, pyramidal TIFF) is range-read in place
and never copied. One that only OpenSlide reads (MIRAX, VMS/VMU, or a TIFF tiffslide fails
on) is downloaded whole, with its companion files (MIRAX: the folder of the same name beside
the ``.mrxs``; VMS: the files its index names), into a cache folder on the machine that
opens it: the slide's listing task, then once per machine whose workers read its tiles
(several processes of a machine share one copy; a copy is written under a temporary name
and renamed, so no process sees half a slide).

The download is refused above ``SEGPC_SLIDE_DOWNLOAD_GB`` (default 20 GB: a large MIRAX
slide is 2-6 GB; the limit keeps a wrong input from filling a node's disk); the cache keeps
about twice that, the least recently opened copies removed first. The cache lives under
``SEGPC_SLIDE_CACHE`` (default: ``segpc-slides`` in the system temp folder).
"""

from __future__ import annotations

import configparser
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

from segpc.errors import InputError
from segpc.io.storage import filesystem, with_retries

DEFAULT_LIMIT_GB = 20.0


def download_limit() -> int:
    """Bytes a slide (with its companion files) may take to be copied."""
    return int(float(os.environ.get("SEGPC_SLIDE_DOWNLOAD_GB", DEFAULT_LIMIT_GB)) * 1e9)


def cache_root() -> Path:
    return Path(os.environ.get("SEGPC_SLIDE_CACHE") or Path(tempfile.gettempdir()) / "segpc-slides")


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def slide_files(uri: str) -> dict[str, int]:
    """Every object the slide at ``uri`` is made of, with its size: the file itself and its
    companions (MIRAX: all files under the folder named like the file, without suffix;
    VMS: the files its index names)."""
    fs, path = filesystem(uri)
    try:
        files = {path: int(with_retries(f"checking {uri}", fs.info, path)["size"])}
    except FileNotFoundError:
        raise InputError(f"{uri}: no such slide") from None
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".mrxs":
        folder = path[: -len(suffix)]
        found = with_retries(f"listing {folder}", lambda: fs.find(folder, detail=True))
        if not found:
            raise InputError(f"{uri}: MIRAX slide without its data folder {PurePosixPath(folder).name}/ beside it")
        files.update({p: int(e["size"]) for p, e in found.items()})
    elif suffix == ".vms":
        for p in vms_parts(uri):
            try:
                files[p] = int(with_retries(f"checking {p}", fs.info, p)["size"])
            except FileNotFoundError:
                raise InputError(f"{uri}: names {PurePosixPath(p).name}, which is missing") from None
    return files


def vms_parts(uri: str) -> list[str]:
    """The files a Hamamatsu ``.vms`` index names (image pieces, map, optimisation file), as
    paths of its filesystem, beside it."""
    fs, path = filesystem(uri)
    index = configparser.ConfigParser(strict=False, interpolation=None)
    index.read_string(with_retries(f"reading {uri}", fs.cat_file, path).decode("utf-8", "replace"))
    parent = str(PurePosixPath(path).parent)
    return [f"{parent}/{name.strip()}" for section in index.sections() for key, name in index[section].items()
            if key.startswith(("imagefile", "mapfile", "optimisationfile")) and name.strip()]


def local_copy(uri: str) -> str:
    """A local path OpenSlide can open for the slide at ``uri``: the path itself when local,
    else the slide's copy in the cache (downloaded now unless this machine has it)."""
    if is_local(uri):
        return uri.removeprefix("file://")
    files = slide_files(uri)
    total, limit = sum(files.values()), download_limit()
    main = next(iter(files))
    if total > limit:
        raise InputError(f"{uri}: {total / 1e9:.1f} GB with its companion files; OpenSlide reads local files "
                         f"only, so this slide would be downloaded whole, and the limit is {limit / 1e9:g} GB "
                         "(SEGPC_SLIDE_DOWNLOAD_GB)")
    stamp = "|".join(f"{p}:{n}" for p, n in sorted(files.items()))
    root = cache_root()
    entry = root / hashlib.sha1(f"{uri}|{stamp}".encode()).hexdigest()[:20]
    parent = str(PurePosixPath(main).parent)
    target = entry / PurePosixPath(main).name
    if not target.exists():
        fs, _ = filesystem(uri)
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{entry.name}.part-", dir=root))
        try:
            for p in files:
                local = partial / p[len(parent) + 1:]
                local.parent.mkdir(parents=True, exist_ok=True)
                with_retries(f"downloading {p}", fs.get_file, p, str(local))
            try:
                partial.rename(entry)
            except OSError:  # another process of this machine finished first: use its copy
                pass
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        _evict(root, keep=entry, budget=2 * limit)
    os.utime(entry)  # recently opened: kept longest
    return str(target)


def _evict(root: Path, keep: Path, budget: int) -> None:
    """Remove the least recently opened copies while the cache holds more than ``budget``."""
    entries = [e for e in root.iterdir() if e.is_dir() and ".part-" not in e.name]
    sizes = {e: sum(f.stat().st_size for f in e.rglob("*") if f.is_file()) for e in entries}
    total = sum(sizes.values())
    for e in sorted(entries, key=lambda e: e.stat().st_mtime):
        if total <= budget:
            break
        if e != keep and time.time() - e.stat().st_mtime > 60:  # not one being opened right now
            shutil.rmtree(e, ignore_errors=True)
            total -= sizes[e]
