"""`pdserve serve -tp 2`: a worker whose model is split over two rank processes answers through
the openai client exactly as a one-rank worker does, and a rank that dies takes the worker down
cleanly, also with streams in flight: each ends answered or with an OpenAI error, none hangs;
the server exits non-zero for its supervisor and no rank process outlives it. A rank that is
frozen (SIGSTOP) instead fails the step within --tp-step-timeout, with the same ends."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import openai
import psutil
import pytest

from pdserve import procs
from helpers import wait_for
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

    def __init__(self, url: str, n: int, max_tokens: int = 200):
        self.url, self.max_tokens, self.first = url, max_tokens, threading.Semaphore(0)
        self.outcomes: Counter = Counter()
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _one(self):
        c = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)
        got = False
        try:
            finish = None
            for ch in c.completions.create(model=c.models.list().data[0].id, prompt=PROMPTS[0],
                                           max_tokens=self.max_tokens, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
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


def test_a_frozen_rank_under_load_fails_the_step_within_the_step_timeout(default_model_dir, tmp_path):
    """SIGSTOP, not SIGKILL: the rank is alive, so only the in-step collective's own timeout
    (--tp-step-timeout, 5 s here; JOIN_TIMEOUT_S would be 600) can end the wait."""
    model = make_tiny_model(tmp_path / "model", default_model_dir)
    port = procs.free_port()
    proc = procs.start(procs.pdserve_command("serve", model, "--port", port, "--device", "cpu", "-tp", 2,
                                             "--kv-cache-memory", "16MiB", "--max-model-len", "2048",
                                             "--tp-step-timeout", 5),
                       tmp_path / "tp2.log", env={"OMP_NUM_THREADS": "1"})
    ranks = []
    try:
        url = f"http://127.0.0.1:{port}"
        procs.wait_healthy(url, proc, timeout=300)
        ranks = ranks_of(proc.pid)
        load = Streams(url, 6, max_tokens=1500)   # long answers: still in flight when the rank freezes
        for _ in load.threads:
            load.first.acquire(timeout=300)
        ranks[0].send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        for t in load.threads:
            t.join(timeout=120)
        ended = time.monotonic() - frozen
        rc = proc.wait(timeout=120)
        print(f"\nSIGSTOP of TP rank 1 with 6 streams in flight: {dict(load.outcomes)}; the streams ended "
              f"{ended:.1f} s and the worker exited {time.monotonic() - frozen:.1f} s after the freeze")
        assert not any(t.is_alive() for t in load.threads) and load.outcomes["hung"] == 0, load.outcomes
        assert load.outcomes["failed"] >= 1 and sum(load.outcomes.values()) == 6, load.outcomes
        assert rc != 0, procs.log_tail(proc)
        assert re.search(r"tensor-parallel (all-reduce|step broadcast) failed on rank 0: .*Timed out",
                         procs.log_tail(proc, 20000)), procs.log_tail(proc)
        gone, alive = psutil.wait_procs(ranks, timeout=30)   # killed, although stopped
        assert not alive
    finally:
        for r in ranks:
            try:
                r.send_signal(signal.SIGCONT)
                r.kill()
            except psutil.NoSuchProcess:
                pass
        procs.stop(proc)


def test_the_wait_for_a_step_has_no_limit_and_an_in_step_all_reduce_has_the_step_timeout():
    """The two groups of tp_ranks._init_group (tests/tp_group_probe.py): rank 1 idles past the
    step timeout and still takes the next step; frozen within a step, it fails rank 0's
    all-reduce (RankLostError) after the step timeout, not JOIN_TIMEOUT_S."""
    port, probe = procs.free_port(), str(Path(__file__).with_name("tp_group_probe.py"))
    ranks = [subprocess.Popen([sys.executable, probe, str(r), str(port), "2"], stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        out, _ = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 0, out
        assert "step 1: 2.0" in out, out
        assert re.search(r"step 2: tensor-parallel all-reduce failed on rank 0: .*Timed out waiting 2000ms", out), out
        # frozen, not failed: its wait for step 1, twice the step timeout, did not time out
        wait_for(lambda: psutil.Process(ranks[1].pid).status() == psutil.STATUS_STOPPED, what="rank 1 frozen")
    finally:
        for p in ranks:
            p.kill()
            p.wait()
