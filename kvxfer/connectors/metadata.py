"""Wire formats of the NIXL connector: handshake payload and `kv_transfer_params`.

The handshake payload is versioned and carries a compatibility hash over everything two
engines must agree on before one reads the other's KV blocks; a mismatch names the field.
`kv_transfer_params` come from clients and proxies, so they are parsed once, strictly, into
frozen structs (`parse_kv_transfer_params`); what depends on the engine (role, prompt length,
block size) is checked by the connector's `check_new_request`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from kvxfer.connectors.base import KVParamsError
from kvxfer.specs import KVCacheGroup, SlidingWindowSpec

PROTOCOL_VERSION = 3  # 3: Held.claim, Reply.kind, Release

# Every integer from outside is bounded here, at parse time: an id the wire formats (msgpack,
# numpy descriptors) cannot carry must be a clear 400, never a failure deep in a transfer.
MAX_INT = 2**63 - 1
NonNegInt = Annotated[int, Meta(ge=0, le=MAX_INT)]
PosInt = Annotated[int, Meta(ge=1, le=MAX_INT)]
Rank = Annotated[int, Meta(ge=0, le=65535)]
TPSize = Annotated[int, Meta(ge=1, le=65536)]
Seconds = Annotated[float, Meta(gt=0.0, le=1e9)]  # also refuses NaN
Port = Annotated[int, Meta(ge=1, le=65535)]
Name = Annotated[str, Meta(min_length=1, max_length=256)]
Token = Annotated[str, Meta(min_length=32, max_length=128)]  # >= 128 random bits, hex
Claim = Annotated[str, Meta(min_length=16, max_length=64)]  # one decode load, all its ranks
LogProb = Annotated[float, Meta(le=0.0)]  # also refuses NaN


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
    kv_cache_groups: list[str]  # per group: its layers and attention kind (`describe_groups`)

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


def one_group(spec: Any) -> tuple[KVCacheGroup, ...]:
    """Every layer of `spec` in one group: the groups of a model without sliding layers."""
    return (KVCacheGroup(tuple(range(spec.num_layers)), spec),)


def describe_groups(groups: Sequence[KVCacheGroup]) -> list[str]:
    """Per group, e.g. "full layers 0,2" or "window 6 layers 1,3": what two peers must share."""
    return [
        (f"window {g.spec.sliding_window}" if isinstance(g.spec, SlidingWindowSpec) else "full")
        + " layers " + ",".join(map(str, g.layer_ids))
        for g in groups
    ]


def compat_of(
    spec: Any, model_identity: str, groups: Sequence[KVCacheGroup] | None = None, layout: str | None = None
) -> Compat:
    """`spec` is the whole model's (heads, dtype, block size); `groups` its KV cache groups
    (default: all layers in one group); `layout` the memory layout's name (default kvxfer's
    block-major one, `layout_of`): two peers must share it."""
    return Compat(
        protocol_version=PROTOCOL_VERSION,
        model_identity=model_identity,
        num_layers=spec.num_layers,
        head_size=spec.head_size,
        num_kv_heads=spec.num_kv_heads,
        dtype=spec.dtype,
        layout=layout or layout_of(spec),
        block_size=spec.block_size,
        kv_cache_groups=describe_groups(groups or one_group(spec)),
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


class GroupRegion(msgspec.Struct, frozen=True, array_like=True):
    """One KV cache group's tensor on one rank, as registered with its NIXL agent."""

    base_addr: int
    region_bytes: int
    num_blocks: int
    # Split by layer (vLLM's layout, `descriptors.Region`): layer l's blocks at base + l * layer_stride.
    num_layers: int = 1
    layer_stride: int = 0


class RankMetadata(msgspec.Struct, frozen=True):
    """One rank's NIXL agent and the KV regions registered with it, one per KV cache group."""

    tp_rank: int
    agent_name: str
    agent_metadata: bytes
    regions: list[GroupRegion]
    device_id: int
    mem_type: str  # "DRAM" | "VRAM"
    kv_heads: int  # heads in this rank's tensors


class EngineMetadata(msgspec.Struct, frozen=True):
    version: int
    engine_id: str
    instance_id: str  # this start of the engine; kv_transfer_params name it
    lease_seconds: float  # how long it holds a finished request: a reader's time-out must fit
    tp_size: int
    block_size: int
    num_blocks: list[int]  # per group, MIN over ranks: a block id below it is valid on every rank
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
    secret: bytes  # the instance's `instance_secret`: only its own ranks know it
    compat_hash: str
    tp_size: int
    rank: RankMetadata


class Query(msgspec.Struct, frozen=True, tag=True):
    engine_id: str  # the engine the caller expects to reach; "" (a configured peer): whichever serves


class Held(msgspec.Struct, frozen=True, tag=True):
    """Asked by a decode rank before its READs: is `request_id` held with exactly these blocks
    under this token? A yes pins the hold for `reader_rank` for `Reply.pin_seconds` and binds
    the token to `claim` (one load of one decode engine): a check with another claim is refused."""

    engine_id: str
    instance_id: str
    request_id: str
    transfer_token: str
    block_ids: list[NonNegInt]  # all the blocks the params name, as issued
    reader: str  # decode engine id
    reader_rank: Rank
    transfer_timeout_s: Seconds  # the reader abandons its READs after this long
    claim: Claim


