"""A whole slide's cells as one QuPath GeoJSON file: ``geojson/<slide image_id>.geojson``.

Coordinates are the scan's LEVEL-0 pixels (what QuPath shows when it opens the slide
file): a cell's outline traced in the analysis view (:mod:`segpc.io.geojson`, pixel
edges), moved to its tile's core and scaled by ``to_level0``. Feature ids are fixed by the
slide and the cell's slide-wide ``cell_id``; ``properties.tile`` names the tile row.

Each tile writes its cells as a part, ``geojson/_parts/<slide>/<tile image_id>.jsonl``
(one Feature per line), beside its other outputs; after the job, :func:`merge_slide_geojson`
streams the slide's file: the features of the file there before, minus those of tiles that
have a new part (a resumed run's redone tiles), then every part, one Feature per line. Then
the parts are deleted. Nothing holds more than one line or one part in memory (a slide may
have 100k cells), and an interruption anywhere leaves a state the next merge completes: the
file is replaced whole (local: temporary name then rename; S3: the multipart upload is
committed on close), and parts go only after it.
"""

from __future__ import annotations

import json
import uuid

from fsspec.implementations.local import LocalFileSystem

from segpc.io.geojson import cell_feature
from segpc.io.storage import filesystem, join, with_retries
from segpc.method.results import ImageResult

HEAD, TAIL = '{"type":"FeatureCollection","features":[', "]}"
PARTS = "geojson/_parts"


def part_path(slide_image_id: str, tile_image_id: str) -> str:
    """A tile's part, relative to the output."""
    return f"{PARTS}/{slide_image_id}/{tile_image_id}.jsonl"


def slide_path(slide_image_id: str) -> str:
    return f"geojson/{slide_image_id}.geojson"


def tile_part(result: ImageResult, tile_image_id: str, slide_image_id: str, origin: tuple[int, int],
              to_level0: float, mpp: float | None) -> bytes:
    """A tile's Features (cells in its core's coordinates, ``origin`` the core's top-left in
    the analysis view), one per line, in level-0 pixels."""
    lines = []
    for c in result.cells:
        f = cell_feature(c, slide_image_id, mpp, origin, to_level0)
        if f is not None:
            f["properties"]["tile"] = tile_image_id
            lines.append(json.dumps(f, separators=(",", ":")))
    return "".join(f"{ln}\n" for ln in lines).encode()


def _features(lines, drop: set[str]):
    """The Feature lines of a file this module wrote, minus those of tiles in ``drop``."""
    for raw in lines:
        line = (raw.decode() if isinstance(raw, bytes) else raw).strip().rstrip(",")
        if line.startswith('{"type":"Feature"') and json.loads(line)["properties"].get("tile") not in drop:
            yield line


def merge_slide_geojson(output: str, slide_image_id: str) -> int | None:
    """(Re)write the slide's file from the file before and the tiles' parts; delete the
    parts. Returns the features written, None when there was nothing to merge."""
    fs, root = filesystem(output)
    folder, path = join(root, PARTS, slide_image_id), join(root, slide_path(slide_image_id))

    def listing() -> list[str]:
        fs.invalidate_cache(folder)
        return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".jsonl")) if fs.exists(folder) else []

    parts = with_retries(f"listing {folder}", listing)
    exists = with_retries(f"checking {path}", fs.exists, path)
    if not parts and exists:
        return None
    redone = {p.rsplit("/", 1)[-1].removesuffix(".jsonl") for p in parts}

    def write() -> int:
        target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if isinstance(fs, LocalFileSystem) else path
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        n = 0
        with fs.open(target, "wb") as out:
            out.write(HEAD.encode())

            def put(line: str) -> None:
                nonlocal n
                out.write(((",\n" if n else "\n") + line).encode())
                n += 1

            if exists:
                with fs.open(path, "rb") as old:
                    for line in _features(old, redone):
                        put(line)
            for p in parts:
                for line in fs.cat_file(p).decode().splitlines():
                    if line.strip():
                        put(line.strip())
            out.write(f"\n{TAIL}\n".encode())
        if target != path:
            fs.mv(target, path)
        return n

    n = with_retries(f"writing {path}", write)
    for p in parts:
        with_retries(f"removing {p}", fs.rm, p)
    return n
