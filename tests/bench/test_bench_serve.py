"""`kvxfer bench serve` as a user runs it (the CLI in a subprocess) against real servers on
loopback: a colocated tiny-qwen3 server and a prefill/decode pair behind the proxy. The JSON's
summary is checked against the per-request records it also holds, recomputed here."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys

import pytest

from kvxfer.ports import free_ports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, timeout_s: float = 240) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "kvxfer.entrypoints.cli", "bench", "serve", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, proc.stdout + proc.stderr


def quantile(xs: list[float], p: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]


def check_summary(s: dict, records: list[dict], slo_ttft_ms: float, slo_tpot_ms: float) -> None:
    ok = [r for r in records if r["error"] is None]
    for section in ("ttft", "tpot", "itl", "e2e"):
        assert s[section]["p50_ms"] <= s[section]["p90_ms"] <= s[section]["p99_ms"], section
    ttft = [r["ttft_s"] * 1e3 for r in ok]
    tpot = [(r["e2e_s"] - r["ttft_s"]) * 1e3 / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    assert s["ttft"]["p50_ms"] == pytest.approx(statistics.median(ttft))
    assert s["ttft"]["p99_ms"] == pytest.approx(quantile(ttft, 99))
    assert s["tpot"]["p90_ms"] == pytest.approx(quantile(tpot, 90))
    good = sum(1 for r in ok if r["ttft_s"] * 1e3 <= slo_ttft_ms
               and (r["output_tokens"] < 2 or (r["e2e_s"] - r["ttft_s"]) * 1e3 / (r["output_tokens"] - 1) <= slo_tpot_ms))
    assert s["good_requests"] == good
    assert s["goodput"] == pytest.approx(good / s["duration_s"])
    assert s["goodput"] <= s["request_throughput"] == pytest.approx(len(ok) / s["duration_s"])
    assert s["output_tokens"] == sum(r["output_tokens"] for r in ok)
    # The run's duration spans its requests: at least the longest one.
    assert s["duration_s"] >= max(r["e2e_s"] for r in ok)


def test_load_against_colocated_server(servers, tmp_path):
    out = tmp_path / "result.json"
    rc, log = bench("--endpoint", f"colocated={servers['colocated']}", "--num-requests", "12", "--concurrency", "4",
                    "--mix", "chat:3:8-32:6-10", "--mix", "long:1:200-300:3", "--warmup", "1", "--seed", "7",
                    "--slo-ttft-ms", "150", "--slo-tpot-ms", "15", "--out", str(out))
    assert rc == 0, log
    result = json.loads(out.read_text())
    ep = result["endpoints"]["colocated"]
    s, records = ep["summary"], ep["requests"]
    assert (s["requests"], s["completed"], s["errors"]) == (12, 12, {}), log
    assert set(ep["classes"]) <= {"chat", "long"} and sum(c["requests"] for c in ep["classes"].values()) == 12
    for r in records:
        # ignore_eos: the server's usage reports exactly max_tokens; the prompt as drawn.
        assert r["output_tokens"] == r["max_tokens"]
        lo, hi = (8, 32) if r["klass"] == "chat" else (200, 300)
        assert lo <= r["prompt_tokens"] <= hi
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert len(r["itl_s"]) <= r["output_tokens"] - 1
    check_summary(s, records, 150, 15)
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as img:
        img.verify()
        assert img.size[0] > 500 and img.size[1] > 300


def test_sequential_comparison_proxy_vs_colocated(servers, tmp_path):
    out = tmp_path / "cmp.json"
    rc, log = bench("--endpoint", f"colocated={servers['colocated']}", "--endpoint", f"pd={servers['pd']}",
                    "--sequential", "--num-requests", "4", "--input-len", "40-80", "--output-len", "4",
                    "--warmup", "1", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100", "--out", str(out))
    assert rc == 0, log
    result = json.loads(out.read_text())
    eps = result["endpoints"]
    assert result["config"]["rounds"] == 4  # sequential comparison: one request per endpoint per round
    for name in ("colocated", "pd"):
        s = eps[name]["summary"]
        assert (s["completed"], s["errors"]) == (4, {}), log
        assert [r["round"] for r in eps[name]["requests"]] == [0, 1, 2, 3]
        assert all(r["output_tokens"] == 4 for r in eps[name]["requests"])
        check_summary(s, eps[name]["requests"], 1000, 100)
    # Same workload on both: the same prompt lengths in the same rounds.
    assert ([r["prompt_tokens"] for r in eps["pd"]["requests"]]
            == [r["prompt_tokens"] for r in eps["colocated"]["requests"]])
    ratio = result["ratios"]["pd/colocated"]
    assert ratio["ttft_p50_ms"] == pytest.approx(eps["pd"]["summary"]["ttft"]["p50_ms"]
                                                 / eps["colocated"]["summary"]["ttft"]["p50_ms"])
    assert "pd/colocated" in log


def test_errors_are_counted_by_kind_and_the_run_finishes(servers, tmp_path):
    (dead_port,) = free_ports(1)  # nothing listens there
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (backlog), never answers
    out = tmp_path / "err.json"
    try:
        rc, log = bench("--endpoint", f"dead=http://127.0.0.1:{dead_port}",
                        "--endpoint", f"silent=http://127.0.0.1:{silent.getsockname()[1]}",
                        "--endpoint", f"colocated={servers['colocated']}", "--request-timeout", "2",
                        "--num-requests", "3", "--rounds", "1", "--warmup", "0", "--input-len", "8",
                        "--output-len", "100000", "--out", str(out))
    finally:
        silent.close()
    assert rc == 1, log  # no endpoint completed anything
    eps = json.loads(out.read_text())["endpoints"]
    assert eps["dead"]["summary"]["errors"] == {"connect": 3}
    assert eps["silent"]["summary"]["errors"] == {"timeout": 3}
    # Over the server's context length: a 400 whose message names max_tokens.
    assert eps["colocated"]["summary"]["errors"] == {"http_400": 3}
    assert all("max_tokens" in r["error_detail"] for r in eps["colocated"]["requests"])
