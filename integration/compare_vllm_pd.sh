#!/usr/bin/env bash
# kvxfer P/D against vLLM P/D (its NixlConnector on CPU) on one host, side by side with
# `kvxfer bench serve`: each deployment is a prefill instance pinned to PREFILL_CPUS and a decode
# instance pinned to DECODE_CPUS behind kvxfer's proxy; all four servers and both proxies stay up
# and the same workload alternates between the two deployments in rounds, so load drift on a
# shared host hits both. vLLM runs at its best configuration here: NIXL's progress thread off
# (integration/vllm_site/sitecustomize.py), its OpenMP thread bound to the instance's core.
#   integration/compare_vllm_pd.sh [MODEL]        (a model directory or a preset; default tiny-qwen3)
# Stages (STAGES, default "load ttft"):
#   load  64 requests of 128-512-token prompts, 32 output tokens, concurrency 8 (issue 9's load;
#         LOAD_ARGS replaces it), LOAD_ROUNDS rounds; ratios vllm/kvxfer;
#   ttft  one request at a time, prompts of TTFT_LENS tokens, median of TTFT_REPEATS after
#         warm-up, the two deployments alternating request by request.
# Deployments (endpoints of the same `kvxfer bench serve` run): "kvxfer" (kvxfer's engine; KVXFER_ENGINE=0
#   leaves it out), one vLLM P/D per entry of VLLM_CONNECTORS [nixl] ("vllm": vLLM's NixlConnector,
#   "vllm-kvxfer": kvxfer's KvxferConnector inside vLLM, both behind the same proxy), and with
#   COLOCATED=1 "vllm-colocated", one `vllm serve` without KV transfer pinned to PREFILL_CPUS (the
#   disaggregation overhead of a P/D endpoint is its TTFT minus this one's).
# Environment: VLLM_VENV [the repo's .vllm-venv: scripts/vllm-venv.sh] OUT [compare_vllm_pd_out]
#   CACHE [~/.cache/kvxfer/integration] DTYPE [float32] VLLM_DTYPE [DTYPE; "auto": vLLM's own
#   choice, bfloat16 on this CPU] NUM_KV_BLOCKS [1024] PREFILL_CPUS [0] DECODE_CPUS [1] SEED [0]
#   VLLM_KV_GIB [1] (each vLLM instance's KV space) START_TIMEOUT_S [900] (per server: vLLM compiles
#   its graph at start, minutes for qwen3-0.6b-shape on 2 busy cores) SERVE_ARGS / VLLM_ARGS (more options for every
#   kvxfer / vLLM server) BASELINE (another kvxfer checkout, e.g. `git worktree add /tmp/base main`:
#   a third P/D deployment of its code, endpoint "baseline", for before/after in the same run)
#   KVX_NIXL_PROGRESS_THREAD=1 leaves NIXL's progress thread on in the vLLM instances (../vllm_site).
# Writes OUT/<stage>*.json, .png, .txt and the servers' logs (with COLOCATED=1 also OUT/overhead.txt:
# vllm/overhead.py's issue 16 figures); stops every process it started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

source "$(dirname "${BASH_SOURCE[0]}")/vllm/common.sh"
VLLM_CONNECTORS=${VLLM_CONNECTORS:-nixl}
for connector in $VLLM_CONNECTORS; do kvx_vllm_kv_config "$connector" >/dev/null; done
kvx_vllm_check

MODEL_DIR=$(kvx_model_dir "${1:-tiny-qwen3}" "${CACHE:-$HOME/.cache/kvxfer/integration}")
OUT=${OUT:-compare_vllm_pd_out}
STAGES=${STAGES:-load ttft}
DTYPE=${DTYPE:-float32}
LOAD_ROUNDS=${LOAD_ROUNDS:-4}
TTFT_LENS=${TTFT_LENS:-16 128 512 1024}
TTFT_REPEATS=${TTFT_REPEATS:-20}
SEED=${SEED:-0}
[[ -n "$PREFILL_CPUS" && -n "$DECODE_CPUS" ]] || kvx_die "PREFILL_CPUS and DECODE_CPUS must name cores here (taskset lists)"
read -r -a LOAD <<<"${LOAD_ARGS:---input-len 128-512 --output-len 32 --num-requests 64 --concurrency 8}"
mkdir -p "$OUT"
trap kvx_stop_all EXIT

if [[ -n "${BASELINE:-}" ]]; then
  [[ -f "$BASELINE/kvxfer/__init__.py" ]] || kvx_die "BASELINE=$BASELINE is not a kvxfer checkout"
  BASELINE=$(cd "$BASELINE" && pwd)
fi
HEALTH=()  # "URL INDEX" of every server and proxy, INDEX into KVX_PIDS
ENDPOINTS=()

