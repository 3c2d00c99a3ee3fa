#!/usr/bin/env bash
# run_accuracy_test.sh's vLLM engine: vLLM prefill + decode with a KV connector behind
# `kvxfer proxy --first-token decode`, against a colocated `vllm serve` of the same model; greedy
# outputs must agree prompt by prompt, the decode must have computed at most one prompt token per
# request itself, and no KV block may stay in use afterwards (../accuracy_check.py --vllm).
#   integration/vllm/run_accuracy_test.sh          (MODEL [tiny-qwen3]: a preset or model directory)
# Environment: CONNECTOR [kvxfer] (nixl: vLLM's NixlConnector, for comparison) PREFILL_TP [1]
#   DECODE_TP [1] (vLLM's --tensor-parallel-size) PREFILL_CPUS [0] DECODE_CPUS [1] (vllm/common.sh) NUM_PROMPTS [100] MAX_TOKENS [8] CONCURRENCY [8]
#   VLLM_DTYPE [float32] VLLM_VENV [.vllm-venv: scripts/vllm-venv.sh] HEALTH_TIMEOUT [900]
#   MODEL_CACHE [~/.cache/kvxfer/integration] WORK_DIR [fresh temp dir] KEEP_LOGS [0]
# Exit status 0 only when the check passes; every process started here is stopped on exit.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL=${MODEL:-tiny-qwen3}
CONNECTOR=${CONNECTOR:-kvxfer}
PREFILL_TP=${PREFILL_TP:-1} DECODE_TP=${DECODE_TP:-1}
NUM_PROMPTS=${NUM_PROMPTS:-100} MAX_TOKENS=${MAX_TOKENS:-8} CONCURRENCY=${CONCURRENCY:-8}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-900}
# float32 by default: the colocated reference and the P/D pair then agree to the bit, not only
# up to bf16 rounding ties.
export VLLM_DTYPE=${VLLM_DTYPE:-float32}
for var in PREFILL_TP DECODE_TP NUM_PROMPTS MAX_TOKENS CONCURRENCY HEALTH_TIMEOUT; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || kvx_die "$var must be a positive integer, got '${!var}'"
done
kvx_vllm_kv_config "$CONNECTOR" >/dev/null
kvx_vllm_check

kvx_work_dir kvxfer-vllm-accuracy

MODEL_DIR=$(kvx_model_dir "$MODEL" "${MODEL_CACHE:-$HOME/.cache/kvxfer/integration}")
read -r P_PORT P_SIDE D_PORT D_SIDE R_PORT X_PORT <<<"$(kvx_free_ports 6)"
kvx_log "model $MODEL_DIR | vLLM prefill TP$PREFILL_TP -> decode TP$DECODE_TP | connector $CONNECTOR"
kvx_start_vllm prefill "$LOGS/prefill.log" "$MODEL_DIR" "$P_PORT" "$P_SIDE" "$PREFILL_CPUS" "$CONNECTOR" --tensor-parallel-size "$PREFILL_TP"
kvx_start_vllm decode "$LOGS/decode.log" "$MODEL_DIR" "$D_PORT" "$D_SIDE" "$DECODE_CPUS" "$CONNECTOR" --tensor-parallel-size "$DECODE_TP"
kvx_start_vllm reference "$LOGS/reference.log" "$MODEL_DIR" "$R_PORT" "" "" none
SERVER_PORTS=("$P_PORT" "$D_PORT" "$R_PORT")  # in the order started, so index i is KVX_PIDS[i]
for i in 0 1 2; do
  kvx_wait_healthy "http://127.0.0.1:${SERVER_PORTS[$i]}" "${KVX_PIDS[$i]}" "${KVX_NAMES[$i]}" "${KVX_LOGS[$i]}" \
    "$HEALTH_TIMEOUT"
done
kvx_start proxy "$LOGS/proxy.log" "$PYTHON" -m kvxfer.entrypoints.cli proxy --port "$X_PORT" --first-token decode \
  --prefill "http://127.0.0.1:$P_PORT" --decode "http://127.0.0.1:$D_PORT" --log-level warning
kvx_wait_healthy "http://127.0.0.1:$X_PORT" "${KVX_PIDS[3]}" proxy "${KVX_LOGS[3]}" 180

set +e
# Block size 32: vLLM's (kvx_start_vllm), so the prompts' lengths straddle its block edges.
"$PYTHON" "$KVX_ROOT/integration/accuracy_check.py" --vllm --proxy "http://127.0.0.1:$X_PORT" \
  --reference "http://127.0.0.1:$R_PORT" --decode "http://127.0.0.1:$D_PORT" \
  --servers "http://127.0.0.1:$P_PORT" "http://127.0.0.1:$D_PORT" --model-dir "$MODEL_DIR" --block-size 32 \
  --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" --concurrency "$CONCURRENCY" --json "$WORK_DIR/report.json"
rc=$?
set -e
summary="ENGINE=vllm CONNECTOR=$CONNECTOR MODEL=$MODEL PREFILL=TP$PREFILL_TP DECODE=TP$DECODE_TP"
if ((rc == 0)); then echo "PASS $summary"; else echo "FAIL $summary (rc $rc)"; fi
exit "$rc"
