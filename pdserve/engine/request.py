"""Request state and sampling parameters. Pure Python: the simulator uses these too."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


MAX_STOP_STRINGS, MAX_STOP_CHARS = 64, 1024


@dataclass
class SamplingParams:
    """Per-request sampling settings, named and defaulted as vLLM's."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return besides the sampled one
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field; the server turns it into a 400."""
        def bad(name: str, msg: str):
            err = ValueError(f"{name} {msg}")
            err.param = name
            raise err
        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)
        # NaN compares false with everything: it would pass every range check below
        for name in ("temperature", "top_p", "min_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, f"must be a finite number, got {v!r}.")
        for name in ("n", "top_k", "min_tokens"):
            if not integer(getattr(self, name)):
                bad(name, f"must be an integer, got {getattr(self, name)!r}.")
        for name in ("max_tokens", "seed", "logprobs"):
            if getattr(self, name) is not None and not integer(getattr(self, name)):
                bad(name, f"must be an integer, got {getattr(self, name)!r}.")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be at least 1, got {self.n}.")
        if self.temperature < 0:
            bad("temperature", f"must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be 0 or -1 (disable) or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be at most max_tokens={self.max_tokens}, got {self.min_tokens}.")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"must be in [0, 20], got {self.logprobs}.")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings.")
        # each stop string is searched for after every token: bound the work one request can ask for
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            bad("stop", f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters.")
        if any(not integer(t) for t in self.stop_token_ids):
            bad("stop_token_ids", "must be integers.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


class Status(enum.Enum):
    WAITING = "waiting"              # not yet (or no longer, after preemption) holding blocks
    WAITING_FOR_KV = "waiting_for_kv"  # decode role: blocks allocated, remote KV being loaded
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, stop token or stop string
    LENGTH = "length"      # max_tokens or max_model_len
    ABORT = "abort"
    REMOTE_DECODE = "remote_decode"  # prefill role: first token made, KV held for a decode worker


@dataclass(eq=False)
class Sequence:
    """One sequence's tokens, blocks and progress. `token_ids` holds prompt then output."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    # decode role: the first output token made by the prefill worker, appended once KV is in
    remote_first_token: int | None = None
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0       # prompt tokens found in the prefix cache (or pulled remotely)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks
    remote_decode: bool = False      # prefill side: hold the blocks after the first token
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while the step after this one still does not produce a new token."""
        return self.num_computed_tokens < self.num_tokens - 1