class Release(msgspec.Struct, frozen=True, tag=True):
    """Sent by a decode engine whose request ended before its pull: stop holding it now."""

    engine_id: str
    instance_id: str
    request_id: str
    transfer_token: str


class Reply(msgspec.Struct, frozen=True, tag=True):
    ok: bool
    error: str = ""
    metadata: EngineMetadata | None = None
    pin_seconds: float = 0.0  # Held: the hold stays pinned this long from receipt
    # A refused Held: "" (not held so: the params' fault), "conflict" (another pull claimed the
    # token), "expired" (the lease ran out first); the decode side maps it to its error kind.
    kind: str = ""


SideChannelRequest = Register | Query | Held | Release


class ReadDone(msgspec.Struct, frozen=True, array_like=True):
    """NIXL notification from a decode rank: it is done with `request_id`'s blocks."""

    request_id: str
    transfer_token: str
    decode_engine_id: str
    decode_rank: Rank
    decode_tp_size: TPSize


# --- kv_transfer_params --------------------------------------------------------------------


class RemoteDecodeParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Prefill-side request params: finish after one token and hold the blocks."""

    do_remote_decode: bool


class RemotePrefillParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Decode-side request params, as returned by the prefill engine. `transfer_token` is the
    prefill's proof of issue: its side channel accepts checks, ReadDone and release only with
    it, for exactly these blocks of this request of this instance."""

    do_remote_prefill: bool
    remote_engine_id: Name
    remote_instance_id: Name
    remote_host: Name
    remote_port: Port
    # The held blocks of each KV cache group in turn: a full-attention group's whole prompt, a
    # sliding group's entries from the first one the decode side reads (`held_entries`).
    remote_block_ids: list[NonNegInt]
    remote_request_id: Name
    remote_tp_size: TPSize
    remote_num_tokens: PosInt
    transfer_token: Token
    # The token the prefill sampled from the prompt (t1): the decode side starts its output with
    # it and computes its position. Its log-prob entry (best first) when the request asked.
    first_token_id: NonNegInt
    first_token_logprobs: list[tuple[NonNegInt, LogProb]] | None = None
    # Set by a router that already sent t1 to the client: the decode stream does not repeat it.
    first_token_streamed: bool = False


KVTransferParams = RemotePrefillParams | RemoteDecodeParams


def parse_kv_transfer_params(params: Any) -> KVTransferParams | None:
    """The one parse of a request's `kv_transfer_params` (a JSON object or None); KVParamsError
    names the field. An already parsed struct is returned as is."""
    if params is None or isinstance(params, (RemotePrefillParams, RemoteDecodeParams)):
        return params
    if not isinstance(params, dict):
        raise KVParamsError(f"kv_transfer_params must be an object, got {type(params).__name__}")
    prefill, decode = bool(params.get("do_remote_prefill")), bool(params.get("do_remote_decode"))
    if prefill and decode:
        raise KVParamsError("kv_transfer_params: do_remote_prefill and do_remote_decode are exclusive")
    if not (prefill or decode):
        extra = sorted(k for k in params if k not in ("do_remote_prefill", "do_remote_decode"))
        if extra:
            raise KVParamsError(f"kv_transfer_params: {', '.join(map(str, extra))} only valid with do_remote_prefill")
        return None
    kind = RemotePrefillParams if prefill else RemoteDecodeParams
    other = "do_remote_decode" if prefill else "do_remote_prefill"
    if params.get(other, None) is False:  # an explicit "no" for the other leg says nothing
        params = {k: v for k, v in params.items() if k != other}
    try:
        parsed = msgspec.convert(params, kind, strict=True)
    except msgspec.ValidationError as e:
        raise KVParamsError(f"invalid kv_transfer_params: {e}") from None
    return parsed


def held_entries(groups: Sequence[KVCacheGroup], num_prompt_tokens: int) -> list[range]:
    """Per group, the block-table entries a prefill side holds for a prompt: all of them for full
    attention, and from the first one a decode side reads for a sliding window. The decode side
    receives every prompt position `0 .. N-1` and computes position N (the prefill's first
    token): the window is the one ending at N."""
    end = -(-num_prompt_tokens // groups[0].spec.block_size)
    return [range(g.spec.blocks_to_read(num_prompt_tokens).start, end) for g in groups]


def split_held(groups: Sequence[KVCacheGroup], num_prompt_tokens: int, block_ids: list[int]) -> list[list[int]]:
    """`remote_block_ids` cut into its groups' lists; KVParamsError when the count is wrong for
    the prompt or a group repeats a block."""
    entries = held_entries(groups, num_prompt_tokens)
    needed = sum(len(r) for r in entries)
    if len(block_ids) != needed:
        raise KVParamsError(
            f"kv_transfer_params: {len(block_ids)} remote_block_ids for {num_prompt_tokens} tokens (block size "
            f"{groups[0].spec.block_size}, KV cache groups {describe_groups(groups)} need {needed})"
        )
    out, start = [], 0
    for r in entries:
        out.append(block_ids[start : start + len(r)])
        start += len(r)
        if len(set(out[-1])) != len(out[-1]):
            raise KVParamsError("kv_transfer_params: remote_block_ids repeat a block")
    return out


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
