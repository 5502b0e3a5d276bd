"""Continuous batching with a token budget, chunked prefill, preemption and P/D roles.

Pure Python, no clock of its own (times are passed in): the real engine and the simulator
drive this same class. One step = `schedule()` -> run the model -> `update(out, tokens)`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import FinishReason, Sequence, Status


@dataclass
class SchedulerConfig(EngineConfig):
    """The engine's settings with max_model_len resolved (the model's, when it was None)."""
    max_model_len: int = 2048

    @classmethod
    def of(cls, config: EngineConfig, max_model_len: int) -> "SchedulerConfig":
        return cls(**{**vars(config), "max_model_len": max_model_len})

    def __post_init__(self):
        super().__post_init__()
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    kv_loads: list[Sequence] = field(default_factory=list)  # decode role: start pulling their KV

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


def num_remote_tokens(seq: Sequence, num_computed_tokens: int) -> int | None:
    """With no KV connector (the simulator, a hand-driven engine): a request that came with a
    remote prefill's first token loads every prompt token its prefix cache lacks (0 when it
    holds them all: the request then only takes its first token from the producer); None: the
    request computes its prompt here."""
    if seq.remote_first_token is None or seq.num_output_tokens:
        return None
    return seq.num_prompt_tokens - num_computed_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: dict[str, Sequence] = {}                 # remote KV being pulled in
        self.held: dict[str, tuple[Sequence, float]] = {}      # prefill role: KV kept for a puller
        self.num_preemptions = 0
        # how many prompt tokens a waiting request loads from elsewhere (None: it computes them
        # here): a KV connector's scheduler side answers (EngineCore wires it), else the rule above
        self.get_num_new_matched_tokens = num_remote_tokens

    # ---- requests in and out ----------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.loading)

    def get(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return self.loading.get(request_id) or (self.held.get(request_id) or (None,))[0]

    def abort(self, request_id: str) -> Sequence | None:
        """Stop a request wherever it is and free its blocks. Returns it, or None if unknown."""
        if request_id in self.held:
            return self.release(request_id)
        seq = self.get(request_id)
        if seq is None:
            return None
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        else:
            self.loading.pop(request_id, None)
        self._finish(seq, FinishReason.ABORT)
        self.bm.free(seq)
        return seq

    def release(self, request_id: str) -> Sequence | None:
        """Free the blocks a prefill-role request held for its decode worker."""
        seq, _ = self.held.pop(request_id, (None, 0.0))
        if seq is not None:
            self.bm.free(seq)
        return seq

    def renew_held(self, request_id: str, now: float) -> bool:
        """The decode worker still wants this request's held blocks: its lease restarts at now."""
        entry = self.held.get(request_id)
        if entry is None:
            return False
        self.held[request_id] = (entry[0], max(entry[1], now))
        return True

    def expire_held(self, now: float, timeout: float, keep=None) -> list[Sequence]:
        """Free held blocks whose lease (`timeout` seconds since they were held or last renewed)
        ran out. `keep(rid)` true: the blocks are being read right now; their lease restarts."""
        freed = []
        for rid in [rid for rid, (_, t) in self.held.items() if now - t >= timeout]:
            if keep is not None and keep(rid):
                self.held[rid] = (self.held[rid][0], now)
            else:
                freed.append(self.release(rid))
        return freed

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = seq.num_tokens - seq.num_computed_tokens
            if n == 1 and seq.num_computed_tokens < len(seq.block_table) * self.bm.block_size:
                # a decode token with room left in its last block: nothing to allocate, nobody to
                # preempt (the common case; the simulator runs this loop millions of times)
                out.seqs.append(seq)
                out.num_new_tokens.append(1)
                budget -= 1
                i += 1
                continue
            if n > budget and not chunked:
                i += 1
                continue
            n = min(n, budget)
            while not self.bm.can_append(seq, n):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.bm.append_slots(seq, n)
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1

        # admit waiting requests only if nothing was preempted this step
        while self.waiting and budget > 0 and not out.preempted and self.num_running < self.config.max_num_seqs:
            seq = self.waiting[0]
            # prompt logprobs need every prompt position computed here (as vLLM: no prefix hit)
            cached = [] if seq.computes_prompt_logprobs else self.bm.match_prefix(seq, seq.num_tokens)
            if self.get_num_new_matched_tokens(seq, len(cached) * self.bm.block_size) is not None:
                if not self._admit_remote(seq, cached, out):
                    break
                continue
            if len(cached) * self.bm.block_size >= seq.num_tokens:
                cached = cached[:-1]   # at least one token is computed here, for the next token's logits
            n = seq.num_tokens - len(cached) * self.bm.block_size
            if n > budget and not chunked:
                break
            n = min(n, budget)
            if not self.bm.can_allocate(seq, cached, n):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, cached, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return out

    def _admit_remote(self, seq: Sequence, cached: list[int], out: SchedulerOutput) -> bool:
        """Decode role: allocate blocks for the whole prompt; what the prefix cache lacks comes from elsewhere."""
        n = seq.num_prompt_tokens - len(cached) * self.bm.block_size
        if not self.bm.can_allocate(seq, cached, n):
            return False
        self.waiting.popleft()
        self.bm.allocate(seq, cached, n)
        seq.status = Status.WAITING_FOR_KV
        self.loading[seq.request_id] = seq
        out.kv_loads.append(seq)
        return True

    def finish_kv_load(self, request_id: str, ok: bool) -> Sequence | None:
        """The remote KV for a loading request arrived (ok) or did not (then prefill locally)."""
        seq = self.loading.pop(request_id, None)
        if seq is None:
            return None
        seq.status = Status.RUNNING
        if ok:
            seq.num_computed_tokens = seq.num_prompt_tokens
            self.bm.commit(seq)
            self._append_token(seq, seq.remote_first_token)
        else:  # recompute: keep the locally cached prefix, prefill the rest here
            seq.num_computed_tokens = seq.num_cached_tokens
        if seq.is_finished:
            self.bm.free(seq)
        else:
            self.running.append(seq)
        return seq

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.bm.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def update(self, out: SchedulerOutput, sampled: list[int | None], now: float = 0.0) -> list[Sequence]:
        """Account a finished step. sampled[i] is the token drawn for out.seqs[i] (ignored for
        sequences still mid-prompt). Returns the sequences that finished in this step."""
        finished = []
        for seq, n, token in zip(out.seqs, out.num_new_tokens, sampled):
            if seq.status != Status.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += n
            self.bm.commit(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk that does not reach the end of the prompt
            if seq.num_output_tokens == 0 and seq.remote_first_token is not None:
                token = seq.remote_first_token  # recomputed locally; the client already has it
            if seq.params.max_tokens == 0:
                self._finish(seq, FinishReason.LENGTH)   # scoring only: the prompt was the point
            else:
                self._append_token(seq, token)
            if seq.remote_decode and seq.num_output_tokens == 1:
                if not seq.is_finished:
                    self._finish(seq, FinishReason.REMOTE_DECODE)
                self.held[seq.request_id] = (seq, now)
                self.running.remove(seq)
                finished.append(seq)
            elif seq.is_finished:
                self.running.remove(seq)
                self.bm.free(seq)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason=None) -> None:
        """End a running request from outside (e.g. a stop string the detokenizer saw)."""
        if seq.is_finished:
            return
        self._finish(seq, reason, stop_reason)
        if seq.remote_decode and seq.num_output_tokens == 1:
            return  # it is (or is about to be) held for its decode worker
        if seq in self.running:
            self.running.remove(seq)
        self.bm.free(seq)

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        p = seq.params
        n_out = seq.num_output_tokens
        if p.max_tokens is not None and n_out >= p.max_tokens:
            self._finish(seq, FinishReason.LENGTH)
        elif seq.num_tokens >= self.config.max_model_len:
            self._finish(seq, FinishReason.LENGTH)
        elif n_out >= p.min_tokens:
            if token in seq.eos_token_ids and not p.ignore_eos:
                self._finish(seq, FinishReason.STOP)
            elif token in p.stop_token_ids:
                self._finish(seq, FinishReason.STOP, token)

    @staticmethod
    def _finish(seq: Sequence, reason: FinishReason, stop_reason=None) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
