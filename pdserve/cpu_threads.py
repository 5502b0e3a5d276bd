"""CPU thread placement, done once at start by every pdserve process that runs torch.

torch starts one OpenMP thread per core in its affinity mask (a cgroup CPU quota is not
counted), and libgomp's threads spin at every parallel region's barrier before they sleep. On a
busy machine a spinning thread burns the time slice its partner needs to reach the barrier;
a decode step is hundreds of small parallel regions. Measured on 2 cores with 2 CPU hogs
beside `pdserve generate`: torch's defaults 0.3-0.5 tokens/s, OMP_NUM_THREADS=1 5-6,
two threads that sleep at barriers (OMP_WAIT_POLICY=PASSIVE) 8-11. So:

- threads = the cores this process may use: its affinity mask, capped by the cgroup quota
  (v2 `cpu.max`, v1 `cpu.cfs_quota_us`) rounded down, at least 1;
- how idle OpenMP threads wait follows where the count came from (prepare_env, before torch
  loads libgomp): a count taken from the cores spins a while at barriers (libgomp's default),
  a fixed count above one sleeps (OMP_WAIT_POLICY=PASSIVE);
- the process is pinned to the cores it was given (`--cpus`, or `pdserve up`'s split).
  Threads are not bound one per core: a bound thread cannot leave a core a neighbour
  keeps busy (measured slower under the hogs than leaving placement to the kernel).

An explicit choice wins: `--num-threads`, else OMP_NUM_THREADS in the environment (torch
reads it itself), else the count above, which then follows the machine between steps
(`Yielding`): while other processes keep some of the cores busy, the engine runs on the cores
left (at least one thread); a parallel region split over a core a neighbour holds waits for
that neighbour's time slice at every barrier. Measured here (2 cores, 2 CPU hogs, the 64-request
workload of benchmarks/engine_vs_vllm_cpu.py): two threads 86 s, four times their idle time.
While other work holds cores, a step of several sequences does not split its ops at all: the
engine runs it as parts of equal work, one thread each, that meet once per step
(pdserve.engine.step_split); the count here then applies to the steps that do not split (one
sequence, one long prefill). No torch import
at module level: the router and `pdserve up` use the parsing helpers.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass

log = logging.getLogger("pdserve.cpu")


def parse_cpu_list(text: str) -> list[int]:
    """'0-2,5' (the kernel's list format, as in Cpus_allowed_list) -> [0, 1, 2, 5]."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        if lo < 0 or hi < lo:
            raise ValueError(f"bad cpu range {part!r}")
        out += range(lo, hi + 1)
    return sorted(set(out))


def format_cpu_list(cpus) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    cpus = sorted(set(cpus))
    runs: list[str] = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        runs.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(runs)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _ancestors(path: str) -> list[str]:
    """'/a/b' -> ['/a/b', '/a', '/']: a quota on any enclosing group applies too."""
    parts = [p for p in path.strip().split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(self_cgroup: str | None = None, root: str = "/sys/fs/cgroup", read=_read) -> float | None:
    """The CPU quota of this process's cgroup (and its ancestors) in cores, None if unlimited.

    self_cgroup is the text of /proc/self/cgroup; `read(path)` returns a file's text or None
    (both injectable for tests). Inside a container the listed path may not exist under the
    mount (the container's own group is the mount's root): the root is checked too.
    """
    if self_cgroup is None:
        self_cgroup = read("/proc/self/cgroup") or ""
    limits = []
    for line in self_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":                       # cgroup v2, unified hierarchy
            for p in _ancestors(path):
                quota_period = (read(os.path.join(root, p.lstrip("/"), "cpu.max")) or "").split()
                if len(quota_period) == 2 and quota_period[0] != "max":   # "max 100000": no quota
                    limits.append(int(quota_period[0]) / int(quota_period[1]))
        elif "cpu" in controllers.split(","):                     # cgroup v1: cpu controller
            for mount in dict.fromkeys([controllers, "cpu", "cpu,cpuacct"]):
                for p in _ancestors(path):
                    d = os.path.join(root, mount, p.lstrip("/"))
                    quota, period = read(os.path.join(d, "cpu.cfs_quota_us")), read(os.path.join(d, "cpu.cfs_period_us"))
                    if quota and period and int(quota) > 0 and int(period) > 0:
                        limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def cores_for_threads(cpus, limit: float | None) -> int:
    """Threads worth running on these cores under a quota of `limit` cores: rounded down
    (a thread beyond the quota is throttled mid-region and stalls the others), at least 1."""
    n = len(cpus)
    if limit is not None:
        n = min(n, math.floor(limit + 1e-9))
    return max(1, n)


@dataclass
class Placement:
    cpus: list[int]            # the cores this process runs on
    threads: int               # torch intra-op (and inter-op) threads
    why: str                   # where the thread count came from, for the log line
    pin: bool = False          # whether to set the affinity (cores given explicitly)
    yielding: bool = False     # the count came from the cores: it may step aside (Yielding)

    def describe(self) -> str:
        return (f"{self.threads} torch thread(s) on cpus {format_cpu_list(self.cpus)} ({self.why}); "
                f"{wait_policy()}")


def plan(cpus: list[int] | None = None, num_threads: int | None = None, env=None,
         affinity=None, limit: float | None | bool = False) -> Placement:
    """Decide cores and threads. affinity / limit default to this process's (injectable)."""
    env = os.environ if env is None else env
    allowed = sorted(os.sched_getaffinity(0) if affinity is None else affinity)
    pin = cpus is not None
    if pin:
        outside = sorted(set(cpus) - set(allowed))
        if outside:
            raise ValueError(f"--cpus {format_cpu_list(cpus)}: cpu(s) {format_cpu_list(outside)} are not "
                             f"available to this process (allowed: {format_cpu_list(allowed)})")
        allowed = sorted(set(cpus))
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError("--num-threads must be >= 1")
        return Placement(allowed, num_threads, "--num-threads", pin)
    omp = _env_threads(env)
    if omp is not None:
        return Placement(allowed, omp, "OMP_NUM_THREADS", pin)
    if limit is False:
        limit = cgroup_cpu_limit()
    n = cores_for_threads(allowed, limit)
    why = f"{len(allowed)} core(s) allowed" + (f", cgroup quota {limit:g} cores" if limit is not None else "")
    return Placement(allowed, n, why, pin, yielding=n > 1)


NUM_THREADS_FLAG = "--num-threads"   # the commands' flag (add_arguments), also read before parsing
_late: bool | None = None   # None: prepare_env has not run; else whether torch was loaded before it
_MARK = "PDSERVE_OMP_WAIT"  # beside an OMP_WAIT_POLICY pdserve chose: a child decides its own


def wait_for(fixed_threads: int | None) -> str | None:
    """The OMP_WAIT_POLICY for a process whose thread count is fixed at `fixed_threads` (None:
    taken from its cores). A fixed count above one cannot step aside for a neighbour, and a
    thread spinning at a barrier burns the time slice its partner needs: PASSIVE (measured on 2
    cores beside 2 CPU hogs, 16 requests on 2 fixed threads: 12.4 and 14.1 s sleeping, 20.8 and
    24.8 s spinning). A count from the cores follows the machine between steps (Yielding, step
    parts one thread each) and keeps libgomp's default, a bounded spin: on a 2-core AMD host,
    sleeping at every barrier cost the idle 64-request workload 15-25% in-process (PASSIVE
    16.8-18.7 s; spinning: ACTIVE 13.2-15.0, GOMP_SPINCOUNT=100000 14.7-16.8); served by
    `pdserve serve` on a 2-core Intel host the two were alike (PASSIVE 19.6-19.9 s, default
    20.0-20.1)."""
    return "PASSIVE" if fixed_threads is not None and fixed_threads > 1 else None


def _env_threads(env) -> int | None:
    omp = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(omp) if omp.isdigit() and int(omp) > 0 else None


def prepare_env(num_threads: int | None = None) -> None:
    """Before torch is imported, once per process (libgomp reads the environment when it loads):
    the wait policy for this process's thread count (wait_for): `num_threads` if the caller
    knows it, else OMP_NUM_THREADS, else one from the cores. An OMP_WAIT_POLICY or GOMP_SPINCOUNT
    the user set wins; one a pdserve parent chose (marked) is decided again here."""
    global _late
    if _late is not None:
        return
    _late = "torch" in sys.modules
    env = os.environ
    if env.pop(_MARK, None) is not None:
        env.pop("OMP_WAIT_POLICY", None)
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return
    policy = wait_for(num_threads or _env_threads(env))
    if policy:
        env["OMP_WAIT_POLICY"] = env[_MARK] = policy


def threads_in_argv(argv: list[str]) -> int | None:
    """A command line's --num-threads, read before its parser exists (building that imports the
    command's module, and with it torch): None where absent or not a number (the parser says)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument(NUM_THREADS_FLAG, default=None)
    value = p.parse_known_args(argv)[0].num_threads
    return int(value) if value is not None and value.isdigit() else None


def wait_policy() -> str:
    if "GOMP_SPINCOUNT" in os.environ:
        return f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
    policy = os.environ.get("OMP_WAIT_POLICY")
    text = f"OMP_WAIT_POLICY={policy}" if policy else "OpenMP threads spin a while at barriers (libgomp's default)"
    return text + (" (torch was imported before pdserve: its OpenMP kept the environment it found)" if _late else "")


def apply(p: Placement) -> None:
    if p.pin:
        # every thread that exists now (pid 0 would be this thread only); later ones inherit
        for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
            try:
                os.sched_setaffinity(int(tid), p.cpus)
            except (ProcessLookupError, PermissionError):
                pass
    import torch
    if torch.get_num_threads() != p.threads:
        torch.set_num_threads(p.threads)
    try:   # allowed only before any inter-op work; the default is one per core
        torch.set_num_interop_threads(p.threads)
    except RuntimeError:
        pass


_done: Placement | None = None


def setup(cpus: str | list[int] | None = None, num_threads: int | None = None) -> Placement:
    """Plan, apply and log once per process; later calls return the first placement."""
    global _done
    if _done is None:
        if isinstance(cpus, str):
            cpus = parse_cpu_list(cpus)
        _done = plan(cpus, num_threads)
        prepare_env(None if _done.yielding else _done.threads)   # a no-op where it ran before
        apply(_done)
        log.info("%s", _done.describe())
    return _done


class Yielding:
    """Between steps, the engine's thread count follows the other work on the machine: the
    runnable tasks that are not this process's own threads (/proc/loadavg's running count minus
    ours running, /proc/self/task) averaged over the last `window` samples, one per `interval`
    seconds at most; threads = the placement's count minus those, at least 1. Counting our own
    second thread as a neighbour made an idle engine flip between 1 and 2 threads every few
    steps (the 64-request workload 27.1 s against 21.7 s on a fixed 2). The count moves only once
    the average is `margin` past the halfway point between counts: a neighbour runnable about
    half the time (the client or the router beside a served worker) flipped it between 2 and 1
    every few steps. Readers and clock are injectable."""

    def __init__(self, full: int, window: int = 8, interval: float = 0.1, read=None, clock=None,
                 set_threads=None, own=None, margin: float = 0.25):
        import time
        self.full, self.now, self.window, self.interval, self.margin = full, full, window, interval, margin
        self.read = read or (lambda: open("/proc/loadavg").read())
        self.own = own or own_running_threads
        self.clock = clock or time.monotonic
        self.set_threads = set_threads or _set_torch_threads
        self.samples: list[int] = []
        self.last = float("-inf")

    def tick(self) -> int:
        """Call between steps; returns the thread count for the next one."""
        t = self.clock()
        if self.full <= 1 or t - self.last < self.interval:
            return self.now
        self.last = t
        # the machine's count twice, a look at our threads before each: a neighbour is what runs at
        # both counts and is not ours at either look, so neither a task woken for a moment (a
        # served worker's client reading an answer just sent) nor our OpenMP thread gone from its
        # spin to sleep between a count and a look is taken for one
        own, counts = 0, []
        for _ in range(2):
            own = max(own, self.own())
            try:
                counts.append(int(self.read().split()[3].split("/")[0]))
            except (OSError, ValueError, IndexError):
                return self.now
        self.samples = (self.samples + [max(0, min(counts) - own)])[-self.window:]
        busy = sum(self.samples) / len(self.samples)
        if abs(busy - (self.full - self.now)) < 0.5 + self.margin:   # near what the count assumes
            return self.now
        want = max(1, min(self.full, self.full - math.floor(busy + 0.5)))
        if want != self.now:
            log.info("torch threads %d -> %d: %.1f other runnable task(s) on the machine", self.now, want, busy)
            self.set_threads(want)
            self.now = want
        return self.now


def own_running_threads() -> int:
    """This process's threads that are runnable now (the one asking among them)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:   # the thread ended meanwhile
            continue
        n += stat[stat.rindex(")") + 2] == "R"
    return max(n, 1)


def _openmp():
    """torch's OpenMP runtime, as loaded (None where it is not, or not by these names)."""
    import ctypes
    for name in ("libgomp.so.1", "libiomp5.so"):
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
        except (OSError, AttributeError):
            continue
    return None


def release_openmp_threads() -> bool:
    """Let the calling thread's OpenMP worker threads end (omp_pause_resource_all, soft): call it
    in a thread that hands torch's work to another one (the engine's stepping thread). libgomp
    keeps a pool of workers per thread that ever ran a parallel region, and once its pools hold
    more threads than the process has cores, every barrier in every pool spins only ~100 times
    before it sleeps: the 64-request workload stepped in a second thread after the model was
    loaded in the first took 16.6 s against 14.2 s with the first's pool ended. A later parallel
    region in this thread starts a new pool. False where torch's OpenMP is not loaded or lacks it."""
    import ctypes
    fn = getattr(_openmp(), "omp_pause_resource_all", None)
    if fn is None:
        return False
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn(1) == 0   # omp_pause_soft


def one_openmp_thread() -> None:
    """Run torch's ops in the calling thread on that thread alone: for a helper that lives on beside
    the engine (a KV pull or serving thread, the tokenizer pool), whose one parallel copy would leave
    a pool of OpenMP workers behind (see release_openmp_threads: the workload 14.3 -> 16.9 s beside
    one such idle thread). Sets this thread's OpenMP count only: torch.set_num_threads would also
    change the count torch gives threads started later, the engine's included."""
    import torch
    torch.get_num_threads()   # torch's own first-use setup of this thread, which would undo ours
    lib = _openmp()
    if lib is not None and hasattr(lib, "omp_set_num_threads"):
        lib.omp_set_num_threads(1)


def _set_torch_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def yielding() -> Yielding | None:
    """The engine's Yielding for this process's placement (None: a fixed thread count)."""
    if _done is None or not _done.yielding:
        return None
    return Yielding(_done.threads)


def setup_from_args(args: argparse.Namespace) -> Placement:
    return setup(getattr(args, "cpus", None), getattr(args, "num_threads", None))


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CPU threads")
    g.add_argument(NUM_THREADS_FLAG, type=int, default=None, metavar="N",
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else the cores this process may use: "
                        "affinity mask capped by the cgroup CPU quota)")
    g.add_argument("--cpus", default=None, metavar="LIST",
                   help="pin this process to these cores, e.g. 0-1 or 2,3 (default: leave the affinity as is)")
