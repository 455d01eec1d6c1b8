#!/usr/bin/env bash
# Render `make plots`' offline page in headless Chromium (Debian's `chromium` package) with
# networking disabled, save a screenshot, and fail (exit 1) when a lead chart draws no marks:
# the check that the plots draw without a CDN and that none of the charts on top is empty.
#   make plots && bash benchmarks/plots_screenshot.sh [results/plots/screenshot.png]
set -euo pipefail
page="$(pwd)/results/plots/index.html"
out="${1:-results/plots/screenshot.png}"
# the project's interpreter: $PYTHON, else the venv's (`make` does not activate it), else PATH's
venv_python=".venv/bin/python"
[ -x "$venv_python" ] || venv_python="$(command -v python || command -v python3)"
python="${PYTHON:-$venv_python}"
test -f "$page" || { echo "error: $page is missing — run \`make plots\` first" >&2; exit 2; }
command -v chromium >/dev/null || { echo "error: no chromium — apt-get install chromium" >&2; exit 2; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --proxy-server="127.0.0.1:9" --user-data-dir="$profile" \
  --virtual-time-budget=10000 --window-size=1400,2400 --screenshot="$out" "file://$page"
echo "$out"
# The same page's DOM after Vega ran: the shapes each lead chart's data marks drew.
"$python" - "$page" "$profile" <<'PY'
import sys
from pathlib import Path

from freezecache.reporting.plots import drawn_marks, dump_dom

marks = drawn_marks(dump_dom(Path(sys.argv[1]), Path(sys.argv[2])))
for name, n in marks.items():
    print(f"{name}: {n} marks" + ("" if n else "  <- EMPTY"))
sys.exit(0 if all(marks.values()) else 1)
PY
