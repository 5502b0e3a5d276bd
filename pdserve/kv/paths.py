"""The data paths a pull can take, by name: each moves a pull's pieces (kv/heads.py) over the
KV server's control connection (kv/server.py answers, kv/client.py asks). tcp streams the bytes
on the connection (kv/tcp.py); shm and cuda_ipc let the consumer copy from the producer's pools
mapped into its own process (kv/shm.py, kv/cuda_ipc.py). Another one (nixl, an offload tier) is
one class with the DataPath methods of kv/base.py, listed here and in kv/select.PREFERENCE."""
from __future__ import annotations

import torch

from pdserve.kv.base import DataPath
from pdserve.kv.cuda_ipc import IpcPath
from pdserve.kv.shm import ShmPath
from pdserve.kv.tcp import TcpPath


def consumer_paths(dtype: torch.dtype) -> dict[str, DataPath]:
    """One of each for a consumer (each keeps its own mappings, by producer engine id)."""
    return {p.name: p for p in (TcpPath(), ShmPath(dtype), IpcPath())}


# a producer's side holds no state: one of each serves every pull
_PRODUCER: dict[str, DataPath] = {"tcp": TcpPath(), "shm": ShmPath(torch.float32), "cuda_ipc": IpcPath()}


def producer_path(name: str) -> DataPath | None:
    """What a producer does for a pull over `name` (None: not a data path pdserve has); only
    `streams` and `send` are used on this side."""
    return _PRODUCER.get(name)
