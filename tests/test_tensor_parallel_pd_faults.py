"""A rank of a tensor-parallel prefill or decode worker SIGKILLed under load, under `pdserve up`
(P TP=2 -> D TP=2, a random-weight model with 4 KV heads, every prompt prefilled remotely,
a 5 s KV lease and a 5 s --tp-step-timeout). Eight clients, half streamed, each sends one
long prompt after another (each prompt new: a prefill really computes it, in chunks):

- (a) rank 1 of the prefill worker dies while prompts are being prefilled and handed off;
- (b) rank 1 of the decode worker dies while streams are decoding, and while the prefill
  worker holds KV that nobody will pull (as for a decode worker that dies before its pull).

Each request ends answered (as the recovered deployment answers its prompt again, greedy; a
token that differs must be a near-tie there, top two within 1e-4) or failed with an OpenAI
error; none hangs: past READ_BOUND (what the configured timeouts allow one read) a request
counts as hung. `pdserve up` reports the exit and restarts the worker with its ranks; then a
probe prompt is answered as before the fault; no rank outlives its worker (none whose parent
is gone); no worker holds KV blocks once the leases have run out; nothing of the deployment
is left once `up` stops. Counts and times are printed."""
from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import psutil
import pytest

from pdserve.bench.deploy import UpProcess
from pdserve.config import KVTransferConfig
from helpers import complete_counted, metric, wait_for
from tiny_model import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

LEASE = 5.0                                  # --kv-lease: held KV nobody renews is freed after this
STEP_TIMEOUT = 30.0                          # --tp-step-timeout, its default: only a bound here (no rank
# freezes); at 5 s a rank 0 starved beside two CPU hogs stalled past it mid-step and its rank 1 gave up
HEALTH_INTERVAL = 1.0
ROUTER_TIMEOUT = 60.0                        # the router's --request-timeout (upstream read)
PULL_TIMEOUT = KVTransferConfig.kv_pull_timeout
DETECT = 2 * (HEALTH_INTERVAL + min(5.0, max(1.0, HEALTH_INTERVAL)))   # a dead worker marked down within
# The longest one read of a client may wait: the router's upstream read, a KV pull to its
# deadline (then the prompt is recomputed), a step to its timeout, a dead worker detected.
READ_BOUND = ROUTER_TIMEOUT + PULL_TIMEOUT + STEP_TIMEOUT + DETECT
GUARD = 400.0                                # hang guard of the waits on the deployment itself
CLIENTS = 8                                  # even ones stream
NEAR_TIE = 1e-4
ENGINE = (f"--device cpu --kv-cache-memory 16MiB --max-model-len 2048 --max-num-batched-tokens 64 "
          f"--kv-lease {LEASE:g} --tp-step-timeout {STEP_TIMEOUT:g}")
CONFIG = f'health_interval: {HEALTH_INTERVAL}\nrouter_args: ["--request-timeout", "{ROUTER_TIMEOUT:g}"]\n'
PROBE = "The capital of France is"
WORDS = ("river stone cloud lantern harbor meadow copper window thunder orchard violin marble "
         "candle falcon garden silver winter compass ember forest").split()


