"""Starting vLLM servers (with kvxfer's connector or without one) and kvxfer's proxy for the
vLLM tests, and reading what the servers report (their logs, vLLM's /metrics)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx

from kvxfer.entrypoints.launcher import ManagedProcess, proxy_argv

ROOT = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 32  # vLLM CPU attention: a multiple of 32
STARTUP_S = 600  # bounds a hang: vLLM imports torch and profiles on a busy 2-core host
LOADED = re.compile(r"kvxfer: loaded request (\S+): (\d+) bytes in (\d+) descriptors")


def vllm_server(python: str, model_dir: str, name: str, log_dir: Path, cpu: int, kv_role: str | None = "kv_both",
                extra_config: dict | None = None, failure_policy: str = "fail") -> ManagedProcess:
    """A vLLM OpenAI server of `model_dir` on one core; with kvxfer's connector unless
    `kv_role` is None. Started on drawn ports (HTTP, KV side channel), redrawn on a lost bind."""

    def argv(ports) -> list[str]:
        port, side = ports
        out = ["taskset", "-c", str(cpu), python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny-qwen3",
               "--dtype", "float32", "--block-size", str(BLOCK_SIZE), "--max-model-len", "2048",
               "--max-num-seqs", "8", "--uvicorn-log-level", "warning", "--seed", "0"]
        if kv_role is not None:
            config = {"kv_connector": "KvxferConnector", "kv_connector_module_path": "kvxfer.integrations.vllm",
                      "kv_role": kv_role, "kv_load_failure_policy": failure_policy,
                      "kv_connector_extra_config": {"side_channel_port": side, **(extra_config or {})}}
            out += ["--kv-transfer-config", json.dumps(config)]
        return out

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'integration' / 'vllm_site'}",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(cpu), "VLLM_LOGGING_LEVEL": "INFO"}
    return ManagedProcess.on_free_ports(name, 2, argv, log_dir / f"{name}.log", env=env).start()


def proxy(prefill: ManagedProcess, decode: ManagedProcess, log_dir: Path) -> ManagedProcess:
    def argv(ports) -> list[str]:
        return proxy_argv([prefill.url], [decode.url], ports[0], "--first-token", "decode", "--log-level", "warning",
                          "--health-interval", "1")

    return ManagedProcess.on_free_ports("proxy", 1, argv, log_dir / "proxy.log").start()


def complete(url: str, prompt: list[int], max_tokens: int, timeout_s: float = 120.0, **extra) -> httpx.Response:
    body = {"model": "tiny-qwen3", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout_s)


def token_ids(resp: httpx.Response) -> list[int]:
    assert resp.status_code == 200, resp.text
    return list(resp.json()["choices"][0]["token_ids"])


def loads(log: Path) -> list[tuple[str, int, int]]:
    """(request id, bytes, descriptors) of every load the decode's connector logged, in order."""
    return [(m[1], int(m[2]), int(m[3])) for m in LOADED.finditer(log.read_text(errors="replace"))]


def wait_for(check, timeout_s: float, what: str):
    """Poll `check()` until it returns a truthy value (a bound on a hang, not a measurement)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.2)


def metric(url: str, name: str) -> float:
    """A vLLM /metrics gauge or counter, summed over its label sets."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith("#") and (line[len(name)] in "{ ")]
    return sum(values)
