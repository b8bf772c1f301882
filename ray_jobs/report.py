"""Build the analysts' HTML report of a batch-job output (no Ray needed).

    python -m ray_jobs.report --output URI [--gallery N]
"""

from __future__ import annotations

import argparse
import sys

from segpc.errors import exit_status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the batch job's --output (local or s3://)")
    p.add_argument("--gallery", type=int, default=12, help="QC overlays to include (most cells first)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    from ray_jobs.common import job_environment
    from segpc.evaluation.report import build_report

    with job_environment(args):  # --s3-endpoint, for this run only
        return exit_status(lambda: print(f"report: {build_report(args.output, args.gallery)}"))


if __name__ == "__main__":
    sys.exit(main())
