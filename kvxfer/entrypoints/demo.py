"""`make demo`: disaggregated serving of a tiny model, end to end, in one command.

Builds tiny-qwen3, starts a prefill server (TP 2), a decode server (TP 1: a different TP size,
so every pull splits heads across ranks) and the proxy, sends a few completions through the
proxy (one streamed), prints them with the decode side's KV transfer stats, and stops all.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvxfer.entrypoints.launcher import ManagedProcess, proxy_argv, serve_argv, stop_all

PROMPTS = [
    "A prefill engine reads the whole prompt at once",
    "The cache is split into blocks of sixteen tokens, and every block holds all layers of a few heads. "
    "When two requests share the same beginning, the second one can reuse the blocks of the first.",
    "Once upon a time there was a small village by the sea",
]
STREAMED = "Tensor parallel ranks each hold a slice of the attention heads"


def _stats_line(stats: dict | None) -> str:
    if not stats:
        return "no KV transfer"
    return (f"pulled {stats['bytes']:,} bytes in {stats['descriptors']} descriptors, "
            f"{stats['seconds'] * 1e3:.1f} ms ({stats['gbps']:.2f} GB/s)")


def run(workdir: Path, prefill_tp: int, decode_tp: int, max_tokens: int) -> None:
    from kvxfer.models.presets import make_model

    t0 = time.perf_counter()
    model_dir = workdir / "tiny-qwen3"
    make_model("tiny-qwen3", str(model_dir))
    print(f"built tiny-qwen3 in {model_dir} ({time.perf_counter() - t0:.1f}s)")

    common = ("--num-kv-blocks", "256", "--log-level", "warning")
    prefill = ManagedProcess.on_free_ports(
        "prefill", 2, lambda ports: serve_argv(model_dir, "prefill", prefill_tp, *ports, *common), workdir / "prefill.log")
    decode = ManagedProcess.on_free_ports(
        "decode", 2, lambda ports: serve_argv(model_dir, "decode", decode_tp, *ports, *common), workdir / "decode.log")
    processes = [prefill, decode]
    try:
        print(f"starting prefill (TP {prefill_tp}) at {prefill.url} and decode (TP {decode_tp}) at {decode.url}")
        prefill.start()
        decode.start()
        prefill.wait_healthy(180)
        decode.wait_healthy(180)
        # Built once both servers are healthy: a server that had to redraw its ports has a new URL.
        proxy = ManagedProcess.on_free_ports(
            "proxy", 1, lambda ports: proxy_argv([prefill.url], [decode.url], ports[0], "--log-level", "warning"),
            workdir / "proxy.log")
        processes.append(proxy)
        proxy.start().wait_healthy(60)
        print(f"proxy at {proxy.url}; servers up after {time.perf_counter() - t0:.1f}s\n")
        with httpx.Client(base_url=proxy.url, timeout=120) as client:
            for prompt in PROMPTS:
                r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0.0, "ignore_eos": True})
                r.raise_for_status()
                body = r.json()
                print(f"prompt ({body['usage']['prompt_tokens']} tokens): {prompt!r}")
                print(f"  completion: {body['choices'][0]['text']!r}")
                print(f"  decode side: {_stats_line(body['kv_transfer_stats'])}\n")
            print(f"streamed chat ({STREAMED!r}):\n  ", end="", flush=True)
            stats = None
            messages = [{"role": "user", "content": STREAMED}]
            with client.stream("POST", "/v1/chat/completions", json={
                    "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(event["error"]["message"])
                    print(event["choices"][0]["delta"].get("content", ""), end="", flush=True)
                    stats = event.get("kv_transfer_stats") or stats
            print(f"\n  decode side: {_stats_line(stats)}\n")
    except Exception:
        for p in processes:
            print(f"--- {p.name} log (tail) ---\n{p.log_tail(20)}", file=sys.stderr)
        raise
    finally:
        stop_all(processes)
    print(f"done in {time.perf_counter() - t0:.1f}s; all servers stopped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill-tp", type=int, default=2)
    parser.add_argument("--decode-tp", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvxfer-demo-") as workdir:
        run(Path(workdir), args.prefill_tp, args.decode_tp, args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
