#!/usr/bin/env bash
# Fetch every wheel `make gpu-check` needs beyond a stock CUDA 13 / Python 3.12 PyTorch image
# into ./.whl (ignored by git; carry it to the GPU machine: `carry: [".whl"]`), and check they
# fit the 64 MiB carry limit with the working tree. Wraps the shared fetch-wheels.sh (nixl,
# msgspec, pyzmq, the HTTP stack) and adds what the check itself uses.
#   scripts/gpu-wheels.sh            (FETCH_WHEELS=path/to/fetch-wheels.sh to override)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fetch=${FETCH_WHEELS:-}
if [[ -z "$fetch" ]]; then
  for candidate in "$root/../shared/gpu/fetch-wheels.sh" "$root/../../shared/gpu/fetch-wheels.sh"; do
    [[ -f "$candidate" ]] && { fetch=$candidate; break; }
  done
fi
[[ -n "$fetch" && -f "$fetch" ]] || { echo "error: fetch-wheels.sh not found (set FETCH_WHEELS)" >&2; exit 1; }
# It writes to ./.git/info/exclude, which a git worktree does not have (.git is a file there;
# .whl/ is in .gitignore anyway): run it from a scratch folder, wheels into ours.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/.git/info"
# pytest-timeout: pyproject's `timeout` option (a hung CUDA test fails instead of eating the budget).
(cd "$scratch" && WHEEL_DIR="$root/.whl" bash "$fetch" pytest-timeout)
limit=$((64 * 1024 * 1024))
wheels=$(du -sb .whl | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $wheels bytes; working tree: $tree bytes; carry limit: $limit bytes"
if ((wheels + tree > limit)); then
  echo "error: wheels and working tree exceed the 64 MiB carry limit" >&2
  exit 1
fi
