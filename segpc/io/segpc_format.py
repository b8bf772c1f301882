"""The SegPC-2021 layout (``x/<id>.bmp``, ``y/<id>_<k>.bmp``) and ``submission.txt``.

Reading is tolerant of the real data's quirks (METHOD.md 1: one extra nesting level,
3-channel masks, values near 20/40, gaps in ``k``, images without masks) and strict about
what would silently corrupt a score (a mask whose size differs from its image).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segpc.errors import InputError
from segpc.io.imaging import IMAGE_SUFFIXES, decode_image, image_size
from segpc.io.inputs import folder_images
from segpc.method.instances import GRID, Instance, to_grid
_HEADER_BYTES = 1 << 20  # enough for any image header; the full file is read only if not


@dataclass
class Sample:
    """One image of a split, with its labelled cells (sorted by ``k``; [] on the test split)."""

    image_id: str
    image_path: Path
    instances: list[Instance]
    image: np.ndarray | None = None  # RGB uint8, only with ``read_split(..., with_images=True)``


# --------------------------------------------------------------------------- layout


def _subdirs_with(base: Path, name: str) -> list[Path]:
    if not base.is_dir():
        return []
    return sorted(c / name for c in base.iterdir() if c.is_dir() and (c / name).is_dir())


def find_split(root: str | Path) -> tuple[Path, Path | None]:
    """(x_dir, y_dir or None) of a split root, looking at most one folder deeper.

    Real copies nest a level deeper (``validation/validation/y``), sometimes only for
    ``y``, so x and y are searched independently: ``root/x`` then ``root/*/x``; ``y`` next to
    x, then ``root/y``, then one level below either.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: split root does not exist or is not a folder")
    if (root / "x").is_dir():
        x_dir = root / "x"
    else:
        found = _subdirs_with(root, "x")
        if not found:
            raise InputError(f"{root}: no x/ image folder (looked for {root}/x and {root}/*/x)")
        if len(found) > 1:
            raise InputError(f"{root}: ambiguous split root, several x/ folders: "
                             + ", ".join(map(str, found)))
        x_dir = found[0]
    bases = list(dict.fromkeys([x_dir.parent, root]))
    for base in bases:
        if (base / "y").is_dir():
            return x_dir, base / "y"
    found = list(dict.fromkeys(p for base in bases for p in _subdirs_with(base, "y")))
    if len(found) > 1:
        raise InputError(f"{root}: ambiguous split root, several y/ folders: "
                         + ", ".join(map(str, found)))
    return x_dir, (found[0] if found else None)


