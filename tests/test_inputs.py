"""Input listing: slides from folders, safe, unique and stable ids whatever the file names."""

import re

import pytest

from segpc.errors import InputError
from segpc.io.inputs import MAX_ID_LENGTH, ROOT_FILES, list_folder, list_inputs, safe_id, top_level

SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def test_slides_and_ids_from_folders(tmp_path):
    for rel in ["S1/a.bmp", "S1/deeper/b.png", "S2/c.jpg", "notes.txt", "S2/readme.md"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "top.png").write_bytes(b"x")
    items = list_inputs(str(tmp_path))
    assert [(i.image_id, i.slide_id) for i in items] == [
        ("top", "unknown"), ("S1__a", "S1"), ("S1__deeper__b", "S1"), ("S2__c", "S2")]
    assert all(i.uri.startswith(str(tmp_path)) for i in items)
    # the streamed listing: one request for the top level, then one per slide folder
    assert top_level(str(tmp_path)) == (["S1", "S2"], ["notes.txt", "top.png"])
    assert [i.image_id for i in list_folder(str(tmp_path), "S1")] == ["S1__a", "S1__deeper__b"]
    assert [i.image_id for i in list_folder(str(tmp_path), ROOT_FILES)] == ["top"]


def test_ids_do_not_change_when_files_are_added(tmp_path):
    def ids() -> dict[str, str]:
        return {i.uri: i.image_id for i in list_inputs(str(tmp_path))}

    for rel in ["S1/img1.bmp", "S1/img2.bmp", "flat.bmp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    before = ids()
    for rel in ["S2/img1.bmp", "S1/sub/img1.bmp", "S0/img2.bmp", "S2/flat.bmp"]:  # same names elsewhere
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    after = ids()
    assert {u: after[u] for u in before} == before
    assert len(set(after.values())) == len(after) == 7
    # the one exception, stated in the README: a twin differing only in its suffix
    (tmp_path / "S1" / "img1.png").write_bytes(b"x")
    twins = ids()
    assert twins[f"{tmp_path}/S1/img1.bmp"] == "S1__img1-bmp" and twins[f"{tmp_path}/S1/img1.png"] == "S1__img1-png"


def test_hostile_names_give_safe_unique_ids(tmp_path):
    names = ["S1/img 1.bmp", "S2/img 1.bmp", "S1/ünïcødé.png", "S1/..hidden.png", "S3/" + "x" * 200 + ".tif",
             "S1/a.b.c.png", "S1/a_b_c.png", "S1/dup.png", "S2/dup.png"]
    for rel in names:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    items = list_inputs(str(tmp_path))
    ids = [i.image_id for i in items]
    assert len(ids) == len(names) == len(set(ids))
    assert all(SAFE.match(i) and len(i) <= MAX_ID_LENGTH for i in ids)
    assert all("/" not in i and not i.startswith(".") for i in ids)
    # the same name in two slides: the slide is part of the id
    dups = sorted(i.image_id for i in items if "dup" in i.image_id)
    assert dups == ["S1__dup", "S2__dup"]


def test_safe_id_is_stable_and_distinguishes_altered_names():
    assert safe_id("S1/img 1.bmp") == safe_id("S1/img 1.bmp")
    assert safe_id("a b.png") != safe_id("a_b.png")
    assert safe_id("plain-name_01.bmp") == "plain-name_01"
    # a path that climbs out of the prefix (a manifest may hold one) names no folder at all
    climb = safe_id("../../etc/passwd.png")
    assert "/" not in climb and ".." not in climb and not climb.startswith(".")


def test_empty_or_missing_input(tmp_path):
    with pytest.raises(InputError, match="no images"):
        list_inputs(str(tmp_path))
    with pytest.raises(InputError, match="not found"):
        list_inputs(str(tmp_path / "nope"))


def test_manifest_sets_slides_and_accepts_relative_paths(tmp_path):
    for rel in ["x/a.bmp", "x/b.bmp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,slide_id\nx/a.bmp,PT-1\n{tmp_path}/x/b.bmp,PT-2\n")
    items = list_inputs(str(tmp_path), str(manifest))
    assert [(i.image_id, i.slide_id, i.uri) for i in items] == [
        ("x__a", "PT-1", f"{tmp_path}/x/a.bmp"), ("x__b", "PT-2", f"{tmp_path}/x/b.bmp")]
    with_ids = tmp_path / "ids.csv"
    with_ids.write_text("path,slide_id,image_id\nx/a.bmp,PT-1,case 7.a\n")
    assert [(i.image_id, i.slide_id) for i in list_inputs(str(tmp_path), str(with_ids))] == [
        (safe_id("case 7.a.x"), "PT-1")]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,slide\nx/a.bmp,PT-1\n")
    with pytest.raises(InputError, match="path, slide_id"):
        list_inputs(str(tmp_path), str(bad))
