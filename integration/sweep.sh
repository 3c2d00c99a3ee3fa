#!/usr/bin/env bash
# Accuracy sweep: run_accuracy_test.sh over (PREFILL_TP, DECODE_TP) x models, plus
# 2 prefill x 2 decode instances per model, and print a table (markdown).
# Environment: SWEEP_MODELS ["tiny-qwen3 tiny-llama-gqa2 tiny-deepseek-mla"] ("" skips)
#              SWEEP_PAIRS ["1,1 1,2 2,1 2,4 4,2"]  SWEEP_MULTI ["2x2"] (NUM_PREFILL x NUM_DECODE at TP 1; "" skips)
#              SWEEP_HYBRID_MODELS ["tiny-mistral-swa tiny-qwen3-hybrid tiny-gemma3"] ("" skips): sliding-window
#              presets, run at SWEEP_HYBRID_PAIRS ["2,1 1,2 2,4"] (their windows, 6 tokens, are shorter than the prompts)
#              everything run_accuracy_test.sh reads (DEVICE, BLOCK_SIZE, NUM_PROMPTS, ...)
# Exit status 0 only when every row passes.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

read -r -a MODELS <<<"${SWEEP_MODELS-tiny-qwen3 tiny-llama-gqa2 tiny-deepseek-mla}"
read -r -a PAIRS <<<"${SWEEP_PAIRS:-1,1 1,2 2,1 2,4 4,2}"
MULTI=${SWEEP_MULTI-2x2}
read -r -a HYBRID_MODELS <<<"${SWEEP_HYBRID_MODELS-tiny-mistral-swa tiny-qwen3-hybrid tiny-gemma3}"
read -r -a HYBRID_PAIRS <<<"${SWEEP_HYBRID_PAIRS:-2,1 1,2 2,4}"
SWEEP_DIR=$(mktemp -d -t kvxfer-sweep.XXXXXX)
CHILD=0
trap '[[ $CHILD != 0 ]] && kill -TERM $CHILD 2>/dev/null; wait; exit 130' INT TERM

ROWS=()
FAILED=0
run_row() {  # MODEL NUM_PREFILL PREFILL_TP NUM_DECODE DECODE_TP
  local model=$1 np=$2 ptp=$3 nd=$4 dtp=$5 dir rc start=$SECONDS
  dir="$SWEEP_DIR/$model-p${np}x${ptp}-d${nd}x${dtp}"
  kvx_log "=== $model: prefill ${np}x TP$ptp, decode ${nd}x TP$dtp ==="
  MODEL=$model NUM_PREFILL=$np PREFILL_TP=$ptp NUM_DECODE=$nd DECODE_TP=$dtp WORK_DIR=$dir \
    "$KVX_ROOT/integration/run_accuracy_test.sh" &
  CHILD=$!
  wait $CHILD
  rc=$?
  CHILD=0
  ROWS+=("$("$PYTHON" - "$dir/report.json" "$model" "${np}x TP$ptp" "${nd}x TP$dtp" "$rc" $((SECONDS - start)) <<'EOF'
import json, sys
path, model, p, d, rc, secs = sys.argv[1:]
try:
    r = json.load(open(path))
    cells = [r["prompts"], r["exact"], len(r["near_ties"]), len(r["mismatches"]) + len(r["errors"]),
             len(r["no_transfer"]), f"{r['bytes'] / 2**20:.1f}"]
except (OSError, ValueError, KeyError):
    cells = ["-"] * 6
verdict = "PASS" if rc == "0" else f"FAIL ({rc})"
print("| " + " | ".join(str(c) for c in [model, p, d, *cells, secs, verdict]) + " |")
EOF
)")
  ((rc == 0)) || FAILED=$((FAILED + 1))
}

for model in "${MODELS[@]}"; do
  for pair in "${PAIRS[@]}"; do run_row "$model" 1 "${pair%,*}" 1 "${pair#*,}"; done
  if [[ -n "$MULTI" ]]; then run_row "$model" "${MULTI%x*}" 1 "${MULTI#*x}" 1; fi
done
for model in "${HYBRID_MODELS[@]}"; do
  for pair in "${HYBRID_PAIRS[@]}"; do run_row "$model" 1 "${pair%,*}" 1 "${pair#*,}"; done
done

echo
echo "Accuracy sweep ($(date -u +%Y-%m-%d), DEVICE=${DEVICE:-cpu}, BLOCK_SIZE=${BLOCK_SIZE:-16}," \
  "NUM_PROMPTS=${NUM_PROMPTS:-100}, MAX_TOKENS=${MAX_TOKENS:-8}); logs in $SWEEP_DIR"
echo
echo "| model | prefill | decode | prompts | exact | near-ties | mismatches+errors | no transfer | MiB pulled | s | result |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
if ((FAILED)); then echo "$FAILED row(s) failed"; exit 1; fi
echo "all rows passed"
