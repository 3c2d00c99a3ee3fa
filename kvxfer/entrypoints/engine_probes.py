"""Engine-side helpers of the server: readiness (TP rank processes alive, the KV side channel
serving every rank's metadata) and engine.stats() flattened for the metrics page.

Readiness never waits for the engine thread: a long step is load, not ill health, so the
probes read process state and the side channel, which answer while a step runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import zmq

if TYPE_CHECKING:
    from kvxfer.engine.engine import LLMEngine


def dead_ranks_problem(worker_pids: list[int]) -> str | None:
    """None while every TP worker process (ranks 1.., by pid) runs; else which are gone. Any
    thread: reads /proc, so a rank that died (a zombie until the engine reaps it) is seen at
    once, even while the engine thread is inside a step."""
    dead = [rank for rank, pid in enumerate(worker_pids, start=1) if not _process_running(pid)]
    return f"TP rank {', '.join(map(str, dead))} died" if dead else None


def _process_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # the command name may hold spaces
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def engine_stats(engine: LLMEngine) -> dict[str, Any]:
    """engine.stats() with the connector's counters as `kv_<name>`. Runs on the engine thread."""
    stats = dict(engine.stats())
    for key, value in (stats.pop("connector", None) or {}).items():
        stats[f"kv_{key}"] = value
    return stats


def side_channel_problem(
    host: str, port: int, engine_id: str, tp_size: int, timeout_s: float, auth_key: bytes | None = None
) -> str | None:
    """None when the side channel answers a metadata query the way a decode engine would ask
    it (signed with `auth_key` when set), with all `tp_size` ranks registered; else what is
    wrong. Blocking."""
    from kvxfer.connectors.auth import FrameAuth
    from kvxfer.connectors.metadata import Query, decode_reply

    auth = FrameAuth(auth_key)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{host}:{port}")
        frame, nonce = auth.seal_request(msgspec.msgpack.encode(Query(engine_id=engine_id)))
        sock.send(frame)
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return f"KV side channel {host}:{port} did not answer within {timeout_s:.0f}s"
        raw = sock.recv()
        opened = auth.open_reply(raw, nonce)
        reply = decode_reply(raw if opened is None else opened)
    except (zmq.ZMQError, ValueError) as exc:
        return f"KV side channel {host}:{port}: {exc}"
    finally:
        sock.close()
    if not reply.ok or reply.metadata is None:
        return f"KV side channel {host}:{port}: {reply.error}"
    if len(reply.metadata.ranks) != tp_size:
        return f"KV side channel {host}:{port} lists {len(reply.metadata.ranks)} of {tp_size} ranks"
    return None
