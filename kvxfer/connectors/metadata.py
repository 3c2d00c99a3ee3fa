"""Wire formats of the NIXL connector: handshake payload and `kv_transfer_params`.

The handshake payload is versioned and carries a compatibility hash over everything two
engines must agree on before one reads the other's KV blocks; a mismatch names the field.
`kv_transfer_params` come from clients and proxies, so they are validated strictly.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from kvxfer.connectors.base import KVParamsError

PROTOCOL_VERSION = 1

NonNegInt = Annotated[int, Meta(ge=0)]
PosInt = Annotated[int, Meta(ge=1)]
Port = Annotated[int, Meta(ge=1, le=65535)]
Name = Annotated[str, Meta(min_length=1, max_length=256)]


class Compat(msgspec.Struct, frozen=True):
    """What must be equal on both sides; hashed into `EngineMetadata.compat_hash`."""

    protocol_version: int
    model_identity: str
    num_layers: int
    head_size: int
    num_kv_heads: int  # total over ranks
    dtype: str
    layout: str
    block_size: int

    def hash(self) -> str:
        return hashlib.sha256(msgspec.msgpack.encode(self)).hexdigest()[:16]

    def mismatch(self, other: Compat) -> str | None:
        """A message naming every field that differs, or None."""
        diffs = [
            f"{name}: local {getattr(self, name)!r} != remote {getattr(other, name)!r}"
            for name in self.__struct_fields__
            if getattr(self, name) != getattr(other, name)
        ]
        return "incompatible KV transfer peer (" + "; ".join(diffs) + ")" if diffs else None


def layout_of(spec: Any) -> str:
    return f"block,head,layer,kv{spec.kv_slots},slot,dim"


def compat_of(spec: Any, model_identity: str) -> Compat:
    return Compat(
        protocol_version=PROTOCOL_VERSION,
        model_identity=model_identity,
        num_layers=spec.num_layers,
        head_size=spec.head_size,
        num_kv_heads=spec.num_kv_heads,
        dtype=spec.dtype,
        layout=layout_of(spec),
        block_size=spec.block_size,
    )


def model_identity(model_dir: str | Path) -> str:
    """Fingerprint of a checkpoint's `config.json`, ignoring where and by what it was saved.

    Two copies of one checkpoint agree; a different architecture or shape does not.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return f"{config.get('model_type', 'unknown')}:{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


class RankMetadata(msgspec.Struct, frozen=True):
    """One rank's NIXL agent and the KV region registered with it."""

    tp_rank: int
    agent_name: str
    agent_metadata: bytes
    base_addr: int
    region_bytes: int
    device_id: int
    mem_type: str  # "DRAM" | "VRAM"
    num_blocks: int
    kv_heads: int  # heads in this rank's tensor


class EngineMetadata(msgspec.Struct, frozen=True):
    version: int
    engine_id: str
    tp_size: int
    block_size: int
    num_blocks: int  # MIN over ranks: a block id below it is valid on every rank
    compat: Compat
    compat_hash: str
    ranks: list[RankMetadata]

    def check_compatible(self, local: Compat) -> None:
        if self.version != PROTOCOL_VERSION:
            raise ValueError(f"handshake protocol version: local {PROTOCOL_VERSION} != remote {self.version}")
        if self.compat_hash != local.hash():
            raise ValueError(local.mismatch(self.compat) or "incompatible KV transfer peer (compat_hash differs)")


# Side-channel messages (tagged union, so both ends reject anything else).
class Register(msgspec.Struct, frozen=True, tag=True):
    engine_id: str
    compat_hash: str
    tp_size: int
    rank: RankMetadata


class Query(msgspec.Struct, frozen=True, tag=True):
    engine_id: str  # the engine the caller expects to reach


class Held(msgspec.Struct, frozen=True, tag=True):
    """Asked by a decode rank after its READs: does the engine still hold `request_id`'s blocks?"""

    engine_id: str
    request_id: str


