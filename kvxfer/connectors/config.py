"""`KVTransferConfig`: how an engine takes part in disaggregated prefill/decode.

Validated on construction: a bad value raises `ValueError` naming the field.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

ROLES = ("prefill", "decode", "both")
FAILURE_POLICIES = ("fail", "recompute")
CONNECTORS = ("nixl",)


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

    @property
    def is_producer(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("decode", "both")
