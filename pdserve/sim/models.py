"""Model shapes the simulator needs: sizes for FLOPs, weight bytes and KV bytes per token.

A name from the table below, or a local Hugging Face directory (its config.json). No torch:
the simulator never loads a model.
"""
from __future__ import annotations

import json
from pathlib import Path

from pdserve.models.shape import ModelShape

# "auto" is what a GPU worker picks (bfloat16): simulated devices are accelerators
DTYPE_BYTES = {"auto": 2, "float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
               "float8": 1, "fp8": 1, "int8": 1}


def _m(name, layers, hidden, inter, heads, kv, hd, vocab, tie=False, maxpos=131072):
    return ModelShape(name, layers, hidden, inter, heads, kv, hd, vocab, tie, maxpos)


# From each model's config.json on the Hugging Face hub.
MODELS = {m.name: m for m in (
    _m("meta-llama/Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128, 128256),
    _m("meta-llama/Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128, 128256),
    _m("meta-llama/Llama-3.2-1B", 16, 2048, 8192, 32, 8, 64, 128256, True),
    _m("meta-llama/Llama-3.2-3B", 28, 3072, 8192, 24, 8, 128, 128256, True),
    _m("mistralai/Mistral-7B-v0.1", 32, 4096, 14336, 32, 8, 128, 32000, False, 32768),
    _m("Qwen/Qwen2.5-7B", 28, 3584, 18944, 28, 4, 128, 152064, False, 32768),
    _m("Qwen/Qwen3-0.6B", 28, 1024, 3072, 16, 8, 128, 151936, True, 40960),
    _m("Qwen/Qwen3-1.7B", 28, 2048, 6144, 16, 8, 128, 151936, True, 40960),
    _m("Qwen/Qwen3-8B", 36, 4096, 12288, 32, 8, 128, 151936, False, 40960),
    _m("Qwen/Qwen3-32B", 64, 5120, 25600, 64, 8, 128, 151936, False, 40960),
    _m("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 1536, 9, 3, 64, 49152, True, 8192),
    _m("HuggingFaceTB/SmolLM2-360M-Instruct", 32, 960, 2560, 15, 5, 64, 49152, True, 8192),
    _m("HuggingFaceTB/SmolLM2-1.7B-Instruct", 24, 2048, 8192, 32, 32, 64, 49152, True, 8192),
)}


def base_name(name: str) -> str:
    """'org/Model-Instruct' -> 'model': instruct/chat variants share the base's shape."""
    n = name.rsplit("/", 1)[-1].lower()
    for suffix in ("-instruct", "-chat", "-it", "-base"):
        n = n.removesuffix(suffix)
    return n


def get_model(name: str) -> ModelShape:
    if name in MODELS:
        return MODELS[name]
    cfg = Path(name) / "config.json" if Path(name).is_dir() else Path(name)
    if cfg.is_file() and cfg.suffix == ".json":
        return ModelShape.from_hf(name, json.loads(cfg.read_text()))
    for m in MODELS.values():
        if base_name(m.name) == base_name(name):
            return m
    raise ValueError(f"unknown model {name!r}: name a local Hugging Face directory or one of "
                     f"{', '.join(MODELS)}")


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]