class Reply(msgspec.Struct, frozen=True, tag=True):
    ok: bool
    error: str = ""
    metadata: EngineMetadata | None = None


SideChannelRequest = Register | Query | Held


class ReadDone(msgspec.Struct, frozen=True, array_like=True):
    """NIXL notification from a decode rank: it is done with `request_id`'s blocks."""

    request_id: str
    decode_engine_id: str
    decode_rank: int
    decode_tp_size: int


# --- kv_transfer_params --------------------------------------------------------------------


class RemoteDecodeParams(msgspec.Struct, frozen=True):
    """Prefill-side request params: finish after one token and hold the blocks."""

    do_remote_decode: bool


class RemotePrefillParams(msgspec.Struct, frozen=True):
    """Decode-side request params, as returned by the prefill engine."""

    do_remote_prefill: bool
    remote_engine_id: Name
    remote_host: Name
    remote_port: Port
    remote_block_ids: list[NonNegInt]
    remote_request_id: Name
    remote_tp_size: PosInt
    remote_num_tokens: PosInt
    transfer_token: Name  # issued by the prefill engine for this hold (secrets.token_hex(16))

    def check_shape(self, block_size: int, num_blocks: int) -> None:
        """Raise ValueError unless the block ids cover the tokens and exist in a pool of `num_blocks`."""
        needed = math.ceil(self.remote_num_tokens / block_size)
        if len(self.remote_block_ids) != needed:
            raise ValueError(
                f"kv_transfer_params: {len(self.remote_block_ids)} remote_block_ids for "
                f"{self.remote_num_tokens} tokens (block size {block_size} needs {needed})"
            )
        bad = [b for b in self.remote_block_ids if b >= num_blocks]
        if bad:
            raise ValueError(
                f"kv_transfer_params: remote_block_ids {bad[:8]} out of range for the peer's "
                f"pool of {num_blocks} blocks"
            )
        if len(set(self.remote_block_ids)) != len(self.remote_block_ids):
            raise ValueError("kv_transfer_params: remote_block_ids repeat a block")


def parse_kv_transfer_params(params: Any) -> RemotePrefillParams | RemoteDecodeParams | None:
    """Validate a request's `kv_transfer_params`; KVParamsError says what is wrong and where."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise KVParamsError(f"kv_transfer_params must be an object, got {type(params).__name__}")
    prefill, decode = bool(params.get("do_remote_prefill")), bool(params.get("do_remote_decode"))
    if prefill and decode:
        raise KVParamsError("kv_transfer_params: do_remote_prefill and do_remote_decode are exclusive")
    if not (prefill or decode):
        return None
    kind = RemotePrefillParams if prefill else RemoteDecodeParams
    try:
        return msgspec.convert(params, kind, strict=True)
    except msgspec.ValidationError as e:
        raise KVParamsError(f"invalid kv_transfer_params: {e}") from None


def remote_prefill_params(
    engine_id: str,
    host: str,
    port: int,
    block_ids: list[int],
    request_id: str,
    tp_size: int,
    num_tokens: int,
    transfer_token: str,
) -> dict[str, Any]:
    """The params a prefill engine returns for its decode side."""
    return msgspec.to_builtins(
        RemotePrefillParams(
            True, engine_id, host, port, list(block_ids), request_id, tp_size, num_tokens, transfer_token
        )
    )


def decode_reply(raw: bytes) -> Reply:
    """Decode a side-channel reply, reporting a version mismatch as such."""
    try:
        return msgspec.msgpack.decode(raw, type=Reply)
    except msgspec.DecodeError as e:
        version = _probe_version(raw)
        if version is not None and version != PROTOCOL_VERSION:
            raise ValueError(f"handshake protocol version: local {PROTOCOL_VERSION} != remote {version}") from None
        raise ValueError(f"malformed handshake reply: {e}") from None


def _probe_version(raw: bytes) -> int | None:
    try:
        reply = msgspec.msgpack.decode(raw)
        return reply["metadata"]["version"]
    except Exception:
        return None
