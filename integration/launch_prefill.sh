#!/usr/bin/env bash
# Start a prefill server: computes prompts and lends their KV cache to decode servers.
#   integration/launch_prefill.sh MODEL_DIR [more `kvxfer serve` options]
# Environment: TP [1] DEVICE [cpu] HOST [127.0.0.1] PORT [8100] SIDE_CHANNEL_PORT [5600]
#              DEVICE_IDS [0..TP-1] (cuda: GPU index per rank, e.g. 0,1; all GPUs stay visible)
#              GPU_MEMORY_UTILIZATION [0.9] (cuda: share of each GPU's total memory)
#              BLOCK_SIZE [16] (must equal the decode servers')
# Equivalent to:
#   kvxfer serve MODEL_DIR --role prefill --tp 1 --device cpu --port 8100 --side-channel-port 5600
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
MODEL_DIR=${1:?usage: $0 MODEL_DIR [kvxfer serve options]}
shift
exec "$PYTHON" -m kvxfer.entrypoints.serve "$MODEL_DIR" --role prefill --tp "${TP:-1}" --device "${DEVICE:-cpu}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8100}" --side-channel-port "${SIDE_CHANNEL_PORT:-5600}" \
  --block-size "${BLOCK_SIZE:-16}" ${DEVICE_IDS:+--device-ids "$DEVICE_IDS"} ${GPU_MEMORY_UTILIZATION:+--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION"} "$@"
