"""The analysts' report: one self-contained HTML page and its PNG figures.

Built from a batch job's ``images/``, ``cells/``, ``slides.parquet`` and ``run.json``:
per-slide plasma-cell counts, cells per image, cell and nucleus areas (in µm² too when the
run knew the pixel size, ``--mpp``), the images that failed and why, a per-image table that
sorts on a header click (at most MAX_IMAGE_ROWS rows: the page stays small for an archive
of a million images), and a gallery of QC overlays (outlines and cell ids drawn on the
images), the images with the most cells first. Whole slides: the per-slide table adds the
tiles analysed of the grid, the analysed share and area and plasma cells per mm²; the
gallery shows tiles (their cores, read from the slide with the slide's label pyramid on
them): each slide's tile with the most cells, then the most cells overall. It needs no server and loads nothing from
elsewhere: open ``report/index.html`` from the output folder (or a copy of it).
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from segpc.errors import InputError  # noqa: E402
from segpc.io.imaging import decode_image, encode_png  # noqa: E402
from segpc.io.outputs import read_label_masks, read_table  # noqa: E402
from segpc.io.overlay import draw_overlay  # noqa: E402
from segpc.io.run_record import read_run_record  # noqa: E402
from segpc.io.storage import filesystem, join, read_bytes  # noqa: E402

BLUE, PURPLE = "#3b6fb6", "#7b3f9e"
CELL_SAMPLE_PARTS = 200  # cells/ parts read for the area histogram, spread over the run
MAX_ERROR_ROWS = 200  # failed images listed on the page (all of them are in images/)
MAX_IMAGE_ROWS = 500  # rows of the per-image table (all of them are in images/)
# a picture that fails to load says so in the browser console (and in the report test)
_ONERROR = "onerror=\"console.error('missing picture: ' + this.src)\""


@dataclass
class ReportData:
    images: pd.DataFrame
    cells: pd.DataFrame
    slides: pd.DataFrame
    mpp: float | None = None  # micrometres per pixel (run.json's ``mpp``), when the run knew it


def load(output: str) -> ReportData:
    fs, root = filesystem(output)
    try:
        with fs.open(join(root, "slides.parquet"), "rb") as f:
            slides = pd.read_parquet(f)
    except FileNotFoundError:
        raise InputError(f"{output}: not a batch-job output (no slides.parquet)") from None
    images = read_table(output, "images", ["image_id", "slide_id", "source_uri", "status", "error",
                                           "n_cells", "n_nuclei", "kind"]).to_pandas()
    # the area histogram needs a sample, not every cell of the archive
    cells = read_table(output, "cells", ["image_id", "slide_id", "cell_id", "cell_area", "nucleus_area",
                                         "ratio", "scale"], max_parts=CELL_SAMPLE_PARTS).to_pandas()
    record = read_run_record(output) or {}
    return ReportData(images, cells, slides, record.get("mpp"))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def figures(data: ReportData) -> dict[str, bytes]:
    """name -> PNG bytes of every chart."""
    out = {}
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(data.slides) + 2), 3.2))
    bars = ax.bar(data.slides.slide_id.astype(str), data.slides.plasma_cells, color=BLUE)
    ax.bar_label(bars)
    ax.set(title="Plasma cells per slide", xlabel="slide", ylabel="plasma cells")
    ax.tick_params(axis="x", rotation=45 if len(data.slides) > 8 else 0)
    out["counts.png"] = _png(fig)

    ok = data.images[data.images.status == "ok"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    top = int(ok.n_cells.max()) if len(ok) else 0
    ax.hist(ok.n_cells, bins=np.arange(-0.5, top + 1.5, 1), color=BLUE, edgecolor="white")
    ax.set(title="Plasma cells per image", xlabel="cells in the image", ylabel="images")
    out["cells_per_image.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    unit = data.mpp ** 2 if data.mpp else 1.0  # µm² per pixel, or pixels
    if len(data.cells):
        cell, nucleus = data.cells.cell_area * unit, data.cells.nucleus_area * unit
        hi = float(np.percentile(cell, 99))
        bins = np.linspace(0, hi if hi > 0 else 1, 30)
        ax.hist(cell.clip(upper=hi), bins=bins, alpha=0.7, color=BLUE, label="cell")
        ax.hist(nucleus.clip(upper=hi), bins=bins, alpha=0.7, color=PURPLE, label="nucleus")
        ax.legend()
    ax.set(title="Cell and nucleus areas", xlabel="area (µm²)" if data.mpp else "area (pixels)", ylabel="cells")
    out["areas.png"] = _png(fig)
    return out


def gallery_rows(data: ReportData, limit: int = 12) -> pd.DataFrame:
    """The gallery's images, in its order: each whole slide's tile with the most cells, then
    the most cells first (then by id). A slide's own row and glass tiles have no picture."""
    kind = data.images["kind"] if "kind" in data.images else pd.Series(None, index=data.images.index)
    ok = data.images[(data.images.status == "ok") & ~kind.isin(["slide", "glass"])]
    ranked = ok.sort_values(["n_cells", "image_id"], ascending=[False, True])
    tiles = ranked[kind.loc[ranked.index] == "tile"]
    best = tiles.drop_duplicates("slide_id").index
    order = list(best) + [i for i in ranked.index if i not in set(best)]
    return ranked.loc[order].head(limit)


