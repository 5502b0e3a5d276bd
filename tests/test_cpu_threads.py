"""CPU thread placement: the core count from affinity and cgroup quotas (parsed from injected
files), the explicit choices that win, and real processes that end up with the threads and
affinity chosen for them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pdserve import cpu_threads as ct

ROOT = "/sys/fs/cgroup"


def reader(files: dict):
    return lambda path: files.get(path)


def test_cpu_lists_round_trip():
    assert ct.parse_cpu_list("0-2,5") == [0, 1, 2, 5]
    assert ct.parse_cpu_list(" 3 ,1") == [1, 3]
    assert ct.format_cpu_list([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert ct.parse_cpu_list(ct.format_cpu_list([0, 2, 3, 4, 9])) == [0, 2, 3, 4, 9]
    with pytest.raises(ValueError):
        ct.parse_cpu_list("3-1")


def test_cgroup_v2_quota_of_the_group_and_its_ancestors():
    cg = "0::/work/job\n"
    assert ct.cgroup_cpu_limit(cg, ROOT, reader({f"{ROOT}/work/job/cpu.max": "max 100000\n"})) is None
    files = {f"{ROOT}/work/job/cpu.max": "max 100000\n", f"{ROOT}/work/cpu.max": "150000 100000\n"}
    assert ct.cgroup_cpu_limit(cg, ROOT, reader(files)) == 1.5            # the parent's quota applies
    files[f"{ROOT}/work/job/cpu.max"] = "50000 100000\n"
    assert ct.cgroup_cpu_limit(cg, ROOT, reader(files)) == 0.5            # the tightest one wins
    # in a container the group is the mount's root: "0::/" with cpu.max at the top
    assert ct.cgroup_cpu_limit("0::/\n", ROOT, reader({f"{ROOT}/cpu.max": "400000 100000"})) == 4.0
    assert ct.cgroup_cpu_limit("0::/\n", ROOT, reader({})) is None


def test_cgroup_v1_cfs_quota():
    cg = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    d = f"{ROOT}/cpu,cpuacct/docker/abc"
    files = {f"{d}/cpu.cfs_quota_us": "200000\n", f"{d}/cpu.cfs_period_us": "100000\n"}
    assert ct.cgroup_cpu_limit(cg, ROOT, reader(files)) == 2.0
    files[f"{d}/cpu.cfs_quota_us"] = "-1\n"                                 # -1: no quota
    assert ct.cgroup_cpu_limit(cg, ROOT, reader(files)) is None
    # the container sees its own group at the mount's root, under the plain "cpu" name
    files = {f"{ROOT}/cpu/cpu.cfs_quota_us": "150000", f"{ROOT}/cpu/cpu.cfs_period_us": "100000"}
    assert ct.cgroup_cpu_limit(cg, ROOT, reader(files)) == 1.5
    # only the memory controller limited: no CPU quota
    assert ct.cgroup_cpu_limit("12:memory:/x\n", ROOT, reader({f"{ROOT}/memory/x/cpu.cfs_quota_us": "1"})) is None


def test_threads_from_cores_and_quota():
    assert ct.cores_for_threads([0, 1], None) == 2
    assert ct.cores_for_threads([0, 1, 2, 3], 1.5) == 1        # rounded down: no throttled thread
    assert ct.cores_for_threads([0, 1, 2, 3, 4, 5, 6, 7], 3.0) == 3
    assert ct.cores_for_threads([0, 1], 0.5) == 1              # at least one
    assert ct.cores_for_threads([0, 1], 16.0) == 2             # the quota does not add cores


def test_explicit_choices_win():
    aff = {0, 1, 2, 3}
    p = ct.plan(env={}, affinity=aff, limit=None)
    assert (p.cpus, p.threads, p.pin) == ([0, 1, 2, 3], 4, False)
    assert ct.plan(env={}, affinity=aff, limit=2.5).threads == 2
    assert ct.plan(env={"OMP_NUM_THREADS": "3"}, affinity=aff, limit=1.0).threads == 3
    assert ct.plan(num_threads=1, env={"OMP_NUM_THREADS": "3"}, affinity=aff, limit=None).threads == 1
    p = ct.plan(cpus=[2, 3], env={}, affinity=aff, limit=None)
    assert (p.cpus, p.threads, p.pin) == ([2, 3], 2, True)
    with pytest.raises(ValueError, match="not available"):
        ct.plan(cpus=[7], env={}, affinity=aff, limit=None)
    with pytest.raises(ValueError, match="num-threads"):
        ct.plan(num_threads=0, env={}, affinity=aff, limit=None)


def test_wait_policy_follows_where_the_count_came_from():
    assert ct.wait_for(None) is None and ct.wait_for(1) is None and ct.wait_for(2) == "PASSIVE"
    assert ct.threads_in_argv(["serve", "--model", "m", "--num-threads", "3"]) == 3
    assert ct.threads_in_argv(["generate", "--num-threads=2", "hi"]) == 2
    assert ct.threads_in_argv(["generate", "hi"]) is None
    assert ct.threads_in_argv(["generate", "--num-threads", "x"]) is None   # the real parser says why
    assert ct.threads_in_argv(["generate", "--num-t", "2"]) is None        # no guessing at abbreviations


PROBE = """
import json, os, sys
from pdserve import cpu_threads
p = cpu_threads.setup(*json.loads(sys.argv[1]))
import torch
torch.ones(1 << 16).sum()     # start torch's thread pool: its threads must follow the placement
tasks = os.listdir("/proc/self/task")
allowed = {open(f"/proc/self/task/{t}/status").read().split("Cpus_allowed_list:")[1].split()[0] for t in tasks}
print(json.dumps({"threads": torch.get_num_threads(), "allowed": sorted(allowed), "why": p.why,
                  "wait": os.environ.get("OMP_WAIT_POLICY")}))
