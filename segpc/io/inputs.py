"""The batch job's inputs: image files under a prefix (any depth) and their ids and slides.

``slide_id`` is the first folder below the prefix (or comes from a manifest). ``image_id``
is the file name without suffix (so SegPC ids such as ``1605`` survive and outputs score
against the SegPC truth), made safe for file and Zarr-group names; where two files share a
name (``img1.bmp`` in two slides) their ids are built from the whole relative path instead,
so ids are unique within the run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from segpc.errors import InputError
from segpc.io.imaging import IMAGE_SUFFIXES
from segpc.io.storage import filesystem

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_LENGTH = 120


@dataclass(frozen=True)
class InputImage:
    uri: str  # the image file, or "<shard>#<image_id>" for a row of a Parquet shard
    image_id: str
    slide_id: str
    shard: str = ""  # the Parquet shard holding the image bytes, if any


SHARD_ID_COLUMN, SHARD_SLIDE_COLUMN = "image_id", "slide_id"


def safe_id(relative: str) -> str:
    """A file-name-safe id for a relative path; a short hash keeps altered names unique."""
    stem = relative.rsplit(".", 1)[0] if "." in relative.rsplit("/", 1)[-1] else relative
    safe = _UNSAFE.sub("_", stem.replace("/", "__")).strip("._") or "image"
    if safe != stem.replace("/", "__") or len(safe) > MAX_ID_LENGTH:
        digest = hashlib.sha1(relative.encode()).hexdigest()[:8]
        safe = f"{safe[:MAX_ID_LENGTH - 9]}-{digest}"
    return safe


def image_files(paths: list[str]) -> list[str]:
    """The image files among ``paths`` (by suffix, any case), in the given order: the one
    rule every command uses to decide what counts as an input image."""
    return [p for p in paths if p.lower().endswith(IMAGE_SUFFIXES)]


def folder_images(folder: str | Path) -> list[Path]:
    """The image files directly in a local folder, sorted by name."""
    folder = Path(folder)
    return [folder / n for n in image_files(sorted(p.name for p in folder.iterdir() if p.is_file()))]


def list_inputs(prefix: str, manifest: str | None = None) -> list[InputImage]:
    """Every image under ``prefix`` in path order, or the images a manifest names."""
    fs, root = filesystem(prefix)
    try:
        if manifest:
            rows = _read_manifest(manifest)
            paths = [(r[0] if "://" in r[0] or r[0].startswith("/") else f"{prefix.rstrip('/')}/{r[0]}", r[1])
                     for r in rows]
            return _unique([(u, _relative(u, prefix), s) for u, s in paths])
        if not fs.exists(root):
            raise InputError(f"{prefix}: input not found")
        everything = sorted(fs.find(root))
        found = image_files(everything)
        shards = [p for p in everything if p.lower().endswith(".parquet")]
        if shards and not found:
            return _shard_inputs(fs, root, prefix, shards)
    except InputError:
        raise
    except Exception as exc:  # network, credentials, bucket names
        raise InputError(f"{prefix}: cannot list the input ({type(exc).__name__}: {exc})") from None
    if not found:
        raise InputError(f"{prefix}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    scheme = prefix.split("://", 1)[0] + "://" if "://" in prefix else ""
    items = []
    for p in found:
        rel = p[len(root.rstrip("/")) + 1:]
        items.append((scheme + p, rel, rel.split("/", 1)[0] if "/" in rel else "unknown"))
    return _unique(items)


def _shard_inputs(fs, root: str, prefix: str, shards: list[str]) -> list[InputImage]:
    """One input per row of Parquet shards that hold the image bytes in a column.

    Each shard needs an ``image_id`` column (unique over the run); ``slide_id`` comes from
    its own column or else from the shard's first folder below the prefix. Only these two
    small columns are read here; the bytes are read by the pipeline.
    """
    import pyarrow.parquet as pq

    scheme = prefix.split("://", 1)[0] + "://" if "://" in prefix else ""
    items, seen = [], set()
    for path in shards:
        with fs.open(path, "rb") as f:
            names = pq.read_schema(f).names
            if SHARD_ID_COLUMN not in names:
                raise InputError(f"{scheme}{path}: shard has no '{SHARD_ID_COLUMN}' column")
            cols = [c for c in (SHARD_ID_COLUMN, SHARD_SLIDE_COLUMN) if c in names]
            f.seek(0)
            table = pq.read_table(f, columns=cols).to_pydict()
        rel = path[len(root.rstrip("/")) + 1:]
        folder_slide = rel.split("/", 1)[0] if "/" in rel else "unknown"
        slides = table.get(SHARD_SLIDE_COLUMN) or [folder_slide] * len(table[SHARD_ID_COLUMN])
        for raw, slide in zip(table[SHARD_ID_COLUMN], slides):
            image_id = safe_id(str(raw))
            if image_id in seen:
                raise InputError(f"{scheme}{path}: image_id {raw!r} occurs twice in the shards")
            seen.add(image_id)
            items.append(InputImage(f"{scheme}{path}#{raw}", image_id, str(slide), scheme + path))
    if not items:
        raise InputError(f"{prefix}: the Parquet shards hold no rows")
    return items


def _relative(uri: str, prefix: str) -> str:
    p = prefix.rstrip("/") + "/"
    return uri[len(p):] if uri.startswith(p) else uri.rsplit("/", 1)[-1]


def _unique(items: list[tuple[str, str, str]]) -> list[InputImage]:
    """(uri, relative path, slide) -> inputs whose ids are the file stems where those are
    unique, else the relative paths; a numeric suffix settles what is still equal."""
    stems = [safe_id(rel.rsplit("/", 1)[-1]) for _, rel, _ in items]
    clash = {s for s, n in Counter(stems).items() if n > 1}  # linear: archives hold 100k+ files
    seen: dict[str, int] = {}
    out = []
    for (uri, rel, slide), stem in zip(items, stems):
        image_id = safe_id(rel) if stem in clash else stem
        n = seen.get(image_id, 0)
        seen[image_id] = n + 1
        out.append(InputImage(uri, image_id if n == 0 else f"{image_id}-{n}", slide))
    return out


def _read_manifest(uri: str) -> list[tuple[str, str]]:
    """(path, slide_id) rows of a CSV or Parquet manifest."""
    fs, path = filesystem(uri)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise InputError(f"{uri}: manifest not found") from None
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data)).to_pylist()
    else:
        table = list(csv.DictReader(io.StringIO(data.decode())))
    if not table or not {"path", "slide_id"} <= set(table[0]):
        raise InputError(f"{uri}: manifest needs the columns path, slide_id")
    return [(str(r["path"]), str(r["slide_id"])) for r in table]
