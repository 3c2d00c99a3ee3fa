#!/usr/bin/env bash
# P/D against colocated serving on one host, measured side by side with `kvxfer bench serve`:
# a prefill instance pinned to PREFILL_CPUS and a decode instance pinned to DECODE_CPUS behind
# the proxy, and one colocated instance on COLOCATED_CPUS; both deployments stay up and the
# same workload alternates between them in rounds, so load drift on a shared host hits both.
#   integration/compare_serving.sh [MODEL]        (a model directory or a preset; default tiny-qwen3)
# Stages (STAGES, default "load ttft"):
#   load  a Poisson mix of short chats and long prompts (LOAD_ARGS replaces the default workload),
#         TTFT/TPOT/ITL percentiles and goodput under SLO_TTFT_MS / SLO_TPOT_MS, ratios pd/colocated;
#   ttft  the TTFT protocol: one request at a time, prompts of TTFT_LENS tokens, median of
#         TTFT_REPEATS after warm-up, proxy vs colocated alternating request by request.
# Environment: OUT [compare_serving_out] CACHE [~/.cache/kvxfer/integration] DTYPE [engine default]
#   NUM_KV_BLOCKS [1024] PREFILL_CPUS [0] DECODE_CPUS [1] COLOCATED_CPUS [0,1] SEED [0]
#   SERVE_ARGS (more `kvxfer serve` options for every instance, e.g. --max-num-batched-tokens 512)
# Writes OUT/<stage>*.json, .png, .txt and the servers' logs; stops every process it started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_DIR=$(kvx_model_dir "${1:-tiny-qwen3}" "${CACHE:-$HOME/.cache/kvxfer/integration}")
OUT=${OUT:-compare_serving_out}
STAGES=${STAGES:-load ttft}
SLO_TTFT_MS=${SLO_TTFT_MS:-1000}
SLO_TPOT_MS=${SLO_TPOT_MS:-25}
TTFT_LENS=${TTFT_LENS:-16 128 512 1024}
TTFT_REPEATS=${TTFT_REPEATS:-20}
SEED=${SEED:-0}
read -r -a LOAD <<<"${LOAD_ARGS:---mix chat:0.75:16-64:32-64 --mix long:0.25:768-1024:8 --request-rate 4 --num-requests 120 --rounds 4}"
mkdir -p "$OUT"
trap kvx_stop_all EXIT

read -r P_PORT P_SIDE D_PORT D_SIDE C_PORT C_SIDE X_PORT <<<"$(kvx_free_ports 7)"
SERVE=("$PYTHON" -m kvxfer.entrypoints.serve "$MODEL_DIR" --host 127.0.0.1 --num-kv-blocks "${NUM_KV_BLOCKS:-1024}"
       --log-level warning ${DTYPE:+--dtype "$DTYPE"} ${SERVE_ARGS:-})
kvx_start prefill "$OUT/prefill.log" taskset -c "${PREFILL_CPUS:-0}" "${SERVE[@]}" --role prefill \
  --port "$P_PORT" --side-channel-port "$P_SIDE"
kvx_start decode "$OUT/decode.log" taskset -c "${DECODE_CPUS:-1}" "${SERVE[@]}" --role decode \
  --port "$D_PORT" --side-channel-port "$D_SIDE"
kvx_start colocated "$OUT/colocated.log" taskset -c "${COLOCATED_CPUS:-0,1}" "${SERVE[@]}" --role both \
  --kv-connector none --port "$C_PORT" --side-channel-port "$C_SIDE"
kvx_start proxy "$OUT/proxy.log" "$PYTHON" "$KVX_ROOT/integration/proxy.py" --prefill "http://127.0.0.1:$P_PORT" \
  --decode "http://127.0.0.1:$D_PORT" --port "$X_PORT" --log-level warning
for i in 0 1 2 3; do
  port=("$P_PORT" "$D_PORT" "$C_PORT" "$X_PORT")
  kvx_wait_healthy "http://127.0.0.1:${port[$i]}" "${KVX_PIDS[$i]}" "${KVX_NAMES[$i]}" "${KVX_LOGS[$i]}" 600
done

ENDPOINTS=(--endpoint "colocated=http://127.0.0.1:$C_PORT" --endpoint "pd=http://127.0.0.1:$X_PORT")
for stage in $STAGES; do
  case $stage in
    load)
      kvx_log "load: ${LOAD[*]} (uptime: $(uptime))"
      kvx_bench load "${LOAD[@]}" --slo-ttft-ms "$SLO_TTFT_MS" --slo-tpot-ms "$SLO_TPOT_MS"
      ;;
    ttft) kvx_ttft_stage ;;
    *) kvx_die "unknown stage $stage (load, ttft)" ;;
  esac
done
uptime | tee "$OUT/uptime.txt"
