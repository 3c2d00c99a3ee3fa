# Helpers shared by the integration scripts; sourced, not run.
# PYTHON: interpreter with kvxfer installed (default: the repo's .venv, else python3).

KVX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$KVX_ROOT/.venv/bin/python" ]]; then PYTHON="$KVX_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

kvx_cli() { "$PYTHON" -m kvxfer.entrypoints.cli "$@"; }

kvx_log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
kvx_die() { kvx_log "error: $*"; exit 1; }

# kvx_model_dir MODEL CACHE_DIR: MODEL if it is a model directory, else build the preset
# of that name under CACHE_DIR (once) and print its path.
kvx_model_dir() {
  local model=$1 cache=$2
  if [[ -f "$model/config.json" ]]; then (cd "$model" && pwd); return; fi
  [[ "$model" == */* ]] && kvx_die "MODEL=$model is neither a model directory (no config.json) nor a preset name"
  local dir="$cache/$model"
  if [[ ! -f "$dir/config.json" ]]; then
    kvx_log "building preset $model in $dir"
    mkdir -p "$cache"
    # Built aside and renamed, so concurrent runs never see a half-written checkpoint.
    local tmp="$dir.tmp.$$"
    kvx_cli make-model --preset "$model" --out "$tmp" >&2 || { rm -rf "$tmp"; kvx_die "could not build preset $model"; }
    mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
  fi
  echo "$dir"
}

# kvx_free_ports N: N distinct free TCP ports on 127.0.0.1, space-separated (kvxfer.ports: drawn
# outside the kernel's ephemeral range, so no client connection can take one before its server binds).
kvx_free_ports() {
  PYTHONPATH="$KVX_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m kvxfer.ports "$1"
}

# kvx_gpu_count: how many GPUs this process sees (CUDA_VISIBLE_DEVICES entries, else all;
# NUM_GPUS overrides, e.g. for a DRY_RUN on a host without one). Instances are given
# `--device-ids` indices into this list, never their own CUDA_VISIBLE_DEVICES: every instance
# must see every GPU to open the others' CUDA IPC handles.
kvx_gpu_count() {
  if [[ -n "${NUM_GPUS:-}" ]]; then echo "$NUM_GPUS"; return; fi
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .; return; fi
  "$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
}

# Background processes, each its own process group (its TP workers included).
KVX_PIDS=()
KVX_NAMES=()
KVX_LOGS=()

# kvx_start NAME LOGFILE CMD...: start CMD in the background in a new session.
kvx_start() {
  local name=$1 log=$2; shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  KVX_PIDS+=($!); KVX_NAMES+=("$name"); KVX_LOGS+=("$log")
  kvx_log "started $name (pid $!, log $log)"
}

# kvx_stop_all: SIGTERM every group, SIGKILL what is left after a grace period.
kvx_stop_all() {
  local pid i saved
  ((${#KVX_PIDS[@]})) || return 0
  # A second SIGINT/SIGTERM (Ctrl-C twice, or `timeout` and a kill) must not end the script
  # half-way through the stop and leave servers running: held until every group is gone.
  saved=$(trap -p INT TERM)
  trap '' INT TERM
  for pid in "${KVX_PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for i in $(seq 1 "${KVX_STOP_GRACE:-15}"); do
    local alive=0
    for pid in "${KVX_PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 1
  done
  for pid in "${KVX_PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  KVX_PIDS=()
  trap - INT TERM
  eval "$saved"
}

# kvx_work_dir PREFIX: WORK_DIR (kept when given) or a fresh temporary one (PREFIX.XXXXXX),
# LOGS="$WORK_DIR/logs", and the traps: at exit every started process group is stopped, then
# the work dir is removed unless the run failed (and was not a DRY_RUN=1), KEEP_LOGS=1, or
# WORK_DIR was given; SIGINT exits 130 and SIGTERM 143, through the same clean-up.
kvx_work_dir() {
  KVX_KEEP_WORK=0
  if [[ -z "${WORK_DIR:-}" ]]; then WORK_DIR=$(mktemp -d -t "$1.XXXXXX"); else KVX_KEEP_WORK=1; mkdir -p "$WORK_DIR"; fi
  LOGS="$WORK_DIR/logs"
  mkdir -p "$LOGS"
  trap kvx_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

kvx_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  kvx_stop_all
  if ((rc != 0 && ! ${DRY_RUN:-0})) || [[ "${KEEP_LOGS:-0}" == 1 ]] || ((KVX_KEEP_WORK)); then
    kvx_log "logs in $LOGS"
  else
    rm -rf "$WORK_DIR"
  fi
  exit "$rc"
}

# kvx_http_ok URL: GET URL answers 200 within 2 s.
kvx_http_ok() {
  if command -v curl >/dev/null; then
    [[ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1")" == 200 ]]
  else
    "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null
  fi
}

# kvx_wait_healthy URL PID NAME LOG TIMEOUT_S: wait for URL/health to answer 200; fail early
# (with the log's tail) if the process exits, or on time-out.
kvx_wait_healthy() {
  local url=$1 pid=$2 name=$3 log=$4 timeout=$5 start=$SECONDS
  while true; do
    if kvx_http_ok "$url/health"; then kvx_log "$name is healthy ($url)"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$log" >&2
      kvx_die "$name exited before becoming healthy (log: $log)"
    fi
    if ((SECONDS - start > timeout)); then
      tail -n 30 "$log" >&2
      kvx_die "$name not healthy after ${timeout}s (log: $log)"
    fi
    sleep 1
  done
}

# kvx_bench NAME ARGS...: one `kvxfer bench serve` comparison of the ENDPOINTS array (SEED) into
# OUT/NAME.{json,png,txt}; an endpoint that completed nothing is reported (its errors are in the
# JSON by kind) and the caller's next stage still runs.
kvx_bench() {
  local name=$1; shift
  kvx_cli bench serve "${ENDPOINTS[@]}" --seed "$SEED" --no-progress "$@" --out "$OUT/$name.json" \
    | tee "$OUT/$name.txt" || kvx_log "warning: an endpoint completed no request in $name (see $OUT/$name.json)"
}

# kvx_ttft_stage: the TTFT protocol, one request at a time per prompt length in TTFT_LENS, 4 output
# tokens, median of TTFT_REPEATS after 3 warm-ups, the endpoints alternating request by request.
kvx_ttft_stage() {
  local n
  for n in $TTFT_LENS; do
    kvx_log "ttft: $n-token prompts (uptime: $(uptime))"
    kvx_bench "ttft_$n" --sequential --input-len "$n" --output-len 4 --num-requests "$TTFT_REPEATS" --warmup 3
  done
}