def prompt(n: int) -> str:
    """The n-th request's prompt: ~650 tokens, its first block its own (no prefix cache hit)."""
    return f"Request {n}: " + " ".join(WORDS[(n * 7 + j * 3 + j // 20) % len(WORDS)] for j in range(300))


@pytest.fixture(scope="module")
def model(default_model_dir, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("kv4") / "m", default_model_dir, heads=8, kv_heads=4,
                           hidden=64, layers=2)


@pytest.fixture(scope="module")
def tokenizer(model):
    from pdserve.engine.tokenizer import load_tokenizer
    return load_tokenizer(model)


# ---- the deployment's processes ----------------------------------------------------------
class UpLog:
    """A running `pdserve up` and what its output says: the workers' URLs and pids, their
    exits and restarts; every worker and router session ever started."""

    def __init__(self, up: UpProcess):
        self.up = up
        # `up` prints its workers once it has seen the router up, maybe after a completion passed
        text = wait_for(lambda: re.search(r"^Ctrl\+C", self.log(), re.M) and self.log(), GUARD, what="up's workers")
        workers = re.findall(r"^\s+(prefill|decode)\s+(http://\S+)\s+pid (\d+)", text, re.M)
        self.url = {r: u for r, u, _ in workers}
        self.pid = {r: int(p) for r, _, p in workers}
        cpus = re.search(r"^pdserve up: cpus: .*$", text, re.M).group(0)   # "prefill0 0, decode1 1, router all"
        self.name = {r: re.search(rf"\b({r}\d+)\b", cpus).group(1) for r in self.pid}
        self.sessions = set(self.pid.values()) | {int(re.search(r"^\s+router\s+\S+\s+pid (\d+)", text, re.M).group(1))}
        up.children()

    def log(self) -> str:
        with open(self.up.log_path) as f:
            return f.read()

    def wait_line(self, pattern: str, after: int) -> re.Match:
        def found():
            self.up.children()   # remember every process, for the end
            assert self.up.proc.poll() is None, f"pdserve up exited:\n{self.up.log_tail(60)}"
            return re.search(pattern, self.log()[after:], re.M)
        return wait_for(found, GUARD, what=pattern, interval=0.1)


def ranks_of(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children(recursive=True)
            if "pdserve.engine.tp_ranks" in " ".join(c.cmdline())]


def session_members(sessions: set[int]) -> list[tuple[int, int, int, str]]:
    """(pid, ppid, session, command) of the live processes in these sessions (each worker and
    the router run in a session of their own: a worker's ranks are in its session)."""
    out = []
    for p in psutil.process_iter(["pid", "ppid", "status", "cmdline"]):
        try:
            sid = os.getsid(p.pid)
            if p.info["status"] != psutil.STATUS_ZOMBIE and sid in sessions:
                out.append((p.pid, p.info["ppid"], sid, " ".join(p.info["cmdline"] or [])[:120]))
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def orphan_ranks(sessions: set[int]) -> list:
    """tp_ranks processes whose parent is not their worker (the session leader): it is gone."""
    return [(pid, ppid) for pid, ppid, sid, cmd in session_members(sessions)
            if "pdserve.engine.tp_ranks" in cmd and ppid != sid]


def healthy_in_router(dep: UpLog, role: str) -> bool:
    st = httpx.get(dep.up.url + "/status", timeout=10).json()
    return any(i["url"] == dep.url[role] and i["healthy"] for i in st[f"{role}_instances"])


def gauge(url: str, name: str) -> float:
    try:
        return metric(url, f"pdserve:{name}")
    except OSError:
        return -1.0   # not answering (yet)


# ---- requests ----------------------------------------------------------------------------
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                         timeout=httpx.Timeout(READ_BOUND, connect=10.0))


def complete(c: openai.OpenAI, model: str, text: str, n: int, stream: bool) -> tuple[str, str | None, int | None]:
    """(text, finish_reason, completion_tokens) of a greedy completion."""
    kw = dict(model=model, prompt=text, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        r = c.completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
    out, finish, tokens = "", None, None
    for ch in c.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if ch.choices:
            out += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            tokens = ch.usage.completion_tokens
    return out, finish, tokens


@dataclass
class Outcome:
    n: int               # the prompt's number
    max_tokens: int
    stream: bool
    kind: str            # answered | failed | hung
    text: str = ""
    note: str = ""
    ended: float = 0.0   # time.monotonic() when it ended


class Load:
    """CLIENTS clients through the router, each sending one request after another until
    stop(); every outcome kept. An outage answers at once: a client waits a second after an
    error, so that the errors stay countable."""

    def __init__(self, url: str, model: str, stream_tokens: int, json_tokens: int):
        self.url, self.model, self.tokens = url, model, (stream_tokens, json_tokens)
        self.outcomes: list[Outcome] = []
        self.mid_stream = 0   # streams that have their first token and not their end
        self.lock = threading.Lock()
        self.numbers = itertools.count()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(o.kind == kind for o in self.outcomes)

    def _client(self, i: int) -> None:
        c, stream = client(self.url), i % 2 == 0
        while not self._stop.is_set():
            o = self._one(c, next(self.numbers), stream)
            with self.lock:
                self.outcomes.append(o)
            self._stop.wait(0.1 if o.kind == "answered" else 1.0)

    def _one(self, c: openai.OpenAI, n: int, stream: bool) -> Outcome:
        tokens = self.tokens[0] if stream else self.tokens[1]
        o = Outcome(n, tokens, stream, "hung")
        kw = dict(model=self.model, prompt=prompt(n), max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True})
        began = []   # a streamed choice arrived: the request counts as mid-stream until it ends

        def first():
            began.append(True)
            with self.lock:
                self.mid_stream += 1
        try:
            text, finish, used = complete_counted(c, stream, first, **kw)
            o.text = text
            if finish == "length" and used == tokens:
                o.kind = "answered"
            else:
                o.note = f"ended with finish_reason {finish!r} after {used} of {tokens} tokens"
        except openai.APITimeoutError as e:
            o.note = f"no byte for {READ_BOUND:g} s: {e!r}"
        except openai.APIConnectionError as e:
            o.note = f"connection broke without an error: {e!r}"
        except openai.APIError as e:   # an HTTP error with a body, or an SSE error event
            body = e.body if isinstance(e.body, dict) else {}
            err = body.get("error", body)
            if isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]:
                o.kind, o.note = "failed", f"{getattr(e, 'status_code', 'sse')}: {err['message']}"
            else:
                o.note = f"error without an OpenAI body: {e!r}"
        finally:
            if began:
                with self.lock:
                    self.mid_stream -= 1
            o.ended = time.monotonic()
        return o

    def stop(self) -> None:
        """Let every client finish its request; one still waiting past the bound is hung."""
        self._stop.set()
        deadline = time.monotonic() + 3 * READ_BOUND
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for t in self.threads:
            if t.is_alive():
                self.outcomes.append(Outcome(-1, 0, False, "hung", note=f"still waiting {3 * READ_BOUND:g} s on"))


def references(url: str, model: str, outcomes: list[Outcome]) -> dict:
    """n -> (token ids, top-two gaps, text) of each answered prompt, asked again, one at a time
    per client thread, of the recovered deployment."""
    def one(o: Outcome):
        c = client(url)
        r = c.completions.create(model=model, prompt=prompt(o.n), max_tokens=o.max_tokens, temperature=0,
                                 logprobs=2, extra_body={"ignore_eos": True, "return_token_ids": True})
        ch = r.choices[0]
        gaps = [(lambda t: t[0] - t[1] if len(t) > 1 else 0.0)(sorted(d.values(), reverse=True))
                for d in ch.logprobs.top_logprobs]
        return o.n, (ch.token_ids, gaps, ch.text)
    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, [o for o in outcomes if o.kind == "answered"]))


