"""Configuration dataclasses. Field names follow vLLM's engine arguments where they exist."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

ROLES = ("both", "prefill", "decode")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_size(value: int | str | None) -> int | None:
    """'2GiB', '512MB', '1.5g' or a byte count -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", str(value).lower())
    if not m:
        raise ValueError(f"cannot read size {value!r}; use e.g. 2GiB, 512MB or a byte count")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def setting(default, help: str, *, sim: bool = False, flags: tuple[str, ...] = (), env: str | None = None, **argparse_kw):
    """An EngineConfig field and what its command-line flag needs (pdserve.cli.args reads it).
    sim: the simulator models it (`pdserve sim` and `pdserve plan` have its flag too); flags:
    option strings other than --field-name; env: a variable that overrides the default."""
    return field(default=default, metadata={"help": help, "sim": sim, "flags": flags, "env": env,
                                            "argparse": argparse_kw})


@dataclass
class EngineConfig:
    """The one definition of engine settings: `pdserve serve`, `up`, `generate`, `chat`, `profile`,
    `sim` and `plan` derive their engine flags from these fields, the simulator its defaults."""
    model: str | None = setting(None, "model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    device: str = setting("auto", "auto | cpu | cuda[:N]")
    dtype: str = setting("auto", "auto (cpu: float32, cuda: bfloat16; the simulator: bfloat16) | float32 | "
                         "bfloat16 | float16", sim=True)
    kv_cache_dtype: str = setting("auto", "dtype of the KV cache: auto (the weights' --dtype) | float32 | bfloat16 | "
                                  "float16; a 16-bit cache beside float32 weights holds twice the tokens per GiB "
                                  "and halves the decode attention's reads (its numerics: the keys and values "
                                  "rounded to 16 bits)", sim=True, choices=KV_CACHE_DTYPES)
    block_size: int = setting(16, "tokens per KV cache block (a power of two)", sim=True)
    max_model_len: int | None = setting(None, "longest prompt plus output, in tokens (default: the model's; "
                                        "a served model's at most 4096)", sim=True)
    max_num_seqs: int = setting(64, "most sequences in one step's batch", sim=True)
    max_num_batched_tokens: int = setting(1024, "most tokens computed in one step (long prompts are prefilled "
                                          "in chunks of it)", sim=True)
    enable_chunked_prefill: bool = setting(True, "prefill long prompts in chunks beside running decodes "
                                           "(--no-enable-chunked-prefill: each prompt in one step)", sim=True)
    enable_prefix_caching: bool = setting(True, "reuse the KV blocks of a prompt prefix computed before",
                                          sim=True)
    kv_cache_memory: int | str | None = setting(None, "KV cache size, e.g. 2GiB (default: 1GiB on CPU, "
                                                "what --gpu-memory-utilization leaves on CUDA)", metavar="SIZE")
    gpu_memory_utilization: float = setting(0.9, "CUDA: share of the GPU's memory for weights, activations and "
                                            "KV cache")
    role: str = setting("both", "prefill: answer the first token and hold the KV for a decode worker; decode: "
                        "pull it and generate the rest; both: a whole request alone", choices=ROLES)
    seed: int = setting(0, "seed of the engine's sampler (requests without their own)")
    tensor_parallel_size: int = setting(1, "split the model over N ranks (processes; on CPU each with its own "
                                        "cores)", flags=("-tp",), metavar="N")
    tp_step_timeout: float = setting(30.0, "tensor-parallel: seconds a rank waits for the others within a step "
                                     "before the worker gives up (a frozen rank); the wait for the next step "
                                     "has no limit", env="PDSERVE_TP_STEP_TIMEOUT", metavar="SECONDS")
    enforce_eager: bool = setting(False, "CUDA: do not capture CUDA graphs")
    step_parts: int | None = setting(None, "CPU: run each step's sequences as up to N independent parts, one "
                                     "thread each, that meet once per step (default: as many as the engine's "
                                     "threads while other processes keep cores busy, else every op split over "
                                     "the threads; 1: never)", metavar="N")
    kv_lease_duration: float = setting(30.0, "prefill role: seconds held KV outlives its decode worker's last "
                                       "renewal", flags=("--kv-lease",), env="PDSERVE_KV_LEASE", metavar="SECONDS")
    served_model_name: str | None = setting(None, "model name in the API (default: the model's own)")
    step_trace: str | None = setting(None, "append one JSON line per engine step (timings and batch shape) to "
                                     "PATH (pdserve.engine.step_trace)", env="PDSERVE_STEP_TRACE", metavar="PATH")

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.step_parts is not None and self.step_parts < 1:
            raise ValueError(f"step_parts must be >= 1, got {self.step_parts}")
        if self.tp_step_timeout <= 0:
            raise ValueError(f"tp_step_timeout must be positive, got {self.tp_step_timeout}")
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


SIM_FIELDS = tuple(f.name for f in fields(EngineConfig) if f.metadata["sim"])


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
