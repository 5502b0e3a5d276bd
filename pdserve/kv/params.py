"""`kv_transfer_params`: the object a prefill worker returns and a decode worker is sent.

Field names follow vLLM's NixlConnector (do_remote_decode, do_remote_prefill,
remote_engine_id, remote_host, remote_port, remote_block_ids); the rest is what pdserve
needs besides: the one-time token that unlocks the blocks, the first token the prefill
worker sampled, the prompt the KV belongs to, the transports the producer offers, and the
lease (seconds) the producer holds the blocks for unless the decode worker renews it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.errors import RequestError
from pdserve.engine.request import TokenLogprobs

PARAM = "kv_transfer_params"


def wants_remote_decode(params: dict | None) -> bool:
    return bool(params) and bool(params.get("do_remote_decode"))


def wants_remote_prefill(params: dict | None) -> bool:
    return bool(params) and bool(params.get("do_remote_prefill"))


@dataclass
class RemotePrefill:
    """A decode worker's view of where a request's KV lies and how to claim it."""
    engine_id: str
    host: str
    port: int
    block_ids: list[int]
    request_id: str
    token: str
    first_token_id: int
    prompt_token_ids: list[int]
    transports: list[str]
    lease: float = 30.0
    # what the prefill worker computed besides the KV, for a decode worker to answer with: the
    # first token's logprobs (when asked for) and the prompt's (prompt_logprobs / echo)
    first_logprob: TokenLogprobs | None = None
    prompt_logprobs: list | None = None
    # set by pdserve's router when it streamed the first token to the client itself: the
    # decode worker then does not send it again (a vLLM-style proxy never sets it)
    first_token_sent: bool = False
    tp_size: int = 1   # the prefill worker's tensor-parallel size (vLLM's field; the handshake has its layout)

    def to_params(self) -> dict:
        out = {"do_remote_decode": False, "do_remote_prefill": True,
               "remote_engine_id": self.engine_id, "remote_host": self.host, "remote_port": self.port,
               "remote_block_ids": self.block_ids, "remote_request_id": self.request_id,
               "kv_token": self.token, "first_token_id": self.first_token_id,
               "prompt_token_ids": self.prompt_token_ids, "transports": self.transports, "tp_size": self.tp_size,
               "kv_lease_s": self.lease}
        if self.first_logprob is not None:
            out["first_token_logprobs"] = pack_logprob(self.first_logprob)
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = [None if lp is None else pack_logprob(lp) for lp in self.prompt_logprobs]
        return out

    @classmethod
    def from_params(cls, p: dict) -> "RemotePrefill":
        """Validate what a client sent; a malformed object is the client's error (400)."""
        def need(name, kind):
            v = p.get(name)
            ok = isinstance(v, kind) and not isinstance(v, bool)
            if kind is list:
                ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            if not ok:
                raise RequestError(f"{PARAM}.{name} is missing or not a {kind.__name__}", PARAM)
            return v
        rp = cls(need("remote_engine_id", str), need("remote_host", str), need("remote_port", int),
                 need("remote_block_ids", list), need("remote_request_id", str), need("kv_token", str),
                 need("first_token_id", int), need("prompt_token_ids", list),
                 [t for t in p.get("transports") or ["tcp"] if isinstance(t, str)])
        lease = p.get("kv_lease_s", 30.0)
        if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not 0 < lease < 1e6:
            raise RequestError(f"{PARAM}.kv_lease_s must be a positive number of seconds", PARAM)
        rp.lease = float(lease)
        rp.first_token_sent = p.get("first_token_sent") is True
        if not rp.prompt_token_ids:
            raise RequestError(f"{PARAM}.prompt_token_ids is empty", PARAM)
        if not rp.block_ids:
            raise RequestError(f"{PARAM}.remote_block_ids is empty", PARAM)
        if not 0 < rp.port < 65536:
            raise RequestError(f"{PARAM}.remote_port is out of range", PARAM)
        if p.get("first_token_logprobs") is not None:
            rp.first_logprob = unpack_logprob(p["first_token_logprobs"], "first_token_logprobs")
        if p.get("prompt_logprobs") is not None:
            plp = p["prompt_logprobs"]
            if not isinstance(plp, list) or len(plp) != len(rp.prompt_token_ids):
                raise RequestError(f"{PARAM}.prompt_logprobs must have one entry per prompt token", PARAM)
            rp.prompt_logprobs = [None if e is None else unpack_logprob(e, "prompt_logprobs") for e in plp]
        return rp

    @classmethod
    def all_from_params(cls, p: dict) -> list["RemotePrefill"]:
        """One per prompt: a prefill worker answers a request of several prompts with their
        params under "prompts" (the top level keeps only the do_remote_* flags)."""
        many = p.get("prompts")
        if many is None:
            return [cls.from_params(p)]
        if not isinstance(many, list) or not many or not all(isinstance(x, dict) for x in many):
            raise RequestError(f"{PARAM}.prompts must be a non-empty list of objects", PARAM)
        return [cls.from_params(x) for x in many]


def pack_params(per_prompt: list[dict]) -> dict:
    """kv_transfer_params for the answer to a request of one or several prompts."""
    if len(per_prompt) == 1:
        return per_prompt[0]
    return {"do_remote_decode": False, "do_remote_prefill": True, "prompts": per_prompt}


def pack_logprob(lp: TokenLogprobs) -> list:
    return [lp.token_id, lp.logprob, lp.rank, [[i, v] for i, v in lp.top]]


def unpack_logprob(e, name: str) -> TokenLogprobs:
    try:
        tid, lp, rank, top = e
        return TokenLogprobs(int(tid), float(lp), [(int(i), float(v)) for i, v in top],
                             None if rank is None else int(rank))
    except (TypeError, ValueError):
        raise RequestError(f"{PARAM}.{name} is malformed", PARAM) from None
