"""Prefill/decode behaviour of the simulator, checked against physics rather than its own code."""
from __future__ import annotations

import ast
import json
import math
import pathlib
import random

import pytest

import pdserve.sim
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler
from pdserve.sim.cluster_config import parse_cluster_config
from pdserve.sim.simulator import ClusterSim
from pdserve.sim.trace import Session, TraceRequest

LLAMA_8B_KV_BYTES_PER_TOKEN = 131_072   # DESIGN.md: 2 x 32 layers x 8 kv heads x 128 x 2 bytes


def pd_config(link_bw=16, link_latency=20000, n_prefill=1, n_decode=1, **extra):
    inst = {"model_name": "meta-llama/Llama-3.1-8B", "hardware": "RTXPRO6000",
            "npu_mem": {"mem_size": 96, "mem_bw": 1597, "mem_latency": 0}, "tp_size": 1, **extra}
    insts = [dict(inst, pd_type="prefill") for _ in range(n_prefill)] + \
            [dict(inst, pd_type="decode") for _ in range(n_decode)]
    return parse_cluster_config({"num_nodes": 1, "link_bw": link_bw, "link_latency": link_latency,
                                 "nodes": [{"num_instances": len(insts), "instances": insts}]})


def collect(cluster, sessions):
    """Run and return (sim, finished records) via a Collector-independent hook."""
    sim = ClusterSim(cluster)
    recs = []
    sim.run(sessions, recs.append)
    return sim, {r.request_id: r for r in recs}


def test_sim_drives_the_engine_scheduler_and_block_manager():
    sim = ClusterSim(pd_config())
    for inst in sim.instances:
        assert type(inst.sched) is Scheduler and type(inst.bm) is BlockManager
        assert inst.sched.bm is inst.bm


def test_sim_package_has_no_scheduler_or_block_manager_of_its_own():
    """Fails if the simulator grows its own copy of the engine's scheduling or KV logic."""
    pkg = pathlib.Path(pdserve.sim.__file__).parent
    for path in pkg.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert "scheduler" not in node.name.lower(), f"{path}: class {node.name}"
                assert "blockmanager" not in node.name.lower(), f"{path}: class {node.name}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in mods:   # the sim never loads a model
                    assert not m.startswith("torch") and "model_runner" not in m, f"{path}: imports {m}"
    src = (pkg / "instance.py").read_text()
    assert "from pdserve.engine.scheduler import Scheduler" in src
    assert "from pdserve.engine.block_manager import BlockManager" in src


def one_request(n_in=1000, n_out=5):
    return [Session(0.0, [TraceRequest(n_in, n_out)])]


@pytest.mark.parametrize("slow_bw,fast_bw", [(1, 100), (4, 64)])
def test_link_bandwidth_delays_second_token_by_bytes_over_bw(slow_bw, fast_bw):
    n_in = 1000
    _, slow = collect(pd_config(link_bw=slow_bw), one_request(n_in))
    _, fast = collect(pd_config(link_bw=fast_bw), one_request(n_in))
    s, f = slow["r0"], fast["r0"]
    nbytes = n_in * LLAMA_8B_KV_BYTES_PER_TOKEN
    expect = nbytes / (slow_bw * 1e9) - nbytes / (fast_bw * 1e9)
    # the first token comes from the prefill instance: the link does not touch it
    assert s.prefill_instance == "n0i0" and s.decode_instance == "n0i1"
    assert s.token_times[0] == f.token_times[0]
    assert s.token_times[1] - f.token_times[1] == pytest.approx(expect, rel=1e-9)
    assert s.end - f.end == pytest.approx(expect, rel=1e-9)
    assert len(s.token_times) == 5
    # decode steps after the hand-off are unaffected by the link
    assert s.token_times[4] - s.token_times[1] == pytest.approx(f.token_times[4] - f.token_times[1])
    # and the hand-off starts only once the first token exists
    assert s.kv_start >= s.token_times[0]
    assert s.token_times[1] - s.token_times[0] > 20e-6 + nbytes / (slow_bw * 1e9)


