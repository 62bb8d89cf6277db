#!/usr/bin/env bash
# The open studies in their order, each resuming where it stopped (rerun the script to continue after a stop):
#   1. the configuration search         ssa experiment lm --budget search
#   2. with the search's choice (read from its results.json once every search run is done; the pre-registered
#      rule of experiments/lm/config.py chose it): the packed-documents study (paired with the search's runs),
#      the confirmation, and the confirmation's wiki half packed (paired with the confirmation's runs)
# Low priority (nice 10), so that tests and benchmarks run beside it. Results are refreshed in RUNS/<study>/;
# copying them into results/ (scripts/refresh_results.sh STUDY ARGS) and committing stays a person's step.
#   scripts/continue_studies.sh                     # RUNS=runs, SSA=".venv/bin/python -m selective_attention"
#   RUNS=/data/runs SSA=ssa scripts/continue_studies.sh
set -euo pipefail
RUNS="${RUNS:-runs}"
read -r -a SSA <<<"${SSA:-.venv/bin/python -m selective_attention}"
PYTHON="${PYTHON:-.venv/bin/python}"

study() {
  echo "== $(date -u +%H:%M) ssa experiment $*"
  nice -n 10 "${SSA[@]}" experiment "$@" --no-progress
}

# (the SmolLM2-135M fine-tunes, `ssa experiment finetune --budget cpu`, are complete: results/ft-smollm2/)
study lm --budget search --out "$RUNS/lm-search" --jobs 2
choice="$("$PYTHON" - "$RUNS/lm-search/results.json" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
if not results.get("complete") or not results.get("choice"):
    sys.exit(f"{sys.argv[1]}: the search is not complete ({len(results.get('pending', []))} runs pending)")
print(results["choice"]["method"])
EOF
)"
echo "== the search chose $choice"
study lm --budget packed --set chosen="$choice" --set stitched_from="$RUNS/lm-search" --out "$RUNS/lm-packed" --jobs 2
study lm --budget confirm --set chosen="$choice" --out "$RUNS/lm-confirm" --jobs 2
study lm --budget confirm-packed --set chosen="$choice" --set stitched_from="$RUNS/lm-confirm" \
  --out "$RUNS/lm-confirm-packed" --jobs 2
echo "== $(date -u +%H:%M) every study is complete"
