"""AsyncEngine: the step loop in a background thread, each request streamed to asyncio.

Every change to engine state (add, abort, release) is queued as a command and applied by the
loop thread between steps, so the engine itself never needs a lock; what a KV connector
finished the engine takes at its next step, and `wake` makes an idle loop take one.
Validation (tokenizing, limits) runs in the caller's thread so a bad request fails at once.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import SamplingParams, Sequence

log = logging.getLogger("pdserve.engine")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pdserve-engine", daemon=True)
        self.dead: BaseException | None = None
        self.step_hooks: list[Callable[[], None]] = []  # run in the loop thread before each step
        # called (on the loop thread) if the loop itself dies: a server exits so its supervisor
        # sees it, rather than answering 503 forever
        self.on_dead: Callable[[BaseException], None] | None = None

    def start(self) -> "AsyncEngine":
        """Start the loop thread: from now on it runs the engine's torch work, so the calling
        thread (which loaded the model) lets its OpenMP workers go (cpu_threads)."""
        self._thread.start()
        if self.engine.runner.device.type == "cpu":
            from pdserve.cpu_threads import release_openmp_threads
            release_openmp_threads()
        if self.engine.ranks is not None:   # a tensor-parallel rank lost: the loop must end
            self.engine.ranks.watch(lambda e: self._cmds.put(("fatal", e)))
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._cmds.put(("noop",))
        self._thread.join(timeout=10)

    def wake(self) -> None:
        """Any thread: step soon (a KV connector has something finished to report)."""
        self._cmds.put(("noop",))

    def call(self, fn: Callable[[LLMEngine], None]) -> None:
        """Run fn(engine) on the loop thread between steps."""
        self._cmds.put(("call", fn))

    # ---- requests -----------------------------------------------------------------------
    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       **kwargs) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; raises RequestError at once for bad input. Leaving the
        iteration early (client gone, task cancelled) aborts the request and frees its blocks."""
        if self.dead is not None:
            raise EngineDeadError(f"engine loop died: {self.dead!r}")
        seq, text = self.engine.make_sequence(prompt, params, request_id, **kwargs)
        async for out in self.submit(seq, text):
            yield out

    async def submit(self, seq: Sequence, text: str | None = None) -> AsyncIterator[RequestOutput]:
        rid = seq.request_id
        if rid in self._streams:
            from pdserve.errors import RequestError
            raise RequestError(f"request id {rid!r} is already in use", "request_id")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._cmds.put(("add", seq, text))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._cmds.put(("call", lambda e: e.abort(request_id)))

    def release(self, request_id: str) -> None:
        self._cmds.put(("call", lambda e: e.release(request_id)))

    # ---- loop thread --------------------------------------------------------------------
    def _apply(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, seq, text = cmd
            try:
                self.engine.add_sequence(seq, text)
            except Exception as e:
                self._deliver(seq.request_id, e)
        elif kind == "fatal":   # the loop's death, on purpose (its handler reports it)
            raise cmd[1]
        elif kind == "call":
            try:
                cmd[1](self.engine)
            except Exception:   # an abort or a connector callback that failed: not the loop's death
                log.exception("engine command failed")

    def _deliver(self, rid: str, item) -> None:
        entry = self._streams.get(rid)
        if entry is not None:
            loop, q = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _deliver_step(self, outs: list[RequestOutput]) -> None:
        """A step's outputs, one wake-up per event loop (a call_soon_threadsafe per request and step
        woke the loop 64 times a step with 64 requests running)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                if not eng.has_unfinished():  # idle: sleep until a command (or a held block's expiry)
                    try:
                        self._apply(self._cmds.get(timeout=0.5 if eng.scheduler.held else None))
                    except queue.Empty:
                        pass
                self._drain()
                for hook in self.step_hooks:
                    try:
                        hook()
                    except Exception:
                        log.exception("engine step hook failed")
                self._deliver_step(eng.step())
                if eng.has_unfinished() and not eng.scheduler.has_work():
                    try:  # only requests waiting for their KV: wait for a command, do not spin
                        self._apply(self._cmds.get(timeout=0.005))
                    except queue.Empty:
                        pass
        except BaseException as e:  # surface the failure to every waiting request
            log.exception("engine loop died")
            self.dead = e
            if self.on_dead is not None and not self._stop.is_set():
                self.on_dead(e)
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine loop died: {e!r}"))

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            self._apply(cmd)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