def test_link_latency_adds_once():
    _, a = collect(pd_config(link_latency=0), one_request())
    _, b = collect(pd_config(link_latency=5_000_000), one_request())   # 5 ms
    assert b["r0"].token_times[0] == a["r0"].token_times[0]
    assert b["r0"].end - a["r0"].end == pytest.approx(5e-3, rel=1e-9)


def test_decode_kv_grows_while_prefill_kv_stays_bounded():
    """Seed 003: the decode instance accumulates KV for every active request; the prefill
    instance's KV is in flight only (requests being prefilled or handed off)."""
    rng = random.Random(3)
    t, sessions = 0.0, []
    for _ in range(120):
        t += rng.expovariate(6.0)
        sessions.append(Session(t, [TraceRequest(rng.randint(200, 1200), rng.randint(300, 600))]))
    cluster = pd_config()
    sim = ClusterSim(cluster, options=None)
    sim.opts.log_interval = 0.5
    sim.on_log = lambda line: None
    recs = []
    sim.run(sessions, recs.append)
    assert len(recs) == 120
    p, d = sim.instances
    bs = p.bm.block_size

    def used_blocks(inst, mem):
        return round((mem - inst.weight_bytes) / inst.kv_bytes_per_block)

    hist = [(at, used_blocks(p, m[0]), used_blocks(d, m[1])) for at, m in sim.mem_history]
    for at, p_used, _ in hist:
        # independent bound from the request timeline: blocks of requests that started prefilling
        # and whose KV has not yet reached the decode instance
        inflight = sum(math.ceil((r.input_toks + 1) / bs) for r in recs if r.first_scheduled <= at < r.kv_done)
        assert p_used <= inflight
    peak_p = max(h[1] for h in hist)
    peak_d = max(h[2] for h in hist)
    assert peak_d > 10 * peak_p
    # during the arrival phase the decode instance's KV keeps growing
    arrivals_end = sessions[-1].arrival
    early = [h[2] for h in hist if h[0] <= 2.0]
    late = [h[2] for h in hist if arrivals_end - 4 <= h[0] <= arrivals_end]
    assert max(late) > 3 * max(early)
    assert hist[-1][1] == 0 and hist[-1][2] == 0   # everything freed at the end


def test_decode_prefix_cache_cuts_the_transfer():
    """With prefix caching on, a decode instance pulls only what its own cache lacks."""
    shared = list(range(5000, 5000 + 512))
    sessions = [Session(i * 2.0, [TraceRequest(640, 3, shared + list(range(i * 1000, i * 1000 + 128)))])
                for i in range(3)]
    from pdserve.config import EngineConfig
    sim = ClusterSim(pd_config(), EngineConfig(enable_prefix_caching=True))
    recs = []
    sim.run(sessions, recs.append)
    kv = [r.kv_bytes for r in sorted(recs, key=lambda r: r.arrival)]
    assert kv[0] == 640 * LLAMA_8B_KV_BYTES_PER_TOKEN
    assert kv[1] == kv[2] == 128 * LLAMA_8B_KV_BYTES_PER_TOKEN


def test_colocated_cluster_serves_everything_locally():
    d = json.loads(json.dumps({"num_nodes": 1, "link_bw": 16, "link_latency": 0, "nodes": [{
        "num_instances": 2, "instances": [{"model_name": "Qwen/Qwen3-0.6B", "hardware": "H100",
                                           "pd_type": None, "tp_size": 1}]}]}))
    sim, recs = collect(parse_cluster_config(d), [Session(i * 0.01, [TraceRequest(100, 10)]) for i in range(10)])
    assert len(recs) == 10
    assert all(r.kv_bytes == 0 and r.decode_instance == "" for r in recs.values())
    assert {r.prefill_instance for r in recs.values()} == {"n0i0", "n0i1"}   # round robin
    assert all(len(r.token_times) == 10 for r in recs.values())


