"""`pdserve serve -tp 2`: a worker whose model is split over two rank processes answers through
the openai client exactly as a one-rank worker does, and a rank that dies takes the worker down
cleanly (the server exits non-zero for its supervisor; no rank process outlives it)."""
from __future__ import annotations

import signal

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


def test_a_lost_rank_takes_its_worker_down_and_nothing_is_left(workers):
    proc, _ = workers[2]
    ranks = ranks_of(proc.pid)
    ranks[0].send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=120)   # the watcher notices within a second; the graceful stop has 30 s
    assert rc != 0, procs.log_tail(proc)
    assert "tensor-parallel rank 1" in procs.log_tail(proc, 20000)
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive
