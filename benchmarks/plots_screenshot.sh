#!/usr/bin/env bash
# Render `make plots`' offline page in headless Chromium (Debian's `chromium` package) with
# networking disabled, and save a screenshot: the check that the plots draw without a CDN.
#   make plots && bash benchmarks/plots_screenshot.sh [results/plots/screenshot.png]
set -euo pipefail
page="$(pwd)/results/plots/index.html"
out="${1:-results/plots/screenshot.png}"
test -f "$page" || { echo "error: $page is missing — run \`make plots\` first" >&2; exit 2; }
command -v chromium >/dev/null || { echo "error: no chromium — apt-get install chromium" >&2; exit 2; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --proxy-server="127.0.0.1:9" --user-data-dir="$profile" \
  --virtual-time-budget=10000 --window-size=1400,2400 --screenshot="$out" "file://$page"
echo "$out"
