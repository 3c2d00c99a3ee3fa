#!/usr/bin/env bash
# Start a prefill server: computes prompts and lends their KV cache to decode servers.
#   integration/launch_prefill.sh MODEL_DIR [more `kvxfer serve` options]
# Environment: TP [1] DEVICE [cpu] HOST [127.0.0.1] PORT [8100] SIDE_CHANNEL_PORT [5600]
#              BLOCK_SIZE [16] (must equal the decode servers')
# Equivalent to:
#   kvxfer serve MODEL_DIR --role prefill --tp 1 --device cpu --port 8100 --side-channel-port 5600
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
MODEL_DIR=${1:?usage: $0 MODEL_DIR [kvxfer serve options]}
shift
exec "$PYTHON" -m kvxfer.entrypoints.serve "$MODEL_DIR" --role prefill --tp "${TP:-1}" --device "${DEVICE:-cpu}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8100}" --side-channel-port "${SIDE_CHANNEL_PORT:-5600}" \
  --block-size "${BLOCK_SIZE:-16}" "$@"
