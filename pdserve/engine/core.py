"""The pure part of one engine step, which the engine and the simulator both run: take what
the KV connector finished, expire holds, schedule, start loads; after the model, account the
tokens. No clock of its own (times are passed in), no I/O; the connector is optional (the
simulator and a hand-driven engine move KV themselves: `out.kv_loads`).

`StepShape` is a scheduled batch in the performance model's terms (pdserve.sim.perf): what
the step trace records and what the simulator prices.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from pdserve.engine.request import Sequence
from pdserve.engine.scheduler import Scheduler, SchedulerOutput, num_remote_tokens


@dataclass(slots=True)
class StepShape:
    prefill_tokens: int = 0
    pairs: int = 0            # attention (query, key) pairs of the prefill chunks
    prefill_kv: int = 0       # KV the prefill chunks read
    decode_seqs: int = 0
    decode_ctx: int = 0       # total context of the decoding rows
    decode_max_ctx: int = 0
    sampled: int = 0          # rows that sample a token (a prompt's last chunk, every decode)

    @classmethod
    def of(cls, seqs, num_new_tokens) -> "StepShape":
        """A row of one new token takes the model runner's decode path, any other is a prefill chunk."""
        pt = pairs = pkv = nd = dctx = dmax = ns = 0
        for s, n in zip(seqs, num_new_tokens):
            c = s.num_computed_tokens
            if n == 1:
                nd += 1
                dctx += c + 1
                if c >= dmax:
                    dmax = c + 1
            else:
                pt += n
                pairs += n * c + n * (n + 1) // 2
                pkv += c + n
            ns += c + n >= s.num_tokens
        return cls(pt, pairs, pkv, nd, dctx, dmax, ns)

    def flops(self, model) -> float:
        """Matmul FLOPs of the batch for a ModelShape (what the performance model prices)."""
        return model.step_flops(self.prefill_tokens + self.decode_seqs, self.pairs + self.decode_ctx, self.sampled)

    def to_dict(self) -> dict:
        return asdict(self)


class EngineCore:
    def __init__(self, scheduler: Scheduler, connector=None):
        self.scheduler = scheduler
        self._pins: dict[str, list[int]] = {}   # loads in flight: the blocks they write, pinned
        self.connector = connector

    @property
    def connector(self):
        """kv/base.py's interface, set by a KV connector; it answers the scheduler's question of
        how many tokens a request loads from elsewhere."""
        return self._connector

    @connector.setter
    def connector(self, c) -> None:
        self._connector = c
        self.scheduler.get_num_new_matched_tokens = c.get_num_new_matched_tokens if c is not None else num_remote_tokens

    # ---- requests -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if self.connector is not None and seq.kv_params is not None:
            self.connector.add_request(seq)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> Sequence | None:
        held = request_id in self.scheduler.held
        seq = self.scheduler.abort(request_id)
        if seq is not None and self.connector is not None:
            if held:
                self.connector.request_freed(request_id)
            elif seq.kv_params is not None:
                self.connector.request_aborted(seq)
        return seq

    def release(self, request_id: str) -> Sequence | None:
        """Prefill side: the decode worker has the KV (or gave up); free the held blocks."""
        seq = self.scheduler.release(request_id)
        if seq is not None and self.connector is not None:
            self.connector.request_freed(request_id)
        return seq

    # ---- one step -------------------------------------------------------------------------
    def take_finished(self, now: float) -> list[tuple[str, bool, str | None]]:
        """Apply what the connector finished: holds the decode side is done with are freed,
        renewed leases restart; returns the loads that ended (request, ok, error), their
        blocks unpinned, for the caller to finish (scheduler.finish_kv_load, or an error)."""
        if self.connector is None:
            return []
        ev = self.connector.get_finished()
        for rid in ev.sent:
            self.release(rid)
        for rid in ev.renewed:
            self.scheduler.renew_held(rid, now)
        for rid, _, _ in ev.loaded:
            self.scheduler.bm.unpin(self._pins.pop(rid, []))
        return ev.loaded

    def schedule(self, now: float, lease: float) -> SchedulerOutput:
        """Expire holds whose lease ran out, schedule, and start the loads of newly admitted
        remote-prefill requests (with no connector they stay in out.kv_loads for the caller)."""
        c = self.connector
        if self.scheduler.held and lease != float("inf"):
            self.scheduler.expire_held(now, lease, c.keep_held if c is not None else None)
        out = self.scheduler.schedule()
        if c is not None:
            for seq in out.kv_loads:
                dst = c.update_state_after_alloc(seq)
                self.scheduler.bm.pin(dst)
                self._pins[seq.request_id] = dst
        return out

    def update(self, out: SchedulerOutput, sampled: list[int | None], now: float) -> list[Sequence]:
        return self.scheduler.update(out, sampled, now)
