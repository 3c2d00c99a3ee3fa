#!/usr/bin/env bash
# Proxy routing policies side by side on one host, with `kvxfer bench serve`: two prefill and one
# decode kvxfer servers, and one colocated server, all up for the whole run; in front of them
# one proxy per policy, so every policy runs on the same servers and the endpoints alternate in
# rounds (load drift on a shared host hits all of them):
#   round_robin     --policy round_robin  (the reference: ratios are against it)
#   least_loaded    --policy least_loaded
#   prefix_aware    --policy prefix_aware --colocate-below 0 (prefill by prefix, always P/D)
#   prefix_colo     --policy prefix_aware --colocate-below COLOCATE_BELOW [65] (short uncached parts
#                   served by the decode server alone)
#   colocated       the colocated server hit directly (short stage)
#   colocated_proxy the colocated server behind the same proxy code, every request on its
#                   colocated path (short stage: the proxy hop's cost alone)
#   integration/compare_routing.sh [MODEL]        (a model directory or a preset; default tiny-qwen3)
# Stages (STAGES, default "shared short"):
#   shared  the shared-prefix workload: SHARED_PREFIX system prompts (N:LO-HI tokens) x user turns
#           of USER_LEN tokens, OUTPUT_LEN output tokens, Poisson arrivals at RATE/s, NUM_REQUESTS
#           per endpoint in ROUNDS rounds; TTFT p50/p99/mean, TPOT p99, the prefill servers'
#           prefix-cache hit rate, goodput under SLO_TTFT_MS / SLO_TPOT_MS;
#   short   prompts of SHORT_LENS tokens (<= 64), one at a time, SHORT_REPEATS each after 3
#           warm-ups, request by request across colocated, colocated_proxy, prefix_colo and
#           round_robin (always P/D).
# Environment: OUT [compare_routing_out] CACHE [~/.cache/kvxfer/integration] DTYPE [engine default]
#   PREFILL_KV_BLOCKS [256] (each prefill server's pool: smaller than the 8 system prompts
#   together, so where a prefix goes matters) NUM_KV_BLOCKS [1024] (decode and colocated)
#   PREFILL_CPUS ["0 1"] DECODE_CPUS [0,1] COLOCATED_CPUS [0,1] SEED [0] SERVE_ARGS PROXY_ARGS
#   PROFILE_PROXY [0] (1: the colocated_proxy proxy runs under cProfile, OUT/colocated_proxy.prof)
# Writes OUT/<stage>*.json, .png, .txt, the servers' logs and OUT/uptime.txt; stops every
# process it started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STAGES=${STAGES:-shared short}
SHARED_PREFIX=${SHARED_PREFIX:-8:512-1024}
USER_LEN=${USER_LEN:-16-64}
OUTPUT_LEN=${OUTPUT_LEN:-16}
RATE=${RATE:-1.5}
NUM_REQUESTS=${NUM_REQUESTS:-160}
ROUNDS=${ROUNDS:-4}
SLO_TTFT_MS=${SLO_TTFT_MS:-1000}
SLO_TPOT_MS=${SLO_TPOT_MS:-50}
COLOCATE_BELOW=${COLOCATE_BELOW:-65}  # fewer than 65 uncached tokens: prompts of <= 64
SHORT_LENS=${SHORT_LENS:-16 64}
SHORT_REPEATS=${SHORT_REPEATS:-30}
PREFILL_KV_BLOCKS=${PREFILL_KV_BLOCKS:-256}
NUM_KV_BLOCKS=${NUM_KV_BLOCKS:-1024}
PROFILE_PROXY=${PROFILE_PROXY:-0}
SEED=${SEED:-0}
read -r -a PREFILL_CPU_SETS <<<"${PREFILL_CPUS:-0 1}"

# Every input is checked before anything starts (and before OUT is created).
for stage in $STAGES; do
  [[ $stage == shared || $stage == short ]] || kvx_die "STAGES: unknown stage '$stage' (shared, short)"
