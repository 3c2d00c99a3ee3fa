"""`KVTransferConfig`: how an engine takes part in disaggregated prefill/decode.

Validated on construction: a bad value raises `ValueError` naming the field.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import uuid
from dataclasses import dataclass, field

ROLES = ("prefill", "decode", "both")
FAILURE_POLICIES = ("fail", "recompute")
CONNECTORS = ("nixl",)
# A decode rank's READs must end this long before the prefill side's pin on them lapses
# (message latency, clock-rate differences, a cancelled READ still landing).
PIN_MARGIN_S = 2.0
MIN_AUTH_KEY_BYTES = 16


def lease_fit_error(transfer_timeout_s: float, lease_seconds: float) -> str | None:
    """Why a decode with this transfer time-out cannot read from a prefill with this lease, or None."""
    if transfer_timeout_s + PIN_MARGIN_S <= lease_seconds:
        return None
    return (
        f"the decode's transfer_timeout_s ({transfer_timeout_s:g}s) + {PIN_MARGIN_S:g}s margin does not fit "
        f"inside the prefill's lease_seconds ({lease_seconds:g}s)"
    )


@dataclass(frozen=True)
class KVTransferConfig:
    connector: str = "nixl"
    role: str = "both"
    # Shared by all ranks of one engine (the config is pickled to the workers), so the default
    # is drawn once here.
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    side_channel_host: str = "127.0.0.1"
    # Port of the handshake ROUTER (rank 0). A prefill-capable engine needs a fixed one: its
    # other ranks register there and decode engines are told it in `kv_transfer_params`.
    side_channel_port: int = 0
    # Prefill holds a finished request's blocks this long for its decode side to read them.
    lease_seconds: float = 60.0
    failure_policy: str = "fail"
    handshake_timeout_s: float = 5.0
    # A READ still in progress after this long fails the request (dead peer that UCX does not
    # report). Must stay below the prefill side's lease.
    transfer_timeout_s: float = 30.0
    backends: tuple[str, ...] = ("UCX",)
    # Shared secret of all instances (`--kv-auth-key-file`): every side-channel message between
    # instances is authenticated with it. None: unauthenticated (keep the side channel private).
    auth_key: bytes | None = field(default=None, repr=False)
    # Drawn once per instance (the config is pickled to its ranks): a rank must present it to
    # register its KV region, and its hash is the instance id bound into kv_transfer_params.
    instance_secret: bytes = field(default_factory=lambda: secrets.token_bytes(16), repr=False)
    # Decode: prefill side channels ("host:port") to handshake with at start, so an incompatible
    # peer or a lease that the transfer time-out does not fit fails the start, not a request.
    peers: tuple[str, ...] = ()
    # Decode: the only side channels it may connect to ("host:port", or a CIDR such as
    # "10.0.0.0/8" matching IP literals; `peers` are allowed too); empty: any address. Params
    # naming another address are refused (400) before anything connects.
    allowed_peers: tuple[str, ...] = ()
    # Set by the engine's Executor, not by users: the write end of the pipe on which the ranks'
    # connectors wake the engine loop when a transfer finished (`engine.rank_events`); -1: none.
    event_fd: int = -1

    def __post_init__(self) -> None:
        if self.connector not in CONNECTORS:
            raise ValueError(f"KVTransferConfig.connector must be one of {CONNECTORS}, got {self.connector!r}")
        if self.role not in ROLES:
            raise ValueError(f"KVTransferConfig.role must be one of {ROLES}, got {self.role!r}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(
                f"KVTransferConfig.failure_policy must be one of {FAILURE_POLICIES}, got {self.failure_policy!r}"
            )
        if not isinstance(self.engine_id, str) or not self.engine_id or any(c.isspace() for c in self.engine_id):
            raise ValueError(
                f"KVTransferConfig.engine_id must be a non-empty string without spaces, got {self.engine_id!r}"
            )
        if not isinstance(self.side_channel_host, str) or not self.side_channel_host:
            raise ValueError(f"KVTransferConfig.side_channel_host must be a host name, got {self.side_channel_host!r}")
        if not isinstance(self.side_channel_port, int) or not 0 <= self.side_channel_port <= 65535:
            raise ValueError(f"KVTransferConfig.side_channel_port must be in 0..65535, got {self.side_channel_port!r}")
        if self.role != "decode" and self.side_channel_port == 0:
            raise ValueError(f"KVTransferConfig.side_channel_port must be set (1..65535) for role {self.role!r}")
        for name in ("lease_seconds", "handshake_timeout_s", "transfer_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"KVTransferConfig.{name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.backends, str):
            object.__setattr__(self, "backends", (self.backends,))
        object.__setattr__(self, "backends", tuple(self.backends))
        if not self.backends or not all(isinstance(b, str) and b for b in self.backends):
            raise ValueError(f"KVTransferConfig.backends must name at least one NIXL backend, got {self.backends!r}")
        key = self.auth_key
        if key is not None and (not isinstance(key, bytes) or len(key) < MIN_AUTH_KEY_BYTES):
            raise ValueError(f"KVTransferConfig.auth_key must be at least {MIN_AUTH_KEY_BYTES} bytes (or None)")
        object.__setattr__(self, "peers", tuple(self.peers))
        for peer in self.peers:
            host, _, port = peer.rpartition(":") if isinstance(peer, str) else ("", "", "")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"KVTransferConfig.peers must be HOST:PORT side-channel addresses, got {peer!r}")
        object.__setattr__(self, "allowed_peers", tuple(self.allowed_peers))
        allow = [_allow_entry(entry) for entry in self.allowed_peers]
        for entry, parsed in zip(self.allowed_peers, allow):
            if parsed is None:
                raise ValueError(f"KVTransferConfig.allowed_peers must be HOST:PORT or CIDR entries, got {entry!r}")
        object.__setattr__(self, "_allow", allow)  # parsed once; not a field (repr, eq)
        if self.allowed_peers and not self.is_consumer:
            raise ValueError(f"KVTransferConfig.allowed_peers is for engines that load KV; role is {self.role!r}")
        if self.peers and not self.is_consumer:
            raise ValueError(f"KVTransferConfig.peers is for engines that load KV; role is {self.role!r}")
        if not isinstance(self.event_fd, int) or self.event_fd < -1:
            raise ValueError(f"KVTransferConfig.event_fd must be a file descriptor or -1, got {self.event_fd!r}")
        if not isinstance(self.instance_secret, bytes) or len(self.instance_secret) < 16:
            raise ValueError("KVTransferConfig.instance_secret must be at least 16 random bytes")

    @property
    def instance_id(self) -> str:
        """Public id of this instance (a hash of its secret): peers tell two starts apart by it."""
        return hashlib.sha256(b"kvxfer-instance:" + self.instance_secret).hexdigest()[:16]

    @property
    def peer_addresses(self) -> list[tuple[str, int]]:
        return [(host, int(port)) for host, _, port in (p.rpartition(":") for p in self.peers)]

    def peer_allowed(self, host: str, port: int) -> bool:
        """Whether this engine may connect to the side channel at host:port."""
        if not self.allowed_peers or f"{host}:{port}" in self.peers:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None  # a host name matches a HOST:PORT entry only: names are not resolved here
        for allowed in self._allow:
            if allowed == (host, port) or (ip is not None and not isinstance(allowed, tuple)
                                           and ip.version == allowed.version and ip in allowed):
                return True
        return False

    @property
    def is_producer(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("decode", "both")


def _allow_entry(entry: object) -> tuple[str, int] | ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """An `allowed_peers` entry as (host, port) or a network; None when it is neither."""
    if not isinstance(entry, str) or not entry:
        return None
    if "/" in entry:
        try:
            return ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return None
    host, _, port = entry.rpartition(":")
    if host and port.isdigit() and 1 <= int(port) <= 65535:
        return host, int(port)
    return None
