"""HTTP client for the two-namespace test, run inside a namespace (`ip netns exec NS python
netns_client.py OPS_JSON`): the servers there are not reachable from the test's namespace.
Runs each op in order and prints one JSON list of results; every wait has a deadline."""

from __future__ import annotations

import json
import sys
import time

import httpx
from serving_helpers import metrics


def _post(op: dict) -> dict:
    try:
        r = httpx.post(op["url"], json=op["json"], timeout=op.get("timeout", 60))
        return {"status": r.status_code, "body": r.json() if r.headers.get("content-type", "").startswith(
            "application/json") else r.text}
    except httpx.HTTPError as exc:
        return {"status": None, "error": repr(exc)}


def run(op: dict):
    deadline = time.monotonic() + op.get("timeout", 60)
    if op["op"] == "post":
        return _post(op)
    while True:
        try:
            if op["op"] == "wait_healthy":
                if httpx.get(f"{op['url']}/health", timeout=5).status_code == 200:
                    return {"ok": True}
            elif op["op"] == "wait_free":
                m = metrics(op["url"])
                if m["kvxfer_kv_free_blocks"] == m["kvxfer_kv_blocks"]:
                    return {"ok": True, "metrics": m}
            elif op["op"] == "post_until_ok":  # e.g. until the proxy has seen a backend come back
                result = _post(op)
                if result["status"] == 200:
                    return result
            elif op["op"] == "metrics":
                return {"ok": True, "metrics": metrics(op["url"])}
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return {"ok": False}
        time.sleep(0.3)


if __name__ == "__main__":
    print(json.dumps([run(op) for op in json.loads(sys.argv[1])]))
