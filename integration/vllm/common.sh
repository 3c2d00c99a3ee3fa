# vLLM helpers shared by the scripts that run vLLM servers (launch_pd.sh, run_accuracy_test.sh,
# ../compare_vllm_pd.sh); sourced after ../common.sh, not run. vLLM is never a kvxfer dependency:
# it runs from its own environment, made by scripts/vllm-venv.sh.
#   VLLM_VENV [the repo's .vllm-venv]  VLLM_PYTHON [VLLM_VENV/bin/python]

VLLM_VENV=${VLLM_VENV:-$KVX_ROOT/.vllm-venv}
VLLM_PYTHON=${VLLM_PYTHON:-$VLLM_VENV/bin/python}
# Where the P/D instances run (taskset lists; set one empty to leave it unpinned): apart, one
# core each, as the tests run them. Unpinned, vLLM's own "auto" OMP binding puts both instances
# on every core, and on a 2-core host kvxfer's READs were then posted and never completed ("KV
# READ not done after 30s"): every thread of both workers inherits the OMP master's core 0
# (docs/architecture.md, vLLM connector); pinned apart they take milliseconds.
PREFILL_CPUS=${PREFILL_CPUS-0}
if (($(nproc) > 1)); then DECODE_CPUS=${DECODE_CPUS-1}; else DECODE_CPUS=${DECODE_CPUS-0}; fi

# kvx_vllm_check: die, before anything starts, unless VLLM_PYTHON can import vLLM and NIXL.
kvx_vllm_check() {
  [[ -x "$VLLM_PYTHON" ]] || kvx_die "no vLLM environment at VLLM_VENV=$VLLM_VENV (make it with scripts/vllm-venv.sh)"
  "$VLLM_PYTHON" -c "import vllm, nixl._api" 2>/dev/null \
    || kvx_die "$VLLM_PYTHON cannot import vllm and nixl (scripts/vllm-venv.sh $VLLM_VENV installs them)"
}

# kvx_vllm_kv_config CONNECTOR [SIDE_PORT]: the --kv-transfer-config JSON of a P/D instance;
# CONNECTOR is kvxfer (kvxfer's KvxferConnector from this checkout) or nixl (vLLM's NixlConnector
# on CPU memory). kvxfer's side channel port goes in kv_connector_extra_config (without one it
# falls back to vLLM's kv_port, 14579 by default for every instance: a second one on the host
# cannot bind it); NixlConnector's is VLLM_NIXL_SIDE_CHANNEL_PORT (kvx_start_vllm).
kvx_vllm_kv_config() {
  local side=${2:-}
  [[ -z "$side" || "$side" =~ ^[1-9][0-9]*$ ]] || kvx_die "side channel port must be a port number, got '$side'"
  local extra=""
  [[ -z "$side" ]] || extra=",\"kv_connector_extra_config\":{\"side_channel_port\":$side}"
  case $1 in
    kvxfer) printf '{"kv_connector":"KvxferConnector","kv_connector_module_path":"kvxfer.integrations.vllm","kv_role":"kv_both"%s}\n' "$extra" ;;
    nixl) echo '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}' ;;
    *) kvx_die "CONNECTOR must be kvxfer or nixl, got '$1'" ;;
  esac
}

# kvx_start_vllm NAME LOG MODEL_DIR PORT SIDE_PORT CPUS CONNECTOR [VLLM ARGS...]: one `vllm serve`
# in the background. CONNECTOR "none" is a colocated server (no KV transfer); CPUS "" leaves it
# unpinned. SIDE_PORT is the instance's side channel, given to both connectors' variables. The
# block size is a multiple of 32 (vLLM CPU attention), the served name is the directory name (as
# kvxfer's server), kvxfer is imported from this checkout and NIXL's progress thread is off
# (../vllm_site/sitecustomize.py). VLLM_DTYPE [DTYPE, else auto] VLLM_KV_GIB [1] VLLM_ARGS.
kvx_start_vllm() {
  local name=$1 log=$2 model=$3 port=$4 side=$5 cpus=$6 connector=$7; shift 7
  local cmd=(env PYTHONPATH="$KVX_ROOT/integration/vllm_site:$KVX_ROOT${PYTHONPATH:+:$PYTHONPATH}"
             VLLM_CPU_KVCACHE_SPACE="${VLLM_KV_GIB:-1}")
  # Only P/D instances get a side channel: vLLM parses VLLM_NIXL_SIDE_CHANNEL_PORT as an int at start,
  # so an empty one (a colocated server) kills its engine ("invalid literal for int()").
  [[ -z "$side" ]] || cmd+=(VLLM_NIXL_SIDE_CHANNEL_PORT="$side")
  [[ -z "$cpus" ]] || cmd+=(VLLM_CPU_OMP_THREADS_BIND="$cpus" taskset -c "$cpus")
  cmd+=("$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$model" --host 127.0.0.1 --port "$port"
        --served-model-name "$(basename "$model")" --dtype "${VLLM_DTYPE:-${DTYPE:-auto}}" --block-size 32
        --max-model-len "${VLLM_MAX_MODEL_LEN:-4096}" --uvicorn-log-level warning)
  [[ "$connector" == none ]] || cmd+=(--kv-transfer-config "$(kvx_vllm_kv_config "$connector" "$side")")
  kvx_start "$name" "$log" "${cmd[@]}" ${VLLM_ARGS:-} "$@"
}
