"""Whole slides in the library: level choice, tile grid, seam ownership, tissue test, reading
pyramidal TIFFs (local and from S3 by range reads) and the single-process slide driver."""

from __future__ import annotations

import copy
import pickle
from dataclasses import replace

import cv2
import numpy as np
import pytest

from segpc.config import preset
from segpc.evaluation.metrics import iou_matrix, strict_score
from segpc.method.crops import crop_window
from segpc.method.nucleus import Nuclei
from segpc.method.segmenter import Segmenter
from segpc.wsi.driver import segment_slide, segment_tile, segment_tiles
from segpc.wsi.resolution import SlideView, choose_level
from segpc.wsi.slide import is_whole_slide, open_slide, slide_id
from segpc.wsi.synthetic import mosaic, write_pyramidal_tiff
from segpc.wsi.tiles import CORE_ALIGN, core_shape, input_alignment, slide_grid, tile_grid, tile_margin
from segpc.wsi.tissue import stained, tile_fractions, tissue_fraction

FIELD = (240, 320)  # (H, W) of the synthetic fields the bundles are taken to be trained on


# ---------------------------------------------------------------- resolution

@pytest.mark.parametrize("slide_mpp, target, expected", [
    (0.25, 0.25, (0, 1.0)),        # matches level 0
    (0.25, 0.5, (1, 1.0)),         # matches level 1 exactly
    (0.25, 0.505, (1, 1.0)),       # within 2%: scanner rounding, no resampling
    (0.25, 0.75, (1, 0.5 / 0.75)),  # between levels: the finer one, shrunk
    (0.25, 5.0, (3, 2.0 / 5.0)),   # coarser than every level: the coarsest, shrunk
    (0.5, 0.25, (0, 2.0)),         # finer than the scan: level 0, upsampled
    (None, 0.5, (0, 1.0)),         # unknown pixel size: level 0 as is
    (0.25, None, (0, 1.0)),
])
def test_choose_level_takes_the_coarsest_level_not_coarser_than_the_target(slide_mpp, target, expected):
    level, factor = choose_level(slide_mpp, target, [1.0, 2.0, 4.0, 8.0])
    assert level == expected[0] and factor == pytest.approx(expected[1])
    assert factor <= 1.0 or level == 0


# ---------------------------------------------------------------- tile grid

@pytest.mark.parametrize("width, height, core, margin, align", [
    (1040, 520, (140, 220), 50, 1), (300, 200, 64, 20, 2), (100, 90, 200, 30, 1), (257, 129, (16, 32), 40, 51)])
def test_cores_partition_the_slide_and_read_boxes_hold_their_margin(width, height, core, margin, align):
    tiles = tile_grid(width, height, core, margin, align)
    cover = np.zeros((height, width), np.int32)
    for t in tiles:
        y0, x0, y1, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        ry0, rx0, ry1, rx1 = t.read
        assert 0 <= ry0 and 0 <= rx0 and ry1 <= height and rx1 <= width
        # the read box holds the core and `margin` more wherever the slide goes on, no more
        # than needed at its end, and starts on the resize grid
        assert ry0 <= max(y0 - margin, 0) and rx0 <= max(x0 - margin, 0)
        assert ry1 == min(y1 + margin, height) and rx1 == min(x1 + margin, width)
        assert ry0 % align == 0 and rx0 % align == 0 and max(y0 - margin, 0) - ry0 < align
    assert (cover == 1).all()


