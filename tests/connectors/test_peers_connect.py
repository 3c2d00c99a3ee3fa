"""Issue 18 gap: `register_kv_caches` held the worker's lock while it handshook with its
`--kv-peers`, so a slow peer stopped the rank's progress thread and every engine call on the
rank for up to a handshake time-out. The network waits now run outside the lock. A real NIXL
worker, a peer address that accepts connections and never answers."""

import socket
import threading

import torch

from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.nixl_worker import NixlConnectorWorker
from kvxfer.specs import FullAttentionSpec

SPEC = FullAttentionSpec(num_kv_heads=2, head_size=8, num_layers=2, block_size=4, dtype="float32")
HANDSHAKE_S = 10.0  # the silent peer holds the start this long; the worker must answer meanwhile


def test_connecting_to_a_silent_peer_does_not_hold_the_workers_lock():
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    config = KVTransferConfig(role="decode", peers=(f"127.0.0.1:{port}",), handshake_timeout_s=HANDSHAKE_S,
                              transfer_timeout_s=5.0)
    worker = NixlConnectorWorker(config, SPEC, 0, 1, "m")
    cache = torch.zeros((16, *SPEC.block_shape(1)), dtype=torch.float32)
    registering = threading.Thread(target=worker.register_kv_caches, args=([cache],))
    try:
        registering.start()
        silent.settimeout(HANDSHAKE_S * 3)
        conn, _ = silent.accept()  # the handshake is under way (and will get no answer)
        out = worker.get_finished()  # takes the worker's lock: must not wait for that handshake
        assert registering.is_alive(), "get_finished waited for the peer handshake (the lock was held)"
        assert out.is_empty()
        registering.join(HANDSHAKE_S * 6)
        assert not registering.is_alive()
        assert worker.peers == {}  # unreachable at start: left to the first request's lazy handshake
        conn.close()
    finally:
        registering.join(HANDSHAKE_S * 6)
        worker.shutdown()
        silent.close()
