"""A worker: one engine, its step loop, its KV connector and its metrics, started and
stopped together. The HTTP app (app.py) only talks to this object."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.cpu_threads import one_openmp_thread
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.kv.connector import KVConnector
from pdserve.kv.shm import ShmPoolAllocator
from pdserve.server.metrics import Metrics

log = logging.getLogger("pdserve.server")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    advertise_host: str | None = None   # host put in kv_transfer_params (default: the KV bind host)
    enable_auto_tool_choice: bool = False  # tool_choice "auto": parse tool calls out of the output
    tool_call_parser: str | None = None    # with which parser (server/tools.py: hermes, llama3_json)
    max_request_bytes: int | None = 8 << 20   # larger bodies get a 413
    metrics_no_auth: bool = False       # /metrics open without the API key (for a scraper)
    # chat_template in a request: refused unless trusted (as vLLM); even then rendered in a budgeted sandbox
    trust_request_chat_template: bool = False
    exit_on_engine_death: bool = False  # `pdserve serve`: a dead engine loop ends the process (non-zero)


@dataclass
class Worker:
    engine_config: EngineConfig
    kv_config: KVTransferConfig
    server_config: ServerConfig
    # called with the worker once it serves (e.g. `--register ROUTER_URL`, issue 4)
    on_ready: list[Callable[["Worker"], None]] = field(default_factory=list)

    def start(self) -> "Worker":
        ec, kc = self.engine_config, self.kv_config
        self.created = int(time.time())
        # a CPU pool that a prefill worker may hand out goes into shared memory, for `shm`
        wants_shm = ec.role in ("prefill", "both") and kc.kv_transport in ("auto", "shm")
        self.shm = ShmPoolAllocator() if wants_shm else None
        self.engine = LLMEngine(ec, kv_allocator=self.shm)
        self.model_name = self.engine.model_name
        # the grammar engine's token trie takes a second or two to build: not on the first
        # constrained request's path (it would stall the event loop), but beside startup
        threading.Thread(target=self.engine.grammars.warm_up, name="grammar-tokenizer", daemon=True).start()
        # tokenizing and chat templates: CPU work that must not hold up the event loop
        self.cpu_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pdserve-tokenize",
                                           initializer=one_openmp_thread)
        self.died: BaseException | None = None
        self.async_engine = AsyncEngine(self.engine)
        if self.server_config.exit_on_engine_death:
            self.async_engine.on_dead = self._engine_died
        self.async_engine.start()
        try:
            self.connector = KVConnector(self.engine, kc, self.server_config.host, self.shm,
                                         self.server_config.advertise_host, self.server_config.api_key,
                                         wake=self.async_engine.wake)
        except BaseException:
            self.stop()
            raise
        self.metrics = Metrics(self.engine, self.model_name)
        self.connector.on_event = self.metrics.on_kv_event
        return self

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    def _engine_died(self, e: BaseException) -> None:
        """The step loop is gone: a process that answers 503 forever hides that from its
        supervisor. Stop gracefully (SIGTERM to ourselves: shared memory unlinked, router
        pools left), exit non-zero; force the exit if the graceful path hangs."""
        log.critical("engine loop died (%r): stopping the worker", e)
        self.died = e
        os.kill(os.getpid(), signal.SIGTERM)
        t = threading.Timer(30.0, os._exit, (70,))
        t.daemon = True
        t.start()

    @property
    def role(self) -> str:
        return self.engine_config.role

    def info(self) -> dict:
        c = self.connector
        return {"role": self.role, "model": self.model_name, "engine_id": c.engine_id,
                "kv_host": c.host, "kv_port": c.port, "kv_transports": c.offers if c.produces else None,
                "block_size": c.spec.block_size,
                "dtype": c.spec.dtype, "max_model_len": self.engine.max_model_len}

    def ready(self) -> None:
        for hook in self.on_ready:
            try:
                hook(self)
            except Exception:
                log.exception("on_ready hook failed")

    def stop(self) -> None:
        """Idempotent: the app's shutdown and the command's exit path both call it."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        if getattr(self, "connector", None) is not None:
            self.connector.close()
        if getattr(self, "async_engine", None) is not None:
            self.async_engine.shutdown()
        if getattr(self, "engine", None) is not None and self.engine.ranks is not None:
            self.engine.ranks.stop()
        if getattr(self, "shm", None) is not None:
            self.shm.close()
        if getattr(self, "cpu_pool", None) is not None:
            self.cpu_pool.shutdown(wait=False, cancel_futures=True)
