#!/usr/bin/env bash
# The two commands of the README: ./run.sh demo | ./run.sh test  (both create .venv once).
set -euo pipefail
cd "$(dirname "$0")"
cmd=${1:-help}
shift || true
case "$cmd" in
  test)
    bash scripts/venv.sh
    exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
    ;;
  demo)
    bash scripts/venv.sh
    exec .venv/bin/python -m ray_jobs.demo "$@"
    ;;
  *)
    echo "usage: ./run.sh demo [--help for its options] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
