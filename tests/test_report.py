"""The report without Ray: the gallery in its own order, the sortable per-image table, µm²."""

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

from segpc.evaluation import report
from segpc.evaluation.report import ReportData, build_report, render
from segpc.io.imaging import encode_png
from segpc.io.inputs import InputImage
from segpc.io.outputs import ImageRecord, OutputWriter
from segpc.io.run_record import write_run_record
from segpc.io.slides import write_slides_table
from segpc.method.results import Cell, ImageResult

SHAPE = (120, 160)


def _result(n_cells: int) -> ImageResult:
    cells = []
    for k in range(n_cells):
        y0, x0 = 10 + 50 * (k // 3), 10 + 50 * (k % 3)
        cell, nucleus = np.zeros((40, 40), bool), np.zeros((40, 40), bool)
        cell[disk((20, 20), 18)] = True
        nucleus[disk((16, 16), 8)] = True
        cells.append(Cell(k + 1, k + 1, (y0, x0, y0 + 40, x0 + 40), nucleus, cell, 1.0, 0.9, 0.8, 2.0, False))
    return ImageResult(SHAPE, cells, n_nuclei=n_cells + 1)


def test_report_keeps_the_gallery_order_and_sorts_images(tmp_path):
    out, src = str(tmp_path / "out"), tmp_path / "src"
    src.mkdir()
    counts = {"S01__a": 1, "S01__b": 4, "S02__c": 2}  # name order a, b, c; gallery order b, c, a
    records = []
    for image_id, n in counts.items():
        path = src / f"{image_id}.png"
        path.write_bytes(encode_png(np.full((*SHAPE, 3), 200, np.uint8)))
        records.append(ImageRecord(InputImage(str(path), image_id, image_id[:3]), "ok", "", SHAPE[1], SHAPE[0],
                                   0.1, _result(n)))
    records.append(ImageRecord(InputImage(str(src / "bad.png"), "S02__bad", "S02"), "error", "not an image <x>"))
    OutputWriter(out).write(records)
    write_slides_table(out)
    write_run_record(out, {"mpp": 0.5})
    build_report(out, gallery_size=3)
    page = (tmp_path / "out" / "report" / "index.html").read_text()

    assert re.findall(r"<figcaption>([^<]+)</figcaption>", page) == ["S01__b", "S02__c", "S01__a"]
    table = page[page.index('<table id="images"'):]
    table = table[:table.index("</table>")]
    assert 'class="sortable"' in table and "<th>nuclei</th>" in table and "<th class=l>error</th>" in table
    assert re.findall(r"<tr><td>([^<]+)</td>", table) == ["S01__a", "S01__b", "S02__bad", "S02__c"]
    assert "<td>4</td><td>5</td><td class=l>ok</td>" in table  # S01__b: 4 cells, 5 nuclei
    assert "not an image &lt;x&gt;" in table
    assert "<script>" in page and "addEventListener" in page and "http" not in page.split("<body>")[1]
    # µm²: pixel size 0.5 µm, so an area in µm² is a quarter of the pixels'
    slides = pd.read_parquet(tmp_path / "out" / "slides.parquet")
    r = slides.set_index("slide_id").loc["S01"]
    assert "mean cell area (µm²)" in page
    assert f"<td>{r.mean_cell_area * 0.25:.1f}</td><td>{r.mean_nucleus_area * 0.25:.1f}</td></tr>" in page

    # the sorting script runs: a header click in Node with a minimal DOM sorts the rows
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed here; the script check needs it")
    check = _NODE_CHECK.replace("SORT_JS", report._SORT_JS)
    proc = subprocess.run([node, "-e", check], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # numbers as numbers (2 < 3 < 10), a second click reverses, text columns by text
    assert proc.stdout.split() == ["3,10,2", "2,3,10", "10,3,2", "b,a,c", "c,b,a"]


def test_per_image_table_is_capped():
    n = report.MAX_IMAGE_ROWS + 20
    images = pd.DataFrame({"image_id": [f"i{k:04d}" for k in range(n)], "slide_id": "S01",
                           "source_uri": "x", "status": "ok", "error": None, "n_cells": 1, "n_nuclei": 1})
    slides = pd.DataFrame([{"slide_id": "S01", "images": n, "images_ok": n, "images_error": 0,
                            "plasma_cells": n, "mean_cells_per_image": 1.0, "mean_cell_area": 100.0,
                            "mean_nucleus_area": 40.0}])
    page = render(ReportData(images, pd.DataFrame(), slides), ["z.png", "a.png"])
    table = page[page.index('<table id="images"'):]
    assert table[:table.index("</table>")].count("<tr><td>") == report.MAX_IMAGE_ROWS
    assert "20 more are in <code>images/</code>" in page
    assert page.index("gallery/z.png") < page.index("gallery/a.png")
    assert "µm²" not in page  # no pixel size: pixels only


# a stand-in for the browser's DOM, enough for the script: three rows, clicks on headers
_NODE_CHECK = """
function cell(t) { return {textContent: t}; }
function row(a, b) { return {cells: [cell(a), cell(b)]}; }
var body = {rows: [row("a", "3"), row("b", "10"), row("c", "2")],
            appendChild: function (r) { this.rows.splice(this.rows.indexOf(r), 1); this.rows.push(r); }};
function th() { return {attrs: {}, on: {}, getAttribute: function (k) { return this.attrs[k] || null; },
  setAttribute: function (k, v) { this.attrs[k] = v; }, removeAttribute: function (k) { delete this.attrs[k]; },
  addEventListener: function (e, f) { this.on[e] = f; }}; }
var heads = [th(), th()];
var table = {tBodies: [body], querySelectorAll: function () { return heads; }};
var document = {querySelectorAll: function () { return [table]; }};
SORT_JS
function col(k) { return body.rows.map(function (r) { return r.cells[k].textContent; }).join(","); }
console.log(col(1));
heads[1].on.click(); console.log(col(1));
heads[1].on.click(); console.log(col(1) + " " + col(0));
heads[0].on.click(); heads[0].on.click(); console.log(col(0));
"""