def same_or_near_tie(tokenizer, ref, text: str) -> bool:
    """The answer is the reference, or leaves it at a near-tie. Where it leaves is found in
    the text: the reference's longest token prefix that the answer starts with; a character
    of several tokens decodes whole only at its last, so the tokens just after it count too."""
    ids, gaps, ref_text = ref
    if text == ref_text:
        return True
    k = 0
    while k < len(ids) and text.startswith(tokenizer.decode(ids[:k + 1])):
        k += 1
    return any(g < NEAR_TIE for g in gaps[k:k + 4])


# ---- the test ----------------------------------------------------------------------------
class Sampler:
    """A worker's KV blocks in use and held requests, ten times a second, until stop()."""

    def __init__(self, url: str):
        self.url, self.samples, self._stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            self.samples.append((gauge(self.url, "num_kv_blocks_used"), gauge(self.url, "num_requests_held")))

    def stop(self) -> str:
        self._stop.set()
        self.thread.join(10)
        return (f"most KV blocks in use {max((b for b, _ in self.samples), default=0):g}, "
                f"most held requests {max((h for _, h in self.samples), default=0):g}")


def hold_on_prefill(url: str, model: str, k: int) -> list[dict]:
    """k prompts prefilled on the prefill worker as the router asks it (do_remote_decode): it
    holds their KV for a decode worker that never pulls it, as one that dies first. Their
    kv_transfer_params."""
    out = []
    for i in range(k):
        r = httpx.post(url + "/v1/completions", timeout=READ_BOUND, json={
            "model": model, "prompt": prompt(10_000 + i)[:400], "max_tokens": 8, "temperature": 0,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}})
        r.raise_for_status()
        out.append(r.json()["kv_transfer_params"])
    return out


def held_freed(dep: UpLog, held: list[dict], killed: float) -> str:
    """The KV held for the decode worker that died is freed when its lease runs out: gone, not
    released by anyone (nothing is left to release)."""
    wait_for(lambda: gauge(dep.url["prefill"], "num_requests_held") == 0, LEASE + GUARD,
             what="the held KV's lease to run out", interval=0.1)
    freed = time.monotonic() - killed
    for kv in held:
        r = httpx.post(dep.url["prefill"] + "/v1/kv/release", timeout=10,
                       json={"request_id": kv["remote_request_id"], "kv_token": kv["kv_token"]})
        assert r.json() == {"released": False}, r.text
    return f"; its {len(held)} holds for the dead decode worker freed {freed:.1f} s after the fault"


