"""What the engine hands back per request and step, in vLLM's shape."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.request import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # what this step added (for streaming)
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    error: str | None = None   # set when the request ended on an error (e.g. a failed KV pull)
    # with SamplingParams.prompt_logprobs: None for the first prompt token, then each token's
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # prefill side, a remote-decode request now held: what a decode worker needs to continue it
    kv_transfer_params: dict | None = None
