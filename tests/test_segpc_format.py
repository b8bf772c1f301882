"""SegPC layout reader/writer and submission.txt, on files written here with cv2/numpy."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from segpc.errors import InputError
from segpc.method.instances import Instance
from segpc.io.segpc_format import (find_split, list_image_ids, mask_paths, read_masks, read_split,
                                read_submission, submission_from_folder, write_masks,
                                write_submission)

CAM1 = (1536, 2040)  # H x W of the 2040x1536 camera
CAM2 = (1920, 2560)


def _box(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def _mask(shape, nucleus_box, cell_box, nuc_value=40, cyto_value=20):
    m = np.zeros(shape, np.uint8)
    m[_box(shape, *cell_box)] = cyto_value
    m[_box(shape, *nucleus_box)] = nuc_value
    return m


# expected cells per (id, k): (nucleus box, cell box)
EXPECTED = {
    "1": {2: ((10, 20, 10, 20), (5, 30, 5, 30))},
    "10": {1: ((100, 120, 100, 130), (90, 140, 90, 150)),
           2: ((300, 310, 300, 310), (295, 330, 295, 315)),
           3: ((1900, 1920, 2500, 2560), (1880, 1920, 2480, 2560)),
           5: ((50, 60, 50, 60), (50, 60, 50, 60))},
    "1700": {},
    "a_b-2": {1: ((0, 4, 0, 4), (0, 8, 0, 8))},
}


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    """x/ at root, y/ one level deeper (root/validation/y), every quirk of the real data."""
    root = tmp_path_factory.mktemp("quirky")
    x, y = root / "x", root / "validation" / "y"
    _write(x / "1.bmp", np.zeros((*CAM1, 3), np.uint8))
    _write(x / "10.bmp", np.zeros((*CAM2, 3), np.uint8))
    _write(x / "1700.bmp", np.zeros((*CAM1, 3), np.uint8))  # no masks at all
    _write(x / "a_b-2.bmp", np.zeros((*CAM1, 3), np.uint8))
    # 3-channel, only channel 0 set (BGR order: grayscale conversion would give ~5), 41/19
    m = np.zeros((*CAM1, 3), np.uint8)
    m[..., 0] = _mask(CAM1, *EXPECTED["1"][2], nuc_value=41, cyto_value=19)
    _write(y / "1_2.bmp", m)  # only k=2
    e = EXPECTED["10"]
    _write(y / "10_1.bmp", _mask(CAM2, *e[1], nuc_value=38, cyto_value=21))
    _write(y / "10_2.bmp", _mask(CAM2, *e[2]))
    _write(y / "10_3.bmp", np.repeat(_mask(CAM2, *e[3])[..., None], 3, axis=2))
    _write(y / "10_5.bmp", _mask(CAM2, *e[5]))  # gap at 4; nucleus only
    _write(y / "a_b-2_1.bmp", _mask(CAM1, *EXPECTED["a_b-2"][1]))
    return root


def _check(image_id, shape, instances):
    exp = EXPECTED[image_id]
    assert [i.k for i in instances] == sorted(exp)
    for inst in instances:
        nb, cb = exp[inst.k]
        assert inst.nucleus.shape == shape
        assert np.array_equal(inst.nucleus, _box(shape, *nb)), (image_id, inst.k)
        assert np.array_equal(inst.cell, _box(shape, *cb) | _box(shape, *nb)), (image_id, inst.k)


def test_find_split_tolerates_nesting(quirky, tmp_path):
    assert find_split(quirky) == (quirky / "x", quirky / "validation" / "y")
    (tmp_path / "validation" / "x").mkdir(parents=True)
    (tmp_path / "validation" / "y").mkdir()
    assert find_split(tmp_path) == (tmp_path / "validation" / "x", tmp_path / "validation" / "y")
    (tmp_path / "test" / "x").mkdir(parents=True)
    assert find_split(tmp_path / "test") == (tmp_path / "test" / "x", None)


def test_read_split_with_every_quirk(quirky):
    assert list_image_ids(quirky) == ["1", "10", "1700", "a_b-2"]
    samples = list(read_split(quirky))
    assert [s.image_id for s in samples] == ["1", "10", "1700", "a_b-2"]
    shapes = {"1": CAM1, "10": CAM2, "1700": CAM1, "a_b-2": CAM1}
    for s in samples:
        assert s.image_path.name == s.image_id + ".bmp"
        _check(s.image_id, shapes[s.image_id], s.instances)
    assert sum(len(s.instances) for s in samples) == 6
    assert samples[2].instances == [] and samples[0].image is None


def test_mask_paths_prefix_ids(quirky):
    y = quirky / "validation" / "y"
    assert mask_paths(y, "1") == {2: y / "1_2.bmp"}  # not 10_1.bmp
    assert sorted(mask_paths(y, "10")) == [1, 2, 3, 5]
    assert mask_paths(y, "a_b-2") == {1: y / "a_b-2_1.bmp"}
    assert mask_paths(y, "a_b") == {} and read_masks(y, "1700") == []
    _check("10", CAM2, read_masks(y, "10", shape=CAM2))


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    shape = (40, 56)
    cells = [rng.random(shape) < 0.4 for _ in range(3)]
    insts = [Instance(nucleus=c & (rng.random(shape) < 0.5), cell=c, k=k) for c, k in zip(cells, (3, 7, 9))]
    paths = write_masks(tmp_path / "out", "img_1", insts)
    assert [p.name for p in paths] == ["img_1_3.bmp", "img_1_7.bmp", "img_1_9.bmp"]
    back = read_masks(tmp_path / "out", "img_1", shape=shape)
    assert [b.k for b in back] == [3, 7, 9]
    for a, b in zip(insts, back):
        assert np.array_equal(a.nucleus, b.nucleus) and np.array_equal(a.cell, b.cell)
    # k not usable (0, duplicates) -> 1..n in list order
    insts[0].k = insts[1].k = 0
    paths = write_masks(tmp_path / "renum", "z", insts)
    assert [p.name for p in paths] == ["z_1.bmp", "z_2.bmp", "z_3.bmp"]
    assert np.array_equal(read_masks(tmp_path / "renum", "z")[2].cell, insts[2].cell)


def _small_split(tmp_path, mask: np.ndarray | bytes):
    _write(tmp_path / "x" / "5.bmp", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "y").mkdir()
    p = tmp_path / "y" / "5_1.bmp"
    p.write_bytes(mask) if isinstance(mask, bytes) else _write(p, mask)
    return tmp_path


def test_mask_size_mismatch_names_file(tmp_path):
    root = _small_split(tmp_path, np.full((32, 64), 40, np.uint8))
    with pytest.raises(InputError, match=r"5_1\.bmp.*32x64.*64x64"):
        list(read_split(root))


def test_corrupt_mask_names_file(tmp_path):
    root = _small_split(tmp_path, b"BM not really a bitmap")
    with pytest.raises(InputError, match=r"5_1\.bmp"):
        read_masks(root / "y", "5")


def test_with_images_decodes(tmp_path):
    (s,) = read_split(_small_split(tmp_path, np.full((64, 64), 20, np.uint8)), with_images=True)
    assert s.image.shape == (64, 64, 3) and s.instances[0].cell.all() and not s.instances[0].nucleus.any()


def test_missing_or_empty_x(tmp_path):
    (tmp_path / "y").mkdir()
    with pytest.raises(InputError, match="x/"):
        find_split(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        find_split(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="no images"):
        list_image_ids(tmp_path)


# --------------------------------------------------------------------------- submission


def _grid_rc(mask):
    """Independent reference: cv2 nearest resize to 1080x1440, (row, col) in row-major order."""
    g = cv2.resize(mask.astype(np.uint8), (1440, 1080), interpolation=cv2.INTER_NEAREST)
    return np.argwhere(g > 0)


def _rows(a):
    return {tuple(x) for x in a.tolist()}


def test_submission_round_trip_and_no_empty_lists(tmp_path):
    # A: nucleus + cytoplasm, camera 1; B: camera 2
    a = Instance(nucleus=_box(CAM1, 100, 140, 200, 260), cell=_box(CAM1, 80, 170, 180, 300), k=1)
    b = Instance(nucleus=_box(CAM2, 500, 540, 700, 760), cell=_box(CAM2, 480, 600, 690, 800), k=4)
    # C: no cytoplasm at all; D: a nucleus pixel the downscale skips (src row/col 3 is never
    # sampled: dst 2 -> 2, dst 3 -> 4), inside a cytoplasm box; E: only that pixel -> vanishes
    c = Instance(nucleus=_box(CAM1, 400, 420, 400, 430), cell=_box(CAM1, 400, 420, 400, 430), k=2)
    d = Instance(nucleus=_box(CAM1, 3, 4, 3, 4), cell=_box(CAM1, 0, 20, 0, 20), k=3)
    e = Instance(nucleus=_box(CAM1, 3, 4, 3, 4), cell=_box(CAM1, 3, 4, 3, 4), k=5)
    assert len(_grid_rc(d.nucleus)) == 0 and len(_grid_rc(e.cell)) == 0  # premise
    path = tmp_path / "submission.txt"
    with pytest.warns(UserWarning) as rec:
        write_submission(path, {"1650": [a, c, d], "1650x": [], "101": [b], "1650_": [e]})
    messages = " | ".join(str(w.message) for w in rec)
    assert re.search(r"dropped 1 .*1650_ k=5", messages)
    assert re.search(r"2 instance.*1650 k=2.*1650 k=3", messages)

    lines = path.read_text().split("\n")
    assert [ln.split("\t")[0] for ln in lines] == ["101", "1650", "1650_", "1650x"]
    assert lines[2:] == ["1650_", "1650x"]  # images without instances: just the id
    pair = r"\d+,\d+"
    inst_re = re.compile(rf"^{pair}(;{pair})* {pair}(;{pair})*$")
    for line in lines:
        for inst in line.split("\t")[1:]:
            assert inst_re.match(inst), inst[:80]  # never an empty list

    sub = read_submission(path)
    assert sorted(sub) == ["101", "1650", "1650_", "1650x"]
    assert sub["1650x"] == [] and sub["1650_"] == []
    (bn, bc), = sub["101"]
    assert np.array_equal(bn, _grid_rc(b.nucleus)) and np.array_equal(bc, _grid_rc(b.cytoplasm))
    (an, ac), (cn, cc), (dn, dc) = sub["1650"]
    assert np.array_equal(an, _grid_rc(a.nucleus)) and np.array_equal(ac, _grid_rc(a.cytoplasm))
    # C: nucleus exact, cytoplasm borrowed one nucleus pixel; the scored union is unchanged
    assert np.array_equal(cn, _grid_rc(c.nucleus)) and len(cc) == 1
    assert _rows(cn) | _rows(cc) == _rows(_grid_rc(c.cell))
    # D: cytoplasm exact, nucleus borrowed one cytoplasm pixel
    assert np.array_equal(dc, _grid_rc(d.cytoplasm)) and len(dn) == 1
    assert _rows(dn) | _rows(dc) == _rows(_grid_rc(d.cell))


def test_submission_from_folder_and_bad_file(tmp_path):
    m = np.zeros((60, 80), np.uint8)
    m[10:30, 10:40], m[15:25, 15:25] = 20, 40
    _write(tmp_path / "pred" / "7_1.bmp", m)
    submission_from_folder(tmp_path / "pred", tmp_path / "s.txt", image_ids=["7", "8"])
    sub = read_submission(tmp_path / "s.txt")
    assert sorted(sub) == ["7", "8"] and sub["8"] == []
    assert np.array_equal(sub["7"][0][0], _grid_rc(m == 40))
    assert np.array_equal(sub["7"][0][1], _grid_rc(m == 20))
    (tmp_path / "bad.txt").write_text("7\t1,2;3,4\n")
    with pytest.raises(InputError, match="bad.txt:1"):
        read_submission(tmp_path / "bad.txt")


def test_submission_command(tmp_path):
    from segpc.__main__ import main
    from segpc.io.segpc_format import read_submission

    nuc = np.zeros((1080, 1440), bool)
    nuc[100:110, 200:210] = True
    cell = nuc.copy()
    cell[95:115, 195:215] = True
    write_masks(tmp_path / "pred", "img7", [Instance(nuc, cell, k=1)])
    assert main(["submission", "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "s.txt")]) == 0
    parsed = read_submission(tmp_path / "s.txt")
    (nuc_rc, cyto_rc), = parsed["img7"]
    assert len(nuc_rc) == 100 and len(cyto_rc) == 400 - 100
    assert main(["submission", "--pred", str(tmp_path / "missing"), "--out", str(tmp_path / "t.txt")]) == 2
