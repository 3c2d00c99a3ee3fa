"""Two hosts on one machine: the prefill server in one network namespace, decode server and
proxy in another, joined only by a veth pair (UCX restricted to TCP on that link, so the KV
really crosses it). Requests work across the link with --side-channel-host; with the link
down a pull fails by the decode's policy within its time-out and the prefill frees by lease;
with the link back up new requests work. Skips with the reason where namespaces cannot be
made. Addresses are private ones that exist only inside the test's own namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvxfer.entrypoints.launcher import ManagedProcess, proxy_argv, serve_argv, stop_all

HERE = Path(__file__).resolve().parent
SUFFIX = str(os.getpid() % 100000)
NS_P, NS_D = f"kvxp{SUFFIX}", f"kvxd{SUFFIX}"
LINK_P, LINK_D = f"kvxp{SUFFIX}", f"kvxd{SUFFIX}"  # the veth ends, one in each namespace
ADDR_P, ADDR_D = "10.231.7.1", "10.231.7.2"
LEASE_S = 8
TRANSFER_TIMEOUT_S = 5
HTTP_P, HTTP_D, HTTP_PROXY, SIDE = 8100, 8200, 8000, 5600  # each namespace has its own ports


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _in(ns: str, ops: list[dict]) -> list[dict]:
    """Run client ops inside namespace `ns` (see netns_client.py)."""
    timeout = sum(op.get("timeout", 60) for op in ops) + 60
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(HERE / "netns_client.py"), json.dumps(ops)],
                         check=True, capture_output=True, text=True, timeout=timeout, env=os.environ)
    return json.loads(out.stdout)


@pytest.fixture
def namespaces():
    made: list[str] = []
    try:
        for ns in (NS_P, NS_D):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", LINK_P, "netns", NS_P, "type", "veth", "peer", "name", LINK_D, "netns", NS_D)
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {getattr(exc, 'stderr', '') or exc}")
    try:
        for ns, link, addr in ((NS_P, LINK_P, ADDR_P), (NS_D, LINK_D, ADDR_D)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
        yield
    finally:
        for ns in (NS_P, NS_D):  # deleting a namespace deletes its veth end (and the pair)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _start(name: str, ns: str, link: str, argv: list[str], port: int, log_dir: Path) -> ManagedProcess:
    # UCX on TCP over the veth only: no shared-memory shortcut between the "hosts".
    env = os.environ | {"UCX_TLS": "tcp", "UCX_NET_DEVICES": link}
    return ManagedProcess(name, ["ip", "netns", "exec", ns, *argv], port, log_dir / f"{name}.log", env=env).start()


def test_prefill_and_decode_in_two_namespaces(namespaces, tiny_qwen3, tmp_path):
    common = ("--block-size", "16", "--num-kv-blocks", "256", "--log-level", "warning")
    prefill_argv = serve_argv(tiny_qwen3, "prefill", 1, HTTP_P, SIDE, *common, "--kv-lease-seconds", str(LEASE_S),
                              "--side-channel-host", ADDR_P)
    prefill_argv[prefill_argv.index("--host") + 1] = "0.0.0.0"  # reachable on the link and on its loopback
    decode_argv = serve_argv(tiny_qwen3, "decode", 1, HTTP_D, SIDE, *common, "--kv-failure-policy", "fail",
                             "--kv-transfer-timeout", str(TRANSFER_TIMEOUT_S), "--kv-handshake-timeout", "5")
    prefill_url, decode_url = f"http://{ADDR_P}:{HTTP_P}", f"http://127.0.0.1:{HTTP_D}"
    proxy_url = f"http://127.0.0.1:{HTTP_PROXY}"
    procs = [_start("prefill", NS_P, LINK_P, prefill_argv, HTTP_P, tmp_path),
             _start("decode", NS_D, LINK_D, decode_argv, HTTP_D, tmp_path),
             _start("proxy", NS_D, LINK_D, proxy_argv([prefill_url], [decode_url], HTTP_PROXY,
                                                      "--health-interval", "0.5"), HTTP_PROXY, tmp_path)]
    logs = lambda: "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in procs)  # noqa: E731
    try:
        ready = _in(NS_D, [{"op": "wait_healthy", "url": u, "timeout": 240} for u in (prefill_url, decode_url)]
                    + [{"op": "wait_healthy", "url": proxy_url, "timeout": 60}])
        assert all(r["ok"] for r in ready), logs()
        body = {"prompt": list(range(3, 60)), "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True}
        first, reference = _in(NS_D, [
            {"op": "post", "url": f"{proxy_url}/v1/completions", "json": body, "timeout": 120},
            {"op": "post", "url": f"{prefill_url}/v1/completions", "timeout": 120,
             "json": body | {"kv_transfer_params": None, "max_tokens": 4}},
        ])
        assert first["status"] == 200, (first, logs())
        assert first["body"]["kv_transfer_stats"]["bytes"] > 0  # pulled across the link
        assert first["body"]["choices"][0]["token_ids"] == reference["body"]["choices"][0]["token_ids"]

        # A prefill leg, then the link goes down before the decode side pulls.
        prompt = list(range(100, 150))
        (leg,) = _in(NS_D, [{"op": "post", "url": f"{prefill_url}/v1/completions", "timeout": 120, "json": {
            "prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}}])
        assert leg["status"] == 200, leg
        _ip("-n", NS_P, "link", "set", LINK_P, "down")
        (pull,) = _in(NS_D, [{"op": "post", "url": f"{decode_url}/v1/completions", "timeout": 120, "json": {
            "prompt": prompt, "max_tokens": 2, "kv_transfer_params": leg["body"]["kv_transfer_params"]}}])
        assert pull["status"] == 502, (pull, logs())  # failed by policy, not hung: within the 120 s client limit
        (decode_free,) = _in(NS_D, [{"op": "wait_free", "url": decode_url, "timeout": 60}])
        assert decode_free["ok"], logs()
        # The prefill, cut off from its reader, frees the hold by lease.
        (prefill_free,) = _in(NS_P, [{"op": "wait_free", "url": f"http://127.0.0.1:{HTTP_P}",
                                      "timeout": LEASE_S + 60}])
        assert prefill_free["ok"], logs()
        assert prefill_free["metrics"]["kvxfer_kv_expired_leases_total"] >= 1

        _ip("-n", NS_P, "link", "set", LINK_P, "up")
        # Once the proxy's health checks see the prefill again, requests go through.
        again = _in(NS_D, [{"op": "post_until_ok", "url": f"{proxy_url}/v1/completions", "json": body,
                            "timeout": 120}])
        assert again[-1].get("status") == 200, (again, logs())
        assert again[-1]["body"]["choices"][0]["token_ids"] == first["body"]["choices"][0]["token_ids"]
        assert again[-1]["body"]["kv_transfer_stats"]["bytes"] > 0
    finally:
        stop_all(procs)