# start_kvxfer NAME ROOT: a kvxfer P/D deployment (prefill, decode, proxy) of the code in ROOT.
start_kvxfer() {
  local name=$1 root=$2 p_port p_side d_port d_side x_port
  read -r p_port p_side d_port d_side x_port <<<"$(kvx_free_ports 5)"
  local serve=(env PYTHONPATH="$root" "$PYTHON" -m kvxfer.entrypoints.serve "$MODEL_DIR" --host 127.0.0.1
               --num-kv-blocks "${NUM_KV_BLOCKS:-1024}" --log-level warning --dtype "$DTYPE" ${SERVE_ARGS:-})
  HEALTH+=("http://127.0.0.1:$p_port ${#KVX_PIDS[@]}")
  kvx_start "$name-prefill" "$OUT/${name}_prefill.log" taskset -c "$PREFILL_CPUS" "${serve[@]}" --role prefill \
    --port "$p_port" --side-channel-port "$p_side"
  HEALTH+=("http://127.0.0.1:$d_port ${#KVX_PIDS[@]}")
  kvx_start "$name-decode" "$OUT/${name}_decode.log" taskset -c "$DECODE_CPUS" "${serve[@]}" --role decode \
    --port "$d_port" --side-channel-port "$d_side" --kv-peers "127.0.0.1:$p_side"
  HEALTH+=("http://127.0.0.1:$x_port ${#KVX_PIDS[@]}")
  kvx_start "$name-proxy" "$OUT/${name}_proxy.log" env PYTHONPATH="$root" "$PYTHON" "$root/integration/proxy.py" \
    --prefill "http://127.0.0.1:$p_port" --decode "http://127.0.0.1:$d_port" --port "$x_port" --log-level warning
  ENDPOINTS+=(--endpoint "$name=http://127.0.0.1:$x_port")
}
[[ "${KVXFER_ENGINE:-1}" == 0 ]] || start_kvxfer kvxfer "$KVX_ROOT"

# vLLM P/D per connector (integration/vllm/common.sh: block size 32, the directory name as served
# name, NIXL's progress thread off), one OpenMP thread bound to the instance's core; prefix caching
# at its default (on), as kvxfer's. kvxfer's proxy fronts each: vLLM's decode returns the first token.
export VLLM_DTYPE=${VLLM_DTYPE:-$DTYPE}
for connector in $VLLM_CONNECTORS; do
  name=vllm; [[ "$connector" == nixl ]] || name="vllm-$connector"
  read -r vp_port vp_side vd_port vd_side vx_port <<<"$(kvx_free_ports 5)"
  HEALTH+=("http://127.0.0.1:$vp_port ${#KVX_PIDS[@]}")
  kvx_start_vllm "$name-prefill" "$OUT/${name}_prefill.log" "$MODEL_DIR" "$vp_port" "$vp_side" "$PREFILL_CPUS" "$connector"
  HEALTH+=("http://127.0.0.1:$vd_port ${#KVX_PIDS[@]}")
  kvx_start_vllm "$name-decode" "$OUT/${name}_decode.log" "$MODEL_DIR" "$vd_port" "$vd_side" "$DECODE_CPUS" "$connector"
  HEALTH+=("http://127.0.0.1:$vx_port ${#KVX_PIDS[@]}")
  kvx_start "$name-proxy" "$OUT/${name}_proxy.log" "$PYTHON" "$KVX_ROOT/integration/proxy.py" --first-token decode \
    --prefill "http://127.0.0.1:$vp_port" --decode "http://127.0.0.1:$vd_port" --port "$vx_port" --log-level warning
  ENDPOINTS+=(--endpoint "$name=http://127.0.0.1:$vx_port")
done
if [[ "${COLOCATED:-0}" == 1 ]]; then
  read -r vc_port <<<"$(kvx_free_ports 1)"
  HEALTH+=("http://127.0.0.1:$vc_port ${#KVX_PIDS[@]}")
  kvx_start_vllm vllm-colocated "$OUT/vllm_colocated.log" "$MODEL_DIR" "$vc_port" "" "$PREFILL_CPUS" none
  ENDPOINTS+=(--endpoint "vllm-colocated=http://127.0.0.1:$vc_port")
fi
[[ -z "${BASELINE:-}" ]] || start_kvxfer baseline "$BASELINE"

for entry in "${HEALTH[@]}"; do
  read -r url i <<<"$entry"
  kvx_wait_healthy "$url" "${KVX_PIDS[$i]}" "${KVX_NAMES[$i]}" "${KVX_LOGS[$i]}" "${START_TIMEOUT_S:-900}"
done

for stage in $STAGES; do
  case $stage in
    load)
      kvx_log "load: ${LOAD[*]} --rounds $LOAD_ROUNDS (uptime: $(uptime))"
      kvx_bench load "${LOAD[@]}" --rounds "$LOAD_ROUNDS" --warmup 4
      ;;
    ttft) kvx_ttft_stage ;;
    *) kvx_die "unknown stage $stage (load, ttft)" ;;
  esac
done
uptime | tee "$OUT/uptime.txt"
# Issue 16's figures: disaggregation overheads (TTFT minus vllm-colocated) and load duration ratios.
[[ "${COLOCATED:-0}" != 1 ]] || "$PYTHON" "$KVX_ROOT/integration/vllm/overhead.py" "$OUT" | tee "$OUT/overhead.txt"
