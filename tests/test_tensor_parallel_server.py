"""`pdserve serve -tp 2`: a worker whose model is split over two rank processes answers through
the openai client exactly as a one-rank worker does, and a rank that dies takes the worker down
cleanly, also with streams in flight: each ends answered or with an OpenAI error, none hangs;
the server exits non-zero for its supervisor and no rank process outlives it."""
from __future__ import annotations

import re
import signal
import threading
from collections import Counter

import openai
import psutil
import pytest

from pdserve import procs
from tiny_model import make_tiny_model

pytestmark = pytest.mark.slow
PROMPTS = ["Once upon a time", "The weather today is", "1, 2, 3,"]


def ranks_of(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children(recursive=True)
            if "pdserve.engine.tp_ranks" in " ".join(c.cmdline())]


@pytest.fixture(scope="module")
def workers(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    model = make_tiny_model(tmp / "model", default_model_dir)   # 2 heads, 1 KV head: replicated on 2 ranks
    out, started = {}, []
    try:
        for tp in (1, 2):
            port = procs.free_port()
            p = procs.start(procs.pdserve_command("serve", model, "--port", port, "--device", "cpu", "-tp", tp,
                                                  "--kv-cache-memory", "16MiB", "--max-model-len", "256"),
                            tmp / f"tp{tp}.log", env={"OMP_NUM_THREADS": "1"})
            started.append(p)
            procs.wait_healthy(f"http://127.0.0.1:{port}", p, timeout=300)
            out[tp] = (p, f"http://127.0.0.1:{port}")
        yield out
    finally:
        for p in started:
            procs.stop(p)


def complete(url: str) -> list[list[int]]:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    res = []
    for prompt in PROMPTS:
        r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=16, temperature=0,
                                 logprobs=1, extra_body={"ignore_eos": True})
        res.append(r.choices[0].logprobs.tokens)
    return res


def test_tp2_worker_answers_as_tp1(workers):
    assert len(ranks_of(workers[2][0].pid)) == 1 and not ranks_of(workers[1][0].pid)
    assert complete(workers[2][1]) == complete(workers[1][1])


class Streams:
    """n streamed requests in flight on one worker; each ends answered, failed with an OpenAI
    error (an SSE error event or an error body), or hung (a broken connection, no end)."""

    def __init__(self, url: str, n: int):
        self.url, self.first = url, threading.Semaphore(0)
        self.outcomes: Counter = Counter()
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _one(self):
        c = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)
        got = False
        try:
            finish = None
            for ch in c.completions.create(model=c.models.list().data[0].id, prompt=PROMPTS[0], max_tokens=200,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if not got:
                    got = True
                    self.first.release()
                finish = (ch.choices[0].finish_reason if ch.choices else None) or finish
            self.outcomes["answered" if finish else "hung"] += 1
        except openai.APIStatusError as e:
            self.outcomes["failed" if "message" in str(e.body) else "hung"] += 1
        except openai.APIError as e:   # an SSE error event has a message; a cut connection does not
            self.outcomes["failed" if getattr(e, "body", None) else "hung"] += 1
        finally:
            if not got:
                self.first.release()


def test_a_lost_rank_under_load_takes_its_worker_down_and_nothing_is_left(workers):
    proc, url = workers[2]
    ranks = ranks_of(proc.pid)
    load = Streams(url, 6)
    for _ in load.threads:   # every stream has its first token (or already ended)
        load.first.acquire(timeout=300)
    ranks[0].send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=120)   # the watcher notices within a second; the graceful stop has 30 s
    for t in load.threads:
        t.join(timeout=120)
    print(f"\nSIGKILL of TP rank 1 with 6 streams in flight: {dict(load.outcomes)}")
    assert not any(t.is_alive() for t in load.threads) and load.outcomes["hung"] == 0, load.outcomes
    assert sum(load.outcomes.values()) == 6
    assert rc != 0, procs.log_tail(proc)
    # the watcher ("tensor-parallel rank 1 ... exited") or a step's collective ("tensor-parallel
    # all-reduce failed") says why, whichever comes first
    assert re.search(r"tensor-parallel (rank 1 \(pid \d+\) exited|all-reduce failed|step broadcast failed)",
                     procs.log_tail(proc, 20000))
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive
