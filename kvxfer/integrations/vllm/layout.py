"""vLLM's configs and KV tensors in kvxfer's terms: the transfer config, the specs and KV cache
groups, and each group's region.

vLLM 0.32 on CPU (attention backend `CPU_ATTN`, whose only layout is `KVCacheLayout.LBHNC`)
allocates one backing buffer and views it per attention layer (`vllm/v1/worker/utils.py`,
`allocate_kv_cache`): layer `l`'s tensor is `[num_blocks, num_kv_heads, block_size, 2 * head_size]`
(this rank's heads) at `offset + l * layer_stride`, one block one page (`block_stride`).
`CPUAttentionBackendImpl.do_kv_cache_update` views a block as `[num_kv_heads, 2 * block_size,
head_size]` and splits it into K then V, so one (block, head) of one layer is
`[K: block_size x head_size | V: block_size x head_size]`: kvxfer's `[kv, slot, dim]` of one
layer. A head range of one block is thus one contiguous run per layer: the region is kvxfer's
`descriptors.Region` split by layer (`num_layers`, `layer_stride`), and a read posts one
descriptor per layer, block run and TP slice. vLLM's layer order (the layer index in the layer
name) is the same on both sides, and the compat hash carries `LAYOUT`, so a kvxfer engine
(layers inside the block) and a vLLM engine never read each other's memory.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.descriptors import Region
from kvxfer.connectors.metadata import model_identity
from kvxfer.specs import FullAttentionSpec, KVCacheGroup, KVCacheSpec, MLAAttentionSpec, SlidingWindowSpec

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

LAYOUT = "vllm:layer|block,head,kv{kv},slot,dim"
ROLES = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "both"}
# kv_connector_extra_config keys, each a KVTransferConfig field of the same name (plus
# "auth_key_file": a file holding the shared side-channel key, and "stats_path": see `worker`).
EXTRA_FIELDS = ("side_channel_host", "side_channel_port", "lease_seconds", "handshake_timeout_s",
                "transfer_timeout_s", "peers", "allowed_peers")


def layout_name(spec: KVCacheSpec) -> str:
    return LAYOUT.format(kv=spec.kv_slots)


def transfer_config(vllm_config: VllmConfig) -> KVTransferConfig:
    """kvxfer's config from vLLM's `kv_transfer_config`. The engine id and instance secret are
    derived from vLLM's engine id (a uuid4 drawn once per `vllm serve`, the same in the
    scheduler and every worker process, which draw nothing together): the public id is one
    hash of it, the secret an HMAC of it under the side-channel key. vLLM logs its engine id at
    start, so without `auth_key_file` the secret is only as private as that log (and the side
    channel is unauthenticated anyway)."""
    kv = vllm_config.kv_transfer_config
    extra = dict(kv.kv_connector_extra_config or {})
    unknown = sorted(set(extra) - set(EXTRA_FIELDS) - {"auth_key_file", "stats_path"})
    if unknown:
        raise ValueError(f"kv_connector_extra_config: unknown keys {unknown} (known: "
                         f"{sorted(EXTRA_FIELDS + ('auth_key_file', 'stats_path'))})")
    if kv.kv_role not in ROLES:
        raise ValueError(f"kv_transfer_config.kv_role must be one of {sorted(ROLES)}, got {kv.kv_role!r}")
    fields = {k: extra[k] for k in EXTRA_FIELDS if k in extra}
    fields.setdefault("side_channel_host", "127.0.0.1")
    fields.setdefault("side_channel_port", int(kv.kv_port))  # vLLM 0.32 has kv_port, no kv_ip
    key_file = extra.get("auth_key_file")
    key = Path(key_file).read_bytes().strip() if key_file else None
    seed = str(kv.engine_id).encode()
    return KVTransferConfig(
        role=ROLES[kv.kv_role],
        engine_id="vllm-" + hashlib.sha256(b"kvxfer-vllm-engine:" + seed).hexdigest()[:12],
        instance_secret=hmac.new(key or b"", b"kvxfer-vllm-secret:" + seed, hashlib.sha256).digest(),
        failure_policy=kv.kv_load_failure_policy,
        auth_key=key,
        **fields,
    )


def model_id(vllm_config: VllmConfig) -> str:
    """kvxfer's model identity (its checkpoint's config.json) when the model is a directory."""
    model = vllm_config.model_config.model
    if (Path(model) / "config.json").is_file():
        return model_identity(model)
    return f"hf:{model}@{vllm_config.model_config.revision or 'main'}"


@dataclass(frozen=True)
class ModelKV:
    """The whole model's spec (total KV heads over TP ranks) and its groups, in vLLM's group
    order, with each group's vLLM layer names in layer order."""

    spec: KVCacheSpec
    groups: tuple[KVCacheGroup, ...]
    layer_names: tuple[tuple[str, ...], ...]


