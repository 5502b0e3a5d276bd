"""The KV connector interface, in two sides as vLLM v1's KVConnectorBase_V1. Pure Python.

Scheduler side: called by the engine core on the engine thread, between steps, never waits.
The scheduler owns every block and every hold; the connector keeps only what a transport
needs to serve or fetch them (the one-time token of a hold, the lease of a remote one).

    get_num_new_matched_tokens(seq, n) how many prompt tokens a waiting request, n of them
                                      in the prefix cache here, loads from elsewhere (None:
                                      it computes them here)
    add_request(seq)                  a request arrived whose prompt KV lies elsewhere
                                      (seq.kv_params: the RemotePrefill it came with)
    update_state_after_alloc(seq)     its blocks are allocated: start loading the remote
                                      blocks the prefix cache lacks; returns the blocks the
                                      load writes (the core pins them until it ends)
    request_finished(seq, lp, plp)    a remote-decode request made its first token and the
                                      scheduler holds its blocks: the kv_transfer_params to
                                      answer with (they go out in RequestOutput)
    keep_held(request_id)             a hold's lease ran out: True keeps it (a read is in
                                      flight); False forgets it in the same step
    request_freed(request_id)         the scheduler freed a hold (released, aborted)
    request_aborted(seq)              a request ended before its load started: let the
                                      remote KV go

Worker side: the transport (tcp, shm, cuda_ipc over the KV server's control channel; a fake
in the tests) serves and makes pulls on its own threads and reports what finished:

    get_finished() -> KVEvents        holds the decode side has (free them), holds whose
                                      lease the decode side renewed, loads that ended
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class KVEvents:
    sent: list[str] = field(default_factory=list)        # holds to free: the decode side is done with them
    renewed: list[str] = field(default_factory=list)     # holds whose lease restarts now
    loaded: list[tuple[str, bool, str | None]] = field(default_factory=list)   # (request, ok, error)


class KVConnectorBase(Protocol):
    # ---- scheduler side -----------------------------------------------------------------
    def get_num_new_matched_tokens(self, seq, num_computed_tokens: int) -> int | None: ...
    def add_request(self, seq) -> None: ...
    def update_state_after_alloc(self, seq) -> list[int]: ...
    def request_finished(self, seq, first_logprob=None, prompt_logprobs=None) -> dict: ...
    def keep_held(self, request_id: str) -> bool: ...
    def request_freed(self, request_id: str) -> None: ...
    def request_aborted(self, seq) -> None: ...
    # ---- worker side --------------------------------------------------------------------
    def get_finished(self) -> KVEvents: ...


class Transport(Protocol):
    """How blocks move. A producer's transport answers pulls of the grants the connector
    authorises (`serve`); a consumer's makes them. Adding one (nixl, an offload tier) is one
    class with these methods."""
    def serve(self, producer) -> tuple[str, int]: ...    # start answering; (host, port) to advertise
    def pull(self, rp, src: list[int], dst: list[int]) -> tuple[int, str]: ...   # (bytes, transport used)
    def renew(self, rps: list) -> None: ...              # one producer's leases; best effort
    def release(self, rp) -> None: ...                   # free a hold without pulling; best effort
    def close(self) -> None: ...


class DataPath(Protocol):
    """How one pull's bytes move once the producer authorised it (kv/paths.py lists them)."""
    name: str
    streams: bool        # the producer sends the bytes on the connection after its reply

    def ready(self, engine_id: str, offer: dict) -> bool: ...   # consumer: usable with this producer
    def send(self, sock, pool, ids: list[int], pieces, deadline: float) -> int: ...   # producer
    def receive(self, sock, offer: dict, engine_id: str, pool, pieces, src: list[int], dst: list[int],
                deadline: float) -> int: ...                    # consumer: bytes landed in its pools
