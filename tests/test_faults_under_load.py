"""Faults under load: a 1 prefill + 1 decode deployment started by `pdserve up`'s own code
(pdserve.launch.cluster.Cluster, supervised by pdserve.launch.supervise.Supervisor as `pdserve up`
does), every request prefilled remotely, ~30 streams in flight when a worker is SIGKILLed or
SIGSTOPped (then SIGCONTed). Each request ends one of three ways:

- right: the greedy text a colocated run gives (the decode worker prefilling itself, asked
  directly), with finish_reason and completion_tokens as that run's;
- failed clearly: an OpenAI-shaped error (an HTTP error body or an SSE error event);
- hung: anything else: the client's read timeout fired, the stream was cut, the connection broke.

The read timeout is not a guess at how fast the machine is: it is the longest any single read
may wait given the configured timeouts (the router's upstream read timeout, the KV pull
deadline, health detection). Hung must be 0, every failure clear, the worker back and serving,
no KV held at the end, no process left over.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections import Counter

import httpx
import openai
import pytest

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.launch.cluster import Cluster, add_arguments
from pdserve.launch.config import load_deployment
from pdserve.launch.supervise import Supervisor
from helpers import MODEL, complete_counted

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

KEY = "faults-under-load-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAMS = int(os.environ.get("PDSERVE_FAULT_STREAMS", "30"))   # clients, each one request after another
HEALTH_INTERVAL = 1.0
HEALTH_TIMEOUT = min(5.0, max(1.0, HEALTH_INTERVAL))   # what the router's health loop allows one check
ROUTER_TIMEOUT = 60.0                                  # the router's --request-timeout (upstream read)
PULL_TIMEOUT = KVTransferConfig.kv_pull_timeout        # a whole KV pull, then the load-failure policy
LEASE = EngineConfig.kv_lease_duration                 # held KV whose decoder stopped renewing is freed
DETECT = 2 * (HEALTH_INTERVAL + HEALTH_TIMEOUT)        # a wedged worker is marked down within this
# The longest a client may wait for any one read: a decode worker's first byte after a prefill
# worker that froze (detected, or a pull that runs to its deadline and is recomputed), or the
# router's own upstream read timeout, whichever is longer. Past it, a request is hung.
READ_BOUND = ROUTER_TIMEOUT + PULL_TIMEOUT + DETECT
FREEZE_S = 8.0                                         # SIGSTOP, then SIGCONT this much later
MAX_TOKENS = (8, 16, 32, 48)
PROMPTS = ["The capital of France is", "Write one sentence about the sea.", "List three colours:",
           "Prefill and decode are the two phases of serving a language model. " * 5 + "Explain why they differ.",
           "Once upon a time, in a small village by a river, there lived an old baker who"]
CONFIG = f"""
port: 0
api_key: {KEY}
health_interval: {HEALTH_INTERVAL}
max_restarts: 10
router_args: ["--request-timeout", "{ROUTER_TIMEOUT:g}"]
engine: {{kv_cache_memory: 128MiB, max_num_batched_tokens: 512}}
prefill: {{count: 1}}
decode: {{count: 1}}
"""


class Supervised:
    """The cluster with `pdserve up`'s supervisor checking it twice a second, as `pdserve up` does."""

    def __init__(self, c: Cluster):
        self.c, self.lines = c, []
        self.sup = Supervisor(c, c.dep.max_restarts, say=self.lines.append)
        self.pids: set[int] = {w.proc.pid for w in c.workers} | {c.router.pid}   # every one ever started
        self._stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self._stop.is_set():
            with self.lock:
                self.sup.check()
                self.pids |= {w.proc.pid for w in self.c.workers} | {self.c.router.pid}
            self._stop.wait(0.5)

    def stop(self):
        self._stop.set()
        self.thread.join(10)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults_load")
    (tmp / "deploy.yaml").write_text(CONFIG)
    p = argparse.ArgumentParser()
    add_arguments(p)
    dep = load_deployment(p.parse_args(["--config", str(tmp / "deploy.yaml")]))
    c = Cluster(dep, str(tmp)).start(timeout=400)
    s = Supervised(c)
    try:
        s.refs = references(c)
        yield s
    finally:
        s.stop()
        c.stop()
    left = leftovers(s.pids)
    assert not left, f"processes left after stop: {left}"