def in_flight(load: Load, dep: UpLog, role: str) -> bool:
    """Work on the victim: prompts being prefilled (a), streams being decoded (b)."""
    if load.count("answered") < CLIENTS:   # every client past its first request
        return False
    if role == "prefill":
        return gauge(dep.url[role], "num_requests_running") + gauge(dep.url[role], "num_requests_waiting") >= 2
    return load.mid_stream >= CLIENTS // 2 - 1 and gauge(dep.url[role], "num_requests_running") >= CLIENTS // 2


def kill_and_recover(dep: UpLog, load: Load, role: str, probe) -> dict:
    """SIGKILL rank 1 of the role's worker once work is in flight on it; `up` reports the exit
    and restarts it; nothing is left of the old one; the probe answers through the new one as
    before the fault. What happened, with times since the fault."""
    other = "decode" if role == "prefill" else "prefill"
    worker = psutil.Process(dep.pid[role])
    ranks = ranks_of(worker.pid)
    assert len(ranks) == 1 and len(ranks_of(dep.pid[other])) == 1
    wait_for(lambda: in_flight(load, dep, role), GUARD, what=f"work in flight on the {role} worker", interval=0.01)
    held = hold_on_prefill(dep.url["prefill"], load.model, 2) if role == "decode" else []
    f = {"at_fault": {"mid_stream": load.mid_stream, **{f"{r}_{g}": gauge(dep.url[r], f"num_requests_{g}")
                                                        for r in ("prefill", "decode") for g in ("running", "held")}}}
    n = len(dep.log())
    survivor = Sampler(dep.url[other])
    f["killed"] = killed = time.monotonic()
    try:
        ranks[0].send_signal(signal.SIGKILL)
        f["rc"] = int(dep.wait_line(rf"pdserve up: {dep.name[role]} exited \((-?\d+)\); restart 1 of", n).group(1))
        f["exited"] = time.monotonic() - killed
        new_pid = int(dep.wait_line(rf"pdserve up: restarted {dep.name[role]} \(pid (\d+)\)", n).group(1))
        f["restarted"] = time.monotonic() - killed
    finally:
        f["survivor"] = f"the {other} worker until the restart: {survivor.stop()}"
    dep.sessions.add(new_pid)
    assert f["rc"] != 0 and new_pid != worker.pid
    if held:
        f["survivor"] += held_freed(dep, held, killed)
    # the old worker and its rank are gone, no rank is left without its worker
    gone, alive = psutil.wait_procs([worker, *ranks], timeout=60)
    assert not alive, alive
    assert not session_members({worker.pid}), session_members({worker.pid})
    assert not orphan_ranks(dep.sessions), orphan_ranks(dep.sessions)
    # serving again: the new worker back in the router's pool, the probe answered through it
    wait_for(lambda: healthy_in_router(dep, role), GUARD, what=f"{role} back in the router's pool", interval=0.1)
    before = metric(dep.url[role], "pdserve:prompt_tokens_total", required=False)
    probe()
    f["serving"] = time.monotonic() - killed
    if role == "prefill":   # the probe's prompt was prefilled by the new prefill worker
        assert metric(dep.url[role], "pdserve:prompt_tokens_total") > before
    assert len(ranks_of(new_pid)) == 1
    return f


def judge(load: Load, refs: dict, tokenizer, killed: float) -> tuple[dict, str]:
    """Counts of the outcomes (answered, failed, hung), and a line about them; no answer is wrong."""
    out = load.outcomes
    counts = {k: sum(o.kind == k for o in out) for k in ("answered", "failed", "hung")}
    wrong = [(o.n, o.text[:60], refs[o.n][2][:60]) for o in out
             if o.kind == "answered" and not same_or_near_tie(tokenizer, refs[o.n], o.text)]
    exact = sum(o.kind == "answered" and o.text == refs[o.n][2] for o in out)
    errors = [o.ended - killed for o in out if o.kind == "failed"]
    when = f"{min(errors):.1f}..{max(errors):.1f} s after the fault" if errors else "none"
    kinds = Counter(o.note.split(":")[0] for o in out if o.kind == "failed")   # an HTTP status or "sse"
    messages = sorted({re.sub(r"\d+", "N", o.note)[:80] for o in out if o.kind == "failed"})
    line = (f"{counts} of {len(out)} requests ({exact} answered exactly, {len(wrong)} wrong); errors {when}, "
            f"{dict(kinds)}: {messages[:4]}")
    assert counts["hung"] == 0, [o.note for o in out if o.kind == "hung"][:5]
    assert not wrong, wrong[:5]
    return counts, line