def test_margin_keeps_the_largest_crop_of_an_owned_nucleus_strictly_inside_the_read_box():
    cfg = preset("tiny")  # U-Net input 320, expected diameter 10 px, largest scale 3.0
    margin = tile_margin(cfg, FIELD)
    assert margin == 20 + 30  # h = 2 diameters = 20 px; half_up(3.0 * 20 / 2) = 30
    paper = preset("paper")  # a 2040-px camera field is shrunk to 800: h = ceil(2 * 30 * 2.55)
    assert tile_margin(paper, (1536, 2040)) == 153 + 230
    tiles = tile_grid(2000, 2000, core_shape(FIELD, margin), margin)
    inner = [t for t in tiles if t.read[0] > 0 and t.read[1] > 0 and t.read[2] < 2000 and t.read[3] < 2000]
    h = 20
    for t in inner[:3]:
        cy0, cx0, cy1, cx1 = t.core
        # nuclei of side h whose centre is on each corner of the core
        for y, x in [(cy0, cx0), (cy0, cx1 - 1), (cy1 - 1, cx0), (cy1 - 1, cx1 - 1)]:
            for by0 in (y - h + 1, y):
                for bx0 in (x - h + 1, x):
                    wy0, wx0, wy1, wx1 = crop_window((by0, bx0, by0 + h, bx0 + h), 3.0)
                    ry0, rx0, ry1, rx1 = t.read
                    assert ry0 < wy0 and rx0 < wx0 and wy1 < ry1 and wx1 < rx1


# ---------------------------------------------------------------- ownership

def _nuclei(boxes: list[tuple[int, int, int, int]], origin=(0, 0), shape=(10 ** 4, 10 ** 4)) -> Nuclei:
    """Solid nuclei with these slide boxes, in an image whose (0, 0) is ``origin`` of the slide."""
    local = [(y0 - origin[0], x0 - origin[1], y1 - origin[0], x1 - origin[1]) for y0, x0, y1, x1 in boxes]
    return Nuclei(shape, local, [np.ones((b[2] - b[0], b[3] - b[1]), bool) for b in local], [1.0] * len(local))


def test_nucleus_centre_is_the_floor_of_the_centroid_wherever_it_is_computed():
    n = _nuclei([(10, 20, 12, 23)])  # rows 10-11 (mean 10.5), cols 20-22 (mean 21)
    assert n.centres() == [(10, 21)]
    assert _nuclei([(110, 1020, 112, 1023)], origin=(100, 1000)).centres() == [(10, 21)]
    m = np.zeros((3, 3), bool)
    m[0, 0] = m[2, 2] = m[2, 1] = True  # row mean 4/3, column mean 1
    odd = Nuclei((20, 20), [(5, 7, 8, 10)], [m], [1.0])
    assert odd.centres() == [(6, 8)]
    assert len(odd.centred_in((6, 8, 7, 9))) == 1 and len(odd.centred_in((0, 0, 6, 20))) == 0


def test_cells_on_core_borders_are_owned_by_exactly_one_tile():
    margin = 30
    tiles = tile_grid(400, 300, 100, margin)
    # nuclei centred on and around the corners and edges where four cores meet, and at the
    # slide's own border
    centres = [(y, x) for y in (0, 99, 100, 101, 199, 200, 299) for x in (0, 99, 100, 101, 299, 300, 399)]
    boxes = [(y - 2, x - 1, y + 3, x + 2) for y, x in centres]  # 5x3: centroid exactly (y, x)
    seen = []
    for t in tiles:
        ry0, rx0, ry1, rx1 = t.read
        inside = [b for b in boxes if b[0] >= ry0 and b[1] >= rx0 and b[2] <= ry1 and b[3] <= rx1]
        mine = _nuclei(inside, (ry0, rx0), t.shape).centred_in(t.core_box_in_read)
        for (y0, x0, y1, x1), (y, x) in zip(mine.boxes, mine.centres()):
            assert t.core[0] <= y + ry0 < t.core[2] and t.core[1] <= x + rx0 < t.core[3]
            seen.append((y0 + ry0, x0 + rx0, y1 + ry0, x1 + rx0))
    # boxes at the slide's edge stick out: they are clipped out of every read box here, so
    # only the ones fully inside the slide count
    whole = [b for b in boxes if b[0] >= 0 and b[1] >= 0 and b[2] <= 300 and b[3] <= 400]
    assert sorted(seen) == sorted(whole)  # each once, in slide coordinates