def worker(s: Supervised, role: str):
    return next(w for w in s.c.workers if w.spec.role == role)


def references(c: Cluster) -> dict:
    """(prompt, max_tokens) -> (text, finish_reason, completion_tokens) of a colocated run: the
    decode worker asked directly prefills the prompt itself, no KV hand-off."""
    d = next(w for w in c.workers if w.spec.role == "decode")
    cl = openai.OpenAI(base_url=d.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    refs = {}
    for prompt in PROMPTS:
        for n in MAX_TOKENS:
            r = cl.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
            refs[(prompt, n)] = (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens)
    return refs


def session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[3])   # state, ppid, pgrp, session


def leftovers(started: set[int]) -> list[int]:
    """Live processes in the sessions of the workers and routers ever started (each is started
    in a session of its own: a leftover there is one of their children, or themselves)."""
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and session_of(int(p)) in started)


def current_sessions(s: Supervised) -> set[int]:
    return {w.proc.pid for w in s.c.workers} | {s.c.router.pid}


def status(s: Supervised) -> dict:
    return httpx.get(s.c.router_url + "/status", headers=AUTH, timeout=10).json()


def healthy(s: Supervised, url: str) -> bool:
    st = status(s)
    return any(i["url"] == url and i["healthy"] for i in st["prefill_instances"] + st["decode_instances"])


def kv_usage(url: str) -> float:
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("pdserve:kv_cache_usage_perc"))


def wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


