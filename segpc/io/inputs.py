"""The batch job's inputs: image files under a prefix (any depth), their ids and slides.

One rule for ids, stable as the archive grows: ``image_id`` is the file's path below the
input prefix without its suffix, folders joined by ``__`` (``S01/field 3.jpg`` ->
``S01__field_3-<hash>``), made safe for file and Zarr names (a short hash of the original
keeps altered names apart). It depends on nothing but the file's own path, so adding files
later never changes the id of an image already done. Files directly under the prefix keep
their stem (a SegPC ``x/`` folder: ``1605.bmp`` -> ``1605``, scorable against the truth).
Two files that differ only in their suffix (``a.png`` beside ``a.bmp``) each get the suffix
appended (``a-png``, ``a-bmp``). ``slide_id`` is the first folder below the prefix.

Listing is streamed: :func:`top_level` is one listing of the prefix, and each slide folder
is listed on its own by :func:`list_folder`, which the batch job runs as parallel tasks, so
the driver never holds one entry per image.
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
from segpc.io.storage import filesystem, with_retries

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_LENGTH = 120
ROOT_FILES = ""  # the folder name :func:`list_folder` takes for the prefix's own files
NO_SLIDE = "unknown"  # the slide of files directly under the prefix


@dataclass(frozen=True)
class InputImage:
    uri: str  # the image file, or "<shard>#<image_id>" for a row of a Parquet shard
    image_id: str
    slide_id: str


SHARD_ID_COLUMN, SHARD_SLIDE_COLUMN = "image_id", "slide_id"


def safe_id(relative: str) -> str:
    """A file-name-safe id for a relative path (suffix dropped, folders joined by ``__``);
    a short hash keeps altered names unique."""
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


def input_files(paths: list[str]) -> list[str]:
    """The files among ``paths`` the batch job takes: images, and whole slides by their
    scanner suffix (a pyramidal ``.tif`` is among the images until it is opened:
    :func:`segpc.wsi.slide.is_whole_slide`)."""
    from segpc.wsi.slide import SLIDE_SUFFIXES

    return [p for p in paths if p.lower().endswith(IMAGE_SUFFIXES + SLIDE_SUFFIXES)]


def folder_images(folder: str | Path) -> list[Path]:
    """The image files directly in a local folder, sorted by name."""
    folder = Path(folder)
    return [folder / n for n in image_files(sorted(p.name for p in folder.iterdir() if p.is_file()))]


def inputs_of(relatives: list[str], prefix: str) -> list[InputImage]:
    """Inputs for image paths relative to ``prefix``, by the id rule above."""
    base = prefix.rstrip("/")
    stems = Counter(r.rsplit(".", 1)[0] for r in relatives)
    out = []
    for rel in relatives:
        stem, _, suffix = rel.rpartition(".")
        image_id = safe_id(rel) if stems[stem] == 1 else safe_id(f"{stem}-{suffix.lower()}.x")
        out.append(InputImage(f"{base}/{rel}", image_id, rel.split("/", 1)[0] if "/" in rel else NO_SLIDE))
    return out


def top_level(prefix: str) -> tuple[list[str], list[str]]:
    """(slide folders, other files) directly under ``prefix``: one listing request."""
    fs, root = filesystem(prefix)
    try:
        if not with_retries(f"checking {prefix}", fs.exists, root):
            raise InputError(f"{prefix}: input not found")
        entries = with_retries(f"listing {prefix}", fs.ls, root, True)
    except InputError:
        raise
    except Exception as exc:  # network, credentials, bucket names
        raise InputError(f"{prefix}: cannot list the input ({type(exc).__name__}: {exc})") from None
    folders = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
    files = sorted(e["name"].rsplit("/", 1)[-1] for e in entries if e["type"] != "directory")
    return folders, files


def folder_files(prefix: str, folder: str) -> list[str]:
    """Every file of one slide folder below ``prefix`` (any depth), as sorted paths relative
    to the prefix; with ``folder == ROOT_FILES``, the files directly under the prefix."""
    fs, root = filesystem(prefix)
    root = root.rstrip("/")
    if folder == ROOT_FILES:
        names = [e["name"] for e in with_retries(f"listing {prefix}", fs.ls, root, True)
                 if e["type"] != "directory"]
    else:
        names = with_retries(f"listing {prefix}/{folder}", fs.find, f"{root}/{folder}")
    return sorted(p[len(root) + 1:] for p in names)


def parquet_files(relatives: list[str]) -> list[str]:
    return [r for r in relatives if r.lower().endswith(".parquet")]


def list_folder(prefix: str, folder: str) -> list[InputImage]:
    """The images of one slide folder below ``prefix`` (see :func:`folder_files`), in path order."""
    return inputs_of(image_files(folder_files(prefix, folder)), prefix)


def list_inputs(prefix: str, manifest: str | None = None) -> list[InputImage]:
    """Every image under ``prefix`` in path order, or the images a manifest names, in one
    list: for single-process tools and tests (the batch job streams the same listing)."""
    if manifest:
        return manifest_inputs(read_manifest(manifest), prefix)
    folders, files = top_level(prefix)
    items = list_folder(prefix, ROOT_FILES) if image_files(files) else []
    for folder in folders:
        items += list_folder(prefix, folder)
    if not items:
        raise InputError(f"{prefix}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return items


def manifest_inputs(rows: list[dict], prefix: str) -> list[InputImage]:
    """Inputs for manifest rows (``path``, ``slide_id``, optionally ``image_id``): relative
    paths are below ``prefix``; without an ``image_id`` column the id rule above applies to
    the path below the prefix (or the whole path for one outside it)."""
    base = prefix.rstrip("/") + "/"
    out = []
    for r in rows:
        path = str(r["path"])
        uri = path if "://" in path or path.startswith("/") else base + path
        rel = uri[len(base):] if uri.startswith(base) else uri.split("://", 1)[-1].lstrip("/")
        image_id = safe_id(str(r["image_id"]) + ".x") if r.get("image_id") else safe_id(rel)
        out.append(InputImage(uri, image_id, str(r["slide_id"])))
    return out


def read_manifest(uri: str) -> list[dict]:
    """The rows of a CSV or Parquet manifest (columns ``path``, ``slide_id``, optionally
    ``image_id``)."""
    fs, path = filesystem(uri)
    try:
        data = with_retries(f"reading {uri}", fs.cat_file, path)
    except FileNotFoundError:
        raise InputError(f"{uri}: manifest not found") from None
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data)).to_pylist()
    else:
        table = list(csv.DictReader(io.StringIO(data.decode())))
    check_manifest_columns(uri, list(table[0]) if table else [])
    return table


def manifest_columns(uri: str) -> list[str]:
    """A manifest's column names, from its header (CSV) or schema (Parquet) alone."""
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            if path.endswith(".parquet"):
                import pyarrow.parquet as pq

                return pq.read_schema(f).names
            return next(csv.reader([f.readline().decode()]), [])
    except FileNotFoundError:
        raise InputError(f"{uri}: manifest not found") from None


def check_manifest_columns(uri: str, names: list[str]) -> None:
    if not {"path", "slide_id"} <= set(names):
        raise InputError(f"{uri}: manifest needs the columns path, slide_id")


def shard_inputs(ids: list, slides: list | None, shard: str, prefix: str) -> list[InputImage]:
    """Inputs for the rows of one Parquet shard that holds image bytes in a column: ids
    from its ``image_id`` column, slides from its ``slide_id`` column or else the shard's
    first folder below the prefix."""
    base = prefix.rstrip("/") + "/"
    rel = shard[len(base):] if shard.startswith(base) else shard.rsplit("/", 1)[-1]
    folder_slide = rel.split("/", 1)[0] if "/" in rel else NO_SLIDE
    return [InputImage(f"{shard}#{raw}", safe_id(str(raw) + ".x"),
                       str(slides[i]) if slides is not None else folder_slide)
            for i, raw in enumerate(ids)]
