"""A tiny random-weight Llama that speaks the default model's tokenizer and chat template:
loads in a second, so servers built on it start fast. Its text is noise; tests that use it
check behaviour (validation, errors, limits, trust), never what the model says."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")


def make_tiny_model(out: Path, default_model_dir: str, max_positions: int = 2048, heads: int = 2,
                    kv_heads: int = 1, hidden: int = 32, layers: int = 1) -> str:
    import torch
    import transformers
    src = Path(default_model_dir)
    ref = json.loads((src / "config.json").read_text())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=ref["vocab_size"], hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=max_positions, tie_word_embeddings=True,
                                   bos_token_id=ref.get("bos_token_id"), eos_token_id=ref.get("eos_token_id"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return str(out)


def save_random_family(cfg_cls: str, model_cls: str, config: dict, out: Path):
    """A random-weight transformers model of one family (e.g. "Qwen2Config", "Qwen2ForCausalLM"),
    saved to out; returns the transformers model (the reference). Seeded; a family with q/k/v
    biases gets non-zero ones (random init leaves them at zero, so they would not count)."""
    import torch
    import transformers
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**config)).eval().float()
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    hf.save_pretrained(out)
    return hf