def test_slide_grid_reads_boxes_of_several_fields_with_aligned_cores():
    cfg = preset("tiny")
    margin = tile_margin(cfg, FIELD)
    tiles = slide_grid((2000, 3000), cfg, FIELD)  # two fields a side: cores (380, 540) cut to 64s
    assert tiles[0].core == (0, 0, 320, 512) and tiles[0].shape == (320 + margin, 512 + margin)
    inner = next(t for t in tiles if t.row == 1 and t.col == 1)  # starts 64 * k - 50: moved to an even px
    assert inner.read[:2] == (320 - margin, 512 - margin) and inner.shape == (320 + 2 * margin, 512 + 2 * margin)
    assert input_alignment(cfg, FIELD) == 1 and input_alignment(cfg, (480, 640)) == 2
    assert input_alignment(preset("paper"), (1536, 2040)) == 51 and input_alignment(preset("paper"), (1920, 2560)) == 16
    assert all(t.core[0] % CORE_ALIGN == 0 and t.core[1] % CORE_ALIGN == 0 for t in tiles)
    assert slide_grid((2000, 3000), cfg, FIELD, fields_per_tile=1)[0].core == (0, 0, 128, 192)


# ---------------------------------------------------------------- tissue

def test_tissue_test_tells_glass_from_a_field():
    s = mosaic(1, 2, seed=3, empty=(1,))
    field, glass = s.image[:, :320], s.image[:, 360:]
    assert tissue_fraction(glass) == 0.0
    assert tissue_fraction(field) > 0.05
    assert stained(np.array([[[236, 224, 228], [72, 30, 112]]], np.uint8)).tolist() == [[False, True]]


# ---------------------------------------------------------------- reading slides

@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    """2 x 3 synthetic fields (one position left as glass) as a 3-level pyramidal TIFF, 0.5 µm."""
    s = mosaic(2, 3, gap=40, seed=1, empty=(5,))
    path = tmp_path_factory.mktemp("wsi") / "S07.tif"
    write_pyramidal_tiff(path, s.image, mpp=0.5, levels=3)
    return s, path


def test_pyramidal_tiff_reads_back_with_its_levels_and_pixel_size(slide_file, tmp_path):
    s, path = slide_file
    with open_slide(str(path)) as slide:
        assert slide.id == slide_id(str(path)) == "S07"
        assert slide.level_shapes == [(520, 1040), (260, 520), (130, 260)]
        assert slide.downsamples == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(0.5)
        assert (slide.read_region(0, (100, 200, 300, 555)) == s.image[100:300, 200:555]).all()
        half = cv2.resize(s.image, (520, 260), interpolation=cv2.INTER_AREA)
        assert (slide.read_region(1, (10, 20, 60, 90)) == half[10:60, 20:90]).all()
        again = pickle.loads(pickle.dumps(slide))  # what a Ray task receives: reopens lazily
        assert (again.read_region(2, (0, 0, 130, 260)) == slide.read_region(2, (0, 0, 130, 260))).all()
    plain = tmp_path / "field.tif"
    cv2.imwrite(str(plain), s.image[:240, :320])  # a field image saved as TIFF (stripped)
    import tifffile
    tifffile.imwrite(tmp_path / "tiled_field.tif", s.image[:240, :320], tile=(64, 64))
    assert is_whole_slide(str(path)) and is_whole_slide("x/slide.svs") and is_whole_slide("a.NDPI")
    assert not is_whole_slide(str(plain)) and not is_whole_slide(str(tmp_path / "tiled_field.tif"))
    assert not is_whole_slide("x/field.bmp")


def test_resampled_view_agrees_across_tiles_and_with_an_area_resize(slide_file):
    s, path = slide_file
    with open_slide(str(path)) as slide:
        view = SlideView.at(slide, target_mpp=0.75)  # level 1 (1.0 µm) is coarser: level 0 shrunk
        assert (view.level, view.factor) == (0, pytest.approx(0.5 / 0.75))
        assert view.shape == (346, 693) and view.to_level0 == pytest.approx(1.5)
        a, b = view.read((0, 0, 200, 300)), view.read((150, 250, 346, 693))
        assert (a[150:, 250:] == b[:50, :50]).all()  # the same pixels from either tile
        ref = cv2.resize(s.image, (693, 346), interpolation=cv2.INTER_AREA)
        assert np.abs(view.read((0, 0, 346, 693)).astype(int) - ref).mean() < 3.0
        with pytest.raises(Exception, match="pixel size"):
            SlideView.at(open_slide(str(_no_mpp(s, path.parent))), target_mpp=0.5)
        assert SlideView.at(open_slide(str(_no_mpp(s, path.parent))), 1.0, mpp=0.5).level == 1


