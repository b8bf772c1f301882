"""images/ and cells/ read back: columns of older parts, samples, and --retry-errors' rewrite."""

import io

import pyarrow as pa
import pyarrow.parquet as pq

from segpc.io.outputs import IMAGES_SCHEMA, done_images, forget_errors, part_name, read_table


def _row(image_id: str, status: str = "ok", kind: str | None = None) -> dict:
    return {"image_id": image_id, "slide_id": "S1", "source_uri": f"/in/{image_id}.png", "status": status,
            "error": "boom" if status != "ok" else None, "error_kind": kind, "n_cells": 0}


def _part(out, rows: list[dict], schema: pa.Schema = IMAGES_SCHEMA) -> str:
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "images" / part_name([r["image_id"] for r in rows])
    table = pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA).select(schema.names)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path.write_bytes(buf.getvalue())
    return str(path)


def test_old_parts_read_with_nulls_and_samples_spread(tmp_path):
    old = pa.schema([f for f in IMAGES_SCHEMA if f.name != "error_kind"])  # before errors had kinds
    _part(tmp_path, [_row("a", "error"), _row("b")], old)
    for k in range(6):
        _part(tmp_path, [_row(f"n{k}")])
    t = read_table(str(tmp_path), "images", ["image_id", "status", "error_kind"]).to_pandas()
    assert sorted(t.image_id) == ["a", "b"] + [f"n{k}" for k in range(6)]
    assert t.set_index("image_id").error_kind.isna().all()
    sample = read_table(str(tmp_path), "images", ["image_id"], max_parts=3, with_file=True)
    assert len(set(sample.column("__filename").to_pylist())) == 3
    assert read_table(str(tmp_path / "none"), "images", ["image_id"]).num_rows == 0


def test_forget_errors_drops_only_storage_errors(tmp_path):
    _part(tmp_path, [_row("ok1"), _row("gone", "error", "storage"), _row("bad", "error", "image")])
    clean = _part(tmp_path, [_row("ok2")])
    before = (tmp_path / "images" / clean.rsplit("/", 1)[-1]).read_bytes()
    assert forget_errors(str(tmp_path)) == 1
    assert sorted(done_images(str(tmp_path)).column("image_id").to_pylist()) == ["bad", "ok1", "ok2"]
    assert (tmp_path / "images" / clean.rsplit("/", 1)[-1]).read_bytes() == before  # untouched
    assert forget_errors(str(tmp_path)) == 0