def _index_images(x_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for p in folder_images(x_dir):
        if p.stem in index:
            raise InputError(f"{x_dir}: image id {p.stem!r} twice ({index[p.stem].name}, {p.name})")
        index[p.stem] = p
    return index


def _parse_mask_name(p: Path) -> tuple[str, int] | None:
    """``<id>_<k>.<suffix>`` split at the LAST underscore, so ids may contain '_' and '-'."""
    image_id, sep, k = p.stem.rpartition("_")
    if not sep or not image_id or not k.isdigit():
        return None
    return image_id, int(k)


def index_masks(y_dir: str | Path) -> dict[str, dict[int, Path]]:
    """{image_id: {k: path}} of every ``<id>_<k>.<image suffix>`` in a folder (one listing).

    Image files that do not follow the pattern are skipped with a warning, not guessed at.
    """
    y_dir = Path(y_dir)
    if not y_dir.is_dir():
        raise InputError(f"{y_dir}: mask folder does not exist or is not a folder")
    index: dict[str, dict[int, Path]] = {}
    skipped = []
    for p in folder_images(y_dir):
        parsed = _parse_mask_name(p)
        if parsed is None:
            skipped.append(p.name)
            continue
        image_id, k = parsed
        by_k = index.setdefault(image_id, {})
        if k in by_k:
            raise InputError(f"{y_dir}: mask {image_id}_{k} twice ({by_k[k].name}, {p.name})")
        by_k[k] = p
    if skipped:
        warnings.warn(f"{y_dir}: skipped {len(skipped)} file(s) not named <id>_<k>: "
                      + ", ".join(skipped[:5]), stacklevel=2)
    return {i: dict(sorted(by_k.items())) for i, by_k in index.items()}


def list_image_ids(root: str | Path) -> list[str]:
    """Sorted ids of the images in a split's x/ folder; an empty x/ is an error."""
    x_dir, _ = find_split(root)
    ids = sorted(_index_images(x_dir))
    if not ids:
        raise InputError(f"{x_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return ids


def mask_paths(y_dir: str | Path, image_id: str) -> dict[int, Path]:
    """{k: path} of one image's masks (k may have gaps); {} if it has none."""
    return index_masks(y_dir).get(image_id, {})


# --------------------------------------------------------------------------- masks


def _read_mask(p: Path) -> np.ndarray:
    try:
        data = np.fromfile(p, np.uint8)  # np.fromfile + imdecode also copes with non-ASCII paths
    except OSError as exc:
        raise InputError(f"{p}: cannot read mask ({exc.strerror})") from None
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if arr is None:
        raise InputError(f"{p}: not a readable mask image (empty, truncated or corrupt)")
    return arr


def read_mask_files(paths: Mapping[int, Path], shape: tuple[int, int] | None = None) -> list[Instance]:
    """Decode ``{k: path}`` into instances sorted by k, checking each mask is H x W == ``shape``."""
    out = []
    for k, p in sorted(paths.items()):
        arr = _read_mask(p)
        if shape is not None and tuple(arr.shape[:2]) != tuple(shape):
            raise InputError(f"{p}: mask is {arr.shape[0]}x{arr.shape[1]} (HxW) but its image is "
                             f"{shape[0]}x{shape[1]}")
        out.append(Instance.from_segpc_mask(arr, k=k, name=str(p)))
    return out


def read_masks(y_dir: str | Path, image_id: str, shape: tuple[int, int] | None = None) -> list[Instance]:
    """One image's labelled cells, sorted by k; [] when it has no masks."""
    return read_mask_files(mask_paths(y_dir, image_id), shape)


def _image_shape(p: Path) -> tuple[int, int]:
    """(H, W) from the header: a prefix of the file, the whole file only if that fails."""
    try:
        with open(p, "rb") as f:
            head = f.read(_HEADER_BYTES)
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        w, h = image_size(head, str(p))
    except InputError:
        w, h = image_size(p.read_bytes(), str(p))
    return h, w


def read_split(root: str | Path, with_images: bool = False) -> Iterator[Sample]:
    """Every image of a split in id order, with its cells; lazily, so memory stays flat.

    Mask sizes are checked against the image size (from the header unless ``with_images``).
    Masks whose id has no image are reported in one warning.
    """
    x_dir, y_dir = find_split(root)
    images = _index_images(x_dir)
    if not images:
        raise InputError(f"{x_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    masks = index_masks(y_dir) if y_dir is not None else {}
    orphans = sorted(set(masks) - set(images))
    if orphans:
        warnings.warn(f"{y_dir}: masks for {len(orphans)} id(s) with no image in {x_dir}: "
                      + ", ".join(orphans[:5]), stacklevel=2)
    for image_id in sorted(images):
        p = images[image_id]
        image = decode_image(p.read_bytes(), str(p)) if with_images else None
        shape = image.shape[:2] if image is not None else _image_shape(p)
        yield Sample(image_id, p, read_mask_files(masks.get(image_id, {}), shape), image)


def write_masks(out_dir: str | Path, image_id: str, instances: list[Instance]) -> list[Path]:
    """Write ``<id>_<k>.bmp`` (40/20/0) per instance; returns the paths.

    k is the instance's own ``k`` when all are > 0 and unique, else 1..n in list order.
    Instances with an empty cell are skipped (warning): such a file would be a truth cell
    no prediction can match. Masks of an earlier run with other k are not removed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ks = [inst.k for inst in instances]
    if not (all(k > 0 for k in ks) and len(set(ks)) == len(ks)):
        ks = list(range(1, len(instances) + 1))
    paths, empty = [], []
    for k, inst in zip(ks, instances):
        if not inst.cell.any():
            empty.append(k)
            continue
        p = out / f"{image_id}_{k}.bmp"
        ok, buf = cv2.imencode(".bmp", inst.to_segpc_mask())
        if not ok:
            raise InputError(f"{p}: cannot encode mask")
        try:
            p.write_bytes(buf.tobytes())
        except OSError as exc:
            raise InputError(f"{p}: cannot write ({exc.strerror})") from None
        paths.append(p)
    if empty:
        warnings.warn(f"image {image_id}: skipped empty instance(s) k={empty}", stacklevel=2)
    return paths


# --------------------------------------------------------------------------- submission.txt


_NUM = [str(i) for i in range(max(GRID))]


def _rc_list(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)  # row-major, like the official writer's np.where
    return ";".join([_NUM[r] + "," + _NUM[c] for r, c in zip(rows.tolist(), cols.tolist())])


def _nearest_pixel(mask: np.ndarray, rc: tuple[float, float]) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    i = int(np.argmin((rows - rc[0]) ** 2 + (cols - rc[1]) ** 2))
    return int(rows[i]), int(cols[i])


def _grid_parts(inst: Instance) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(nucleus, cytoplasm, fix note) at the grid, neither empty; None if the cell vanished."""
    nucleus, cytoplasm = to_grid(inst.nucleus), to_grid(inst.cytoplasm)
    if not nucleus.any() and not cytoplasm.any():
        return None
    if nucleus.any() and cytoplasm.any():
        return nucleus, cytoplasm, ""
    if not nucleus.any():  # borrow the cytoplasm pixel nearest where the nucleus was
        target = (0.0, 0.0)
        if inst.nucleus.any():
            rr, cc = np.nonzero(inst.nucleus)
            sr, sc = GRID[0] / inst.nucleus.shape[0], GRID[1] / inst.nucleus.shape[1]
            target = (rr.mean() * sr, cc.mean() * sc)
        nucleus = np.zeros(GRID, bool)
        nucleus[_nearest_pixel(cytoplasm, target)] = True
        return nucleus, cytoplasm, "nucleus"
    rows, cols = np.nonzero(nucleus)  # the last pixel in row-major order is on the boundary
    cytoplasm = np.zeros(GRID, bool)
    cytoplasm[rows[-1], cols[-1]] = True
    return nucleus, cytoplasm, "cytoplasm"


def named_by_source(pred_dir: str | Path, sources: Mapping[str, str], dest: str | Path) -> Path:
    """Copies of the batch job's ``<image_id>_<k>.bmp`` masks named by their source file's
    stem (``sources``: image_id -> source URI), the names a SegPC truth folder uses. The
    job's ids carry the slide folder (``S01/0003.bmp`` -> ``S01__0003``); a flat input, such
    as the challenge's ``x/``, needs no renaming."""
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for p in Path(pred_dir).glob("*.bmp"):
        image_id, k = p.stem.rsplit("_", 1)
        stem = sources[image_id].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        shutil.copy(p, dest / f"{stem}_{k}.bmp")
    return dest


def write_submission(path: str | Path,
                     predictions: Mapping[str, list[Instance]] | Iterable[tuple[str, list[Instance]]]
                     ) -> None:
    """Write the challenge's ``submission.txt`` (METHOD.md 2).

    Format, as the official scorer reads it: "a line per image: ``<id>\\t<inst>\\t<inst>...``,
    each instance ``"<nucleus r,c;r,c;...> <cytoplasm r,c;...>"`` in the 1080x1440 grid".
    Nucleus and cytoplasm are each resized with nearest-neighbour to 1080x1440 (H x W) and
    listed as (row, col) pairs in row-major order; lines are joined by '\\n' with no trailing
    newline, as the official writer does. An image with no instances gets a line with just
    its id (its cells then score 0 instead of the image being missing: same score, explicit).

    Empty lists: "the official scorer crashes (and scores the whole image 0) on an instance
    whose nucleus or cytoplasm list is empty", which happens when a cell has no cytoplasm or
    its nucleus vanishes in the downscale. Dropping such an instance would lose a cell, so
    instead the empty part borrows ONE pixel of the other part, listed in both lists: the
    scorer only uses their union (the cell), so the scored mask is exactly unchanged. The
    borrowed pixel is the cytoplasm pixel nearest the nucleus centroid (empty nucleus) or the
    last nucleus pixel in row-major order, a boundary pixel (empty cytoplasm). Only a cell
    that vanishes entirely at 1080x1440 is dropped; it could not overlap anything there.
    Both are reported in one warning naming the image ids and k.

    Checked against the organisers' scorer script (a copy: AIVIS-inc/SegPC,
    ``getSubmissionScore.py``): it writes ``np.where`` pairs of the INTER_NEAREST-resized
    ``mask == 40`` / ``mask == 20``, splits instances on '\\t', parts on ' ', pairs on ';'
    and ',', and sets every listed pixel of both parts True, so a pixel in both is harmless.
    Note that script takes the id as the text before the FIRST '_' of a mask file name, so
    ids containing '_' only work with this module's reader (last '_'), not with that script.

    ``predictions``: a mapping (written in sorted id order) or an iterable of (id, instances)
    pairs (written as given, so a generator keeps memory flat).
    """
    items = sorted(predictions.items()) if isinstance(predictions, Mapping) else predictions
    fixed: list[str] = []
    dropped: list[str] = []
    lines: list[str] = []
    for image_id, instances in items:
        if not image_id or any(ch in image_id for ch in "\t\n\r"):
            raise InputError(f"image id {image_id!r}: empty or has a tab/newline, which would "
                             "break submission.txt")
        fields = [image_id]
        for j, inst in enumerate(instances, 1):
            k = inst.k or j
            parts = _grid_parts(inst)
            if parts is None:
                dropped.append(f"{image_id} k={k}")
                continue
            nucleus, cytoplasm, note = parts
            if note:
                fixed.append(f"{image_id} k={k} ({note})")
            fields.append(_rc_list(nucleus) + " " + _rc_list(cytoplasm))
        lines.append("\t".join(fields))
    if fixed:
        warnings.warn(f"submission: {len(fixed)} instance(s) had an empty nucleus or cytoplasm at "
                      "1080x1440; one pixel of the other part was listed in it (score unchanged): "
                      + ", ".join(fixed[:10]), stacklevel=2)
    if dropped:
        warnings.warn(f"submission: dropped {len(dropped)} instance(s) with no pixel at 1080x1440: "
                      + ", ".join(dropped[:10]), stacklevel=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


def _parse_rc(field: str, where: str) -> np.ndarray:
    if not field:
        return np.zeros((0, 2), np.int64)
    try:
        return np.array(field.replace(";", ",").split(","), np.int64).reshape(-1, 2)
    except ValueError:
        raise InputError(f"{where}: not a list of 'row,col' pairs separated by ';'") from None


def read_submission(path: str | Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """{id: [(nucleus_rc (N,2), cytoplasm_rc (M,2)), ...]} of a ``submission.txt``.

    Blank lines are ignored; a repeated id keeps its last line, as the official scorer does
    (with a warning). Malformed instances raise InputError naming line and instance.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        image_id, *insts = line.split("\t")
        if image_id in out:
            warnings.warn(f"{path}:{n}: image {image_id} listed again; the last line counts",
                          stacklevel=2)
        parsed = []
        for j, inst in enumerate(insts, 1):
            fields = inst.split(" ")
            where = f"{path}:{n}: image {image_id}, instance {j}"
            if len(fields) != 2:
                raise InputError(f"{where}: expected '<nucleus> <cytoplasm>', got {len(fields)} field(s)")
            parsed.append((_parse_rc(fields[0], where), _parse_rc(fields[1], where)))
        out[image_id] = parsed
    return out


def submission_from_folder(pred_dir: str | Path, path: str | Path,
                           image_ids: Iterable[str] | None = None) -> None:
    """``submission.txt`` from a folder of ``<id>_<k>.bmp`` masks, one image at a time.

    ``image_ids`` (e.g. ``list_image_ids(test_root)``) adds a line for images with no
    predicted cell; by default only ids that have masks are written.
    """
    index = index_masks(pred_dir)
    ids = sorted(set(index) | set(image_ids or ()))
    write_submission(path, ((i, read_mask_files(index.get(i, {}))) for i in ids))


# --------------------------------------------------------------------------- scoring folders


def _is_split_root(d: Path) -> bool:
    return (d / "x").is_dir() or any((c / "x").is_dir() for c in d.iterdir() if c.is_dir())


def _truth_cells(truth_dir: Path):
    """(image_id, cells) per truth image: a split's x/ decides the image set when given."""
    if _is_split_root(truth_dir):
        if find_split(truth_dir)[1] is None:
            raise InputError(f"{truth_dir}: split has no y/ masks (a test split cannot be scored)")
        for s in read_split(truth_dir):
            yield s.image_id, [inst.cell for inst in s.instances]
        return
    index = index_masks(truth_dir)
    if not index:
        raise InputError(f"{truth_dir}: no <id>_<k> mask files and no x/ folder of a SegPC split")
    for image_id in sorted(index):
        yield image_id, [inst.cell for inst in read_mask_files(index[image_id])]


def evaluate_folders(truth_dir: str | Path, pred_dir: str | Path, iou_threshold: float = 0.5) -> dict:
    """``evaluate`` on folders of ``<id>_<k>.bmp`` masks, one image in memory at a time.

    ``truth_dir`` is a SegPC split root (every image of x/ counts, masks or not) or a plain
    mask folder (only ids with masks exist). Predictions for ids outside the truth are left
    out of the score and counted in ``n_pred_unknown_images`` (with a warning): they usually
    mean the wrong folder, and a plain truth folder cannot say which images have no cells.
    """
    from segpc.evaluation.metrics import image_ious, summarize

    truth_dir, pred_dir = Path(truth_dir), Path(pred_dir)
    for name, d in (("truth", truth_dir), ("prediction", pred_dir)):
        if not d.is_dir():
            raise InputError(f"{d}: {name} folder does not exist or is not a folder")
    pred_index = index_masks(pred_dir)
    ious: dict[str, np.ndarray] = {}
    for image_id, cells in _truth_cells(truth_dir):
        preds = [inst.cell for inst in read_mask_files(pred_index.get(image_id, {}))]
        ious[image_id] = image_ious(cells, preds)
    if not sum(m.shape[0] for m in ious.values()):
        raise InputError(f"{truth_dir}: no truth cells; the official metric is undefined")
    unknown = sorted(set(pred_index) - set(ious))
    if unknown:
        warnings.warn(f"{pred_dir}: {len(unknown)} predicted image id(s) not in {truth_dir}, "
                      "left out of the score: " + ", ".join(unknown[:5]), stacklevel=2)
    return {**summarize(ious, iou_threshold), "n_pred_unknown_images": len(unknown)}
