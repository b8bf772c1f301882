"""The OpenSlide backend of whole slides (formats tiffslide cannot read), the local copies it
needs of remote slides, and whole slides refused as bytes in a Parquet shard.

No MIRAX/VMS sample can be made or downloaded here: the backend is checked on a generic
pyramidal TIFF (which OpenSlide reads too) against tiffslide's reading of the same file; the
MIRAX-specific part (the companion folder is copied with the .mrxs) is checked on files
laid out like one.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import tifffile

from segpc.errors import InputError
from segpc.io.storage import filesystem
from segpc.wsi import slide as slide_module
from segpc.wsi.local_copy import local_copy, slide_files
from segpc.wsi.slide import UnreadableSlide, check_not_slide_bytes, open_slide
from segpc.wsi.synthetic import mosaic, write_pyramidal_tiff


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 3-level pyramidal TIFF at 0.5 µm/px, levels as pages (OpenSlide's generic TIFF)."""
    s = mosaic(1, 2, gap=40, seed=3)
    path = tmp_path_factory.mktemp("os") / "S09.tif"
    write_pyramidal_tiff(path, s.image, mpp=0.5, levels=3, subifds=False)
    return s, path


def _same_slide(a, b) -> None:
    assert (a.level_shapes, a.downsamples, a.mpp, a.id) == (b.level_shapes, b.downsamples, b.mpp, b.id)
    for level, (h, w) in enumerate(a.level_shapes):
        for box in [(0, 0, h, w), (3, 7, h - 5, w - 9), (h // 2, w // 3, h // 2 + 17, w // 3 + 29)]:
            assert np.array_equal(a.read_region(level, box), b.read_region(level, box)), (level, box)


def test_openslide_backend_reads_what_tiffslide_reads(pyramid):
    s, path = pyramid
    with open_slide(str(path)) as ts, open_slide(str(path), backend="openslide") as osl:
        assert (ts.backend, osl.backend) == ("tiffslide", "openslide")
        assert osl.level_shapes == [(240, 680), (120, 340), (60, 170)]
        assert osl.downsamples == [1.0, 2.0, 4.0] and osl.mpp == pytest.approx(0.5)
        assert np.array_equal(osl.read_region(0, (10, 20, 200, 600)), s.image[10:200, 20:600])
        _same_slide(ts, osl)
        again = pickle.loads(pickle.dumps(osl))  # what a Ray task receives: reopens lazily
        assert again.backend == "openslide" and np.array_equal(again.read_region(2, (0, 0, 60, 170)),
                                                                osl.read_region(2, (0, 0, 60, 170)))
        with pytest.raises(InputError, match="leaves level 1"):
            osl.read_region(1, (0, 0, 121, 10))


def test_a_file_tiffslide_cannot_parse_falls_back_to_openslide(pyramid, monkeypatch, tmp_path):
    _, path = pyramid

    def refuse(self):
        raise UnreadableSlide(f"{self.uri}: not a readable whole slide (test)")

    monkeypatch.setattr(slide_module.Slide, "_open", refuse)
    with open_slide(str(path)) as got:
        assert got.backend == "openslide" and got.level_shapes[0] == (240, 680)
    with pytest.raises(UnreadableSlide):
        open_slide(str(path), backend="tiffslide")
    monkeypatch.undo()
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 100)
    with pytest.raises(InputError, match="OpenSlide cannot read it either"):
        open_slide(str(junk))
    with pytest.raises(InputError, match="OpenSlide reads"):  # MIRAX goes to OpenSlide directly
        open_slide(str(tmp_path / "missing.mrxs"))


@pytest.mark.s3
def test_remote_slide_for_openslide_is_copied_once_and_within_the_limit(pyramid, s3_bucket, tmp_path, monkeypatch):
    s, path = pyramid
    monkeypatch.setenv("SEGPC_SLIDE_CACHE", str(tmp_path / "cache"))
    fs, _ = filesystem(s3_bucket)
    base = s3_bucket.removeprefix("s3://")
    fs.put_file(str(path), f"{base}/S09.tif")
    with open_slide(f"{s3_bucket}/S09.tif", backend="openslide") as remote, open_slide(str(path)) as here:
        _same_slide(here, remote)
    copies = list((tmp_path / "cache").rglob("S09.tif"))
    assert len(copies) == 1 and copies[0].read_bytes() == path.read_bytes()
    assert local_copy(f"{s3_bucket}/S09.tif") == str(copies[0])  # the machine's copy, reused
    assert not [p for p in (tmp_path / "cache").iterdir() if ".part-" in p.name]
    # MIRAX: the .mrxs and every file of the folder of the same name, laid out as they were
    fs.pipe_file(f"{base}/m/S10.mrxs", b"index")
    fs.pipe_file(f"{base}/m/S10/Slidedat.ini", b"[GENERAL]")
    fs.pipe_file(f"{base}/m/S10/Data0000.dat", b"x" * 1000)
    assert sorted(slide_files(f"{s3_bucket}/m/S10.mrxs").values()) == [5, 9, 1000]
    main = local_copy(f"{s3_bucket}/m/S10.mrxs")
    assert main.endswith("/S10.mrxs") and open(main.replace(".mrxs", "/Data0000.dat"), "rb").read() == b"x" * 1000
    with pytest.raises(InputError, match="OpenSlide reads local files only.*SEGPC_SLIDE_DOWNLOAD_GB"):
        monkeypatch.setenv("SEGPC_SLIDE_DOWNLOAD_GB", "0.000001")  # 1 kB
        local_copy(f"{s3_bucket}/m/S10.mrxs")
    fs.pipe_file(f"{base}/lone.mrxs", b"index")
    with pytest.raises(InputError, match="without its data folder"):
        slide_files(f"{s3_bucket}/lone.mrxs")


def test_whole_slide_in_a_parquet_shard_is_an_error_row_naming_the_shard(pyramid, archive):
    from ray_jobs.stages import read_decode
    from segpc.config import preset

    _, path = pyramid
    field = sorted((archive / "x").iterdir())[0].read_bytes()
    shard = "s3://bucket/in/S01/part-0.parquet"
    batch = {"uri": np.array([f"{shard}#wsi-1", f"{shard}#field-2"], dtype=object),
             "image_id": np.array(["wsi-1", "field-2"], dtype=object),
             "slide_id": np.array(["S01", "S01"], dtype=object),
             "data": np.array([path.read_bytes(), field], dtype=object)}
    out = read_decode(batch, None, preset("tiny").to_dict())
    assert out["status"].tolist() == ["error", "ok"]
    assert shard in out["error"][0] and "wsi-1" in out["error"][0] and "--manifest" in out["error"][0]
    assert out["error_kind"][0] == "image"
    check_not_slide_bytes(field, f"{shard}#field-2")  # a field, even a tiled TIFF one, passes
    one_level = io.BytesIO()
    tifffile.imwrite(one_level, np.zeros((240, 320, 3), np.uint8), tile=(64, 64))
    check_not_slide_bytes(one_level.getvalue(), f"{shard}#tiled")


def test_the_pieces_a_vms_names_are_not_listed_as_fields(tmp_path):
    from ray_jobs.listing import split_slides
    from segpc.io.inputs import inputs_of

    (tmp_path / "a.vms").write_text("[Virtual Microscope Specimen]\nNoLayers=1\nImageFile=a.jpg\n"
                                    "MapFile=a_map.jpg\nOptimisationFile=a.opt\n")
    for name in ("a.jpg", "a_map.jpg", "field.jpg"):
        (tmp_path / name).write_bytes(b"\xff\xd8")
    fields, slides = split_slides(inputs_of(["a.jpg", "a.vms", "a_map.jpg", "field.jpg"], str(tmp_path)))
    assert [it.uri for it in fields] == [f"{tmp_path}/field.jpg"] and [it.uri for it in slides] == [f"{tmp_path}/a.vms"]
    with pytest.raises(InputError, match="names a.opt, which is missing"):
        slide_files(f"{tmp_path}/a.vms")
