#!/usr/bin/env bash
# The API reference builds from the docstrings without a warning (warnings are errors).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python -m sphinx -W --keep-going -q -b html docs/api "$out"
echo "docs: API reference built ($(ls "$out"/*.html | wc -l) pages)"