done
[[ $SHARED_PREFIX =~ ^[0-9]+:[0-9]+-[0-9]+$ ]] || kvx_die "SHARED_PREFIX=$SHARED_PREFIX is not N:LO-HI"
[[ $USER_LEN =~ ^[0-9]+(-[0-9]+)?$ ]] || kvx_die "USER_LEN=$USER_LEN is not N or LO-HI"
[[ $RATE =~ ^[0-9]+(\.[0-9]+)?$ ]] || kvx_die "RATE=$RATE is not a number of requests per second"
for var in OUTPUT_LEN NUM_REQUESTS ROUNDS SLO_TTFT_MS SLO_TPOT_MS COLOCATE_BELOW SHORT_REPEATS PREFILL_KV_BLOCKS \
           NUM_KV_BLOCKS SEED; do
  [[ ${!var} =~ ^[0-9]+$ ]] || kvx_die "$var=${!var} is not a non-negative integer"
done
for n in $SHORT_LENS; do
  [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 64)) || kvx_die "SHORT_LENS: '$n' is not a prompt length of 1-64 tokens"
done
((${#PREFILL_CPU_SETS[@]} == 2)) || kvx_die "PREFILL_CPUS='${PREFILL_CPUS:-}' must name two CPU lists, one per prefill server"
[[ $PROFILE_PROXY == 0 || $PROFILE_PROXY == 1 ]] || kvx_die "PROFILE_PROXY=$PROFILE_PROXY is not 0 or 1"

MODEL_DIR=$(kvx_model_dir "${1:-tiny-qwen3}" "${CACHE:-$HOME/.cache/kvxfer/integration}")
OUT=${OUT:-compare_routing_out}
mkdir -p "$OUT"
trap kvx_stop_all EXIT

HEALTH=()  # "URL INDEX" of every server and proxy, INDEX into KVX_PIDS
url() { echo "http://127.0.0.1:$1"; }
SERVE=("$PYTHON" -m kvxfer.entrypoints.serve "$MODEL_DIR" --host 127.0.0.1 --log-level warning
       ${DTYPE:+--dtype "$DTYPE"} ${SERVE_ARGS:-})
# One draw for every port: separate draws could hand out the same port before its server binds.
read -r P0_PORT P0_SIDE P1_PORT P1_SIDE D_PORT D_SIDE C_PORT C_SIDE X0 X1 X2 X3 X4 <<<"$(kvx_free_ports 13)"
PROXY_PORTS=("$X0" "$X1" "$X2" "$X3" "$X4")
for i in 0 1; do
  port_var=P${i}_PORT side_var=P${i}_SIDE
  HEALTH+=("$(url "${!port_var}") ${#KVX_PIDS[@]}")
  kvx_start "prefill$i" "$OUT/prefill$i.log" taskset -c "${PREFILL_CPU_SETS[$i]}" "${SERVE[@]}" --role prefill \
    --num-kv-blocks "$PREFILL_KV_BLOCKS" --port "${!port_var}" --side-channel-port "${!side_var}"
done
HEALTH+=("$(url "$D_PORT") ${#KVX_PIDS[@]}")
kvx_start decode "$OUT/decode.log" taskset -c "${DECODE_CPUS:-0,1}" "${SERVE[@]}" --role decode \
  --num-kv-blocks "$NUM_KV_BLOCKS" --port "$D_PORT" --side-channel-port "$D_SIDE"
HEALTH+=("$(url "$C_PORT") ${#KVX_PIDS[@]}")
kvx_start colocated "$OUT/colocated.log" taskset -c "${COLOCATED_CPUS:-0,1}" "${SERVE[@]}" --role both \
  --kv-connector none --num-kv-blocks "$NUM_KV_BLOCKS" --port "$C_PORT" --side-channel-port "$C_SIDE"

declare -A PROXY_URL=() PROXY_PID=()
NPROXIES=0  # proxies started: the next one takes PROXY_PORTS[NPROXIES] (${#PROXY_URL[@]} of an empty array trips set -u)
# start_proxy NAME PREFILL_URLS DECODE_URLS ARGS...: a proxy (not pinned, as the load generator).
start_proxy() {
  local name=$1 prefill=$2 decode=$3 port=${PROXY_PORTS[NPROXIES]}; shift 3
  local run=("$PYTHON")
  if [[ $name == colocated_proxy && $PROFILE_PROXY == 1 ]]; then
    run+=(-m cProfile -o "$OUT/colocated_proxy.prof")  # written on SIGINT (see the end)
  fi
  HEALTH+=("$(url "$port") ${#KVX_PIDS[@]}")
  # shellcheck disable=SC2086 # the URL lists split into arguments
  kvx_start "$name" "$OUT/proxy_$name.log" "${run[@]}" "$KVX_ROOT/integration/proxy.py" --prefill $prefill \
    --decode $decode --port "$port" --log-level warning "$@" ${PROXY_ARGS:-}
  PROXY_URL[$name]=$(url "$port")
  PROXY_PID[$name]=${KVX_PIDS[-1]}
  NPROXIES=$((NPROXIES + 1))
}
PREFILLS="$(url "$P0_PORT") $(url "$P1_PORT")"
start_proxy round_robin "$PREFILLS" "$(url "$D_PORT")" --policy round_robin
start_proxy least_loaded "$PREFILLS" "$(url "$D_PORT")" --policy least_loaded
start_proxy prefix_aware "$PREFILLS" "$(url "$D_PORT")" --policy prefix_aware --colocate-below 0
start_proxy prefix_colo "$PREFILLS" "$(url "$D_PORT")" --policy prefix_aware --colocate-below "$COLOCATE_BELOW"
# Every request under 10^6 uncached tokens, i.e. all, takes the colocated path to the colocated server.
start_proxy colocated_proxy "$(url "$C_PORT")" "$(url "$C_PORT")" --policy round_robin --colocate-below 1000000
for entry in "${HEALTH[@]}"; do
  read -r u i <<<"$entry"
  kvx_wait_healthy "$u" "${KVX_PIDS[$i]}" "${KVX_NAMES[$i]}" "${KVX_LOGS[$i]}" 600
done

for stage in $STAGES; do
  case $stage in
    shared)
      ENDPOINTS=()
      for name in round_robin least_loaded prefix_aware prefix_colo; do
        ENDPOINTS+=(--endpoint "$name=${PROXY_URL[$name]}")
      done
      kvx_log "shared: $SHARED_PREFIX x $USER_LEN, rate $RATE (uptime: $(uptime))"
      kvx_bench shared --shared-prefix "$SHARED_PREFIX" --input-len "$USER_LEN" --output-len "$OUTPUT_LEN" \
        --request-rate "$RATE" --num-requests "$NUM_REQUESTS" --rounds "$ROUNDS" --warmup 2 \
        --cache-metrics "$(url "$P0_PORT")" --cache-metrics "$(url "$P1_PORT")" \
        --slo-ttft-ms "$SLO_TTFT_MS" --slo-tpot-ms "$SLO_TPOT_MS"
      ;;
    short)
      ENDPOINTS=(--endpoint "colocated=$(url "$C_PORT")")
      for name in colocated_proxy prefix_colo round_robin; do
        ENDPOINTS+=(--endpoint "$name=${PROXY_URL[$name]}")
      done
      for n in $SHORT_LENS; do
        kvx_log "short: $n-token prompts (uptime: $(uptime))"
        kvx_bench "short_$n" --sequential --input-len "$n" --output-len 4 --num-requests "$SHORT_REPEATS" --warmup 3
      done
      ;;
  esac
done
uptime | tee "$OUT/uptime.txt"
if [[ $PROFILE_PROXY == 1 ]]; then
  # cProfile writes its file when the script returns; uvicorn re-raises a SIGTERM after its
  # shutdown, which kills the process before that, but a SIGINT ends it as KeyboardInterrupt.
  kill -INT -- "-${PROXY_PID[colocated_proxy]}" 2>/dev/null || true
  for _ in $(seq 1 30); do [[ -s $OUT/colocated_proxy.prof ]] && break; sleep 1; done
  [[ -s $OUT/colocated_proxy.prof ]] || kvx_die "the profiled proxy wrote no $OUT/colocated_proxy.prof"
  "$PYTHON" -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats(25)" \
    "$OUT/colocated_proxy.prof" >"$OUT/colocated_proxy_profile.txt"
  kvx_log "proxy profile: $OUT/colocated_proxy.prof (top 25 by cumulative time: $OUT/colocated_proxy_profile.txt)"
fi
