"""Request bodies of the OpenAI API as vLLM accepts them, and their sampling parameters."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pdserve.engine.request import SamplingParams


MAX_LOGPROBS = 20   # OpenAI's limit for top_logprobs (vLLM's default max_logprobs is 20 too)


def _bad(param: str, msg: str) -> ValueError:
    err = ValueError(f"{param} {msg}")
    err.param = param
    return err


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    # unlike vLLM (which ignores them), an unknown field is refused with a 400 naming it:
    # fields.check() reads model_extra. See docs/openai_fields.md.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    kv_transfer_params: dict[str, Any] | None = None
    return_token_ids: bool = False   # vLLM: token ids of prompt and completion in each choice
    request_id: str | None = None
    # sampling controls (OpenAI and vLLM)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    best_of: int | None = None
    user: str | None = None   # accepted, no effect (as OpenAI: an end-user id for abuse monitoring)
    # structured output (server/structured.py): OpenAI's, and vLLM's two spellings
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _params(self, max_tokens: int | None, logprobs: int | None, default_max: int | None,
                prompt_logprobs: int | None = None) -> SamplingParams:
        kw = dict(n=self.n, max_tokens=max_tokens if max_tokens is not None else default_max,
                  seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                  ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs,
                  include_stop_str_in_output=self.include_stop_str_in_output,
                  skip_special_tokens=self.skip_special_tokens)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "allowed_token_ids", "bad_words"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        plp = prompt_logprobs if prompt_logprobs is not None else self.prompt_logprobs
        if plp is not None:
            kw["prompt_logprobs"] = plp
        if self.logit_bias:
            kw["logit_bias"] = self.logit_bias
        from pdserve.server.structured import from_request
        kw["structured_outputs"] = from_request(self)
        return SamplingParams(**kw)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False

    def sampling_params(self) -> SamplingParams:
        plp = self.prompt_logprobs
        if plp is None and self.echo and self.logprobs is not None:
            # echo with logprobs scores the prompt too (OpenAI, vLLM): the prompt's logprobs with
            # as many top entries as the completion's
            plp = self.logprobs
        if plp is None and self.echo and self.max_tokens == 0:
            plp = 0   # echo alone with nothing to generate: a prefill that the engine must not skip
        return self._params(self.max_tokens, self.logprobs, 16, plp)  # 16: OpenAI's default

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template: str | None = None
    # tool calling (server/tools.py)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def sampling_params(self) -> SamplingParams:
        mt = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise _bad("top_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}.")
            if not self.logprobs:
                raise _bad("top_logprobs", "needs logprobs set to true.")
        if mt == 0:
            raise _bad("max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens",
                       "must be at least 1, got 0.")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(mt, lp, None)   # chat: up to the context length


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class KVReleaseRequest(BaseModel):
    request_id: str
    kv_token: str
