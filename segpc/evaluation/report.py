"""The analysts' report: one self-contained HTML page and its PNG figures.

Built from a batch job's ``images/``, ``cells/`` and ``slides.parquet``: per-slide
plasma-cell counts, cells per image, cell and nucleus areas, the images that failed and
why, and a gallery of QC overlays (outlines and cell ids drawn on the images). It needs no
server: open ``report/index.html`` from the output folder (or a copy of it).
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
from segpc.io.storage import filesystem, join, read_bytes  # noqa: E402

BLUE, PURPLE = "#3b6fb6", "#7b3f9e"
CELL_SAMPLE_PARTS = 200  # cells/ parts read for the area histogram, spread over the run
MAX_ERROR_ROWS = 200  # failed images listed on the page (all of them are in images/)
# a picture that fails to load says so in the browser console (and in the report test)
_ONERROR = "onerror=\"console.error('missing picture: ' + this.src)\""


@dataclass
class ReportData:
    images: pd.DataFrame
    cells: pd.DataFrame
    slides: pd.DataFrame


def load(output: str) -> ReportData:
    fs, root = filesystem(output)
    try:
        with fs.open(join(root, "slides.parquet"), "rb") as f:
            slides = pd.read_parquet(f)
    except FileNotFoundError:
        raise InputError(f"{output}: not a batch-job output (no slides.parquet)") from None
    images = read_table(output, "images", ["image_id", "slide_id", "source_uri", "status", "error",
                                           "n_cells"]).to_pandas()
    # the area histogram needs a sample, not every cell of the archive
    cells = read_table(output, "cells", ["image_id", "slide_id", "cell_id", "cell_area", "nucleus_area",
                                         "ratio", "scale"], max_parts=CELL_SAMPLE_PARTS).to_pandas()
    return ReportData(images, cells, slides)


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
    if len(data.cells):
        hi = float(np.percentile(data.cells.cell_area, 99))
        bins = np.linspace(0, max(hi, 1), 30)
        ax.hist(data.cells.cell_area.clip(upper=hi), bins=bins, alpha=0.7, color=BLUE, label="cell")
        ax.hist(data.cells.nucleus_area.clip(upper=hi), bins=bins, alpha=0.7, color=PURPLE, label="nucleus")
        ax.legend()
    ax.set(title="Cell and nucleus areas", xlabel="area (pixels)", ylabel="cells")
    out["areas.png"] = _png(fig)
    return out


def gallery(output: str, data: ReportData, limit: int = 12) -> dict[str, bytes]:
    """QC overlays for up to ``limit`` images, most cells first: image + label masks."""
    ok = data.images[data.images.status == "ok"].sort_values(["n_cells", "image_id"], ascending=[False, True])
    out = {}
    for row in ok.head(limit).itertuples():
        image = decode_image(read_bytes(row.source_uri), row.source_uri)
        nuclei, cells = read_label_masks(output, row.image_id)
        out[f"{row.image_id}.png"] = encode_png(draw_overlay(image, nuclei, cells))
    return out


def render(data: ReportData, gallery_names: list[str]) -> str:
    """The HTML page; numbers come straight from the tables."""
    e = html.escape
    ok = data.images.status == "ok"
    slides_rows = "".join(
        f"<tr><td>{e(str(r.slide_id))}</td><td>{r.images}</td><td>{r.images_ok}</td>"
        f"<td>{r.images_error}</td><td class=n>{r.plasma_cells}</td>"
        f"<td>{_fmt(r.mean_cells_per_image)}</td><td>{_fmt(r.mean_cell_area, 0)}</td>"
        f"<td>{_fmt(r.mean_nucleus_area, 0)}</td></tr>" for r in data.slides.itertuples())
    errors = data.images[~ok]
    error_rows = "".join(f"<tr><td>{e(str(r.image_id))}</td><td class=t>{e(str(r.slide_id))}</td>"
                         f"<td class=t>{e(str(r.error))}</td></tr>" for r in errors.head(MAX_ERROR_ROWS).itertuples())
    more = (f"<p>{len(errors) - MAX_ERROR_ROWS} more in <code>images/</code> (status = 'error').</p>"
            if len(errors) > MAX_ERROR_ROWS else "")
    error_block = (f"<table><tr><th>image</th><th>slide</th><th>problem</th></tr>{error_rows}</table>{more}"
                   if len(errors) else "<p>No image failed.</p>")
    tiles = "".join(f'<figure><img src="gallery/{e(n)}" alt="{e(n)}" {_ONERROR}>'
                    f'<figcaption>{e(n[:-4])}</figcaption></figure>' for n in gallery_names)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Plasma-cell report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{background:#f0f0f5}} td.t{{text-align:left}} td:first-child,th:first-child{{text-align:left}} td.n{{font-weight:bold}}
.charts img{{max-width:100%;margin:0.5em 1em 0.5em 0}} .summary span{{margin-right:2em;font-size:1.2em}}
.gallery{{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:12px}}
figure{{margin:0}} figure img{{width:100%;border:1px solid #ccc}} figcaption{{font-size:0.85em;color:#555}}
</style></head><body>
<h1>Plasma-cell report</h1>
<p class="summary"><span>Slides: <b id="n-slides">{len(data.slides)}</b></span>
<span>Images: <b id="n-images">{len(data.images)}</b> ({int(ok.sum())} ok, {int((~ok).sum())} failed)</span>
<span>Plasma cells: <b id="n-cells">{int(data.slides.plasma_cells.sum())}</b></span></p>
<h2>Per slide</h2>
<table id="slides"><tr><th>slide</th><th>images</th><th>ok</th><th>failed</th><th>plasma cells</th>
<th>cells per image</th><th>mean cell area (px)</th><th>mean nucleus area (px)</th></tr>{slides_rows}</table>
<div class="charts"><img src="counts.png" alt="plasma cells per slide" {_ONERROR}>
<img src="cells_per_image.png" alt="cells per image" {_ONERROR}>
<img src="areas.png" alt="cell and nucleus areas" {_ONERROR}></div>
<h2>Images that could not be processed</h2>{error_block}
<h2>Quality control</h2><p>Cell outlines in cyan, nuclei in yellow, numbered as <code>cell_id</code>
in <code>cells/</code> and <code>masks.zarr</code>; the images with the most cells first.</p>
<div class="gallery">{tiles}</div>
</body></html>
"""


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
    fs.pipe_file(join(base, "index.html"), render(data, sorted(tiles)).encode())
    return join(output, "report", "index.html")
