#!/usr/bin/env bash
# Start the P/D proxy in front of prefill and decode servers; clients talk to it only.
#   integration/launch_proxy.sh [more `kvxfer proxy` options]
# Environment: PREFILL_URLS ["http://127.0.0.1:8100"] DECODE_URLS ["http://127.0.0.1:8200"]
#              (space-separated lists) HOST [127.0.0.1] PORT [8000] POLICY [round_robin|least_loaded]
# Equivalent to:
#   kvxfer proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
read -r -a prefill <<<"${PREFILL_URLS:-http://127.0.0.1:8100}"
read -r -a decode <<<"${DECODE_URLS:-http://127.0.0.1:8200}"
exec "$PYTHON" -m kvxfer.entrypoints.cli proxy --prefill "${prefill[@]}" --decode "${decode[@]}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --policy "${POLICY:-round_robin}" "$@"
