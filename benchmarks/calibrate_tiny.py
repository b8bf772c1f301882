"""Calibrate a tiny bundle on its held-out slide; score it before and after on unseen slides.

    python benchmarks/train_tiny.py --keep DIR          # once: DIR/archive and DIR/bundle
    python benchmarks/calibrate_tiny.py --keep DIR [--test-images 40] [--budget X]

The calibration data is the slide training held out (DIR/archive, the same split rule as
training). The figures after calibration are measured on a fresh synthetic archive of other
slides (DIR/test, another seed), not on the data that chose the thresholds; the table of
the calibration itself (in-sample) is printed too. The calibrated copy goes to
DIR/bundle-calibrated; DIR/bundle is left as it was.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpc.evaluation.calibration import calibrate, format_table, write_calibrated  # noqa: E402
from segpc.evaluation.metrics import evaluate  # noqa: E402
from segpc.io.segpc_format import read_split  # noqa: E402
from segpc.io.synthetic import write_archive  # noqa: E402
from segpc.method.segmenter import Segmenter  # noqa: E402
from segpc.training.splits import list_splits  # noqa: E402


def slides_of(root: Path) -> dict[str, str]:
    with open(root / "slides.csv", newline="") as f:
        return {row["image_id"]: row["slide_id"] for row in csv.DictReader(f)}


def measure(bundle: str, samples: list, slides: dict[str, str]) -> dict:
    """The real segmenter on ``samples``: both metrics, counts per slide and inferences."""
    segmenter = Segmenter.from_bundle(bundle, device="cpu")
    truth, pred, inferences, counts = {}, {}, 0, {}
    for s in samples:
        result = segmenter.segment(s.image)
        truth[s.image_id] = [inst.cell for inst in s.instances]
        pred[s.image_id] = [inst.cell for inst in result.instances()]
        inferences += sum(result.inferences.values())
        slide = counts.setdefault(slides[s.image_id], [0, 0])
        slide[0], slide[1] = slide[0] + len(s.instances), slide[1] + len(result.cells)
    out = evaluate(truth, pred)
    out.pop("per_image")
    return {**out, "count_bias": out["n_pred"] / out["n_truth"] - 1,
            "slide_count_error": sum(abs(p - t) / t for t, p in counts.values()) / len(counts),
            "cytoplasm_inferences": inferences}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", required=True, help="the folder benchmarks/train_tiny.py --keep DIR left")
    p.add_argument("--test-images", type=int, default=40, help="images of the unseen test archive")
    p.add_argument("--test-slides", type=int, default=2)
    p.add_argument("--size", default="640x480")
    p.add_argument("--budget", type=float, default=None, help="cytoplasm inferences per nucleus")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="mIoU and recall a setting may lose against the current one")
    args = p.parse_args()
    work = Path(args.keep)
    archive, bundle, test = work / "archive", str(work / "bundle"), work / "test"
    calibrated = work / "bundle-calibrated"

    held_out = {r.image_id for r in list_splits(str(archive)).validation}
    val = [s for s in read_split(archive, with_images=True) if s.image_id in held_out]
    t0 = time.time()
    chosen, report = calibrate(Segmenter.from_bundle(bundle, device="cpu"), val, budget=args.budget,
                               slides=slides_of(archive), data=f"{archive} (held-out slide)",
                               tolerance=args.tolerance)
    wall = time.time() - t0
    print(f"calibration: {report['images']} images, {report['truth_cells']} cells, "
          f"{report['nuclei']} nuclei, {report['settings_searched']} settings in {wall:.0f}s\n")
    print(format_table(report))
    print("\nguard:", json.dumps(report["guard"]))
    print("separation of true and false cells (AUC):", json.dumps(report["separation"]))
    if calibrated.exists():
        shutil.rmtree(calibrated)
    write_calibrated(bundle, chosen, report, str(calibrated))

    if not (test / "slides.csv").exists():
        write_archive(test, args.test_images, args.test_slides, seed=23, size=args.size)
    samples, slides = list(read_split(test, with_images=True)), slides_of(test)
    before, after = measure(bundle, samples, slides), measure(str(calibrated), samples, slides)
    print(f"\nunseen test slides: {len(samples)} images, {before['n_truth']} cells")
    print(f"{'':<12} {'F1':>7} {'mIoU':>7} {'prec':>7} {'recall':>7} {'cells':>6} {'count':>7} "
          f"{'slide_err':>9} {'crops':>6}")
    for name, m in (("before", before), ("calibrated", after)):
        print(f"{name:<12} {m['f1']:7.4f} {m['miou']:7.4f} {m['precision']:7.4f} {m['recall']:7.4f} "
              f"{m['n_pred']:6d} {m['count_bias']:+7.1%} {m['slide_count_error']:9.1%} "
              f"{m['cytoplasm_inferences']:6d}")
    print(json.dumps({"calibration_s": round(wall), "chosen": report["chosen"], "default": report["default"],
                      "test_before": before, "test_after": after}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
