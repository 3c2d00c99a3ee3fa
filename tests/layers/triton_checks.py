"""Checks of the Triton attention ops against `torch_ops` and an independent float64 softmax.

Each check takes `(device, dtype)` and raises on a mismatch. `test_triton_ops.py` runs them on
CUDA directly, and on CPU tensors under Triton's interpreter in a subprocess (the interpreter
must be chosen before triton is first imported): `TRITON_INTERPRET=1 python triton_checks.py`
prints one JSON line per check.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch

# Elementwise tolerance against the float64 reference, by the cache/query dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (new tokens, context length after the step): fresh prefill over several query tiles, chunked
# prefill over a cached prefix, decode, exact block multiple, a sequence with nothing new,
# shorter than one block.
MIXED = [(70, 70), (10, 30), (1, 17), (16, 16), (0, 5), (3, 3)]
DECODE = [(1, 1), (1, 16), (1, 37), (1, 150), (0, 9), (1, 64)]


def _ops():
    from kvxfer.layers import triton_ops

    return triton_ops


def _meta(batch, tables, block_size, device):
    from kvxfer.layers.attention import AttentionMetadata

    return AttentionMetadata.build([q for q, _ in batch], [s for _, s in batch], tables, block_size, device)


def _paged_cache(batch, heads, slots, block_size, dim, dtype, device, gen, layers=3, layer=1):
    """Random whole-model cache (block-major, head-major) and one layer's strided view of it,
    plus per-sequence block tables drawn from a shuffled free list (block 0 never used: padding)."""
    need = sum(-(-s // block_size) for _, s in batch)
    num_blocks = need + 3
    cache = torch.randn(num_blocks, heads, layers, slots, block_size, dim, generator=gen).to(dtype).to(device)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = [[free.pop() for _ in range(-(-s // block_size))] for _, s in batch]
    return cache, cache[:, :, layer], tables


def dense_reference(query, kv_layer, batch, tables, scale, v_dim=None, window=None):
    """Causal softmax attention in float64, reading each context position straight from its page;
    with `window` W, query position p sees keys in (p - W, p] (transformers' sliding_window_overlay)."""
    heads, slots, block_size = kv_layer.shape[1], kv_layer.shape[2], kv_layer.shape[3]
    group = query.shape[1] // heads
    out_dim = v_dim if slots == 1 else kv_layer.shape[4]
    out = torch.zeros(query.shape[0], query.shape[1], out_dim, dtype=torch.float64)
    cache = kv_layer.detach().cpu().double()
    q_all = query.detach().cpu().double()
    start = 0
    for (q_len, seq_len), table in zip(batch, tables):
        pos = torch.arange(seq_len)
        pages = torch.tensor(table, dtype=torch.long)[pos // block_size]
        k = cache[pages, :, 0, pos % block_size]  # [L, H, D]
        v = k[..., :out_dim] if slots == 1 else cache[pages, :, 1, pos % block_size]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        q = q_all[start : start + q_len]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = (seq_len - q_len + torch.arange(q_len))[:, None]
        visible = pos[None, :] <= q_pos
        if window is not None:
            visible &= pos[None, :] > q_pos - window
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v)
        start += q_len
    return out


def _close(name, got, want, dtype):
    tol = TOLERANCE[dtype]
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= tol * (1 + want.abs().max().item()), f"{name}: max abs error {err:.3g} > tolerance {tol}"


def _attention_case(device, dtype, batch, hq, heads, dim, v_dim, block_size, seed, window=None, **decode_kwargs):
    """Run one batch through triton_ops (paged_attention, plus decode_attention when asked) and
    compare with the dense reference and torch_ops (both with the sliding `window` when given)."""
    from kvxfer.layers import torch_ops

    gen = torch.Generator().manual_seed(seed)
    slots = 1 if v_dim is not None else 2
    _, kv_layer, tables = _paged_cache(batch, heads, slots, block_size, dim, dtype, device, gen)
    meta = _meta(batch, tables, block_size, device)
    query = torch.randn(meta.num_tokens, hq, dim, generator=gen).to(dtype).to(device)
    scale = dim**-0.5
    want = dense_reference(query, kv_layer, batch, tables, scale, v_dim, window)
    got = _ops().paged_attention(query, kv_layer, meta, scale, v_dim, window)
    _close("paged_attention vs dense", got, want, dtype)
    reference = torch_ops.paged_attention(query, kv_layer, meta, scale, v_dim, window)
    _close("torch_ops vs dense", reference, want, dtype)
    _close("paged_attention vs torch_ops", got, reference, dtype)
    if meta.max_query_len <= 1:
        for splits in decode_kwargs.get("splits", ()):
            split = _ops().decode_attention(
                query, kv_layer, meta, scale, v_dim, num_splits=splits, sliding_window=window
            )
            _close(f"decode_attention with {splits} splits vs dense", split, want, dtype)
        # The prefill kernel handles decode rows too (they occur in mixed batches).
        prefill = _ops().prefill_attention(query, kv_layer, meta, scale, v_dim, window)
        _close("prefill_attention on decodes", prefill, want, dtype)


def check_decode_gqa(device, dtype):
    # Non-power-of-two head size, two query heads per KV head, several split counts.
    _attention_case(device, dtype, DECODE, hq=4, heads=2, dim=40, v_dim=None, block_size=16, seed=1, splits=(1, 3, 16))


def check_decode_mqa_wide_group(device, dtype):
    # 20 query heads over one KV head: two query-head tiles per KV head; block size 8.
    _attention_case(device, dtype, DECODE[:4], hq=20, heads=1, dim=32, v_dim=None, block_size=8, seed=2, splits=(2,))


def check_decode_mla(device, dtype):
    # Absorbed MLA: latent 48 = kv_lora_rank 40 (also V) + rope 8, 20 query heads over one slot.
    _attention_case(device, dtype, DECODE, hq=20, heads=1, dim=48, v_dim=40, block_size=16, seed=3, splits=(1, 4))


def check_mixed_gqa(device, dtype):
    _attention_case(device, dtype, MIXED, hq=4, heads=2, dim=24, v_dim=None, block_size=16, seed=4)


def check_mixed_gqa_head_per_kv(device, dtype):
    # One query head per KV head, 64-wide heads, block size 4 (many pages per tile).
    _attention_case(device, dtype, MIXED[1:], hq=2, heads=2, dim=64, v_dim=None, block_size=4, seed=5)


def check_mixed_mla(device, dtype):
    _attention_case(device, dtype, MIXED, hq=4, heads=1, dim=48, v_dim=40, block_size=16, seed=6)


def check_decode_sliding_window(device, dtype):
    # Windows shorter than, equal to and longer than contexts; not a multiple of the block size.
    for window in (1, 7, 16, 37):
        _attention_case(device, dtype, DECODE, hq=4, heads=2, dim=40, v_dim=None, block_size=16, seed=14,
                        window=window, splits=(1, 3))


def check_mixed_sliding_window(device, dtype):
    # Prefill tiles, chunks over a cached prefix and decodes; windows cut mid-tile and mid-block.
    for window in (5, 16, 33):
        _attention_case(device, dtype, MIXED, hq=4, heads=2, dim=24, v_dim=None, block_size=4, seed=15, window=window)


def check_model_shapes_gqa(device, dtype):
    # Qwen3-0.6B attention at TP 1: 16 query heads over 8 KV heads of 128; long contexts split.
    decode = [(1, 1000), (1, 17), (1, 513)]
    _attention_case(device, dtype, decode, hq=16, heads=8, dim=128, v_dim=None, block_size=16, seed=10, splits=(1, 5))
    mixed = [(300, 300), (50, 1050), (1, 20)]
    _attention_case(device, dtype, mixed, hq=16, heads=8, dim=128, v_dim=None, block_size=16, seed=11)


def check_model_shapes_mla(device, dtype):
    # DeepSeek-V2-Lite absorbed MLA: 16 heads, latent 576 = 512 (V) + 64 rope.
    decode = [(1, 700), (1, 33)]
    _attention_case(device, dtype, decode, hq=16, heads=1, dim=576, v_dim=512, block_size=16, seed=12, splits=(1, 3))
    mixed = [(200, 200), (1, 90), (40, 140)]
    _attention_case(device, dtype, mixed, hq=16, heads=1, dim=576, v_dim=512, block_size=16, seed=13)


def check_attention_dispatch(device, dtype):
    # attention.py imports this backend (no silent fallback to torch) and routes CUDA tensors to it.
    from kvxfer.layers import attention

    assert attention.triton_ops is _ops(), "kvxfer.layers.attention did not import triton_ops"
    if device == "cuda":
        assert attention._ops(torch.empty(1, device=device)) is _ops()


def _model_logits(preset, device, dtype, ops):
    """Last-token logits of a tiny preset over three steps (prefills, then a mixed batch finishing a
    chunked prompt, then decodes), with the model's attention ops routed to `ops`; fresh cache.
    Also each MoE router call's (top_k, router logits), in call order."""
    import tempfile

    from kvxfer.layers import attention
    from kvxfer.layers.moe import Router
    from kvxfer.models import build_model, load_model_config
    from kvxfer.models.presets import make_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(preset, tmp)
        config = load_model_config(model_dir)
        model = build_model(config, device=device, dtype=dtype)
        model.load_weights(model_dir)
    block_size = 4
    spec = config.kv_cache_spec(block_size, str(dtype).removeprefix("torch."))
    cache = torch.zeros((24, *spec.block_shape(1)), dtype=dtype, device=device)
    tables = [[5, 2, 9], [7, 1, 11, 3], [4, 8, 6]]
    prompts = torch.randint(3, config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    # (sequence, first position, new tokens) per step: prompt 1 is chunked 4 + 6.
    steps = [
        [(0, 0, prompts[0, :7]), (1, 0, prompts[1, :4]), (2, 0, prompts[2, :1])],
        [(0, 7, prompts[0, 7:8]), (1, 4, prompts[1, 4:10]), (2, 1, prompts[2, 1:2])],
        [(0, 8, prompts[0, 8:9]), (1, 10, prompts[1, :1]), (2, 2, prompts[2, 2:3])],
    ]
    routes = []

    def record(router, args, _):
        # A softmax-greedy router ranks experts by these logits (the margin below assumes it).
        assert router.scoring == "softmax" and router.method == "greedy", "margins need a softmax-greedy router"
        routes.append((router.top_k, torch.nn.functional.linear(args[0].float(), router.weight.float())))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Router)]
    routed, attention._ops = attention._ops, lambda tensor: ops
    try:
        logits = []
        with torch.no_grad():
            for step in steps:
                ids = torch.cat([new for _, _, new in step]).to(device)
                positions = torch.cat([torch.arange(p, p + len(new)) for _, p, new in step]).to(device)
                batch = [(len(new), first + len(new)) for _, first, new in step]
                meta = _meta(batch, [tables[b] for b, _, _ in step], block_size, device)
                hidden = model(ids, positions, attention.layers_of(cache), [meta] * cache.shape[2])
                logits.append(model.compute_logits(hidden[torch.tensor(meta.query_start_loc_host[1:]) - 1]))
    finally:
        attention._ops = routed
        for hook in hooks:
            hook.remove()
    return torch.cat(logits), routes


