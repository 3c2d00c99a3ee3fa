#!/usr/bin/env bash
# One-command vLLM P/D with kvxfer's KV connector: a prefill and a decode `vllm serve` loading
# kvxfer.integrations.vllm's KvxferConnector, behind `kvxfer proxy` (--first-token decode: vLLM's
# decode answers the whole completion, first token included). Runs until Ctrl-C or until one of
# the three exits; stops all of them either way.
#   integration/vllm/launch_pd.sh MODEL      (a model directory or a kvxfer preset, e.g. tiny-qwen3)
#   curl -s localhost:8000/v1/completions -d '{"prompt":"Hello","max_tokens":8}' -H 'content-type: application/json'
# Environment: PORT [8000] (the proxy's) CONNECTOR [kvxfer] (nixl: vLLM's NixlConnector on CPU
#   memory, for comparison) VLLM_VENV [.vllm-venv: scripts/vllm-venv.sh] PREFILL_CPUS [0] / DECODE_CPUS
#   [1] (taskset lists, empty: unpinned; vllm/common.sh says why they are pinned apart) LOG_DIR [fresh temp dir] START_TIMEOUT_S [900]
#   VLLM_ARGS (more `vllm serve` options for both) MODEL_CACHE [~/.cache/kvxfer/integration]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(($# == 1)) || kvx_die "usage: $0 MODEL (a model directory or a kvxfer preset such as tiny-qwen3)"
CONNECTOR=${CONNECTOR:-kvxfer}
PORT=${PORT:-8000}
[[ "$PORT" =~ ^[1-9][0-9]*$ ]] || kvx_die "PORT must be a port number, got '$PORT'"
kvx_vllm_kv_config "$CONNECTOR" >/dev/null
kvx_vllm_check
MODEL_DIR=$(kvx_model_dir "$1" "${MODEL_CACHE:-$HOME/.cache/kvxfer/integration}")
LOG_DIR=${LOG_DIR:-$(mktemp -d -t kvxfer-vllm-pd.XXXXXX)}
mkdir -p "$LOG_DIR"
read -r P_PORT P_SIDE D_PORT D_SIDE <<<"$(kvx_free_ports 4)"

trap 'kvx_stop_all; kvx_log "stopped; logs in $LOG_DIR"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
kvx_start_vllm prefill "$LOG_DIR/prefill.log" "$MODEL_DIR" "$P_PORT" "$P_SIDE" "$PREFILL_CPUS" "$CONNECTOR"
kvx_start_vllm decode "$LOG_DIR/decode.log" "$MODEL_DIR" "$D_PORT" "$D_SIDE" "$DECODE_CPUS" "$CONNECTOR"
kvx_wait_healthy "http://127.0.0.1:$P_PORT" "${KVX_PIDS[0]}" prefill "${KVX_LOGS[0]}" "${START_TIMEOUT_S:-900}"
kvx_wait_healthy "http://127.0.0.1:$D_PORT" "${KVX_PIDS[1]}" decode "${KVX_LOGS[1]}" "${START_TIMEOUT_S:-900}"
kvx_start proxy "$LOG_DIR/proxy.log" "$PYTHON" -m kvxfer.entrypoints.cli proxy --port "$PORT" --first-token decode \
  --prefill "http://127.0.0.1:$P_PORT" --decode "http://127.0.0.1:$D_PORT" --log-level warning
kvx_wait_healthy "http://127.0.0.1:$PORT" "${KVX_PIDS[2]}" proxy "${KVX_LOGS[2]}" 180
kvx_log "ready: http://127.0.0.1:$PORT/v1/completions (model $(basename "$MODEL_DIR"), connector $CONNECTOR; Ctrl-C stops)"
# Until one of the three exits (wait -n returns then); the EXIT trap stops the others.
wait -n "${KVX_PIDS[@]}" || true
kvx_die "a server exited (logs in $LOG_DIR)"