def kv_freed(dep: UpLog) -> float:
    """Seconds until no worker holds a KV block (a hang guard bounds it: leases, pulls)."""
    t0 = time.monotonic()
    for r in ("prefill", "decode"):
        wait_for(lambda: gauge(dep.url[r], "num_kv_blocks_used") == 0 and gauge(dep.url[r], "num_requests_held") == 0,
                 LEASE + PULL_TIMEOUT + DETECT + STEP_TIMEOUT, what=f"the {r} worker's KV blocks freed", interval=0.2)
    return time.monotonic() - t0


def stop_and_check_nothing_left(up: UpProcess, dep: UpLog) -> None:
    """`up` stopped as a user stops it stops every child: no process of the deployment is left."""
    up.children()
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0, up.log_tail(40)
    wait_for(lambda: not session_members(dep.sessions), 30, what="the deployment's processes to end")
    alive = [p.pid for p in up.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


def run_fault(model: str, tokenizer, tmp_path, role: str, stream_tokens: int, json_tokens: int) -> dict:
    (tmp_path / "deploy.yaml").write_text(CONFIG)
    spec = (f"up {model} --config {tmp_path / 'deploy.yaml'} --prefill 1 --decode 1 --prefill-tp 2 --decode-tp 2 "
            f"--local-prefill-max-tokens 0 {ENGINE}")
    with UpProcess(spec, str(tmp_path / "up.log"), ready_timeout=GUARD) as up:
        dep = UpLog(up)
        c = client(up.url)
        served = c.models.list().data[0].id
        want = complete(c, served, PROBE, 16, stream=False)
        assert want[1:] == ("length", 16)

        def probe():   # greedy, as before the fault, not streamed and streamed
            got = complete(c, served, PROBE, 16, stream=False), complete(c, served, PROBE, 16, stream=True)
            assert got == (want, want), (got, want)

        load = Load(up.url, served, stream_tokens, json_tokens)
        try:
            f = kill_and_recover(dep, load, role, probe)
            answered = load.count("answered")   # the load goes on a while against the recovered deployment
            wait_for(lambda: load.count("answered") >= answered + CLIENTS, GUARD, what="answers after the restart")
        finally:
            load.stop()
        counts, line = judge(load, references(up.url, served, load.outcomes), tokenizer, f["killed"])
        freed = kv_freed(dep)
        routed = httpx.get(up.url + "/status", timeout=10).json()["requests"]
        pulls_failed = metric(dep.url["decode"], "pdserve:kv_transfer_failures_total", required=False)
        print(f"\nSIGKILL of {role} rank 1 (P TP=2 -> D TP=2), {CLIENTS} clients; at the fault {f['at_fault']}: "
              f"{line}; exit reported after {f['exited']:.1f} s ({f['rc']}), restarted after {f['restarted']:.1f} s, "
              f"serving again after {f['serving']:.1f} s; {f['survivor']}; all KV free {freed:.1f} s after the "
              f"load ended; failed KV pulls {pulls_failed:g} (decode worker, since its start); routed {routed}",
              flush=True)
        assert counts["answered"] >= 2 * CLIENTS
        stop_and_check_nothing_left(up, dep)
    return counts


def test_a_prefill_rank_killed_while_prompts_load(model, tokenizer, tmp_path):
    """Nothing is lost with the prefill worker: a prompt it did not hand off is prefilled on
    the decode worker instead (there is no other prefill worker), every request is answered."""
    counts = run_fault(model, tokenizer, tmp_path, "prefill", stream_tokens=24, json_tokens=16)
    assert counts["failed"] == 0


def test_a_decode_rank_killed_while_streams_decode(model, tokenizer, tmp_path):
    """The streams it was decoding cannot be finished elsewhere: they end with an error event."""
    counts = run_fault(model, tokenizer, tmp_path, "decode", stream_tokens=256, json_tokens=32)
    assert counts["failed"] > 0
