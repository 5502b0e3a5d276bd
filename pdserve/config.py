"""Configuration dataclasses. Field names follow vLLM's engine arguments where they exist."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

ROLES = ("both", "prefill", "decode")


def parse_size(value: int | str | None) -> int | None:
    """'2GiB', '512MB', '1.5g' or a byte count -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", str(value).lower())
    if not m:
        raise ValueError(f"cannot read size {value!r}; use e.g. 2GiB, 512MB or a byte count")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


@dataclass
class EngineConfig:
    model: str | None = None            # None: the default model (SmolLM2-135M-Instruct GGUF)
    device: str = "auto"                # auto | cpu | cuda[:N]
    dtype: str = "auto"                 # auto (cpu: float32, cuda: bfloat16) | float32 | bfloat16 | float16
    block_size: int = 16
    max_model_len: int | None = None    # None: the model's, capped at 4096
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    kv_cache_memory: int | str | None = None  # bytes for the KV cache; None: from the device
    gpu_memory_utilization: float = 0.9
    role: str = "both"                  # both | prefill | decode
    seed: int = 0
    enforce_eager: bool = False         # CUDA: no CUDA graphs
    kv_lease_duration: float = 30.0     # prefill role: free held blocks whose decode worker stopped renewing
    served_model_name: str | None = None
    step_trace: str | None = None       # JSONL file: one line per step (pdserve.engine.step_trace)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.kv_cache_memory = parse_size(self.kv_cache_memory)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)


@dataclass
class KVTransferConfig:
    kv_transport: str = "auto"          # auto | tcp | shm | cuda_ipc | nixl
    kv_host: str | None = None          # KV server bind address; None: the worker's --host
    kv_port: int = 0                    # 0: a free port
    kv_load_failure_policy: str = "recompute"  # recompute | fail
    kv_pull_timeout: float = 30.0       # deadline of a whole pull (connect, handshake, every byte)
    kv_secret: str | None = None        # shared KV secret; None: $PDSERVE_KV_SECRET, else from --api-key
    kv_allowed_peers: str | None = None # "host:port,...": the only KV servers a decode worker dials
    kv_max_connections: int = 128       # KV server: connections at once (a quarter may be mid-handshake)
    kv_tls_cert: str | None = None      # KV server: PEM certificate (chain); set: KV connections use TLS
    kv_tls_key: str | None = None       # KV server: its private key (None: in kv_tls_cert's file)
    kv_tls_ca: str | None = None        # decode side: CA that signed the KV servers' certificates; set: dial TLS


@dataclass
class RouterConfig:
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "round_robin"
    local_prefill_max_tokens: int = 0
    api_key: str | None = None
    max_request_bytes: int = 8 << 20    # larger request bodies get a 413
    metrics_no_auth: bool = False       # /metrics open without the API key
