"""Command-line flags for the engine, shared by `generate`, `chat`, `serve` and `profile`."""
from __future__ import annotations

import argparse
import os
from dataclasses import fields

from pdserve.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = True) -> None:
    if model_positional:
        p.add_argument("model", nargs="?", default=None,
                       help="model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--dtype", default="auto", help="auto (cpu: float32, cuda: bfloat16) | float32 | bfloat16 | float16")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (a power of two)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt plus output, in tokens (default: the model's, at most 4096)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step's batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="most tokens computed in one step (long prompts are prefilled in chunks of it)")
    g.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="prefill each prompt in one step instead of in chunks beside running decodes")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse the KV blocks of a prompt prefix computed before")
    g.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 2GiB (default: 1GiB on CPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: share of the GPU's memory for weights, activations and KV cache")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N ranks (processes; on CPU each with its own cores)")
    g.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler (requests without their own)")
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: do not capture CUDA graphs")
    g.add_argument("--served-model-name", default=None, help="model name in the API (default: the model's own)")
    g.add_argument("--step-trace", default=os.environ.get("PDSERVE_STEP_TRACE"), metavar="PATH",
                   help="append one JSON line per engine step (timings and batch shape) to PATH")


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(overrides)
    return EngineConfig(**kw)