# The logits are compared only where both backends route every token to the same experts, and
# that is not luck: the smallest gap between a token's k-th and (k+1)-th router logit is this many
# times the largest router-logit difference between the backends. (Flipping one of
# tiny-deepseek-mla's nearest ties changes its logits by up to 0.3, far beyond the tolerance.)
ROUTING_MARGIN_FACTOR = 100


def _routing_margin(routes) -> float:
    """The smallest gap between a token's k-th and (k+1)-th router logit, over every router call."""
    gaps = []
    for k, logits in routes:
        top = logits.topk(k + 1).values
        gaps.append((top[:, k - 1] - top[:, k]).min().item())
    return min(gaps)


def _model_case(preset, device, dtype):
    from kvxfer.layers import torch_ops

    want, want_routes = _model_logits(preset, device, dtype, torch_ops)
    got, got_routes = _model_logits(preset, device, dtype, _ops())
    if want_routes:
        margin = _routing_margin(want_routes)
        drift = max((a - b).abs().max().item() for (_, a), (_, b) in zip(want_routes, got_routes))
        assert margin >= ROUTING_MARGIN_FACTOR * drift, (
            f"{preset}: an expert choice is near a tie (router-logit margin {margin:.3g}, backends differ by "
            f"{drift:.3g}): pick inputs whose routing is decisive")
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    err = (got.double() - want.double()).abs().max().item()
    if err > tol * (1 + want.abs().max().item()):
        # Say whether either backend's result changes when computed again (nondeterminism) or not.
        again = {name: _model_logits(preset, device, dtype, ops)[0] for name, ops in (("torch", torch_ops),
                                                                                     ("triton", _ops()))}
        repeat = {name: "same" if torch.equal(again[name], first) else
                  f"differs by {(again[name] - first).abs().max().item():.3g}"
                  for name, first in (("torch", want), ("triton", got))}
        row = divmod((got - want).abs().argmax().item(), want.shape[1])[0]
        raise AssertionError(f"{preset}: logits differ by {err:.3g} between backends (row {row}); computed "
                             f"again, torch: {repeat['torch']}, triton: {repeat['triton']}")
    assert torch.equal(got.argmax(-1), want.argmax(-1)) or dtype != torch.float32, "greedy tokens differ"