def _no_mpp(s, folder):
    out = folder / "nompp.tif"
    if not out.exists():
        write_pyramidal_tiff(out, s.image, mpp=None, levels=2)
    return out


@pytest.mark.s3
def test_slide_on_s3_reads_the_same_pixels_by_range_requests(s3_bucket, tmp_path, monkeypatch):
    """An incompressible 16 MB slide: two regions cost a few blocks, not the file."""
    import s3fs

    image = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), np.uint8)
    local = tmp_path / "noise.tif"
    write_pyramidal_tiff(local, image, mpp=0.25, levels=2, compression=None)
    from segpc.io.storage import filesystem

    fs, _ = filesystem(s3_bucket)
    fs.put_file(str(local), f"{s3_bucket}/noise.tif")
    fetched = []
    real = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range",
                        lambda self, start, end: fetched.append(end - start) or real(self, start, end))
    with open_slide(f"{s3_bucket}/noise.tif") as remote, open_slide(str(local)) as here:
        assert remote.level_shapes == here.level_shapes and remote.mpp == pytest.approx(0.25)
        for level, box in [(0, (1000, 700, 1100, 900)), (1, (5, 500, 300, 700))]:
            assert (remote.read_region(level, box) == here.read_region(level, box)).all()
    size = local.stat().st_size
    print(f"fetched {sum(fetched)} of {size} bytes in {len(fetched)} range reads")
    assert size > 15_000_000 and 0 < sum(fetched) < size / 4, (sum(fetched), size)


# ---------------------------------------------------------------- the slide driver

def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def colour_nuclei(x: np.ndarray) -> np.ndarray:
    """A context-free stand-in for the U-Net: dark blue-violet pixels are nucleus. Each
    output pixel depends on its input pixel alone, so a tile and the whole slide agree."""
    x = x.astype(np.float32)
    return _sigmoid((150 - x.max(-1)) / 5) * _sigmoid((x[..., 2] - x[..., 1] - 40) / 5)


def colour_cells(scale, crops) -> np.ndarray:
    """A context-free stand-in for the cytoplasm networks: blue-dominant pixels are cell."""
    x = np.stack([c.pixels for c in crops]).astype(np.float32)
    return _sigmoid((x[..., 2] - x[..., 0] - 25) / 5)


