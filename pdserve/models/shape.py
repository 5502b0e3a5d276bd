"""A decoder model's shape: the sizes that fix its FLOPs, weight bytes and KV bytes per token.
No torch: the simulator and the planner use it without loading a model; the engine's
ModelConfig (models/decoder.py) is this plus what the numerics need."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072

    @property
    def layer_params(self) -> int:
        """Matmul weights of all decoder layers (norms are negligible)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (2 * self.num_heads + 2 * self.num_kv_heads)   # q, o and k, v
        return self.num_layers * (attn + 3 * h * self.intermediate_size)

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through the decoder layers."""
        return 2 * self.layer_params

    @property
    def flops_per_pair(self) -> int:
        """Attention FLOPs of one (query, key) pair over all layers: QK^T and PV."""
        return 4 * self.num_layers * self.num_heads * self.head_dim

    @property
    def flops_per_sample(self) -> int:
        """The lm_head's FLOPs for one sampled row."""
        return 2 * self.hidden_size * self.vocab_size

    def step_flops(self, tokens: int, pairs: int, sampled: int) -> int:
        """Matmul FLOPs of a step: `tokens` fed through the layers, `pairs` (query, key) pairs
        attended, `sampled` rows through the lm_head."""
        return self.flops_per_token * tokens + self.flops_per_pair * pairs + self.flops_per_sample * sampled

    @property
    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return self.layer_params + emb * (1 if self.tie_word_embeddings else 2)

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.num_params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf(cls, name: str, hf: dict) -> "ModelShape":
        heads = hf["num_attention_heads"]
        return cls(name, hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"], heads,
                   hf.get("num_key_value_heads") or heads, hf.get("head_dim") or hf["hidden_size"] // heads,
                   hf["vocab_size"], bool(hf.get("tie_word_embeddings", False)),
                   hf.get("max_position_embeddings", 131072))
