"""Structured output: grammars compiled per request, token masks for the sampler.

The engine is llguidance (guidance-ai, MIT; one of vLLM's structured-output backends, and
SGLang's). Chosen over xgrammar and outlines-core because it is one 3 MB wheel with no
dependencies (xgrammar pulls triton and apache-tvm-ffi; outlines-core's index for a JSON
schema is built ahead of time, slow for large schemas), it builds its token trie from the
HF tokenizer.json offline in about a second, it compiles a schema lazily (no per-schema
precomputation, so a new schema per request costs milliseconds), it covers JSON Schema,
regex, choice and Lark / GBNF grammars with one API, and it computes a mask in tens of
microseconds on the CPU, where pdserve's sampler already works.

A request's `Matcher` is built in the caller's thread when the request is validated (a
grammar that does not compile is a 400 before anything runs), then advanced by the engine
with every token the sequence gains, whoever sampled it (this worker, or the prefill worker
whose first token a decode worker continues from).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict

import numpy as np
import torch

from pdserve.engine.request import StructuredOutputsParams

log = logging.getLogger("pdserve.engine")


class GrammarError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Matcher:
    """One request's position in its grammar. `consumed` counts the output tokens it has seen."""
    __slots__ = ("m", "consumed")

    def __init__(self, m):
        self.m, self.consumed = m, 0

    def advance(self, output_token_ids: list[int]) -> str | None:
        """Consume the output tokens not yet seen. Returns an error message if one is rejected."""
        new = output_token_ids[self.consumed:]
        self.consumed = len(output_token_ids)
        if new and not self.m.is_stopped() and not self.m.consume_tokens(new):
            return f"the output left its grammar: {self.m.get_error()}"
        return None


class GrammarCompiler:
    """Compiles StructuredOutputsParams into Matchers for one tokenizer and vocabulary size."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], cache_size: int = 64):
        self._hf, self._vocab, self._eos = hf_tokenizer, vocab_size, list(eos_token_ids)
        self._tok = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, object] = OrderedDict()   # grammar text -> pristine matcher
        self._cache_size = cache_size
        self._executor = None
        self.mask_seconds = 0.0   # engine thread: computing and applying masks, advancing matchers

    @property
    def tokenizer(self):
        if self._tok is None:   # a second or two; a worker starts it beside startup (warm_up)
            with self._lock:
                if self._tok is None:
                    import llguidance.hf
                    self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab, eos_token=self._eos)
        return self._tok

    @staticmethod
    def grammar_text(spec: StructuredOutputsParams) -> str:
        """llguidance's grammar for a spec; raises GrammarError naming spec.param."""
        from llguidance import LLMatcher, grammar_from
        ws = {"whitespace_flexible": not spec.disable_any_whitespace}
        try:
            kind = spec.kind
            if kind == "json":
                schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
                if not isinstance(schema, (dict, bool)):
                    raise ValueError("a JSON schema is an object")
                return LLMatcher.grammar_from_json_schema(schema, defaults=ws)
            if kind == "json_object":
                return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=ws)
            if kind == "regex":
                return LLMatcher.grammar_from_regex(spec.regex)
            if kind == "choice":
                return grammar_from("choice", spec.choice)
            return grammar_from("grammar", spec.grammar)   # Lark, or GBNF converted to Lark
        except (ValueError, TypeError) as e:
            raise GrammarError(f"{spec.param}: cannot compile the {spec.kind}: {e}", spec.param) from e

    def matcher(self, spec: StructuredOutputsParams) -> Matcher:
        from llguidance import LLMatcher
        text = self.grammar_text(spec)
        with self._lock:
            proto = self._cache.get(text)
            if proto is not None:
                self._cache.move_to_end(text)
        if proto is None:
            try:
                tok = self.tokenizer
            except Exception as e:   # e.g. a slow (Python) tokenizer: llguidance needs a fast one
                raise GrammarError(f"{spec.param}: structured output is not available with this "
                                   f"model's tokenizer: {e}", spec.param) from e
            proto = LLMatcher(tok, text, log_level=0)   # compiles; a bad grammar leaves it in error
            if proto.is_error():
                raise GrammarError(f"{spec.param}: cannot compile the {spec.kind}: {proto.get_error()}", spec.param)
            with self._lock:
                self._cache[text] = proto
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return Matcher(proto.deep_copy())

    def warm_up(self) -> None:
        """Build the token trie now (in a thread beside startup), not on the first request's path."""
        try:
            self.tokenizer
        except Exception as e:
            log.warning("structured output unavailable: %s", e)

    # ---- masks (engine thread) ----------------------------------------------------------
    def apply_masks(self, logits: torch.Tensor, rows: list[int], matchers: list[Matcher]) -> None:
        """Set to -inf, in logits [B, V] (CPU float), every token the grammar forbids in the given rows."""
        if not rows:
            return
        t = time.perf_counter()
        import llguidance
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        words = (self._vocab + 31) // 32
        bitmask = np.empty((len(rows), words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr([(m.m, j) for j, m in enumerate(matchers)],
                                               bitmask.ctypes.data, words * 4, len(rows))
        # numpy, not torch: for one [k, V] bool op torch's CPU thread pool costs milliseconds
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").astype(bool)
        view, width = logits.numpy(), min(logits.shape[1], allowed.shape[1])
        for j, i in enumerate(rows):
            row = view[i]
            row[:width][~allowed[j, :width]] = -np.inf
            row[width:] = -np.inf   # logits wider than the grammar's vocabulary
        self.mask_seconds += time.perf_counter() - t
