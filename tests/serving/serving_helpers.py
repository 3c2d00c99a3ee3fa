"""Helpers of the serving tests: a cluster of real server/proxy processes, metrics reading,
polling waits, and the HF reference for greedy outputs."""

from __future__ import annotations

import argparse
import os
import threading
import time

import httpx
import pytest

from kvxfer.entrypoints.launcher import ManagedProcess, proxy_argv, serve_argv, stop_all
from kvxfer.ports import free_ports

BLOCK_SIZE = 16
NUM_KV_BLOCKS = 256
STARTUP_S = 240


class Cluster:
    """Processes started by one fixture; `stop()` ends them all. Each is started on freshly
    drawn ports and restarted on new ones if another process took one first (see launcher)."""

    def __init__(self, model_dir: str, log_dir):
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.processes: list[ManagedProcess] = []

    def server(self, name: str, role: str, tp: int = 1, *extra: str) -> ManagedProcess:
        def argv(ports) -> list[str]:
            return serve_argv(self.model_dir, role, tp, ports[0], ports[1], "--block-size", str(BLOCK_SIZE),
                              "--num-kv-blocks", str(NUM_KV_BLOCKS), "--log-level", "warning", *extra)

        proc = ManagedProcess.on_free_ports(name, 2, argv, self.log_dir / f"{name}.log").start()
        self.processes.append(proc)
        return proc

    def proxy(self, prefill: list[ManagedProcess], decode: list[ManagedProcess], *extra: str) -> ManagedProcess:
        def argv(ports) -> list[str]:
            return proxy_argv([p.url for p in prefill], [d.url for d in decode], ports[0],
                              "--log-level", "warning", *extra)

        index = sum(p.name == "proxy" for p in self.processes)
        proc = ManagedProcess.on_free_ports("proxy", 1, argv, self.log_dir / f"proxy-{index}.log").start()
        self.processes.append(proc)
        return proc

    def wait_healthy(self) -> None:
        for p in self.processes:
            p.wait_healthy(STARTUP_S)

    def stop(self) -> None:
        stop_all(self.processes)


class InProcessServer:
    """`kvxfer serve` built in this process (so a test can block its engine thread or wrap its
    app), served by uvicorn on a loopback port from a background thread."""

    def __init__(self, model_dir: str, role: str, *extra: str, wrap=None):
        import uvicorn

        from kvxfer.entrypoints import serve

        port, side = free_ports(2)
        parser = argparse.ArgumentParser()
        serve.add_arguments(parser)
        args = parser.parse_args([model_dir, "--role", role, "--port", str(port), "--side-channel-port", str(side),
                                  "--block-size", "16", "--num-kv-blocks", "256", *extra])
        self.url = f"http://127.0.0.1:{port}"
        self.engine, app = serve.build_server(args)
        app = wrap(app) if wrap is not None else app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.shutdown()


def metrics(url: str) -> dict[str, float]:
    """Samples of a server's /metrics page by name (labels kept in the name)."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_all_blocks_free(url: str, timeout_s: float = 20.0) -> dict[str, float]:
    """Poll until the server's KV pool is entirely free; fail with the last numbers otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(url)
        if m["kvxfer_kv_free_blocks"] == m["kvxfer_kv_blocks"]:
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"{url}: {m['kvxfer_kv_free_blocks']:.0f} of {m['kvxfer_kv_blocks']:.0f} blocks free "
                        f"after {timeout_s}s ({m.get('kvxfer_kv_held_requests', 0):.0f} held requests)")
        time.sleep(0.2)


def wait_metric(url: str, name: str, at_least: float, timeout_s: float = 20.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        value = metrics(url).get(name, 0.0)
        if value >= at_least:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{url}: {name} = {value}, expected >= {at_least} within {timeout_s}s")
        time.sleep(0.2)


class HFGreedy:
    """Greedy continuations and per-token log-probs from HF transformers on the CPU."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(self, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        torch = self.torch
        ids, out, logprobs = list(prompt_ids), [], []
        with torch.no_grad():
            for _ in range(max_tokens):
                logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                lp = torch.log_softmax(logits, dim=-1)
                token = int(lp.argmax())
                out.append(token)
                logprobs.append(float(lp[token]))
                ids.append(token)
        return out, logprobs

    def top_logprobs(self, prompt_ids: list[int], max_tokens: int, k: int) -> list[list[tuple[int, float]]]:
        """Per greedy position: the k most likely (token id, log-prob), best first."""
        torch = self.torch
        ids, tops = list(prompt_ids), []
        with torch.no_grad():
            for _ in range(max_tokens):
                lp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
                values, top_ids = lp.topk(k)
                tops.append(list(zip(top_ids.tolist(), values.tolist())))
                ids.append(int(top_ids[0]))
        return tops


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (a server's TP worker processes), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # The command name may hold spaces; the parent pid follows the closing paren.
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return children
