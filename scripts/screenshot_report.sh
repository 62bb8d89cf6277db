#!/usr/bin/env bash
# Screenshot an HTML report with headless Chromium, to check that it renders with every figure present.
#   scripts/screenshot_report.sh runs/demo/report.html [OUT.png]
# Needs Debian's chromium (apt-get install -y chromium) or google-chrome / chromium-browser on PATH.
set -euo pipefail
report="${1:?usage: $0 REPORT.html [OUT.png]}"
out="${2:-${report%.html}.png}"
[ -f "$report" ] || { echo "no such report: $report" >&2; exit 2; }
browser=""
for b in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$b" >/dev/null 2>&1; then browser="$b"; break; fi
done
[ -n "$browser" ] || { echo "no chromium found (apt-get install -y chromium)" >&2; exit 3; }
abs="$(realpath "$report")"
mkdir -p "$(dirname "$out")"
out_abs="$(realpath -m "$out")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-dev-shm-usage --hide-scrollbars --user-data-dir="$profile" --window-size=1280,4000 \
  --screenshot="$out_abs" "file://$abs" >/dev/null 2>&1
[ -s "$out_abs" ] || { echo "chromium wrote no screenshot" >&2; exit 1; }
echo "$out_abs"
