#!/usr/bin/env bash
# Commit-ready results of a study in progress, without disturbing its workers: the records of every evaluated run
# (run.json, metrics.jsonl, lm_eval.json, ssa-run.json: what the tables read) into results/STUDY/runs/, and the
# tables over them (results.json, summary.md, figures) into results/STUDY/. The tables are rebuilt with
# `ssa experiment lm ARGS --tables-only` on a copy of those records (no models, checkpoints or unfinished runs),
# laid out as the study's own directory, so results.json names the runs as the study itself would. Then commit
# results/STUDY. From the repository root, with the study's own ARGS:
#   scripts/refresh_results.sh lm-search --budget search
#   scripts/refresh_results.sh lm-packed --budget packed --set chosen=LABEL --set stitched_from=runs/lm-search
#   RUNS=/data/runs SSA=ssa scripts/refresh_results.sh lm-confirm --budget confirm --set chosen=LABEL
set -euo pipefail
if [ $# -lt 1 ] || [ ! -d "${RUNS:-runs}/$1/runs" ]; then
  echo "refresh_results: usage: scripts/refresh_results.sh STUDY ARGS... (no runs in ${RUNS:-runs}/${1:-STUDY}/runs)" >&2
  exit 2
fi
study="$1"
shift
RUNS="${RUNS:-runs}"
RESULTS="${RESULTS:-results}"
read -r -a SSA <<<"${SSA:-$PWD/.venv/bin/python -m selective_attention}"
PYTHON="${PYTHON:-$PWD/.venv/bin/python}"
tmp="$(mktemp -d)"
log="$(mktemp)"
trap 'rm -rf "$tmp" "$log"' EXIT

copied=0
while read -r run; do  # lm-search/runs/wiki/vanilla-seed0 (evaluated: its lm_eval.json is there)
  mkdir -p "$tmp/runs/$run" "$RESULTS/$run"
  for f in run.json metrics.jsonl lm_eval.json ssa-run.json; do
    if [ -f "$RUNS/$run/$f" ]; then
      cp "$RUNS/$run/$f" "$tmp/runs/$run/"
      cp "$RUNS/$run/$f" "$RESULTS/$run/"
    fi
  done
  copied=$((copied + 1))
done < <(cd "$RUNS" && find "$study/runs" -mindepth 3 -maxdepth 3 -name lm_eval.json -printf '%h\n' | sort)

# a packed study pairs with the stitched study it names: its results.json, at the same relative path
for arg in "$@"; do
  case "$arg" in
    stitched_from=*)
      other="${arg#stitched_from=}"
      mkdir -p "$tmp/$other"
      cp "$other/results.json" "$tmp/$other/"
      ;;
  esac
done

(cd "$tmp" && "${SSA[@]}" experiment lm "$@" --out "runs/$study" --tables-only --no-progress) >"$log" 2>&1 || {
  tail -n 5 "$log" >&2
  exit 1
}
cp "$tmp/runs/$study/results.json" "$tmp/runs/$study/summary.md" "$RESULTS/$study/"
cp "$tmp/runs/$study/"*.png "$RESULTS/$study/" 2>/dev/null || true
pending="$("$PYTHON" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["pending"]))' "$RESULTS/$study/results.json")"
echo "refresh_results: $study: $copied runs evaluated, $pending pending; results in $RESULTS/$study (commit them)"
