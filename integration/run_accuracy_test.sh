#!/usr/bin/env bash
# Disaggregated accuracy test: prefill + decode servers behind the proxy against a colocated
# (--role both) server of the same model; greedy outputs must agree (see accuracy_check.py).
#
# Environment (defaults in brackets):
#   MODEL [tiny-qwen3]     preset name (built on the fly into MODEL_CACHE) or model directory
#   PREFILL_TP [1]  DECODE_TP [1]  NUM_PREFILL [1]  NUM_DECODE [1]  REFERENCE_TP [1]
#   DEVICE [cpu]           cpu | cuda (each instance gets its own GPUs, counted from the TP sizes,
#                          as --device-ids: every instance sees every GPU, for CUDA IPC)
#   GPU_SHARING [0]        1: on cuda, let instances share GPUs when there are too few (e.g. prefill,
#                          decode and reference on one GPU), each with a share of its memory
#   GPU_MEMORY_UTILIZATION [0.85 / instances per GPU]  each instance's --gpu-memory-utilization
#   NUM_GPUS [detected]    GPUs to assign (indices 0..NUM_GPUS-1 of the visible ones)
#   DRY_RUN [0]            1: print the server commands (device assignment included) and exit
#   BLOCK_SIZE [16]  NUM_KV_BLOCKS [512, or "auto"]  NUM_PROMPTS [100]  MAX_TOKENS [8]  CONCURRENCY [8]
#   HEALTH_TIMEOUT [300]   seconds to wait for every server's /health
#   MODEL_CACHE [~/.cache/kvxfer/models]  WORK_DIR [fresh temp dir]  KEEP_LOGS [0]
# Exit status 0 only when the check passes. Every process started here is stopped on exit,
# failure or Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL=${MODEL:-tiny-qwen3}
PREFILL_TP=${PREFILL_TP:-1} DECODE_TP=${DECODE_TP:-1} REFERENCE_TP=${REFERENCE_TP:-1}
NUM_PREFILL=${NUM_PREFILL:-1} NUM_DECODE=${NUM_DECODE:-1}
DEVICE=${DEVICE:-cpu} GPU_SHARING=${GPU_SHARING:-0}
BLOCK_SIZE=${BLOCK_SIZE:-16} NUM_KV_BLOCKS=${NUM_KV_BLOCKS:-512}
NUM_PROMPTS=${NUM_PROMPTS:-100} MAX_TOKENS=${MAX_TOKENS:-8} CONCURRENCY=${CONCURRENCY:-8}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-300} DRY_RUN=${DRY_RUN:-0}
MODEL_CACHE=${MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvxfer/models}

for var in PREFILL_TP DECODE_TP REFERENCE_TP NUM_PREFILL NUM_DECODE BLOCK_SIZE NUM_PROMPTS MAX_TOKENS \
           CONCURRENCY HEALTH_TIMEOUT; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || kvx_die "$var must be a positive integer, got '${!var}'"
done
[[ "$NUM_KV_BLOCKS" == auto || "$NUM_KV_BLOCKS" =~ ^[1-9][0-9]*$ ]] || kvx_die "NUM_KV_BLOCKS must be a positive integer or auto"
[[ "$DEVICE" == cpu || "$DEVICE" == cuda ]] || kvx_die "DEVICE must be cpu or cuda, got '$DEVICE'"
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || kvx_die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
[[ -z "${NUM_GPUS:-}" || "$NUM_GPUS" =~ ^[0-9]+$ ]] || kvx_die "NUM_GPUS must be a non-negative integer, got '$NUM_GPUS'"

kvx_work_dir kvxfer-accuracy

if ((DRY_RUN)); then MODEL_DIR=$MODEL; else MODEL_DIR=$(kvx_model_dir "$MODEL" "$MODEL_CACHE"); fi

# --- GPUs: consecutive indices per instance, in the order prefill, decode, reference ---
NUM_GPUS_SEEN=0
GPU_NEXT=0
if [[ "$DEVICE" == cuda ]]; then
  NUM_GPUS_SEEN=$(kvx_gpu_count)
  need=$((NUM_PREFILL * PREFILL_TP + NUM_DECODE * DECODE_TP + REFERENCE_TP))
  ((NUM_GPUS_SEEN > 0)) || kvx_die "DEVICE=cuda but no GPU is visible"
  if ((need > NUM_GPUS_SEEN)); then
    max_tp=$((PREFILL_TP > DECODE_TP ? PREFILL_TP : DECODE_TP))
    max_tp=$((max_tp > REFERENCE_TP ? max_tp : REFERENCE_TP))
    if [[ "$GPU_SHARING" != 1 ]] || ((max_tp > NUM_GPUS_SEEN)); then
      kvx_die "need $need GPUs (NUM_PREFILL*PREFILL_TP + NUM_DECODE*DECODE_TP + REFERENCE_TP =" \
        "$NUM_PREFILL*$PREFILL_TP + $NUM_DECODE*$DECODE_TP + $REFERENCE_TP), $NUM_GPUS_SEEN visible" \
        "$( [[ "$GPU_SHARING" != 1 ]] && echo '(GPU_SHARING=1 lets instances share GPUs)')"
    fi
    kvx_log "sharing $NUM_GPUS_SEEN GPUs between instances that need $need"
  fi
  # Round-robin assignment: no GPU holds more than ceil(need / GPUs) instances; each takes an
  # equal share of 85% of a GPU's memory (the rest: CUDA contexts, outside the fraction).
  per_gpu=$(((need + NUM_GPUS_SEEN - 1) / NUM_GPUS_SEEN))
  GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-$(awk -v n="$per_gpu" 'BEGIN { printf "%.2f", int(85 / n) / 100 }')}
