"""Which transport a pull uses: the fastest one that both ends support."""
from __future__ import annotations

TRANSPORTS = ("auto", "tcp", "shm", "cuda_ipc")
PREFERENCE = ("cuda_ipc", "shm", "tcp")   # fastest first


def check_transport(wanted: str) -> str:
    """A --kv-transport pdserve has; anything else is refused with what it could be instead."""
    if wanted == "nixl":
        raise ValueError("pdserve has no NIXL transport yet; use --kv-transport tcp, shm, cuda_ipc or auto")
    if wanted not in TRANSPORTS:
        raise ValueError(f"unknown --kv-transport {wanted!r}; use one of {', '.join(TRANSPORTS)}")
    return wanted


def producer_offers(wanted: str, pool_device: str, shm_ready: bool, ipc_ready: bool) -> list[str]:
    """Transports a producer offers given its --kv-transport and where its pool lives."""
    can = ["tcp"]
    if shm_ready:
        can.append("shm")
    if ipc_ready and pool_device == "cuda":
        can.append("cuda_ipc")
    check_transport(wanted)
    if wanted == "auto":
        return [t for t in PREFERENCE if t in can]
    if wanted not in can:
        raise ValueError(f"--kv-transport {wanted} is not available here "
                         f"(KV pool on {pool_device}; available: {', '.join(can)})")
    return [wanted]


def check_consumer(wanted: str, pool_device: str) -> None:
    """Refuse at start what a consumer could never use, rather than failing every pull."""
    check_transport(wanted)
    if wanted == "cuda_ipc" and pool_device != "cuda":
        raise ValueError(f"--kv-transport cuda_ipc needs the KV cache on a GPU (it is on {pool_device})")


def choose(wanted: str, offered: list[str], same_host: bool, local_device: str) -> str:
    """The consumer's pick among what the producer offered. Shared-memory transports need
    both workers on one host; cuda_ipc needs the consumer's pool on a GPU as well."""
    usable = []
    for t in offered:
        if t in ("shm", "cuda_ipc") and not same_host:
            continue
        if t == "cuda_ipc" and local_device != "cuda":
            continue
        if t in PREFERENCE:
            usable.append(t)
    check_transport(wanted)
    if wanted != "auto":
        if wanted not in usable:
            raise ValueError(f"--kv-transport {wanted} cannot be used with this prefill worker "
                             f"(it offers {', '.join(offered) or 'nothing'}; same host: {same_host})")
        return wanted
    if not usable:
        raise ValueError(f"no common KV transport (the prefill worker offers {', '.join(offered)})")
    return min(usable, key=PREFERENCE.index)