"""


def probe(cpus=None, num_threads=None, env=None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "PDSERVE_OMP_WAIT")} | (env or {})
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps([cpus, num_threads])], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow  # starts processes
def test_real_process_gets_its_threads_and_cores():
    mine = sorted(os.sched_getaffinity(0))
    got = probe()
    assert got["threads"] == min(len(mine), ct.cores_for_threads(mine, ct.cgroup_cpu_limit()))
    assert got["wait"] is None                              # from the cores: libgomp's bounded spin
    assert got["allowed"] == [ct.format_cpu_list(mine)]
    got = probe(cpus=str(mine[-1]))                         # pinned: every thread on that core
    assert got["threads"] == 1 and got["allowed"] == [str(mine[-1])]
    got = probe(num_threads=3)                              # a fixed count above one sleeps
    assert got["threads"] == 3 and got["wait"] == "PASSIVE"
    got = probe(env={"OMP_NUM_THREADS": "2"})
    assert got["threads"] == 2 and got["wait"] == "PASSIVE"
    got = probe(env={"OMP_WAIT_POLICY": "PASSIVE", "PDSERVE_OMP_WAIT": "PASSIVE"})   # a pdserve parent's
    assert got["wait"] is None
    got = probe(env={"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"})   # the user's own choice
    assert got["threads"] == 1 and got["why"] == "OMP_NUM_THREADS" and got["wait"] == "ACTIVE"


def test_threads_step_aside_while_neighbours_hold_cores_and_come_back():
    from pdserve.cpu_threads import Yielding
    running, ours, t, set_to = ["2/90"], [2], [0.0], []
    y = Yielding(2, window=4, interval=0.1, read=lambda: f"0.1 0.2 0.3 {running[0]} 1", clock=lambda: t[0],
                 set_threads=set_to.append, own=lambda: ours[0])
    for _ in range(4):
        t[0] += 0.2
        assert y.tick() == 2 and set_to == []      # alone, both our threads running: every core
    running[0], ours[0] = "3/90", 1                # two hogs besides us
    for _ in range(4):
        t[0] += 0.2
        y.tick()
    assert y.now == 1 and set_to == [1]            # the cores left: one
    t[0] += 0.01
    running[0] = "1/90"
    assert y.tick() == 1                           # sampled at most once per interval
    for _ in range(4):
        t[0] += 0.2
        y.tick()
    assert y.now == 2 and set_to == [1, 2]         # the neighbours left: both again


def test_a_neighbour_running_half_the_time_does_not_flip_the_count():
    from pdserve.cpu_threads import Yielding
    others, t, set_to = [0], [0.0], []
    y = Yielding(2, window=4, interval=0.1, read=lambda: f"0.1 0.2 0.3 {others[0] + 1}/90 1", clock=lambda: t[0],
                 set_threads=set_to.append, own=lambda: 1)

    def tick(*pattern):
        for n in pattern:
            others[0] = n
            t[0] += 0.2
            y.tick()
    tick(0, 0, 0, 0, *[1, 0] * 8)           # a neighbour half the time: both cores still
    assert y.now == 2 and set_to == []
    tick(1, 1)                              # three samples of four (0.75): one core left
    assert y.now == 1 and set_to == [1]
    tick(*[0, 1] * 8)                       # half the time again: one core still
    assert y.now == 1 and set_to == [1]
    tick(0, 0)                              # one sample of four (0.25): both again
    assert y.now == 2 and set_to == [1, 2]


def test_an_own_thread_gone_to_sleep_during_a_look_is_not_a_neighbour():
    """Our second thread runs when the machine's count is read and sleeps by the time our threads
    are: the look before the count still sees it, so the engine keeps both cores."""
    from pdserve.cpu_threads import Yielding
    t, set_to, looks = [0.0], [], []

    def own():   # two of ours running before the count is read, one after
        looks.append(1)
        return 2 if len(looks) % 2 else 1
    y = Yielding(2, window=4, interval=0.1, read=lambda: "0.1 0.2 0.3 2/90 1", clock=lambda: t[0],
                 set_threads=set_to.append, own=own)
    for _ in range(8):
        t[0] += 0.2
        assert y.tick() == 2
    assert set_to == [] and len(looks) == 16


def test_own_running_threads_counts_this_process_only():
    import hashlib
    import threading
    from pdserve.cpu_threads import own_running_threads
    stop, data = threading.Event(), bytes(1 << 20)

    def spin():   # hashing a large buffer releases the GIL: the spinners run beside the asker
        while not stop.is_set():
            hashlib.sha256(data).digest()
    spinners = [threading.Thread(target=spin) for _ in range(2)]
    base = own_running_threads()
    assert base >= 1
    for th in spinners:
        th.start()
    try:
        seen = max(own_running_threads() for _ in range(200))   # a spinner may be between its slices
    finally:
        stop.set()
        for th in spinners:
            th.join()
    assert seen >= 2   # the asking thread and a spinner at least (runnable counts, on a core or not)


def test_an_explicit_thread_count_never_changes():
    from pdserve.cpu_threads import plan
    assert not plan(num_threads=2, affinity=[0, 1], limit=None).yielding
    assert not plan(env={"OMP_NUM_THREADS": "2"}, affinity=[0, 1], limit=None).yielding
    assert plan(env={}, affinity=[0, 1], limit=None).yielding
    assert not plan(env={}, affinity=[0], limit=None).yielding


RELEASE_PROBE = r"""
import json, os, threading, torch
torch.set_num_threads(3)
tasks = lambda: len(os.listdir("/proc/self/task"))
before = tasks()
torch.ones(4096, 4096).sum()            # a parallel region: this thread's pool of 2 OpenMP workers
with_pool = tasks()
from pdserve.cpu_threads import release_openmp_threads
ok = release_openmp_threads()
after = tasks()
x = torch.ones(4096, 4096).sum().item()  # torch still works, in a new pool
print(json.dumps([before, with_pool, ok, after, tasks(), x]))
"""


@pytest.mark.slow
def test_release_openmp_threads_ends_the_calling_threads_pool():
    """The workers a thread's parallel regions started end when it lets them go; a later region
    starts new ones (the engine's stepping thread then has the only pool)."""
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "3"})
    assert out.returncode == 0, out.stderr
    before, with_pool, ok, after, again, x = json.loads(out.stdout)
    assert ok and with_pool == before + 2 and after == before and again == with_pool and x == 4096 * 4096


