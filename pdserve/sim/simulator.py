"""Event-driven cluster simulation with a virtual clock.

Each instance runs pdserve's own Scheduler and BlockManager; routing uses pdserve's router
policies. The clock jumps from event to event: a request arrives, an instance's step ends
(its length from the performance model), or a KV hand-off lands on a decode instance.

Disaggregated flow, as the real router does it: on arrival a decode instance D is chosen, then
a prefill instance P, or D itself as the router's placement decides (router/placement.py).
P prefills with `remote_decode`, so the scheduler holds the blocks after the first token. Only
then is the request added to D with `remote_first_token`; D's scheduler allocates its blocks
(reusing its own prefix cache) and the missing KV crosses the link in
`link_latency + bytes / link_bw`, transfers into one D queued on its link. D then decodes.

As in the real workers, P exports a finished prefill (the router gets its first token and KV
params) as soon as the step that computed it ends, and authorises D's pull at once, whatever
step P runs meanwhile (the KV connector learns of held blocks on the engine thread and needs no
step boundary). A profile with `pd_overhead` (`pdserve profile --pd-calibration`) adds the
measured fixed costs of the path: `prefill_s` before the first token reaches the client (and the
router can call D), `handoff_s` as the hand-off's floor latency.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from pdserve.engine.core import EngineCore, StepShape
from pdserve.engine.request import FinishReason, SamplingParams, Sequence
from pdserve.router.placement import cached_tokens, local_prefill_reason
from pdserve.router.policies import make_policy
from pdserve.sim.cluster_config import ClusterConfig
from pdserve.config import EngineConfig
from pdserve.sim.instance import SimInstance
from pdserve.sim.perf import load_profile
from pdserve.sim.trace import Session

log = logging.getLogger("pdserve.sim")

TOKEN = -1            # what every simulated step "samples": never EOS, never a prompt id
NO_LEASE = float("inf")   # a held prefill waits for its decode instance's pull, however long
ARRIVAL, STEP_DONE, KV_DONE, HANDOFF = 0, 1, 2, 3


@dataclass(slots=True)
class SimRecord:
    request_id: str
    session: Session
    index: int                       # sub-request index in its session
    input_toks: int
    output_toks: int
    arrival: float
    prefill_instance: str = ""
    decode_instance: str = ""
    first_scheduled: float = -1.0
    token_times: list = field(default_factory=list)
    kv_bytes: int = 0
    kv_start: float = -1.0
    kv_done: float = -1.0
    end: float = -1.0
    error: str = ""

    @property
    def instance(self) -> str:
        return self.decode_instance or self.prefill_instance


@dataclass
class SimOptions:
    routing: str = "round_robin"
    local_prefill_max_tokens: int = 0   # as the router's flag: 0 = always prefill remotely
    log_interval: float = 0.0           # seconds of simulated time between log lines; 0: none


class ClusterSim:
    def __init__(self, cluster: ClusterConfig, engine: EngineConfig | None = None,
                 options: SimOptions | None = None, profile: dict | None = None,
                 on_log: Callable[[str], None] | None = None):
        self.cluster = cluster
        self.opts = options or SimOptions()
        engine = engine or EngineConfig()
        # an instance's own profile (cluster config) wins over the run-wide one; each file read once
        own = {s.profile: load_profile(s.profile) for s in cluster.instances if s.profile}
        self.instances = [SimInstance(s, engine, own.get(s.profile, profile)) for s in cluster.instances]
        self.by_name = {i.name: i for i in self.instances}
        # the engine's own step core on each instance; the KV moves over the simulated link
        self.cores = {i.name: EngineCore(i.sched) for i in self.instances}
        self.prefill_pool = [i.name for i in self.instances if i.role == "prefill"]
        self.decode_pool = [i.name for i in self.instances if i.role in ("decode", "both")]
        self.policy_p = make_policy(self.opts.routing)
        self.policy_d = make_policy(self.opts.routing)
        self.inflight = {i.name: 0 for i in self.instances}   # the router's view of load
        self.on_log = on_log or (lambda line: print(line, flush=True))
        self.events: list = []
        self._seq = itertools.count()
        self._rid = itertools.count()
        self._base = 0                    # next unused synthetic token id
        self._params: dict[int, SamplingParams] = {}
        self.records: dict[str, SimRecord] = {}
        self.now = 0.0
        self.mem_history: list[tuple[float, list[float]]] = []   # (time, bytes used per instance)
        self._log_state = (0, 0, 0)
        # measured P->D path costs (seconds) beyond the engine steps, when the profile has them
        pd = (profile or {}).get("pd_overhead") or {}
        self.prefill_extra = pd.get("prefill_s", 0.0)
        self.handoff_latency = max(cluster.link_latency, pd.get("handoff_s", 0.0))

    # ---- events -------------------------------------------------------------------------
    def _push(self, t: float, kind: int, a, b=None) -> None:
        heapq.heappush(self.events, (t, next(self._seq), kind, a, b))

    def run(self, sessions: list[Session], on_finish: Callable[[SimRecord], None] | None = None,
            progress: Callable[[int], None] | None = None) -> float:
        """Simulate until every request has finished. Sets wall_s and cpu_s (this process's CPU
        time, the fairer speed figure on a shared machine); returns wall_s."""
        self.on_finish = on_finish or (lambda rec: None)
        self.progress = progress
        wall, cpu = time.perf_counter(), time.process_time()
        for s in sessions:
            self._push(s.arrival, ARRIVAL, s, 0)
        interval = self.opts.log_interval
        next_log = interval if interval > 0 else float("inf")
        events, pop = self.events, heapq.heappop
        while events:
            t, _, kind, a, b = pop(events)
            if t >= next_log:
                next_log = self._log_until(t, next_log, interval)
            self.now = t
            if kind == STEP_DONE:
                self._step_done(a, t)
            elif kind == ARRIVAL:
                self._arrive(a, b, t)
            elif kind == HANDOFF:
                self._to_decode(a, b, t)
            else:
                self._kv_done(a, b, t)
        if interval > 0:
            self._log_until(self.now + interval, next_log, interval)
        self.cpu_s = time.process_time() - cpu
        self.wall_s = time.perf_counter() - wall
        return self.wall_s

    # ---- arrivals and routing -----------------------------------------------------------
    def _prompt(self, s: Session, k: int) -> list[int]:
        r = s.requests[k]
        if r.input_tok_ids is not None:
            return list(r.input_tok_ids)
        # no ids in the trace: distinct ids per request; the calls of one session share theirs,
        # so a later call's prompt starts with an earlier call's prompt (as a conversation does)
        if k == 0:
            s.extra["base"] = self._base
            self._base += max(q.input_toks for q in s.requests)
        base = s.extra.get("base", 0)
        return list(range(base, base + r.input_toks))

    def _arrive(self, s: Session, k: int, t: float) -> None:
        r = s.requests[k]
        rid = f"r{next(self._rid)}"
        rec = SimRecord(rid, s, k, r.input_toks, r.output_toks, t)
        ids = self._prompt(s, k)
        params = self._params.get(r.output_toks)
        if params is None:
            params = self._params[r.output_toks] = SamplingParams(max_tokens=r.output_toks, ignore_eos=True)
        key = ids
        choice = self.policy_d.select(self.decode_pool, key, self.inflight)
        d = choice.instance
        dinst = self.by_name[d]
        if r.input_toks + r.output_toks > dinst.max_model_len:
            rec.error = f"input + output tokens exceed max_model_len={dinst.max_model_len}"
            return self._finish(rec, t)
        if dinst.bm.blocks_for(r.input_toks + r.output_toks) > dinst.bm.num_blocks:
            rec.error = f"input + output tokens exceed the KV cache of {d}"
            return self._finish(rec, t)
        remote = local_prefill_reason(r.output_toks, bool(self.prefill_pool), r.input_toks,  # as the router
                                      cached_tokens(key, choice.matched), self.opts.local_prefill_max_tokens) is None
        self.policy_d.record(d, key)
        self.records[rid] = rec
        self.inflight[d] += 1
        seq = Sequence(rid, ids, params, arrival_time=t)
        if remote:
            p = self.policy_p.select(self.prefill_pool, key, self.inflight).instance
            self.policy_p.record(p, key)
            self.inflight[p] += 1
            rec.prefill_instance, rec.decode_instance = p, d
            seq.remote_decode = True
            target = self.by_name[p]
        else:
            rec.prefill_instance = d
            if self.prefill_pool:
                rec.decode_instance = d
            target = dinst
        target.sched.add(seq)
        if not target.busy:
            self._kick(target, t)

    # ---- one instance step ----------------------------------------------------------------
    def _kick(self, inst: SimInstance, t: float) -> None:
        """Start inst's next step at time t if it has anything to run."""
        out = self.cores[inst.name].schedule(t, NO_LEASE)
        for seq in out.kv_loads:
            self._start_kv(inst, seq, t)
        if out.is_empty:
            inst.busy = False
            self._drop_unservable(inst, t)
            return
        shape = StepShape.of(out.seqs, out.num_new_tokens)
        np_, producers, records = 0, [], self.records
        for seq, n in zip(out.seqs, out.num_new_tokens):
            if n != 1:   # a prefill chunk: queuing ends when the first chunk is scheduled
                np_ += 1
                rec = records[seq.request_id]
                if rec.first_scheduled < 0:
                    rec.first_scheduled = t
            if seq.num_computed_tokens + n >= len(seq.token_ids):
                producers.append(seq)
        dt = inst.step_time(shape.prefill_tokens, shape.pairs, shape.prefill_kv, shape.decode_seqs,
                            shape.decode_ctx, shape.sampled)
        inst.out, inst.producers, inst.busy, inst.step_start = out, producers, True, t
        inst.prompt_tokens += shape.prefill_tokens
        inst.gen_tokens += len(producers)
        inst.last_p, inst.last_d = np_, shape.decode_seqs
        inst.num_steps += 1
        inst.busy_time += dt
        self._push(t + dt, STEP_DONE, inst)

    def _step_done(self, inst: SimInstance, t: float) -> None:
        out = inst.out
        finished = self.cores[inst.name].update(out, [TOKEN] * len(out.seqs), t)
        records = self.records
        for seq in inst.producers:
            rec = records[seq.request_id]
            times = rec.token_times
            if not times and rec.first_scheduled < 0:
                rec.first_scheduled = inst.step_start  # a one-token prefill (fully cached prompt)
            times.append(t)
        for seq in finished:
            rec = records[seq.request_id]
            if seq.request_id in inst.sched.held:
                self._prefilled(inst, seq, rec, t)
            else:
                self._complete(inst, rec, t)
        self._kick(inst, t)

    def _drop_unservable(self, inst: SimInstance, t: float) -> None:
        """An idle instance fails a waiting request that could not fit even in its whole KV cache
        (a real worker would reject it); anything smaller waits for blocks to come free."""
        s, bm = inst.sched, inst.bm
        while s.waiting and not s.running and not s.loading:
            seq = s.waiting[0]
            if bm.blocks_for(seq.num_tokens + 1) <= bm.num_blocks:
                return
            s.waiting.popleft()
            rec = self.records.pop(seq.request_id)
            rec.error = f"needs {bm.blocks_for(seq.num_tokens + 1)} KV blocks, {inst.name} has {bm.num_blocks}"
            self.inflight[inst.name] -= 1
            if rec.decode_instance and rec.decode_instance != inst.name:
                self.inflight[rec.decode_instance] -= 1
            self._finish(rec, t)

    # ---- the hand-off -----------------------------------------------------------------------
    def _prefilled(self, p: SimInstance, seq: Sequence, rec: SimRecord, t: float) -> None:
        """P exported the first token and the held KV: the router gets the first token after the
        measured path cost, then sends the request on to its decode instance."""
        self.inflight[p.name] -= 1
        t += self.prefill_extra
        rec.token_times[0] = t   # the client sees the first token when the router relays it
        if rec.output_toks == 1 or seq.finish_reason != FinishReason.REMOTE_DECODE:
            self.cores[p.name].release(seq.request_id)   # nothing left to decode
            self.inflight[rec.decode_instance] -= 1
            return self._finish(rec, t)
        dseq = Sequence(seq.request_id, seq.prompt_token_ids, seq.params, arrival_time=rec.arrival,
                        remote_first_token=seq.token_ids[-1])
        if self.prefill_extra > 0:
            self._push(t, HANDOFF, self.by_name[rec.decode_instance], dseq)
        else:
            self._to_decode(self.by_name[rec.decode_instance], dseq, t)

    def _to_decode(self, d: SimInstance, dseq: Sequence, t: float) -> None:
        d.sched.add(dseq)
        if not d.busy:
            self._kick(d, t)

    def _start_kv(self, d: SimInstance, seq: Sequence, t: float) -> None:
        rec = self.records[seq.request_id]
        rec.kv_bytes = (seq.num_prompt_tokens - seq.num_cached_tokens) * d.kv_bytes_per_token
        start = max(t, d.link_free)
        busy = rec.kv_bytes / self.cluster.link_bw
        d.link_free = start + busy
        rec.kv_start = start
        self._push(start + busy + self.handoff_latency, KV_DONE, d, seq.request_id)

    def _kv_done(self, d: SimInstance, rid: str, t: float) -> None:
        rec = self.records[rid]
        rec.kv_done = t
        d.sched.finish_kv_load(rid, True)
        p = self.by_name[rec.prefill_instance]
        self.cores[p.name].release(rid)   # P frees the held blocks: requests waiting for them may start
        if not d.busy:
            self._kick(d, t)
        if not p.busy:
            self._kick(p, t)

    # ---- completion ---------------------------------------------------------------------------
    def _complete(self, inst: SimInstance, rec: SimRecord, t: float) -> None:
        self.inflight[inst.name] -= 1
        del self.records[rec.request_id]
        self._finish(rec, t)

    def _finish(self, rec: SimRecord, t: float) -> None:
        self.records.pop(rec.request_id, None)
        rec.end = t
        self.on_finish(rec)
        if self.progress:
            self.progress(1)
        s, k = rec.session, rec.index + 1
        if k < len(s.requests):
            self._push(t + s.requests[rec.index].tool_duration, ARRIVAL, s, k)

    # ---- periodic log (seed 003's lines) --------------------------------------------------
    def _log_until(self, t: float, next_log: float, interval: float) -> float:
        while next_log <= t:
            self._log_line(next_log, interval)
            next_log += interval
            if not any(i.busy for i in self.instances) and next_log <= t:
                next_log += (t - next_log) // interval * interval   # skip idle stretches
        return next_log

    def _log_line(self, at: float, interval: float) -> None:
        insts = self.instances
        step, prev_p, prev_g = self._log_state
        p_tok = sum(i.prompt_tokens for i in insts)
        g_tok = sum(i.gen_tokens for i in insts)
        step += 1
        mem = [i.mem_used for i in insts]
        self.mem_history.append((at, mem))
        n_p = sum(i.last_p for i in insts if i.busy)
        n_d = sum(i.last_d for i in insts if i.busy)
        self._log_state = (step, p_tok, g_tok)
        self.on_log(f"[INFO] step={step} P={n_p} D={n_d} "
                    f"prompt_t={_k((p_tok - prev_p) / interval)} tok/s decode_t={_k((g_tok - prev_g) / interval)} tok/s "
                    f"npu_mem=[{', '.join(f'{m / 1e9:.1f} GB' for m in mem)}] t={at:.1f}s")


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"
