"""What both ends of a KV hand-off must agree on, and the handshake check of it."""
from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

import torch


class KVHandshakeError(ValueError):
    """The two workers' KV caches are not compatible; `field` names the first difference."""
    def __init__(self, field: str, local=None, remote=None, message: str | None = None,
                 names: tuple[str, str] = ("this worker", "remote worker")):
        super().__init__(message or f"KV handshake refused: {field} differs ({names[0]}: {local!r}, "
                         f"{names[1]}: {remote!r}); both workers must use the same {field}")
        self.field = field


@dataclass(frozen=True)
class KVSpec:
    model: str
    dtype: str          # the KV cache's (--kv-cache-dtype), e.g. "float32", "bfloat16"
    block_size: int
    num_kv_heads: int
    head_dim: int
    num_layers: int

    @classmethod
    def from_engine(cls, engine) -> "KVSpec":
        mc, runner = engine.runner.model_config, engine.runner
        return cls(engine.model_name, dtype_name(runner.kv_dtype), runner.block_size,
                   mc.num_kv_heads, mc.head_dim, mc.num_layers)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, remote: dict, names: tuple[str, str] = ("this worker", "remote worker")) -> None:
        """Raise KVHandshakeError naming the first field where `remote` differs from us;
        `names` say who is who in the message (it is read on both sides)."""
        for name, value in asdict(self).items():
            if remote.get(name) != value:
                raise KVHandshakeError(name, value, remote.get(name), names=names)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def host_id() -> str:
    """Identifies this machine (and boot): two workers with the same id can share memory.
    $PDSERVE_HOST_ID overrides it where the machine is not the unit that shares /dev/shm: a
    Ray actor sets its Ray node's id (two containers, or two raylets, on one host do not share it)."""
    if os.environ.get("PDSERVE_HOST_ID"):
        return os.environ["PDSERVE_HOST_ID"]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"