def check_model_qwen3(device, dtype):
    _model_case("tiny-qwen3", device, dtype)


def check_model_gemma3(device, dtype):
    # Sliding-window layers (window 6) over contexts of up to 11 tokens, and global layers.
    _model_case("tiny-gemma3", device, dtype)


def check_model_deepseek_mla(device, dtype):
    _model_case("tiny-deepseek-mla", device, dtype)


def _store_case(device, dtype, slots):
    from kvxfer.layers import torch_ops

    gen = torch.Generator().manual_seed(7 + slots)
    heads, dim, block_size, tokens = (2, 40, 8, 11) if slots == 2 else (1, 48, 8, 11)
    batch = [(tokens, 40)]
    cache, kv_layer, tables = _paged_cache(batch, heads, slots, block_size, dim, dtype, device, gen)
    # A fused projection output: K and V are strided views, not contiguous tensors.
    fused = torch.randn(tokens, 3 * heads * dim, generator=gen).to(dtype).to(device)
    key = fused[:, heads * dim : 2 * heads * dim].view(tokens, heads, dim)
    value = fused[:, 2 * heads * dim :].view(tokens, heads, dim) if slots == 2 else None
    slots_map = torch.randperm(len(tables[0]) * block_size, generator=gen)[:tokens]
    slot_mapping = (torch.tensor(tables[0])[slots_map // block_size] * block_size + slots_map % block_size).to(device)
    slot_mapping[3] = -1  # a padding token: stored nowhere
    want = cache.clone()
    reference = cache.clone()
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            want[slot // block_size, :, 1, 0, slot % block_size] = key[t]
            if value is not None:
                want[slot // block_size, :, 1, 1, slot % block_size] = value[t]
    keep = slot_mapping >= 0
    torch_ops.store_kv(reference[:, :, 1], key[keep], None if value is None else value[keep], slot_mapping[keep])
    _ops().store_kv(kv_layer, key, value, slot_mapping)
    assert torch.equal(cache, want), "store_kv wrote a different cache than per-token assignment"
    assert torch.equal(cache, reference), "store_kv differs from torch_ops.store_kv"


def check_store_kv_gqa(device, dtype):
    _store_case(device, dtype, slots=2)


def check_store_kv_mla(device, dtype):
    _store_case(device, dtype, slots=1)


def check_bad_inputs(device, dtype):
    ops = _ops()
    gen = torch.Generator().manual_seed(9)
    batch = [(3, 3)]
    _, kv_layer, tables = _paged_cache(batch, 2, 2, 4, 8, dtype, device, gen)
    _, latent, _ = _paged_cache(batch, 1, 1, 4, 12, dtype, device, gen)
    meta = _meta(batch, tables, 4, device)
    key = torch.zeros(3, 2, 8, dtype=dtype, device=device)
    latent_key = torch.zeros(3, 1, 12, dtype=dtype, device=device)
    cases = [
        (lambda: ops.store_kv(kv_layer, key, None, meta.slot_mapping), "value must be None"),
        (lambda: ops.store_kv(latent, latent_key, latent_key, meta.slot_mapping), "value must be None"),
        (lambda: ops.store_kv(kv_layer, key[:, :, :4], key[:, :, :4], meta.slot_mapping), "key must be"),
        (lambda: ops.store_kv(kv_layer, key, key, meta.slot_mapping[:2]), "slot_mapping must be"),
        (lambda: ops.paged_attention(torch.zeros(3, 3, 8, dtype=dtype, device=device), kv_layer, meta, 1.0), "multiple"),
        (lambda: ops.paged_attention(torch.zeros(2, 2, 8, dtype=dtype, device=device), kv_layer, meta, 1.0), "tokens"),
        (lambda: ops.paged_attention(torch.zeros(3, 2, 12, dtype=dtype, device=device), latent, meta, 1.0), "v_dim"),
        (lambda: ops.paged_attention(key, kv_layer, meta, 1.0, v_dim=4), "v_dim"),
        (lambda: ops.paged_attention(key, kv_layer.transpose(3, 4), meta, 1.0), "head dimension"),
        (lambda: ops.decode_attention(key, kv_layer, meta, 1.0), "at most one"),
    ]
    for call, words in cases:
        try:
            call()
        except ValueError as exc:
            assert words in str(exc), f"error {exc!r} does not mention {words!r}"
        else:
            raise AssertionError(f"no ValueError for a case expecting {words!r}")


CHECKS = {name[len("check_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


# Under the interpreter: model-sized checks take about a minute (CUDA only), whole tiny models
# run in float32 only, and bfloat16 is skipped because Triton's interpreter computes tl.dot on
# bfloat16 wrongly (numpy has no bfloat16).
CUDA_ONLY = ("model_shapes_gqa", "model_shapes_mla")
INTERPRETER_CASES = [
    (name, dtype)
    for name in CHECKS
    if name not in CUDA_ONLY
    for dtype in (("float32",) if name.startswith("model_") else ("float32", "float16"))
]


def main() -> int:
    """Run the interpreter cases on CPU tensors, one JSON line per check and dtype."""
    failed = 0
    for name, dtype in INTERPRETER_CASES:
        started = time.perf_counter()
        try:
            CHECKS[name]("cpu", getattr(torch, dtype))
            result = {"name": f"{name}[{dtype}]", "ok": True}
        except Exception:  # reported to the parent test, which fails with the traceback
            result = {"name": f"{name}[{dtype}]", "ok": False, "error": traceback.format_exc()}
            failed += 1
        result["seconds"] = round(time.perf_counter() - started, 2)
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
