#!/usr/bin/env python3
"""Issue 16's two goal figures from compare_connectors.sh's `kvxfer bench serve` JSON files: per
TTFT prompt length, each P/D endpoint's disaggregation overhead (its TTFT p50 through the proxy
minus the colocated server's, measured in the same alternating run) and its ratio to the last
P/D endpoint's (kvxfer / nixl with the default CONNECTORS); and the load run's duration ratios.
Goal: kvxfer's overhead <= NixlConnector's (ratio <= 1) and load duration ratio <= 1.
    overhead.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _summaries(path: Path) -> dict[str, dict]:
    return {name: ep["summary"] for name, ep in json.loads(path.read_text())["endpoints"].items()}


def _ttft_lines(out: Path) -> list[str]:
    lines = []
    files = sorted(out.glob("ttft_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    for path in files:
        s = _summaries(path)
        pd = [n for n in s if n != "colocated"]
        p50 = {n: s[n]["ttft"]["p50_ms"] for n in s}
        cells = [f"{n} {p50[n]:.1f} ms" for n in s]
        if "colocated" in s and len(pd) >= 2 and None not in p50.values():
            over = {n: p50[n] - p50["colocated"] for n in pd}
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
    pd = [n for n in s if n != "colocated"]
    cells = [f"{n} {s[n]['duration_s']:.2f} s" for n in s]
    cells += [f"{n}/{pd[-1]} {s[n]['duration_s'] / s[pd[-1]]['duration_s']:.3f}" for n in pd[:-1]]
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
