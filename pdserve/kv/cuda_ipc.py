"""cuda_ipc transport: the producer exports a CUDA IPC handle of its whole KV pool once; a
consumer on the same host opens it and copies the blocks it needs device to device.

The handle travels as JSON (base64 bytes, names of an allow-listed set of classes), never as a
pickle: a peer's handshake must not be able to run code in this process.
"""
from __future__ import annotations

import base64

import torch

_CLASSES = {"Tensor": torch.Tensor, "TypedStorage": torch.storage.TypedStorage,
            "UntypedStorage": torch.UntypedStorage}
# positions of the fields in torch.multiprocessing.reductions.rebuild_cuda_tensor's arguments
_FIELDS = ("tensor_cls", "tensor_size", "tensor_stride", "tensor_offset", "storage_cls", "dtype",
           "storage_device", "storage_handle", "storage_size_bytes", "storage_offset_bytes",
           "requires_grad", "ref_counter_handle", "ref_counter_offset", "event_handle",
           "event_sync_required")
_BYTES = {"storage_handle", "ref_counter_handle", "event_handle"}


def encode_args(args: tuple) -> dict:
    """rebuild_cuda_tensor's argument tuple -> a JSON-able dict."""
    out = {}
    for name, v in zip(_FIELDS, args):
        if name in ("tensor_cls", "storage_cls"):
            v = next(k for k, c in _CLASSES.items() if c is v)
        elif name == "dtype":
            v = str(v).removeprefix("torch.")
        elif name in ("tensor_size", "tensor_stride"):
            v = list(v)
        elif name in _BYTES:
            v = None if v is None else base64.b64encode(v).decode()
        out[name] = v
    return out


def decode_args(d: dict) -> tuple:
    """The inverse of encode_args; rejects anything outside the allow-list."""
    args = []
    for name in _FIELDS:
        v = d[name]
        if name in ("tensor_cls", "storage_cls"):
            if v not in _CLASSES:
                raise ValueError(f"cuda_ipc: unexpected class {v!r} in the handle")
            v = _CLASSES[v]
        elif name == "dtype":
            v = getattr(torch, v)
            if not isinstance(v, torch.dtype):
                raise ValueError("cuda_ipc: bad dtype in the handle")
        elif name in ("tensor_size",):
            v = torch.Size(v)
        elif name == "tensor_stride":
            v = tuple(v)
        elif name in _BYTES:
            v = None if v is None else base64.b64decode(v)
        args.append(v)
    return tuple(args)


def export_pool(kv_cache: torch.Tensor) -> dict:
    """Producer: the IPC description of its (CUDA) pool, computed once at start."""
    from torch.multiprocessing.reductions import reduce_tensor
    rebuild, args = reduce_tensor(kv_cache)
    return encode_args(args)


class ImportedPools:
    """Consumer: remote pools opened by IPC, one per producer engine id. Opening a handle is
    expensive and each open maps memory, so it is done once per producer (and dropped when a
    producer's engine id changes, e.g. after a restart)."""

    def __init__(self, opener=None):
        self._open = opener or _open_handle
        self.pools: dict[str, torch.Tensor] = {}

    def get(self, engine_id: str, desc: dict) -> torch.Tensor:
        t = self.pools.get(engine_id)
        if t is None:
            t = self.pools[engine_id] = self._open(desc)
        return t

    def drop(self, engine_id: str) -> None:
        self.pools.pop(engine_id, None)

    def clear(self) -> None:
        self.pools.clear()


class IpcPath:
    """cuda_ipc data path (consumer side): open the producer's pools' IPC handles (one per rank)
    once, then copy each piece device to device; the producer only authorises."""
    name = "cuda_ipc"
    streams = False

    def __init__(self, opener=None):
        self.pools = ImportedPools(opener)

    def ready(self, engine_id: str, offer: dict) -> bool:
        return bool(offer.get("cuda_ipc"))

    def send(self, sock, pool, ids, pieces, deadline) -> int:
        return 0

    def receive(self, sock, offer, engine_id, pool, pieces, src, dst, deadline) -> int:
        descs = offer["cuda_ipc"] if isinstance(offer["cuda_ipc"], list) else [offer["cuda_ipc"]]
        sources = [self.pools.get(f"{engine_id}/{k}", d) for k, d in enumerate(descs)]
        return pool.copy_pieces(sources, pieces, src, dst)


def _open_handle(desc: dict) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    return rebuild_cuda_tensor(*decode_args(desc))