fi
# take_gpus N: sets GPU_ARGS to the serve options for the next N GPUs (empty on cpu).
take_gpus() {
  GPU_ARGS=()
  [[ "$DEVICE" == cuda ]] || return 0
  local ids=() k
  for ((k = 0; k < $1; k++)); do ids+=("$(((GPU_NEXT + k) % NUM_GPUS_SEEN))"); done
  GPU_NEXT=$((GPU_NEXT + $1))
  GPU_ARGS=(--device-ids "$(IFS=,; echo "${ids[*]}")" --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION")
}

# --- servers ---
NUM_SERVERS=$((NUM_PREFILL + NUM_DECODE + 1))
read -r -a PORTS <<<"$(kvx_free_ports $((2 * NUM_SERVERS + 1)))"
PORT_NEXT=0
next_port() { PORT=${PORTS[$PORT_NEXT]}; PORT_NEXT=$((PORT_NEXT + 1)); }

COMMON=(--device "$DEVICE" --host 127.0.0.1 --block-size "$BLOCK_SIZE" --log-level warning)
[[ "$NUM_KV_BLOCKS" == auto ]] || COMMON+=(--num-kv-blocks "$NUM_KV_BLOCKS")
PREFILL_URLS=() DECODE_URLS=() SERVER_URLS=() SERVER_IDX=()

start_server() {  # NAME ROLE TP [extra args]
  local name=$1 role=$2 tp=$3; shift 3
  local port side
  next_port; port=$PORT
  next_port; side=$PORT
  take_gpus "$tp"
  local cmd=("$PYTHON" -m kvxfer.entrypoints.serve "$MODEL_DIR" --role "$role" --tp "$tp" --port "$port"
             --side-channel-port "$side" "${COMMON[@]}" "${GPU_ARGS[@]}" "$@")
  if ((DRY_RUN)); then echo "$name: ${cmd[*]}"; URL="http://127.0.0.1:$port"; return; fi
  kvx_start "$name" "$LOGS/$name.log" "${cmd[@]}"
  SERVER_URLS+=("http://127.0.0.1:$port"); SERVER_IDX+=($((${#KVX_PIDS[@]} - 1)))
  URL="http://127.0.0.1:$port"
}

kvx_log "model $MODEL_DIR | prefill ${NUM_PREFILL}x TP$PREFILL_TP | decode ${NUM_DECODE}x TP$DECODE_TP |" \
  "reference TP$REFERENCE_TP | $DEVICE | block size $BLOCK_SIZE"
for ((i = 0; i < NUM_PREFILL; i++)); do start_server "prefill$i" prefill "$PREFILL_TP"; PREFILL_URLS+=("$URL"); done
# fail policy: a failed pull must show up as an error, never be hidden by a local recompute.
for ((i = 0; i < NUM_DECODE; i++)); do
  start_server "decode$i" decode "$DECODE_TP" --kv-failure-policy fail; DECODE_URLS+=("$URL")
done
start_server reference both "$REFERENCE_TP"; REFERENCE_URL=$URL
((DRY_RUN)) && exit 0

for ((k = 0; k < ${#SERVER_URLS[@]}; k++)); do
  j=${SERVER_IDX[$k]}
  kvx_wait_healthy "${SERVER_URLS[$k]}" "${KVX_PIDS[$j]}" "${KVX_NAMES[$j]}" "${KVX_LOGS[$j]}" "$HEALTH_TIMEOUT"
done

next_port
PROXY_URL="http://127.0.0.1:$PORT"
kvx_start proxy "$LOGS/proxy.log" "$PYTHON" -m kvxfer.entrypoints.cli proxy --port "$PORT" \
  --prefill "${PREFILL_URLS[@]}" --decode "${DECODE_URLS[@]}" --log-level warning
kvx_wait_healthy "$PROXY_URL" "${KVX_PIDS[-1]}" proxy "${KVX_LOGS[-1]}" 60

# --- the check ---
set +e
"$PYTHON" "$KVX_ROOT/integration/accuracy_check.py" --proxy "$PROXY_URL" --reference "$REFERENCE_URL" \
  --servers "${PREFILL_URLS[@]}" "${DECODE_URLS[@]}" \
  --model-dir "$MODEL_DIR" --block-size "$BLOCK_SIZE" --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" \
  --concurrency "$CONCURRENCY" --json "$WORK_DIR/report.json"
rc=$?
set -e
summary="MODEL=$MODEL PREFILL=${NUM_PREFILL}xTP$PREFILL_TP DECODE=${NUM_DECODE}xTP$DECODE_TP DEVICE=$DEVICE BLOCK_SIZE=$BLOCK_SIZE"
if ((rc == 0)); then echo "PASS $summary"; else echo "FAIL $summary (rc $rc)"; fi
exit "$rc"
