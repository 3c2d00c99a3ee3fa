#!/usr/bin/env bash
# Issue 16's benchmark: vLLM P/D with kvxfer's KvxferConnector against vLLM P/D with vLLM's own
# NixlConnector (kv_buffer_device cpu), both started the same way (kvx_start_vllm: same flags,
# prefill pinned to PREFILL_CPUS, decode to DECODE_CPUS, NIXL's progress thread off) behind the
# same `kvxfer proxy --first-token decode`, plus a colocated `vllm serve` (no connector) for the
# disaggregation overhead: TTFT through the proxy minus the colocated TTFT. The same workload
# alternates between all endpoints in rounds (`kvxfer bench serve`, ratios vs the first: kvxfer),
# so load drift on a shared host hits them all; overhead.py then prints the goal's two figures.
#   integration/vllm/compare_connectors.sh [MODEL]      (a preset or model directory; tiny-qwen3)
# Stages (STAGES ["ttft load"]): ttft (sequential, TTFT_LENS [16 128 512 1024] tokens, median of
#   TTFT_REPEATS [20] after warm-up, endpoints alternating request by request); load (64 requests,
#   128-512 in, 32 out, concurrency 8, LOAD_ROUNDS [4] rounds).
# Environment: CONNECTORS ["kvxfer nixl"] (a P/D deployment each; "nixl nixl" checks the script
#   without kvxfer's connector; a repeated name gets a suffix) COLOCATED [1] (0: no colocated
#   server, no overhead) VLLM_VENV [.vllm-venv] VLLM_DTYPE [auto: bfloat16 here] PREFILL_CPUS [0]
#   DECODE_CPUS [1] COLOCATED_CPUS [PREFILL_CPUS] OUT [compare_connectors_out] START_TIMEOUT_S
#   [1800] SEED [0] VLLM_ARGS MODEL_CACHE [~/.cache/kvxfer/integration]
# NIXL's progress thread: integration/vllm_site/sitecustomize.py turns it off for every instance
# here; KVX_NIXL_PROGRESS_THREAD=1 (read there) leaves it on, to see where that changes the result.
# Writes OUT/<stage>.{json,txt}, OUT/overhead.txt, the servers' logs; stops what it started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_DIR=$(kvx_model_dir "${1:-tiny-qwen3}" "${MODEL_CACHE:-$HOME/.cache/kvxfer/integration}")
read -r -a CONNS <<<"${CONNECTORS:-kvxfer nixl}"
((${#CONNS[@]} >= 1)) || kvx_die "CONNECTORS is empty"
for c in "${CONNS[@]}"; do kvx_vllm_kv_config "$c" >/dev/null; done
COLOCATED=${COLOCATED:-1}
[[ "$COLOCATED" == 0 || "$COLOCATED" == 1 ]] || kvx_die "COLOCATED must be 0 or 1, got '$COLOCATED'"
kvx_vllm_check
OUT=${OUT:-compare_connectors_out}
STAGES=${STAGES:-ttft load}
TTFT_LENS=${TTFT_LENS:-16 128 512 1024}
TTFT_REPEATS=${TTFT_REPEATS:-20}
LOAD_ROUNDS=${LOAD_ROUNDS:-4}
SEED=${SEED:-0}
PREFILL_CPUS=${PREFILL_CPUS:-0}
DECODE_CPUS=${DECODE_CPUS:-1}
mkdir -p "$OUT"
trap kvx_stop_all EXIT

HEALTH=()  # "URL INDEX" of every server and proxy, INDEX into KVX_PIDS
ENDPOINTS=()
NAMES=()
for c in "${CONNS[@]}"; do
  name=$c n=2
  while [[ " ${NAMES[*]} " == *" $name "* ]]; do name="$c$n"; n=$((n + 1)); done
  NAMES+=("$name")
  read -r p_port p_side d_port d_side x_port <<<"$(kvx_free_ports 5)"
  HEALTH+=("http://127.0.0.1:$p_port ${#KVX_PIDS[@]}")
  kvx_start_vllm "$name-prefill" "$OUT/${name}_prefill.log" "$MODEL_DIR" "$p_port" "$p_side" "$PREFILL_CPUS" "$c"
  HEALTH+=("http://127.0.0.1:$d_port ${#KVX_PIDS[@]}")
  kvx_start_vllm "$name-decode" "$OUT/${name}_decode.log" "$MODEL_DIR" "$d_port" "$d_side" "$DECODE_CPUS" "$c"
  HEALTH+=("http://127.0.0.1:$x_port ${#KVX_PIDS[@]}")
  kvx_start "$name-proxy" "$OUT/${name}_proxy.log" "$PYTHON" -m kvxfer.entrypoints.cli proxy --port "$x_port" \
    --first-token decode --prefill "http://127.0.0.1:$p_port" --decode "http://127.0.0.1:$d_port" --log-level warning
  ENDPOINTS+=(--endpoint "$name=http://127.0.0.1:$x_port")
done
if [[ "$COLOCATED" == 1 ]]; then
  read -r c_port <<<"$(kvx_free_ports 1)"
  HEALTH+=("http://127.0.0.1:$c_port ${#KVX_PIDS[@]}")
  kvx_start_vllm colocated "$OUT/colocated.log" "$MODEL_DIR" "$c_port" "" "${COLOCATED_CPUS:-$PREFILL_CPUS}" none
  ENDPOINTS+=(--endpoint "colocated=http://127.0.0.1:$c_port")
fi

for entry in "${HEALTH[@]}"; do
  read -r url i <<<"$entry"
  kvx_wait_healthy "$url" "${KVX_PIDS[$i]}" "${KVX_NAMES[$i]}" "${KVX_LOGS[$i]}" "${START_TIMEOUT_S:-1800}"
done

for stage in $STAGES; do
  case $stage in
    ttft) kvx_ttft_stage ;;
    load)
      kvx_log "load: 64 x 128-512 in, 32 out, concurrency 8, $LOAD_ROUNDS rounds (uptime: $(uptime))"
      kvx_bench load --input-len 128-512 --output-len 32 --num-requests 64 --concurrency 8 --rounds "$LOAD_ROUNDS" \
        --warmup 4
      ;;
    *) kvx_die "unknown stage $stage (ttft, load)" ;;
  esac
done
uptime | tee "$OUT/uptime.txt"
"$PYTHON" "$KVX_ROOT/integration/vllm/overhead.py" "$OUT" | tee "$OUT/overhead.txt"
