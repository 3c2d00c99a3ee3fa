"""What every causal LM here shares: vocab-parallel embedding, a stack of decoder layers that
each use their view of the rank's KV cache, final norm, LM head, and checkpoint loading."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kvxfer.layers.attention import AttentionMetadata
from kvxfer.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kvxfer.layers.norm import RMSNorm
from kvxfer.layers.parallel import TPInfo
from kvxfer.models.config import ModelConfig
from kvxfer.models.loader import Checkpoint


class DecoderLayer(nn.Module):
    """Pre-norm residual block; subclasses set `input_layernorm`, `self_attn`,
    `post_attention_layernorm` and `mlp`."""

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_layer: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        # The residual stream is this step's own tensor: both adds update it in place.
        attn_out = self.self_attn(positions, self.input_layernorm(hidden), kv_layer, attn)
        normed, hidden = self.post_attention_layernorm(attn_out, hidden)
        return hidden.add_(self.mlp(normed))

    def load(self, ckpt: Checkpoint, prefix: str) -> None:
        self.input_layernorm.load(ckpt, f"{prefix}.input_layernorm")
        self.self_attn.load(ckpt, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(ckpt, f"{prefix}.post_attention_layernorm")
        self.mlp.load(ckpt, f"{prefix}.mlp")


class CausalLM(nn.Module):
    """Subclasses build `self.layers` (modules with `forward(positions, hidden, kv_layer, attn)`
    and `load(ckpt, prefix)`) after calling this constructor."""

    def __init__(self, config: ModelConfig, tp: TPInfo, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hf = config.hf_config
        self.config = config
        self.tp = tp
        self.dtype, self.device = dtype, device
        self.embed_tokens = VocabParallelEmbedding(hf.vocab_size, hf.hidden_size, tp, dtype, device)
        self.norm = RMSNorm(hf.hidden_size, hf.rms_norm_eps, dtype, device)
        tie = self.embed_tokens if hf.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(hf.vocab_size, hf.hidden_size, tp, tie, dtype, device)
        self.layers = nn.ModuleList()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_layers: Sequence[torch.Tensor],
        attns: Sequence[AttentionMetadata],
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` of the flattened batch; writes the new tokens' KV. Per layer:
        its cache view (`[num_blocks, heads, 2, block_size, head_size]`, in its KV cache group's
        tensor) and its group's attention metadata."""
        hidden = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            hidden = layer(positions, hidden, kv_layers[i], attns[i])
        return self.norm(hidden)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings (a model that scales them overrides this)."""
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocab float32 logits `[S, vocab]` on rank 0; None on the other ranks."""
        return self.lm_head.compute_logits(hidden)

    @torch.no_grad()
    def load_weights(self, model_dir: str | None = None) -> None:
        """Read this rank's shard of every weight from the directory's `*.safetensors`."""
        ckpt = Checkpoint(model_dir or self.config.model_dir, self.dtype, self.device)
        self.embed_tokens.load(ckpt, "model.embed_tokens")
        self.norm.load(ckpt, "model.norm")
        if not self.lm_head.tied:
            self.lm_head.load(ckpt, "lm_head")
        for i, layer in enumerate(self.layers):
            layer.load(ckpt, f"model.layers.{i}")
