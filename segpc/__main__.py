"""Command line of the library: ``python -m segpc {synth,evaluate,submission,segment,calibrate,export-encoder}``."""

from __future__ import annotations

import argparse
import json
import sys

from segpc.errors import exit_status


def _synth(args: argparse.Namespace) -> None:
    from segpc.io.synthetic import write_archive

    ids = write_archive(args.out, n_images=args.images, n_slides=args.slides, seed=args.seed,
                        size=args.size)
    print(f"wrote {len(ids)} images in {args.slides} slide(s) to {args.out}", file=sys.stderr)


def _evaluate(args: argparse.Namespace) -> None:
    from segpc.io.segpc_format import evaluate_folders

    print(json.dumps(evaluate_folders(args.truth, args.pred), indent=2))


def _segment(args: argparse.Namespace) -> None:
    from segpc.io.folder import segment_folder

    summary = segment_folder(args.input, args.bundle, args.out, overlays=args.overlays,
                             device=args.device, tta=args.tta)
    print(json.dumps(summary))


def _submission(args: argparse.Namespace) -> None:
    from segpc.io.segpc_format import submission_from_folder

    submission_from_folder(args.pred, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


def _calibrate(args: argparse.Namespace) -> None:
    from segpc.evaluation.calibration import (calibrate, check_destination, format_table,
                                              labelled_split, write_calibrated)
    from segpc.method.segmenter import Segmenter

    check_destination(args.bundle, args.out)
    segmenter = Segmenter.from_bundle(args.bundle, device=args.device, tta=args.tta)
    samples, slides = labelled_split(args.data)
    chosen, report = calibrate(segmenter, samples, budget=args.budget, slides=slides,
                               data=args.data, tolerance=args.tolerance, top=args.top)
    report["tta"] = args.tta
    print(format_table(report))
    print(json.dumps({k: report[k] for k in ("chosen", "default", "budget", "guard", "separation")}))
    where = write_calibrated(args.bundle, chosen, report, args.out)
    print(f"wrote the calibrated settings to {where}/bundle.json", file=sys.stderr)


def _export_encoder(args: argparse.Namespace) -> None:
    from segpc.models.encoders import export_encoder

    print(json.dumps(export_encoder(args.encoder, args.out, args.weights)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segpc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic archive in SegPC layout (x/, y/, slides.csv)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--images", type=int, required=True, help="number of images")
    s.add_argument("--slides", type=int, default=1, help="number of slides the images spread over")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same archive")
    s.add_argument("--size", default="640x480",
                   help="WxH, 'camera1' (2040x1536), 'camera2' (2560x1920) or 'mixed' (both cameras)")
    s.set_defaults(func=_synth)

    e = sub.add_parser("evaluate", help="score predicted instance masks against the truth (JSON)")
    e.add_argument("--truth", required=True, help="folder of <id>_<k>.bmp masks or a SegPC split root")
    e.add_argument("--pred", required=True, help="folder of predicted <id>_<k>.bmp masks")
    e.set_defaults(func=_evaluate)
    t = sub.add_parser("submission", help="convert <id>_<k>.bmp masks to the challenge's submission.txt")
    t.add_argument("--pred", required=True, help="folder of <id>_<k>.bmp masks (e.g. a job's segpc/)")
    t.add_argument("--out", required=True, help="submission.txt to write")
    t.set_defaults(func=_submission)

    g = sub.add_parser("segment", help="segment a local folder of images in one process (no Ray)")
    g.add_argument("--input", required=True, help="folder of images, or a SegPC split root (x/)")
    g.add_argument("--bundle", required=True, help="model bundle folder or s3:// URI")
    g.add_argument("--out", required=True, help="output folder: masks/<id>_<k>.bmp, images.jsonl")
    g.add_argument("--overlays", action="store_true", help="also write QC overlays (PNG)")
    g.add_argument("--tta", action="store_true",
                   help="test-time flips: average both networks over 4 flips (about 4x the network time)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    g.set_defaults(func=_segment)

    c = sub.add_parser("calibrate", help="choose the aggregation thresholds on labelled images")
    c.add_argument("--bundle", required=True, help="model bundle folder or s3:// URI")
    c.add_argument("--data", required=True, help="a labelled SegPC split root (x/, y/)")
    c.add_argument("--out", default=None,
                   help="write a calibrated copy of the bundle here (default: update it in place)")
    c.add_argument("--budget", type=float, default=None,
                   help="most cytoplasm inferences per detected nucleus (default: no more than "
                        "the bundle's current setting takes on this data)")
    c.add_argument("--tolerance", type=float, default=0.0,
                   help="official mIoU and strict recall a setting may lose against the current "
                        "one and still be chosen (default 0: neither may fall)")
    c.add_argument("--top", type=int, default=15, help="rows of the table to print and keep")
    c.add_argument("--tta", action="store_true",
                   help="observe with test-time flips, for bundles run with --tta (recorded in the report)")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    c.set_defaults(func=_calibrate)

    x = sub.add_parser("export-encoder",
                       help="write an encoder's ImageNet weights as a safetensors file, for "
                            "training where nothing can be downloaded (--encoder-weights FILE)")
    x.add_argument("--encoder", required=True, help="encoder name, as in the config (resnet34, tu-xception65)")
    x.add_argument("--weights", default="imagenet", choices=["imagenet"],
                   help="the libraries' weights to export")
    x.add_argument("--out", required=True, help="FILE.safetensors to write (local path or s3:// URI)")
    x.set_defaults(func=_export_encoder)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
