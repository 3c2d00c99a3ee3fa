#!/usr/bin/env python3
"""Issue 16's two goal figures from the `kvxfer bench serve` JSON files of
integration/compare_vllm_pd.sh run with COLOCATED=1: per TTFT prompt length, each vLLM P/D
endpoint's disaggregation overhead (its TTFT p50 through the proxy minus the one of
"vllm-colocated", a `vllm serve` without KV transfer, measured in the same alternating run) and
its ratio to NixlConnector's ("vllm"); and the load run's duration ratios to "vllm". Goal:
kvxfer's connector ("vllm-kvxfer") has overhead ratio <= 1 and load duration ratio <= 1. kvxfer's
own engine ("kvxfer") is left out: its TTFT minus a vLLM server's is no overhead.
    overhead.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


COLOCATED = "vllm-colocated"
NIXL = "vllm"  # compare_vllm_pd.sh's name for vLLM P/D with NixlConnector


def _summaries(path: Path) -> dict[str, dict]:
    """The vLLM endpoints' summaries, NixlConnector's P/D last (the ratios' denominator)."""
    eps = {name: ep["summary"] for name, ep in json.loads(path.read_text())["endpoints"].items()
           if name.startswith("vllm")}
    return dict(sorted(eps.items(), key=lambda kv: kv[0] == NIXL))


def _ttft_lines(out: Path) -> list[str]:
    lines = []
    files = sorted(out.glob("ttft_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    for path in files:
        s = _summaries(path)
        pd = [n for n in s if n != COLOCATED]
        p50 = {n: s[n]["ttft"]["p50_ms"] for n in s}
        cells = [f"{n} {p50[n]:.1f} ms" for n in s]
        if COLOCATED in s and NIXL in s and len(pd) >= 2 and None not in p50.values():
            over = {n: p50[n] - p50[COLOCATED] for n in pd}
            ref = pd[-1]
            cells += [f"overhead {n} {over[n]:.1f} ms" for n in pd]
            cells += [f"overhead {n}/{ref} " + (f"{over[n] / over[ref]:.2f}" if over[ref] > 0 else "n/a (<= 0)")
                      for n in pd[:-1]]
        lines.append(f"ttft {path.stem.split('_')[1]:>5} tokens: " + ", ".join(cells))
    return lines


def _load_lines(out: Path) -> list[str]:
    path = out / "load.json"
    if not path.exists():
        return []
    s = _summaries(path)
    pd = [n for n in s if n != COLOCATED]
    cells = [f"{n} {s[n]['duration_s']:.2f} s" for n in s]
    if NIXL in s:
        cells += [f"{n}/{NIXL} {s[n]['duration_s'] / s[NIXL]['duration_s']:.3f}" for n in pd[:-1]]
    return ["load duration: " + ", ".join(cells)]


def main() -> int:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    print("\n".join(_ttft_lines(out) + _load_lines(out)) or f"no ttft_*.json or load.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