def model_kv(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> ModelKV:
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.kv_cache_interface import FullAttentionSpec as VFull
    from vllm.v1.kv_cache_interface import MLAAttentionSpec as VMLA
    from vllm.v1.kv_cache_interface import SlidingWindowSpec as VSliding

    mc = vllm_config.model_config
    total_heads = 1 if mc.use_mla else mc.get_total_num_kv_heads()
    groups, names, first = [], [], None
    for g, group in enumerate(kv_cache_config.kv_cache_groups):
        vspec = group.kv_cache_spec
        if not isinstance(vspec, (VFull, VSliding)) or getattr(vspec, "head_size_v", vspec.head_size) not in (
                vspec.head_size, 0):
            raise ValueError(f"KV cache group {g}: kvxfer's connector supports attention with K and V of one head "
                             f"size (or MLA), not {type(vspec).__name__}")
        layers = sorted(group.layer_names, key=extract_layer_index)
        common = dict(head_size=vspec.head_size, num_layers=len(layers), block_size=vspec.block_size,
                      dtype=str(vspec.dtype).removeprefix("torch."))
        if isinstance(vspec, VMLA):
            spec: KVCacheSpec = MLAAttentionSpec(num_kv_heads=1, **common)
        elif isinstance(vspec, VSliding):
            spec = SlidingWindowSpec(num_kv_heads=total_heads, sliding_window=vspec.sliding_window, **common)
        else:  # vLLM's FullAttentionSpec with a sliding_window still holds every block: full here
            spec = FullAttentionSpec(num_kv_heads=total_heads, **common)
        groups.append(KVCacheGroup(tuple(extract_layer_index(n) for n in layers), spec))
        names.append(tuple(layers))
        first = first or spec
    if first is None:
        raise ValueError("the model has no KV cache groups: nothing for a KV connector to transfer")
    num_layers = sum(len(n) for n in names)
    whole = type(first)(**{**first.__dict__, "num_layers": num_layers}) if not isinstance(
        first, SlidingWindowSpec) else FullAttentionSpec(first.num_kv_heads, first.head_size, num_layers,
                                                         first.block_size, first.dtype)
    return ModelKV(whole, tuple(groups), tuple(names))


@dataclass(frozen=True)
class Regions:
    """One rank's KV memory as kvxfer sees it: a region per group, and the span to register."""

    regions: list[Region]
    region_bytes: list[int]
    span_addr: int
    span_bytes: int
    mem_type: str
    device_id: int


def layer_regions(kv_caches: dict[str, torch.Tensor], model: ModelKV, tp_size: int) -> Regions:
    """Each group's layer tensors as one region split by layer; ValueError naming the layer when
    a tensor is not the layout above (another backend's, e.g. CUDA's K/V-planes-outermost one)."""
    regions, region_bytes, lo, hi = [], [], None, 0
    first = next(iter(kv_caches.values()))
    mem_type = "VRAM" if first.is_cuda else "DRAM"
    device_id = (first.device.index or 0) if first.is_cuda else 0
    for group, names in zip(model.groups, model.layer_names):
        spec = group.spec
        heads = spec.heads_per_rank(tp_size)
        head_bytes = spec.bytes_per_head_block() // spec.num_layers
        block_bytes = heads * head_bytes
        tensors = []
        for name in names:
            t = kv_caches.get(name)
            if t is None:
                raise ValueError(f"vLLM registered no KV cache tensor for layer {name!r}")
            if t.dim() < 2 or t.stride(0) * t.element_size() != block_bytes or not t[0].is_contiguous() or (
                    t[0].numel() * t.element_size() != block_bytes):
                raise ValueError(
                    f"KV cache of layer {name!r} is {tuple(t.shape)} with strides {t.stride()}: kvxfer's vLLM "
                    f"connector needs contiguous blocks of {heads} heads x [K|V] x {spec.block_size} x "
                    f"{spec.head_size} (vLLM's CPU layout, LBHNC)")
            tensors.append(t)
        ptrs = [t.data_ptr() for t in tensors]
        stride = ptrs[1] - ptrs[0] if len(ptrs) > 1 else 0
        num_blocks = tensors[0].shape[0]
        if any(b - a != stride for a, b in zip(ptrs, ptrs[1:])) or any(t.shape[0] != num_blocks for t in tensors):
            raise ValueError(f"the layers {names} of a KV cache group are not evenly spaced views of one buffer")
        if len(ptrs) > 1 and stride < num_blocks * block_bytes:
            raise ValueError(f"the layers {names} overlap (stride {stride} < {num_blocks * block_bytes} bytes)")
        nbytes = (len(ptrs) - 1) * stride + num_blocks * block_bytes
        regions.append(Region(ptrs[0], num_blocks, block_bytes, head_bytes, device_id, len(ptrs), stride))
        region_bytes.append(nbytes)
        lo = ptrs[0] if lo is None else min(lo, ptrs[0])
        hi = max(hi, ptrs[0] + nbytes)
    return Regions(regions, region_bytes, lo, hi - lo, mem_type, device_id)
