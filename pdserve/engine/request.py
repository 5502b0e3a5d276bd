"""Request state and sampling parameters. Pure Python: the simulator uses these too."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


MAX_STOP_STRINGS, MAX_STOP_CHARS = 64, 1024


@dataclass
class StructuredOutputsParams:
    """What the output must match, as vLLM's: exactly one of json (a JSON schema, dict or
    string), regex, choice (a list of strings), grammar (Lark or GBNF text) or json_object (any
    JSON object). `param` names the request field it came from, for a 400 that points at it."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    param: str = "structured_outputs"

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self):
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            err = ValueError(f"{self.param} needs exactly one of {', '.join(self.KINDS)}"
                             + (f"; got {', '.join(given)}" if given else ""))
            err.param = self.param
            raise err
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            err = ValueError(f"{self.param}: choice must be a non-empty list of strings")
            err.param = self.param
            raise err

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))


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
    # logits controls, as vLLM defines them (applied in engine/logits_controls.py)
    presence_penalty: float = 0.0      # minus p for each token that occurs in the output
    frequency_penalty: float = 0.0     # minus f * (occurrences in the output)
    repetition_penalty: float = 1.0    # tokens of prompt or output: positive logits / r, negative * r
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None   # bad_words tokenized (by the engine)
    prompt_logprobs: int | None = None  # top logprobs per prompt token (the prompt token always included)
    structured_outputs: StructuredOutputsParams | None = None  # grammar the output must match

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()
        self.validate_controls()

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
        # 0 only to score a prompt (its logprobs), as vLLM's echo with max_tokens 0
        if self.max_tokens is not None and self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
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

    def validate_controls(self) -> None:
        """The logits controls, with vLLM's ranges; ids against the vocabulary are checked by the
        engine, which knows it."""
        def bad(name: str, msg: str):
            err = ValueError(f"{name} {msg}")
            err.param = name
            raise err
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not -2.0 <= v <= 2.0:
                bad(name, f"must be in [-2, 2], got {v}.")
        r = self.repetition_penalty
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 < r < float("inf"):
            bad("repetition_penalty", f"must be a positive number, got {r}.")
        if self.logit_bias is not None:
            # OpenAI's range; vLLM clamps to it, a value outside is more likely a mistake: refuse
            if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not -100 <= v <= 100
                   for v in self.logit_bias.values()):
                bad("logit_bias", "values must be in [-100, 100].")
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                bad("logit_bias", "keys must be token ids.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            bad("allowed_token_ids", "must not be empty.")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            bad("bad_words", "must be non-empty strings.")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", f"must be in [0, 20], got {self.prompt_logprobs}.")

    @property
    def has_controls(self) -> bool:
        """Whether any logits control is set (the sampler skips the work otherwise)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids)

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


@dataclass
class TokenLogprobs:
    """One sampled (or prompt) token's logprob and its top alternatives (no torch: it travels in
    kv_transfer_params and outputs)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None     # the token's rank among all (1: the most likely); prompt logprobs


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
    # decode role, carried in kv_transfer_params: that token's logprobs and the prompt's (the
    # prefill worker computed them; this worker never sees the prompt's logits)
    remote_first_logprob: object = None
    remote_prompt_logprobs: list | None = None
    # decode role: the kv_transfer_params it came with (a kv.params.RemotePrefill), for the connector
    kv_params: object = None
    # decode role, a fork (n > 1): the request (pulling the same prompt's KV) to start after
    wait_for: str | None = None
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
    first_token_time: float | None = None
    # structured output: the grammar matcher (engine.grammar.Matcher), advanced with each token
    grammar: object | None = None

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
    def computes_prompt_logprobs(self) -> bool:
        """The prompt's logprobs are asked for and are not carried in from a prefill worker:
        every prompt position must be computed here (no prefix-cache hit)."""
        return (self.params.prompt_logprobs is not None and self.remote_first_token is None
                and self.remote_prompt_logprobs is None)