def _tile_picture(output: str, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tile's core from its slide (the view the tiles were cut from) and the slide's label
    pyramid there: the tile's grid position is in its id, the grid in the pyramid's metadata."""
    from segpc.io.slide_masks import read_slide_meta
    from segpc.wsi.job import TILE_MARK, slide_of
    from segpc.wsi.resolution import SlideView
    from segpc.wsi.slide import open_slide

    slide = slide_of(image_id)
    m = read_slide_meta(output, slide)
    if m is None:
        raise InputError(f"masks.zarr/{slide} holds no slide label pyramid")
    row, col = (int(v) for v in image_id.rsplit(TILE_MARK, 1)[1].split("-"))
    (gh, gw), (h, w) = m.grid_core, m.shape
    core = (row * gh, col * gw, min((row + 1) * gh, h), min((col + 1) * gw, w))
    with open_slide(m.uri) as s:
        image = SlideView(s, m.level, m.factor, m.mpp).read(core)
    return (image, *read_label_masks(output, slide, box=core))


def gallery(output: str, data: ReportData, limit: int = 12) -> dict[str, bytes]:
    """QC overlays for up to ``limit`` images in :func:`gallery_rows`' order (the dict's):
    image + label masks."""
    out = {}
    for row in gallery_rows(data, limit).itertuples():
        if getattr(row, "kind", None) == "tile":
            image, nuclei, cells = _tile_picture(output, row.image_id)
        else:
            image = decode_image(read_bytes(row.source_uri), row.source_uri)
            nuclei, cells = read_label_masks(output, row.image_id)
        out[f"{row.image_id}.png"] = encode_png(draw_overlay(image, nuclei, cells))
    return out


def render(data: ReportData, gallery_names: list[str]) -> str:
    """The HTML page; numbers come straight from the tables. ``gallery_names`` are shown in
    their order (the gallery's: most cells first)."""
    e = html.escape
    ok = data.images.status == "ok"
    um2 = data.mpp ** 2 if data.mpp else None
    wsi = "tiles" in data.slides and bool(data.slides["tiles"].notna().any())  # whole slides in the run
    slides_rows = "".join(
        f"<tr><td>{e(str(r.slide_id))}</td><td>{r.images}</td><td>{r.images_ok}</td>"
        f"<td>{r.images_error}</td><td class=n>{r.plasma_cells}</td>"
        f"<td>{_fmt(r.mean_cells_per_image)}</td><td>{_fmt(r.mean_cell_area, 0)}</td>"
        f"<td>{_fmt(r.mean_nucleus_area, 0)}</td>"
        + (f"<td>{_fmt(_times(r.mean_cell_area, um2), 1)}</td><td>{_fmt(_times(r.mean_nucleus_area, um2), 1)}</td>"
           if um2 else "") + (_slide_cells(r) if wsi else "") + "</tr>" for r in data.slides.itertuples())
    um2_heads = "<th>mean cell area (µm²)</th><th>mean nucleus area (µm²)</th>" if um2 else ""
    wsi_heads = ("<th>tiles analysed / tiles</th><th>analysed share</th><th>analysed (mm²)</th>"
                 "<th>plasma cells per mm²</th>" if wsi else "")
    pixel_size = (f"<p>Pixel size {data.mpp:g} µm (run.json <code>mpp</code>): areas in µm² too.</p>"
                  if um2 else "")
    errors = data.images[~ok]
    error_rows = "".join(f"<tr><td>{e(str(r.image_id))}</td><td class=t>{e(str(r.slide_id))}</td>"
                         f"<td class=t>{e(str(r.error))}</td></tr>" for r in errors.head(MAX_ERROR_ROWS).itertuples())
    more = (f"<p>{len(errors) - MAX_ERROR_ROWS} more in <code>images/</code> (status = 'error').</p>"
            if len(errors) > MAX_ERROR_ROWS else "")
    error_block = (f"<table><tr><th>image</th><th>slide</th><th>problem</th></tr>{error_rows}</table>{more}"
                   if len(errors) else "<p>No image failed.</p>")
    tiles = "".join(f'<figure><img src="gallery/{e(n)}" alt="{e(n)}" {_ONERROR}>'
                    f'<figcaption>{e(n[:-4])}</figcaption></figure>' for n in gallery_names)
    image_block = _image_table(data.images)
    wsi_note = ("; for whole slides, each slide's tile with the most cells comes first (a tile's core, "
                "cells cut at its edge)" if wsi else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Plasma-cell report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{background:#f0f0f5}} table.sortable th{{cursor:pointer}} td.l,th.l{{text-align:left}} td.t{{text-align:left}} td:first-child,th:first-child{{text-align:left}} td.n{{font-weight:bold}}
.charts img{{max-width:100%;margin:0.5em 1em 0.5em 0}} .summary span{{margin-right:2em;font-size:1.2em}}
.gallery{{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:12px}}
figure{{margin:0}} figure img{{width:100%;border:1px solid #ccc}} figcaption{{font-size:0.85em;color:#555}}
</style></head><body>
<h1>Plasma-cell report</h1>
<p class="summary"><span>Slides: <b id="n-slides">{len(data.slides)}</b></span>
<span>Images: <b id="n-images">{len(data.images)}</b> ({int(ok.sum())} ok, {int((~ok).sum())} failed)</span>
<span>Plasma cells: <b id="n-cells">{int(data.slides.plasma_cells.sum())}</b></span></p>
<h2>Per slide</h2>
{pixel_size}<table id="slides"><tr><th>slide</th><th>images</th><th>ok</th><th>failed</th><th>plasma cells</th>
<th>cells per image</th><th>mean cell area (px)</th><th>mean nucleus area (px)</th>{um2_heads}{wsi_heads}</tr>{slides_rows}</table>
<div class="charts"><img src="counts.png" alt="plasma cells per slide" {_ONERROR}>
<img src="cells_per_image.png" alt="cells per image" {_ONERROR}>
<img src="areas.png" alt="cell and nucleus areas" {_ONERROR}></div>
<h2>Images that could not be processed</h2>{error_block}
<h2>Per image</h2>{image_block}
<h2>Quality control</h2><p>Cell outlines in cyan, nuclei in yellow, numbered as <code>cell_id</code>
in <code>cells/</code> and <code>masks.zarr</code>; the images with the most cells first{wsi_note}.</p>
<div class="gallery">{tiles}</div>
<script>{_SORT_JS}</script>
</body></html>
"""


# Click a header of a table.sortable: its rows sort on that column (numbers as numbers),
# a second click reverses. Inline, a few lines: the page loads nothing from elsewhere.
_SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.querySelectorAll("th");
  heads.forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
      heads.forEach(function (h) { h.removeAttribute("data-dir"); });
      th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
      rows.sort(function (a, b) {
        var x = a.cells[col].textContent, y = b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return dir * cmp;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _image_table(images: pd.DataFrame) -> str:
    """The per-image table (sortable in the browser): the first MAX_IMAGE_ROWS images by
    slide and id, and a note of how many more ``images/`` holds."""
    e = html.escape
    if not len(images):
        return "<p>No image.</p>"
    shown = images.sort_values(["slide_id", "image_id"]).head(MAX_IMAGE_ROWS)
    nuclei = shown["n_nuclei"] if "n_nuclei" in shown else pd.Series([None] * len(shown), index=shown.index)
    rows = "".join(
        f"<tr><td>{e(str(r.image_id))}</td><td class=l>{e(str(r.slide_id))}</td><td>{int(r.n_cells)}</td>"
        f"<td>{'' if pd.isna(n) else int(n)}</td><td class=l>{e(str(r.status))}</td>"
        f"<td class=l>{e(str(r.error)) if r.status != 'ok' and isinstance(r.error, str) else ''}</td></tr>"
        for r, n in zip(shown.itertuples(), nuclei))
    more = (f"<p>The first {MAX_IMAGE_ROWS} images by slide and name; {len(images) - MAX_IMAGE_ROWS} more "
            "are in <code>images/</code>.</p>" if len(images) > MAX_IMAGE_ROWS else "")
    return (f'<p>Click a column\'s header to sort on it.</p><table id="images" class="sortable"><thead><tr>'
            "<th>image</th><th class=l>slide</th><th>cells</th><th>nuclei</th><th class=l>status</th><th class=l>error</th>"
            "</tr></thead>"
            f"<tbody>{rows}</tbody></table>{more}")


def _slide_cells(r) -> str:
    """A whole slide's grid columns (empty cells for a folder of fields)."""
    if pd.isna(r.tiles):
        return "<td></td>" * 4
    share = "" if pd.isna(r.analysed_fraction) else f"{100 * r.analysed_fraction:.1f}%"
    return (f"<td>{int(r.tiles_analysed)} / {int(r.tiles)}</td><td>{share}</td>"
            f"<td>{_fmt(r.analysed_mm2, 3)}</td><td>{_fmt(r.plasma_cells_per_mm2, 1)}</td>")


def _times(x, factor: float):
    return None if x is None else x * factor


def _fmt(x, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def build_report(output: str, gallery_size: int = 12) -> str:
    """Write ``<output>/report/`` (index.html + PNGs) and return the page's URI."""
    data = load(output)
    fs, root = filesystem(output)
    base = join(root, "report")
    fs.makedirs(join(base, "gallery"), exist_ok=True)
    for name, png in figures(data).items():
        fs.pipe_file(join(base, name), png)
    tiles = gallery(output, data, gallery_size)
    for name, png in tiles.items():
        fs.pipe_file(join(base, "gallery", name), png)
    fs.pipe_file(join(base, "index.html"), render(data, list(tiles)).encode())  # the gallery's order
    return join(output, "report", "index.html")
