"""Token ids to what a client sees, outside the engine core's step: each request's incremental
detokenizer, stop strings (text that could start one is held back; a match ends the request
through the scheduler), logprobs, and one RequestOutput snapshot per request per step.
`OutputProcessor.states` is the one owner of per-request output state; the engine core's step
hands it the token ids it scheduled and sampled, and it knows nothing of models or KV.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from pdserve.engine.outputs import CompletionOutput, RequestOutput
from pdserve.engine.request import FinishReason, Sequence
from pdserve.engine.tokenizer import IncrementalDetokenizer


@dataclass
class RequestState:
    seq: Sequence
    prompt: str | None
    detok: IncrementalDetokenizer
    out: CompletionOutput
    emitted: int = 0   # characters of out.text already handed out (stop strings are held back)
    error: str | None = None
    new_lp: list = field(default_factory=list)
    prompt_lps: list | None = None   # [None, logprobs of prompt token 1, ...] as computed so far
    kv_params: dict | None = None    # prefill side: the kv_transfer_params its hold is handed off with


class OutputProcessor:
    def __init__(self, tokenizer, finish: Callable[[Sequence, FinishReason, str], None]):
        self.tokenizer = tokenizer
        self.finish = finish   # the scheduler's: a stop string ended a request that still runs
        self.states: dict[str, RequestState] = {}

    def add(self, seq: Sequence, prompt_text: str | None) -> RequestState:
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens)
        lps = [] if seq.params.logprobs is not None else None
        st = self.states[seq.request_id] = RequestState(seq, prompt_text, detok, CompletionOutput(0, logprobs=lps))
        if seq.params.prompt_logprobs is not None:
            st.prompt_lps = list(seq.remote_prompt_logprobs) if seq.remote_prompt_logprobs else [None]
        return st

    def fail(self, st: RequestState, error: str) -> RequestOutput:
        """The request's last output: finish_reason "error", nothing new."""
        self.states.pop(st.seq.request_id, None)
        o = st.out
        o.finish_reason, o.new_text, o.new_token_ids = "error", "", []
        return self.output(st, finished=True, error=error)

    def take_errors(self) -> list[RequestOutput]:
        """The last outputs of requests that failed since the last step (st.error set)."""
        return [self.fail(st, st.error) for st in list(self.states.values()) if st.error is not None]

    def emit(self, st: RequestState, new_ids: list[int]) -> RequestOutput:
        """What the client gets for the tokens st's request gained (st.new_lp: their logprobs)."""
        seq, o = st.seq, st.out
        # decode side: the router already streamed the prefill worker's first token to the
        # client; it counts (usage, logprobs, text), but is not handed out again
        skip = int(not o.token_ids and bool(new_ids) and getattr(seq.kv_params, "first_token_sent", False))
        for i, t in enumerate(new_ids):
            if seq.finish_reason == FinishReason.STOP and t in seq.eos_token_ids and not seq.params.ignore_eos:
                continue  # EOS is not part of the text
            st.detok.add(t)
            if i < skip:
                st.emitted = len(st.detok.text)
        o.token_ids.extend(new_ids)
        o.new_token_ids = list(new_ids[skip:])
        if o.logprobs is not None:
            o.logprobs.extend(st.new_lp)
        o.new_logprobs, st.new_lp = st.new_lp[skip:], []
        text = st.detok.text
        # a remote-decode hold's text goes on elsewhere: a half character stays held back
        if seq.is_finished and seq.finish_reason != FinishReason.REMOTE_DECODE:
            text += st.detok.flush()
        self._check_stop_strings(st, text)
        finished = seq.is_finished
        o.finish_reason = seq.finish_reason.value if finished else None
        o.stop_reason = seq.stop_reason
        # hold back a tail that could be the start of a stop string
        hold = 0 if finished else max((len(s) - 1 for s in seq.params.stop), default=0)
        visible = len(o.text) - hold
        o.new_text = o.text[st.emitted:max(visible, st.emitted)]
        st.emitted = max(visible, st.emitted)
        if finished:
            self.states.pop(seq.request_id, None)
        return self.output(st, finished)

    def _check_stop_strings(self, st: RequestState, text: str) -> None:
        seq, p = st.seq, st.seq.params
        st.out.text = text
        if not p.stop or seq.finish_reason == FinishReason.REMOTE_DECODE:
            return
        # look only where a new match can be: the new text plus a stop string's length before it
        start = max(0, st.emitted - max(len(s) for s in p.stop))
        hits = [(text.find(s, start), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits or seq.num_output_tokens < p.min_tokens:
            return
        i, s = min(hits)
        st.out.text = text[:i + len(s)] if p.include_stop_str_in_output else text[:i]
        if seq.is_finished:  # the same token also hit max_tokens or EOS: the stop string wins
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, s
        else:
            self.finish(seq, FinishReason.STOP, s)

    def output(self, st: RequestState, finished: bool, error: str | None = None) -> RequestOutput:
        seq = st.seq
        # a snapshot: the output crosses to another thread, and the next step rewrites st.out's
        # new_* fields before a slow consumer may have read them
        out = dataclasses.replace(st.out, token_ids=list(st.out.token_ids))
        plp = st.prompt_lps
        plp = plp if plp is not None and len(plp) == seq.num_prompt_tokens else None   # complete: final
        return RequestOutput(seq.request_id, st.prompt, seq.prompt_token_ids, [out], finished,
                             seq.num_cached_tokens, seq.arrival_time, seq.first_token_time, error,
                             prompt_logprobs=plp, kv_transfer_params=st.kv_params)