ENGINE_PROBE = r"""
import json, os, sys, time, torch
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
tasks = lambda: len(os.listdir("/proc/self/task"))
base = tasks()
eng = LLMEngine(model=sys.argv[1], device="cpu", dtype="float32", max_model_len=64, kv_cache_memory=4 << 20)
torch.ones(4096, 4096).sum()             # this thread's pool, as a model load leaves it
loaded = tasks()
ae = AsyncEngine(eng).start()
time.sleep(0.2)
print(json.dumps([base, loaded, tasks(), torch.get_num_threads()]))
ae.shutdown()
"""


@pytest.mark.slow
def test_starting_an_async_engine_ends_the_loading_threads_openmp_pool(default_model_dir, tmp_path):
    """The thread that loaded the model hands stepping to the engine's loop thread and lets its
    OpenMP workers go: the process is left with the loop thread more, not a second pool."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_model import make_tiny_model
    d = make_tiny_model(tmp_path / "tiny", default_model_dir)
    out = subprocess.run([sys.executable, "-c", ENGINE_PROBE, str(d)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    base, loaded, started, threads = json.loads(out.stdout.strip().splitlines()[-1])
    workers = threads - 1                       # the loading thread's pool besides itself
    assert workers >= 1 and loaded >= base + workers
    assert started == loaded - workers + 1      # they ended; the loop thread began


HELPER_PROBE = r"""
import json, os, threading, torch
from pdserve.cpu_threads import one_openmp_thread
torch.set_num_threads(2)
tasks = lambda: len(os.listdir("/proc/self/task"))
got, ready, stop = {}, threading.Event(), threading.Event()
def helper(one):
    if one:
        one_openmp_thread()
    torch.ones(10**7).clone()            # a KV copy's size: parallel with more than one thread
    got[one] = torch.get_num_threads()
    ready.set(); stop.wait()
for one in (True, False):
    before = tasks()
    ready.clear()
    threading.Thread(target=helper, args=(one,), daemon=True).start()
    ready.wait()
    got[f"grew {one}"] = tasks() - before   # the helper itself, and its pool's worker if it made one
later = {}
t = threading.Thread(target=lambda: later.update(n=torch.get_num_threads())); t.start(); t.join()
print(json.dumps({**{str(k): v for k, v in got.items()}, "main": torch.get_num_threads(), "later": later["n"]}))
"""


@pytest.mark.slow
def test_one_openmp_thread_keeps_a_helper_without_a_pool_and_the_default_as_it_was():
    """A helper thread that called one_openmp_thread runs torch on itself alone (no OpenMP
    workers left behind); one that did not leaves one; the main thread and threads started
    later keep the process's count."""
    out = subprocess.run([sys.executable, "-c", HELPER_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["True"] == 1 and got["grew True"] == 1
    assert got["False"] == 2 and got["grew False"] == 2
    assert got["main"] == 2 and got["later"] == 2
