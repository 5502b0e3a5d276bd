"""One decoder for the Llama-shaped families (Llama 2/3/3.1, Mistral, SmolLM2, Qwen2, Qwen3).

They differ only in a few switches read from the Hugging Face config: bias on q/k/v (Qwen2),
per-head RMSNorm on q and k (Qwen3), rope scaling (Llama 3.1), tied embeddings. Module names
follow the Hugging Face checkpoints; q/k/v and gate/up run as one merged matmul each, and the
loader fills the merged weights from the checkpoint's separate tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pdserve.models.attention import AttentionMetadata, paged_attention
from pdserve.models.layers import GatedMLP, Linear, MergedLinear, RMSNorm, RotaryEmbedding, add_rms_norm, apply_rotary
from pdserve.models.shape import ModelShape
from pdserve.models.tensor_parallel import TPGroup, TPLayout

# architecture -> (qkv bias, q/k norm); None: read attention_bias from the config
ARCHITECTURES = {
    "LlamaForCausalLM": (None, False),
    "MistralForCausalLM": (None, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (None, True),
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ModelShape):
    """The model's shape (its sizes, shared with the simulator) and what the numerics need."""
    architecture: str
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    qkv_bias: bool
    qk_norm: bool
    mlp_bias: bool
    eos_token_id: int | list[int] | None
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
        bias, qk_norm = ARCHITECTURES[arch]
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 puts theta and scaling here
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        shape = vars(ModelShape.from_hf(hf.get("_name_or_path") or arch, hf))
        return cls(
            **{**shape, "max_position_embeddings": hf.get("max_position_embeddings", 4096)},
            architecture=arch,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            qkv_bias=bias if bias is not None else hf.get("attention_bias", False),
            qk_norm=qk_norm,
            mlp_bias=hf.get("mlp_bias", False),
            eos_token_id=hf.get("eos_token_id"),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
        )


class Attention(nn.Module):
    """This rank's heads (all of them for one rank); o_proj is row-parallel."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup):
        super().__init__()
        self.layer, self.tp = layer, tp
        lay = TPLayout.of(cfg, tp.size, tp.rank)
        self.nh, self.nkv, self.hd = lay.local_heads, lay.local_kv_heads, cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q_proj": self.nh * self.hd, "k_proj": self.nkv * self.hd,
                                                       "v_proj": self.nkv * self.hd}, cfg.qkv_bias)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = self.hd ** -0.5

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], kv_cache, meta: AttentionMetadata):
        t, nh = x.shape[0], self.nh
        qkv = self.qkv_proj(x)
        v = qkv[:, (nh + self.nkv) * self.hd:].view(t, self.nkv, self.hd)
        if self.qk_norm:   # per-head norms of their own: q and k rotate apart
            q, k, _ = self.qkv_proj.split(qkv)
            q = apply_rotary(self.q_norm(q.view(t, nh, self.hd)), *rope)
            k = apply_rotary(self.k_norm(k.view(t, self.nkv, self.hd)), *rope)
        else:              # q and k heads side by side in qkv: one rotation for both
            qk = apply_rotary(qkv[:, :(nh + self.nkv) * self.hd].view(t, nh + self.nkv, self.hd), *rope)
            q, k = qk[:, :nh], qk[:, nh:]
        o = paged_attention(q, k, v, kv_cache[self.layer], meta, self.scale)
        return self.tp.all_reduce(self.o_proj(o.reshape(t, self.nh * self.hd)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup):
        super().__init__()
        self.self_attn = Attention(cfg, layer, tp)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size // tp.size, cfg.mlp_bias, tp=tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, h, rope, kv_cache, meta, next_norm: RMSNorm):
        """x: the residual stream, h: input_layernorm(x). Returns the stream after this layer and
        next_norm of it (the next layer's input norm, or the final one): each residual add is
        fused with the norm that follows it."""
        x, h = add_rms_norm(x, self.self_attn(h, rope, kv_cache, meta), self.post_attention_layernorm)
        return add_rms_norm(x, self.mlp(h), next_norm)


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TPGroup | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp or TPGroup()
        self.layout = TPLayout.of(cfg, self.tp.size, self.tp.rank)
        self.model = DecoderBody(cfg, self.tp)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)   # packable on CPU (layers.py)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [layers, 2, blocks, block_size, kv_heads, head_dim].
        Returns final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rope(positions)
        layers = self.model.layers
        h = layers[0].input_layernorm(x)
        for i, layer in enumerate(layers):
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x, h = layer(x, h, rope, kv_cache, meta, nxt)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
