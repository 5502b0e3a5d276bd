"""LLMEngine: one model, one device, one step at a time. The wall clock enters here.

`step()` = the engine core's step (schedule, run the model, account tokens), then the output
processor's (detokenize, stop strings, outputs: engine/output_processor.py).
Requests come in as text or token ids, for a colocated run (role both), as the prefill half
of a disaggregated run (`remote_decode`: held after the first token), or as the decode half
(`remote_first_token`: blocks allocated, the prompt's KV loaded by a connector).
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Callable

from pdserve.errors import RequestError
from pdserve.models.tensor_parallel import RankLostError
from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.core import EngineCore, StepShape
from pdserve.engine.logits_controls import bad_words_token_ids
from pdserve.engine.grammar import GrammarCompiler, GrammarError
from pdserve.engine.model_runner import KVAllocator, ModelRunner
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import SamplingParams, Sequence, Status
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.engine.step_trace import StepTrace
from pdserve.engine.output_processor import OutputProcessor
from pdserve.engine.tokenizer import apply_chat_template, load_tokenizer
from pdserve.models.loader import read_hf_config, resolve_model

log = logging.getLogger("pdserve.engine")
DEFAULT_MAX_MODEL_LEN = 4096


def check_text(s: str, param: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that no UTF-8 encoder or tokenizer accepts."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} is not valid Unicode text (a lone surrogate at position {e.start})",
                           param) from None


def _check_strings(obj, param: str) -> None:
    if isinstance(obj, str):
        check_text(obj, param)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_strings(k, param)
            _check_strings(v, param)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_strings(v, param)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, kv_allocator: KVAllocator | None = None,
                 **kwargs):
        self.config = config = config or EngineConfig.from_kwargs(**kwargs)
        name, self.model_dir = resolve_model(config.model)
        self.model_name = config.served_model_name or name
        hf = read_hf_config(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.max_model_len = self._max_model_len(hf)
        self.ranks = None   # the other tensor-parallel ranks (child processes), if any
        if config.tensor_parallel_size > 1:
            from pdserve.engine.tp_ranks import Ranks
            from pdserve.models.decoder import ModelConfig
            from pdserve.models.tensor_parallel import check_divisible
            check_divisible(ModelConfig.from_hf(hf), config.tensor_parallel_size)   # before any rank starts
            self.ranks = Ranks(config, self.model_dir, self.max_model_len)
        self.runner = ModelRunner(config, self.model_dir, hf, self.max_model_len, kv_allocator,
                                  tp=self.ranks.group if self.ranks else None)
        self._fit_max_model_len()
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig.of(config, self.max_model_len), self.block_manager)
        self.core = EngineCore(self.scheduler)   # a KV connector sets core.connector
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler.finish)
        self.eos_token_ids = self._eos_ids(hf)
        self.grammars = GrammarCompiler(self.tokenizer, self.runner.model_config.vocab_size, self.eos_token_ids)
        self.runner.sampler.grammars = self.grammars
        # no token decodes to more characters than the longest vocabulary entry: a longer prompt
        # than this cannot fit, and is refused before anyone spends time tokenizing it
        longest = max(map(len, self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = self.max_model_len * max(longest, 16)
        self._batch: list[Sequence] | None = None   # what the running step scheduled
        self._early: list[RequestOutput] = []       # and the outputs it made before running them
        self.clock: Callable[[], float] = time.monotonic           # the wall clock enters here (tests inject one)
        self.pending_kv_loads: list[Sequence] = []                 # with no connector: loads to do by hand
        self._loaded: list[str] = []                               # KV arrived, first token to emit
        self._parked: dict[str, list[Sequence]] = {}               # forks waiting for a KV pull
        self._ids = itertools.count()
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self.step_trace = StepTrace(config.step_trace, config.role) if config.step_trace else None
        from pdserve import cpu_threads
        # only without tensor parallelism: the ranks' threads are their own (tp_ranks places them)
        self.threads = cpu_threads.yielding() if self.runner.device.type == "cpu" and not self.ranks else None
        kv = "" if self.runner.kv_dtype == self.runner.dtype else f" ({self.runner.kv_dtype})"
        log.info("engine ready: %s on %s/%s, %d KV blocks%s of %d tokens, max_model_len %d",
                 self.model_name, self.runner.device, self.runner.dtype, self.runner.num_blocks, kv,
                 config.block_size, self.max_model_len)

    def _max_model_len(self, hf: dict) -> int:
        model_max = hf.get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN)
        want = self.config.max_model_len
        if want is None:
            return min(model_max, DEFAULT_MAX_MODEL_LEN)
        if want > model_max:
            raise ValueError(f"max_model_len={want} exceeds the model's max_position_embeddings={model_max}")
        return want

    def _fit_max_model_len(self) -> None:
        """One sequence of max_model_len tokens must fit in the KV cache: lower a default
        max_model_len to fit, refuse an explicit one that does not."""
        capacity = self.runner.num_blocks * self.config.block_size
        if capacity >= self.max_model_len:
            return
        msg = (f"the KV cache holds {capacity} tokens ({self.runner.num_blocks} blocks), fewer than "
               f"max_model_len={self.max_model_len}")
        if self.config.max_model_len is not None:
            raise ValueError(msg + "; raise --kv-cache-memory or lower --max-model-len")
        log.warning("%s: lowering max_model_len to %d", msg, capacity)
        self.max_model_len = capacity

    def _eos_ids(self, hf: dict) -> tuple[int, ...]:
        ids = []
        gen = Path(self.model_dir) / "generation_config.json"
        for src in ((json.loads(gen.read_text()) if gen.is_file() else {}), hf):
            e = src.get("eos_token_id")
            ids += e if isinstance(e, list) else ([e] if e is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    # ---- requests -----------------------------------------------------------------------
    def make_sequence(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                      *, remote_decode: bool = False, remote_first_token: int | None = None,
                      remote_prefill=None, arrival_time: float | None = None) -> tuple[Sequence, str | None]:
        """Validate a request and build its sequence without touching engine state (any thread).
        remote_prefill: the kv.params.RemotePrefill a decode-side request came with (its
        first token, that token's and the prompt's logprobs, where its KV lies)."""
        params = params or SamplingParams()
        if remote_prefill is not None:
            remote_first_token = remote_prefill.first_token_id
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise RequestError("the prompt is empty; send at least one token", "prompt")
        vocab = self.runner.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) for t in ids) or min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        # these reach the sampler as tensor indices: one out of range would fail every step it is in
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise RequestError(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        for s in params.stop:
            check_text(s, "stop")
        limit = self.max_model_len
        if len(ids) + params.min_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, min_tokens={params.min_tokens} "
                f"with {len(ids)} prompt tokens asks for more.", "min_tokens")
        if len(ids) >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{len(ids)} tokens, which leaves no room for a completion.", "prompt")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, "
                f"{params.max_tokens} for the completion).", "max_tokens")
        role = self.config.role
        if role == "prefill" and remote_first_token is not None:
            raise RequestError("this worker has role prefill and cannot continue a remote prefill",
                               "kv_transfer_params")
        if role == "decode" and remote_decode:
            raise RequestError("this worker has role decode and cannot produce KV for remote decode",
                               "kv_transfer_params")
        if remote_first_token is not None and not 0 <= remote_first_token < vocab:
            raise RequestError("the first token from the prefill worker is out of range", "kv_transfer_params")
        self._resolve_controls(params, vocab)
        seq = Sequence(request_id or f"req-{next(self._ids)}", ids, params,
                       arrival_time=time.monotonic() if arrival_time is None else arrival_time,
                       eos_token_ids=self.eos_token_ids, remote_first_token=remote_first_token)
        if remote_prefill is not None:
            seq.kv_params = remote_prefill
            seq.remote_first_logprob = remote_prefill.first_logprob
            seq.remote_prompt_logprobs = remote_prefill.prompt_logprobs
        seq.remote_decode = remote_decode or role == "prefill"
        if params.structured_outputs is not None:
            try:
                seq.grammar = self.grammars.matcher(params.structured_outputs)
            except GrammarError as e:
                raise RequestError(str(e), e.param) from e
            # a decode worker continues from the prefill worker's first token: the grammar too
            if remote_first_token is not None and seq.grammar.advance([remote_first_token]) is not None:
                raise RequestError("the first token from the prefill worker does not match this request's "
                                   "grammar (were both sent the same request?)", "kv_transfer_params")
        return seq, text

    def _resolve_controls(self, params: SamplingParams, vocab: int) -> None:
        """Check token ids against the vocabulary and tokenize bad_words (as vLLM)."""
        for name, ids in (("logit_bias", list(params.logit_bias or ())),
                          ("allowed_token_ids", params.allowed_token_ids or [])):
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise RequestError(f"{name} has token ids outside the vocabulary [0, {vocab})", name)
        if params.bad_words and params.bad_words_token_ids is None:
            params.bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt))
            check_text(prompt, "prompt")
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._prompt_ids(prompt["prompt"])
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise RequestError("a prompt is a string, a list of token ids or {'prompt_token_ids': [...]}", "prompt")

    def check_prompt_chars(self, n: int, param: str = "prompt") -> None:
        if n > self.max_prompt_chars:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; a prompt of {n} characters "
                f"cannot fit (at most {self.max_prompt_chars} characters are accepted).", param)

    def chat_prompt_ids(self, messages: list[dict], chat_template: str | None = None,
                        tools: list[dict] | None = None, add_generation_prompt: bool = True) -> list[int]:
        try:
            _check_strings(messages, "messages")
            if chat_template is not None:
                check_text(chat_template, "chat_template")
            return apply_chat_template(self.tokenizer, messages, add_generation_prompt, chat_template, tools,
                                       self.max_prompt_chars)
        except ValueError as e:
            param = "chat_template" if chat_template is not None and "template" in str(e) else "messages"
            raise RequestError(str(e), getattr(e, "param", None) or param) from e

    def add_sequence(self, seq: Sequence, prompt_text: str | None = None) -> None:
        if seq.request_id in self.states:
            raise RequestError(f"request id {seq.request_id!r} is already in use", "request_id")
        self.outputs.add(seq, prompt_text)
        parent = self.states.get(seq.wait_for) if seq.wait_for else None
        if parent is not None and parent.seq.status in (Status.WAITING, Status.WAITING_FOR_KV) \
                and parent.seq.remote_first_token is not None and not parent.seq.num_output_tokens:
            # a fork of a remote prefill: admitted once the parent's KV is in (then its prefix
            # cache holds the prompt and the fork computes only the last block's tail)
            self._parked.setdefault(seq.wait_for, []).append(seq)
            return
        self.core.add(seq)

    def _unpark(self, parent_id: str) -> None:
        for seq in self._parked.pop(parent_id, ()):
            if seq.request_id in self.states:
                self.core.add(seq)

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    **kwargs) -> str:
        seq, text = self.make_sequence(prompt, params, request_id, **kwargs)
        self.add_sequence(seq, text)
        return seq.request_id

    def abort(self, request_id: str) -> bool:
        st = self.states.pop(request_id, None)
        self._unpark(request_id)
        for forks in self._parked.values():
            if st is not None and st.seq in forks:
                forks.remove(st.seq)
        seq = self.core.abort(request_id)
        return st is not None or seq is not None

    def release(self, request_id: str) -> bool:
        """Prefill side: the decode worker has the KV (or gave up); free the held blocks."""
        return self.core.release(request_id) is not None

    def finish_kv_load(self, request_id: str, ok: bool, error: str | None = None) -> None:
        """Decode side: the connector finished pulling a request's KV into its blocks.
        With ok=False the request is either prefilled locally or failed (error given)."""
        if error is not None:
            st = self.states.get(request_id)
            if st is not None:
                st.error = error
            self.core.abort(request_id)
            self._unpark(request_id)
            return
        if self.scheduler.finish_kv_load(request_id, ok) is not None and ok:
            self._loaded.append(request_id)
        self._unpark(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.states) or self.scheduler.has_work()

    # ---- one step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step. If it fails, the requests it ran fail with the error and the engine goes
        on: one request that slipped past validation must not take every other one down."""
        self._batch, self._early = None, []
        if self.threads is not None:   # on CPU: fewer threads while neighbours hold cores, steps in parts
            self.runner.busy = self.threads.tick() < self.threads.full
        try:
            return self._step()
        except RankLostError:   # no step can run without every rank: the worker must go
            raise
        except Exception as e:
            log.exception("a step failed; failing the requests it ran")
            return self._fail_step(e)

    def _fail_step(self, e: Exception) -> list[RequestOutput]:
        # unknown which request broke it, or the step broke before scheduling: fail them all
        seqs = self._batch if self._batch is not None else [st.seq for st in self.states.values()]
        res = list(self._early)   # outputs made before the failure still go out
        for seq in seqs:
            st = self.states.get(seq.request_id)
            self.abort(seq.request_id)
            if st is not None:
                res.append(self.outputs.fail(st, f"the engine failed while running this request: {e!r}"[:500]))
        return res

    def _step(self) -> list[RequestOutput]:
        now = start = self.clock()
        if self.step_trace:
            self.step_trace.begin()
        for rid, ok, error in self.core.take_finished(now):
            self.finish_kv_load(rid, ok, error)
        out = self.core.schedule(now, self.config.kv_lease_duration)
        if self.core.connector is None:
            self.pending_kv_loads += out.kv_loads
        for seq in out.seqs if self._parked else ():
            if seq.request_id in self._parked:   # a parent that computes its prompt here loads no KV
                self._unpark(seq.request_id)     # to wait for: its forks go now
        early = self._early = self.outputs.take_errors() + self._collect_loaded()
        if out.is_empty:
            return early
        self._batch = list(out.seqs)
        before = {s.request_id: s.num_output_tokens for s in out.seqs}
        self.num_prompt_tokens += sum(min(n, max(0, s.num_prompt_tokens - s.num_computed_tokens))
                                      for s, n in zip(out.seqs, out.num_new_tokens))
        shape = StepShape.of(out.seqs, out.num_new_tokens) if self.step_trace else None
        model_start = self.clock()
        tokens, logprobs = self.runner.execute(out, self._banned)
        now = self.clock()
        for rid, (pos, entries) in self.runner.prompt_logprobs.items():
            st = self.states.get(rid)
            if st is not None and st.prompt_lps is not None and pos <= len(st.prompt_lps):
                st.prompt_lps.extend(entries[len(st.prompt_lps) - pos:])   # a recompute repeats some
        model_s = now - model_start
        self.core.update(out, tokens, now)
        self._advance_grammars(out.seqs)
        connector, held = self.core.connector, self.scheduler.held
        results = []
        for seq, lp in zip(out.seqs, logprobs):
            st = self.states.get(seq.request_id)
            if st is None or st.error is not None:
                continue  # aborted or failed
            if seq.num_output_tokens == before[seq.request_id]:
                if seq.is_finished:   # max_tokens 0: scored, nothing generated
                    results.append(self.outputs.emit(st, []))
                continue  # a prefill chunk that produced no token
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.num_generation_tokens += 1
            if seq.remote_first_token is not None and before[seq.request_id] == 0:
                lp = seq.remote_first_logprob   # recomputed here, but the token is the prefill worker's
            if lp is not None and st.out.logprobs is not None:
                st.new_lp.append(lp)
            if connector is not None and seq.request_id in held:   # its params leave with this output
                plp = st.prompt_lps if st.prompt_lps is not None and len(st.prompt_lps) == seq.num_prompt_tokens else None
                st.kv_params = connector.request_finished(seq, lp if st.out.logprobs is not None else None, plp)
            results.append(self.outputs.emit(st, seq.output_token_ids[len(st.out.token_ids):]))
        if self.step_trace:
            self.step_trace.record(start, model_s, shape)
        return early + results

    def _advance_grammars(self, seqs: list[Sequence]) -> None:
        """Move each constrained sequence's matcher over the tokens it gained this step."""
        t = time.perf_counter()
        for seq in seqs:
            if seq.grammar is None or seq.is_finished:
                continue
            err = seq.grammar.advance(seq.output_token_ids)
            st = self.states.get(seq.request_id)
            if err is not None and st is not None:   # the mask makes this unreachable; never ignore it
                st.error = err
                self.scheduler.abort(seq.request_id)
        self.grammars.mask_seconds += time.perf_counter() - t

    def _collect_loaded(self) -> list[RequestOutput]:
        """Decode side: requests whose KV arrived got their first token appended by the scheduler."""
        res = []
        loaded, self._loaded = self._loaded, []
        for rid in loaded:
            st = self.states.get(rid)
            if st is not None and not st.out.token_ids:
                st.seq.first_token_time = st.seq.first_token_time or time.monotonic()
                if st.seq.remote_first_logprob is not None and st.out.logprobs is not None:
                    st.new_lp.insert(0, st.seq.remote_first_logprob)
                res.append(self.outputs.emit(st, st.seq.output_token_ids))
        return res

    def _banned(self, seq: Sequence) -> tuple[int, ...]:
        p = seq.params
        if seq.num_output_tokens < p.min_tokens and not p.ignore_eos:
            return tuple(self.eos_token_ids) + tuple(p.stop_token_ids)
        if seq.num_output_tokens < p.min_tokens:
            return tuple(p.stop_token_ids)
        return ()

    @property
    def states(self):
        """Every request in the engine, by id: the output processor's (it owns them)."""
        return self.outputs.states

    # ---- introspection ------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {"num_requests_running": self.scheduler.num_running,
                "num_requests_waiting": len(self.scheduler.waiting),
                "num_requests_held": len(self.scheduler.held),
                "kv_cache_usage_perc": bm.usage,
                "num_blocks": bm.num_blocks, "num_used_blocks": bm.num_used_blocks,
                "prefix_cache_queries": bm.prefix_queries, "prefix_cache_hits": bm.prefix_hits,
                "prompt_tokens": self.num_prompt_tokens, "generation_tokens": self.num_generation_tokens,
                "num_preemptions": self.scheduler.num_preemptions}