class Load:
    """STREAMS clients through the router, each sending one request after another (4 in 5
    streamed, a mix of prompts and lengths) until stop(); every outcome classified."""

    def __init__(self, s: Supervised):
        self.s, self.refs = s, s.refs
        self.outcomes: Counter = Counter()
        self.errors: list[str] = []      # the clear errors' messages
        self.unclear: list[str] = []     # what made a request hung
        self.mid_stream = 0              # streams that have their first token and not their last
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(STREAMS)]
        for t in self.threads:
            t.start()

    def _count(self, outcome: str, note: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome == "failed":
                self.errors.append(note)
            elif outcome in ("hung", "wrong"):
                self.unclear.append(note)

    def _client(self, i: int) -> None:
        cl = openai.OpenAI(base_url=self.s.c.router_url + "/v1", api_key=KEY, max_retries=0,
                           timeout=httpx.Timeout(READ_BOUND, connect=10.0))
        k = 0
        while not self._stop.is_set():
            prompt, n = PROMPTS[(i + k) % len(PROMPTS)], MAX_TOKENS[(i // 2 + k) % len(MAX_TOKENS)]
            ok = self._one(cl, prompt, n, stream=(i + k) % 5 != 0)
            k += 1
            self._stop.wait(0.2 if ok else 1.0)   # an outage answers at once: keep the error rate countable

    def _one(self, cl: openai.OpenAI, prompt: str, n: int, stream: bool) -> bool:
        """One request, counted; whether it was answered."""
        want = self.refs[(prompt, n)]
        began = []   # a streamed choice arrived: the request counts as mid-stream until it ends

        def first():
            began.append(True)
            with self.lock:
                self.mid_stream += 1
        try:
            text, finish, tokens = complete_counted(cl, stream, first, model=MODEL, prompt=prompt,
                                                    max_tokens=n, temperature=0)
            if finish is None:
                self._count("hung", f"stream ended without a finish_reason after {text!r}")
            elif (text, finish, tokens) == want:
                self._count("right")
                return True
            else:
                self._count("wrong", f"{(text, finish, tokens)!r} != {want!r}")
        except openai.APITimeoutError as e:
            self._count("hung", f"no byte for {READ_BOUND:g} s: {e!r}")
        except openai.APIConnectionError as e:
            self._count("hung", f"connection broke without an error: {e!r}")
        except openai.APIError as e:   # an HTTP error with a body, or an SSE error event
            body = e.body if isinstance(e.body, dict) else {}
            err = body.get("error", body)   # the client hands over the `error` object itself for SSE events
            if isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]:
                self._count("failed", f"{getattr(e, 'status_code', 'sse')}: {err['message']}")
            else:
                self._count("hung", f"error without an OpenAI body: {e!r}")
        finally:
            if began:
                with self.lock:
                    self.mid_stream -= 1
        return False

    def stop(self) -> None:
        """Let every client finish its current request. A thread still running past the bound
        (its request's reads, then the stream's end) is a hung request."""
        self._stop.set()
        deadline = time.monotonic() + 3 * READ_BOUND
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in self.threads)
        if alive:
            self.outcomes["hung"] += alive
            self.unclear.append(f"{alive} client(s) still waiting {3 * READ_BOUND:g} s after the load stopped")


def run_fault(s: Supervised, role: str, sig: int) -> Counter:
    w = worker(s, role)
    old_pid = w.proc.pid
    restarts0 = s.sup.restarted.get(w.name, 0)
    load = Load(s)
    try:
        # faults land with streams in flight: wait until most clients are mid-stream
        assert wait_for(lambda: load.mid_stream >= STREAMS // 2, 300), f"load never reached {STREAMS // 2} streams"
        in_flight = load.mid_stream
        if sig == signal.SIGKILL:
            os.kill(old_pid, signal.SIGKILL)   # the process alone, as the OOM killer does
            assert wait_for(lambda: s.sup.restarted.get(w.name, 0) > restarts0, 60), s.lines
            assert w.proc.pid != old_pid
        else:
            w.proc.send(signal.SIGSTOP)
            time.sleep(FREEZE_S)
            w.proc.send(signal.SIGCONT)
        assert wait_for(lambda: healthy(s, w.url), 400), f"{w.name} not back in the router's pool: {s.lines}"
        # the worker back in the pool: the load runs a while longer against the recovered deployment
        served0 = load.outcomes["right"]
        assert wait_for(lambda: load.outcomes["right"] >= served0 + STREAMS, 300), "no requests served after recovery"
    finally:
        load.stop()
    out = Counter(load.outcomes)
    print(f"\n{signal.Signals(sig).name} {role}: {in_flight} streams in flight at the fault; "
          f"right {out['right']}, failed clearly {out['failed']}, hung {out['hung']}, wrong {out['wrong']}; "
          f"errors: {Counter(m[:100] for m in load.errors).most_common(4)}",
          flush=True)
    assert out["hung"] == 0, load.unclear[:5]
    assert out["wrong"] == 0, load.unclear[:5]
    assert out["right"] >= STREAMS
    # the worker serves again: a request now goes through the (restarted or thawed) worker
    before = {i["url"]: i["requests"] for i in status(s)["prefill_instances"] + status(s)["decode_instances"]}
    cl = openai.OpenAI(base_url=s.c.router_url + "/v1", api_key=KEY, max_retries=0, timeout=READ_BOUND)
    prompt, n = PROMPTS[0], MAX_TOKENS[0]
    r = cl.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == s.refs[(prompt, n)]
    after = {i["url"]: i["requests"] for i in status(s)["prefill_instances"] + status(s)["decode_instances"]}
    assert after[w.url] > before[w.url], f"{w.name} took no part in a request after recovery"
    assert status(s)["requests"]["remote_prefill"] > 0
    # no KV held anywhere once leases and pulls have run out
    for x in s.c.workers:
        assert wait_for(lambda: kv_usage(x.url) == 0.0, LEASE + PULL_TIMEOUT + DETECT), \
            f"{x.name} still holds KV: {kv_usage(x.url)}"
    # nothing left of a killed process: only the current ones' sessions have live processes
    with s.lock:
        stale = leftovers(s.pids - current_sessions(s))
    assert not stale, f"orphans of killed processes: {stale}"
    return out


@pytest.mark.parametrize("role,sig", [("prefill", signal.SIGKILL), ("decode", signal.SIGKILL),
                                      ("prefill", signal.SIGSTOP), ("decode", signal.SIGSTOP)],
                         ids=["sigkill-prefill", "sigkill-decode", "sigstop-prefill", "sigstop-decode"])
def test_fault_under_load(up, role, sig):
    out = run_fault(up, role, sig)
    if sig == signal.SIGKILL and role == "decode":
        assert out["failed"] > 0   # the streams it was decoding cannot be finished elsewhere: said so