def whole_config(cfg, shape):
    """The same settings for the whole mosaic run as one image at its own pixels: a U-Net input
    that fits it unresized and the size rule kept in pixels (it scales with the image)."""
    cfg = copy.deepcopy(cfg)
    cfg.nucleus.min_area = cfg.nucleus.min_area * FIELD[0] * FIELD[1] / (shape[0] * shape[1])
    cfg.nucleus.input_size = -(-max(shape) // 32) * 32
    return cfg


def _centre(cell) -> tuple[int, int]:
    """A cell's nucleus centre, by the tiles' rule, in its box's coordinates' frame."""
    return Nuclei((0, 0), [cell.box], [cell.nucleus], [1.0]).centres()[0]


def _full(cells, shape, what="cell"):
    out = []
    for c in cells:
        y0, x0, y1, x1 = c.box
        m = np.zeros(shape, bool)
        m[y0:y1, x0:x1] = getattr(c, what)
        out.append(m)
    return out


@pytest.mark.s3
def test_slide_from_s3_finds_every_cell_once_exactly_as_the_whole_mosaic_run(slide_file, s3_bucket):
    s, path = slide_file
    from segpc.io.storage import filesystem

    fs, _ = filesystem(s3_bucket)
    fs.put_file(str(path), f"{s3_bucket}/S07.tif")
    seg = Segmenter(preset("tiny"), colour_nuclei, colour_cells)
    slide = open_slide(f"{s3_bucket}/S07.tif")
    result = segment_slide(seg, slide, FIELD, fields_per_tile=1)  # small tiles: many seams
    shape = s.image.shape[:2]
    whole = seg.with_config(whole_config(seg.config, shape)).segment(s.image)
    assert len(whole.cells) >= 20
    # the seams cut cells: without ownership, cells near seams come out twice
    tiles = slide_grid(shape, seg.config, FIELD, fields_per_tile=1)
    cores = {(t.row, t.col): t for t in tiles}
    crossing = [c for c in whole.cells if sum(
        not (c.box[2] <= t.core[0] or c.box[0] >= t.core[2] or c.box[3] <= t.core[1] or c.box[1] >= t.core[3])
        for t in cores.values()) > 1]
    assert len(crossing) >= 3
    at_border = [c for c in whole.cells if c.box[0] == 0 or c.box[1] == 0 or c.box[2] == shape[0] or c.box[3] == shape[1]]
    assert at_border
    # every cell once, with the very masks of the untiled run
    key = lambda c: (c.box, c.nucleus.tobytes(), c.cell.tobytes())
    assert sorted(map(key, result.cells)) == sorted(map(key, whole.cells))
    assert [c.cell_id for c in result.cells] == list(range(1, len(result.cells) + 1))
    nuclei = iou_matrix(_full(result.cells, shape, "nucleus"), _full(result.cells, shape, "nucleus"))
    np.fill_diagonal(nuclei, 0)
    assert nuclei.max() <= 0.5 and len({_centre(c) for c in result.cells}) == len(result.cells)
    truth = {"s": [t.cell for t in s.truth]}
    f1 = strict_score(truth, {"s": _full(result.cells, shape)})["f1"]
    assert f1 == strict_score(truth, {"s": _full(whole.cells, shape)})["f1"] and f1 > 0.6
    # the glass where the sixth field would be was skipped before any network ran
    assert result.tiles == len(tiles) == 30 and result.tiles_analysed == 24
    assert 0.85 < result.analysed_fraction < 1.0
    assert result.mpp == pytest.approx(0.5)
    assert result.slide_mm2 == pytest.approx(520 * 1040 * 0.25 / 1e6)
    assert result.analysed_mm2 == pytest.approx(result.analysed_px * 0.25 / 1e6)
    fractions = tile_fractions(SlideView.at(slide), tiles)
    assert sorted(f for f in fractions if f < 0.001) == [0.0] * 6
    # the per-tile step alone: a tile's cells are the slide's cells of its core
    t = cores[(1, 2)]
    mine = [key(c) for c in result.cells if t.core[0] <= _centre(c)[0] < t.core[2]
            and t.core[1] <= _centre(c)[1] < t.core[3]]
    assert mine and sorted(mine) == sorted(map(key, segment_tile(seg, SlideView.at(slide), t, FIELD)))
    # without a small level the tissue test runs on each tile's own pixels, before the networks
    glass = next(t for t, f in zip(tiles, fractions) if f == 0.0)
    skipped, kept = segment_tiles(seg, SlideView.at(slide), [glass, t], FIELD, min_fraction=0.001)
    assert skipped is None and sorted(map(key, kept)) == sorted(mine)


def test_slide_with_the_trained_unet_matches_the_field_level_run(bundle, slide_file):
    """The quick bundle's U-Net (its cytoplasm networks are untrained: colour rule instead) on
    the slide's tiles (two fields a side, seen at a field's scale) scores as on the fields
    (the issue's bound: strict F1 within 0.01); no seam may count a cell twice."""
    from segpc.method.segmenter import nucleus_net
    from segpc.models.bundle import load_bundle

    s, path = slide_file
    b = load_bundle(bundle, device="cpu")
    seg = Segmenter(b.config, nucleus_net(b, "cpu", 8), colour_cells)
    shape = s.image.shape[:2]
    result = segment_slide(seg, open_slide(str(path)), FIELD)
    fields = seg.segment_batch([f[0] for f in s.fields])
    field_cells = []
    for res, (_, _, (y, x)) in zip(fields, s.fields):
        for c in res.cells:
            y0, x0, y1, x1 = c.box
            field_cells.append(replace(c, box=(y0 + y, x0 + x, y1 + y, x1 + x)))
    nuclei = iou_matrix(_full(result.cells, shape, "nucleus"), _full(result.cells, shape, "nucleus"))
    np.fill_diagonal(nuclei, 0)
    assert nuclei.max() <= 0.5  # no duplicate at a seam
    assert abs(len(result.cells) - len(field_cells)) <= 2
    truth = {"s": [t.cell for t in s.truth]}
    f1 = strict_score(truth, {"s": _full(result.cells, shape)})["f1"]
    f1_fields = strict_score(truth, {"s": _full(field_cells, shape)})["f1"]
    print(f"slide: {len(result.cells)} cells, F1 {f1:.3f}; fields: {len(field_cells)} cells, F1 {f1_fields:.3f}")
    assert abs(f1 - f1_fields) <= 0.01 and f1 > 0.6


# ---------------------------------------------------------------- the batch job's pure steps

def test_job_rows_of_a_slide_and_their_results_are_the_slide_drivers(slide_file, tmp_path):
    """What the batch job does per slide (its rows) and per tile (read, segment, keep the owned
    cells in the core) gives segment_slide's cells; errors name the file and the flag."""
    from segpc.io.outputs import Placement
    from segpc.wsi.job import SLIDE, SlideTile, level0_box, placement, read_tile, slide_tiles, tile_id, tile_result

    s, path = slide_file
    seg = Segmenter(preset("tiny"), colour_nuclei, colour_cells)
    head, tiles = slide_tiles(str(path), seg.config, FIELD)
    assert (head.kind, head.tiles, head.skipped, len(tiles)) == (SLIDE, 6, 1, 5)  # 2 x 3, a glass sliver
    assert tiles[0].tile.shape == (370, 562) and all(t.field == FIELD for t in tiles)  # core + margin, clipped
    assert head.mpp == pytest.approx(0.5) and head.shape == (520, 1040)
    assert all(SlideTile.from_json(t.to_json()) == t for t in [head, *tiles])
    assert tile_id("S07", 1, 2) == "S07__tile-1-2"
    ref = segment_slide(seg, open_slide(str(path)), FIELD)
    got = []
    results = seg.segment_batch([read_tile(t) for t in tiles], field_shape=FIELD,
                                regions=[t.tile.core_box_in_read for t in tiles])
    for t, res in zip(tiles, results):
        kept = tile_result(res, t)
        # ids unique in the slide: tile index (row-major, 3 columns) * stride + 1..n
        assert (t.grid_cols, t.label_stride) == (3, 10 ** 8)
        base = (t.row * 3 + t.col) * 10 ** 8
        assert kept.shape == t.core_shape and [c.cell_id for c in kept.cells] == list(range(base + 1, base + len(kept.cells) + 1))
        nuclei, cells = kept.label_maps()  # the core only; cells reaching past it are cut
        assert nuclei.shape == t.core_shape and set(np.unique(nuclei)) - {0} <= {c.cell_id for c in kept.cells}
        p = placement(t)
        assert p == Placement("tile", t.mpp, t.core[:2], 1.0, core_area_px=t.core_area, tile=t)
        got += [(level0_box(c.box, p.origin, p.to_level0), c.nucleus.tobytes(), c.cell.tobytes()) for c in kept.cells]
    want = [(c.box, c.nucleus.tobytes(), c.cell.tobytes()) for c in ref.cells]
    assert len(got) == len(want) > 20 and sorted(got) == sorted(want)
    # a slide read at another pixel size: level-0 boxes cover the analysis boxes
    assert level0_box((0, 1, 3, 5), (10, 20), 1.5) == (15, 31, 20, 38)
    assert level0_box((2, 2, 4, 4), (0, 0), 2 / 3 * 1.5) == (2, 2, 4, 4)
    # the bundle knows its pixel size, the slide does not: the flag is named, --mpp stands in
    nompp = str(_no_mpp(s, path.parent))
    with pytest.raises(Exception, match=r"nompp.tif.*--mpp"):
        slide_tiles(nompp, seg.config, FIELD, target_mpp=1.0)
    head, _ = slide_tiles(nompp, seg.config, FIELD, target_mpp=1.0, mpp=0.5)
    assert (head.level, head.factor, head.shape, head.to_level0) == (1, 1.0, (260, 520), 2.0)
    with pytest.raises(Exception, match="training fields"):
        slide_tiles(str(path), seg.config, None)