def small_kv_config(prefill_blocks: int, link_bw=1):
    """Prefill instance with room for only `prefill_blocks` KV blocks (block = 16 tokens)."""
    from pdserve.sim.models import get_model
    weights = get_model("meta-llama/Llama-3.1-8B").weight_bytes(2)
    mem_gb = (weights + (prefill_blocks + 0.5) * 16 * LLAMA_8B_KV_BYTES_PER_TOKEN) / 0.9 / 1e9
    c = pd_config(link_bw=link_bw)
    c.instances[0].mem_size = mem_gb * 1e9
    return c


def test_prefill_waits_for_held_blocks_then_continues():
    """Two prompts that cannot both sit in the prefill instance's KV: the second starts only once
    the first's KV has crossed the link and P released it."""
    sim = ClusterSim(small_kv_config(40))
    assert sim.instances[0].bm.num_blocks == 40
    recs = []
    sim.run([Session(0.0, [TraceRequest(500, 3)]), Session(0.001, [TraceRequest(500, 3)])], recs.append)
    a, b = sorted(recs, key=lambda r: r.arrival)
    assert not a.error and not b.error
    assert b.first_scheduled >= a.kv_done     # blocked until the hand-off freed P's blocks
    assert len(b.token_times) == 3


def test_request_larger_than_any_kv_cache_fails_cleanly():
    sim = ClusterSim(small_kv_config(40))
    recs = []
    sim.run([Session(0.0, [TraceRequest(100, 3)]), Session(0.0, [TraceRequest(2000, 3)]),
             Session(0.1, [TraceRequest(100, 3)])], recs.append)
    assert len(recs) == 3
    failed = [r for r in recs if r.error]
    assert len(failed) == 1 and failed[0].input_toks == 2000 and "KV" in failed[0].error
    assert all(len(r.token_times) == 3 for r in recs if not r.error)


@pytest.mark.parametrize("routing", ["round_robin", "prefix_aware"])
def test_routing_policy_objects_pick_the_decode_instance(routing):
    """The router's own policies route the simulated requests: prefix-aware keeps a shared
    prefix on one decode instance, where its prefix cache then saves most of the transfer."""
    from pdserve.config import EngineConfig
    from pdserve.sim.simulator import SimOptions
    prefix = list(range(10_000, 10_000 + 480))
    sessions = [Session(i * 0.5, [TraceRequest(512, 2, prefix + list(range(i * 100, i * 100 + 32)))])
                for i in range(6)]
    sim = ClusterSim(pd_config(n_decode=2), EngineConfig(enable_prefix_caching=True), SimOptions(routing=routing))
    recs = []
    sim.run(sessions, recs.append)
    recs.sort(key=lambda r: r.arrival)
    decoders = [r.decode_instance for r in recs]
    if routing == "round_robin":
        assert len(set(decoders)) == 2
        assert decoders[0] != decoders[1]
    else:
        assert len(set(decoders)) == 1
        full = 512 * LLAMA_8B_KV_BYTES_PER_TOKEN
        assert recs[0].kv_bytes == full and all(r.kv_bytes == 32 * LLAMA_8B_KV_BYTES_PER_TOKEN for r in recs[1:])


def test_local_prefill_threshold_as_the_router_decides():
    """--local-prefill-max-tokens: a call whose prompt is mostly on the decode instance already is
    prefilled there; a long new prompt goes to the prefill instance."""
    from pdserve.config import EngineConfig
    from pdserve.sim.simulator import SimOptions
    first = list(range(20_000, 20_000 + 800))
    follow = first + list(range(30_000, 30_000 + 48))
    sessions = [Session(0.0, [TraceRequest(800, 4, first, tool_duration=0.1), TraceRequest(848, 4, follow)], "s")]
    sim = ClusterSim(pd_config(), EngineConfig(enable_prefix_caching=True),
                     SimOptions(routing="prefix_aware", local_prefill_max_tokens=100))
    recs = []
    sim.run(sessions, recs.append)
    a, b = sorted(recs, key=lambda r: r.index)
    assert a.prefill_instance == "n0i0" and a.kv_bytes == 800 * LLAMA_8B_KV_BYTES_PER_TOKEN
    assert b.prefill_instance == b.decode_instance == "n0i1" and b.kv_bytes == 0
    assert len(b.token_times) == 4
