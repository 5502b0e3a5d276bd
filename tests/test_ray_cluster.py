"""`pdserve up --ray` on a real Ray cluster of raylets on this machine (ray.cluster_utils.Cluster,
127.0.0.1 only): workers as named actors placed by role, P and D on different nodes, KV over
tcp between them; answers equal to a colocated worker's; a killed decode actor restarted by
Ray and taken back by the router; decode workers added and drained at run time; a lost node's
worker re-placed on another node. Nothing left running afterwards."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import httpx
import openai
import psutil
import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from pdserve.procs import free_port, pdserve_command, start, stop, wait_healthy  # noqa: E402
from pdserve.ray_cluster.cli import connect  # noqa: E402
from pdserve.ray_cluster.driver import CONTROLLER  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ENGINE = ["--kv-cache-memory", "64MiB", "--max-num-batched-tokens", "512"]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = ("Prefill and decode are the two phases of serving a language model. Explain, in plain words, why "
          "a serving system might run them on different machines.")
CONFIG = """
ray: {max_restarts: -1, max_task_retries: -1, drain_timeout: 300}
local_prefill_max_tokens: 0
prefill: {count: 1, ray_resources: {prefill_node: 1}}
decode: {count: 1, ray_resources: {decode_node: 1}}
"""


def node_ids() -> dict[str, str]:
    """custom resource -> id of the node that has it."""
    out = {}
    for n in ray.nodes():
        if n["Alive"]:
            for r in ("prefill_node", "decode_node"):
                if r in n["Resources"]:
                    out.setdefault(r, set()).add(n["NodeID"])
    return out


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    nodes = {"prefill": c.add_node(num_cpus=2, resources={"prefill_node": 4}, node_ip_address="127.0.0.1"),
             "decode": c.add_node(num_cpus=2, resources={"decode_node": 4}, node_ip_address="127.0.0.1")}
    c.wait_for_nodes()
    connect(c.address, "pdserve")
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        raylets = [p for p in psutil.Process().children(recursive=True)]
        c.shutdown()
    gone, alive = psutil.wait_procs(raylets, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"left running: {alive}"


@pytest.fixture(scope="module")
def up(cluster, tmp_path_factory):
    c, nodes = cluster
    logs = tmp_path_factory.mktemp("ray-up")
    cfg = logs / "deploy.yaml"
    cfg.write_text(CONFIG)
    ref_port = free_port()
    ref = start(pdserve_command("serve", "--role", "both", "--port", ref_port, *ENGINE), logs / "ref.log")
    proc = subprocess.Popen(pdserve_command("up", "--ray", c.address, "--config", cfg, "--port", "0",
                                            "--log-dir", logs, "--startup-timeout", "600", *ENGINE),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: [lines.append(l) for l in proc.stdout], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not any(l.startswith("Ctrl+C") for l in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "pdserve up --ray failed:\n" + "".join(lines)
            time.sleep(0.5)
        text = "".join(lines)
        router = re.search(r"pdserve is up: (\S+)/v1", text).group(1)
        wait_healthy(f"http://127.0.0.1:{ref_port}", ref, timeout=300)
        yield {"router": router, "ref": f"http://127.0.0.1:{ref_port}", "proc": proc, "lines": lines,
               "address": c.address, "cluster": c, "nodes": nodes}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        stop(ref)
        print("".join(lines))   # shown with a failure


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def status(router: str) -> dict:
    return httpx.get(router + "/status", timeout=30).json()


def metric(url: str, name: str, label: str = "") -> float:
    """The sum of a worker's samples of `name` whose labels contain `label`."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(v) for labels, v in re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M)
               if label in labels)


def complete(url: str, **kw) -> str:
    out = client(url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, **kw)
    return out.choices[0].text


def chat_stream(url: str, **kw) -> str:
    s = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=16, stream=True, **kw)
    return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)


def wait_for(cond, what: str, timeout: float = 300.0, lines=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"not reached within {timeout:.0f}s: {what}" + ("\n" + "".join(lines) if lines else ""))


def test_pd_on_two_nodes_equals_colocated(up):
    st = status(up["router"])
    (p,), (d,) = st["prefill_instances"], st["decode_instances"]
    ids = node_ids()
    assert {p["ray_node_id"]} == ids["prefill_node"] and {d["ray_node_id"]} == ids["decode_node"]
    assert p["ray_node_id"] != d["ray_node_id"]
    assert p["ray_actor"] == "pdserve-prefill-0" and d["ray_actor"] == "pdserve-decode-0"
    assert p["url"].startswith("http://127.0.0.1:") and d["url"].startswith("http://127.0.0.1:")
    handle = ray.get_actor("pdserve-decode-0", namespace="pdserve")
    assert ray.get(handle.info.remote())["url"] == d["url"]
    for kw in ({"temperature": 0}, {"temperature": 0.9, "seed": 1234}):
        assert complete(up["router"], **kw) == complete(up["ref"], **kw)
        assert chat_stream(up["router"], **kw) == chat_stream(up["ref"], **kw)
    st = status(up["router"])
    assert st["requests"]["remote_prefill"] >= 4 and st["requests"]["local_prefill"] == 0
    assert metric(d["url"], "pdserve:kv_transfer_bytes_total", 'transport="tcp"') > 0
    assert metric(d["url"], "pdserve:kv_transfer_bytes_total", 'transport="shm"') == 0


def load(router: str, n: int, results: list, stop_event: threading.Event | None = None, tokens: int = 48):
    """n streamed chats (or, with stop_event, chats until it is set), each ending as
    ('ok', text) or ('error', message); chunks counted so a test can act mid-stream."""
    progress = {"chunks": 0}

    def one(i):
        try:
            s = client(router).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"{i}: {PROMPT}"}], max_tokens=tokens,
                stream=True, temperature=0)
            text, finish = "", None
            for ch in s:
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
                    progress["chunks"] += 1
            results.append(("ok", text) if finish else ("error", "stream ended without finish_reason"))
        except openai.APIError as e:
            results.append(("error", str(e)))

    def loop():
        i = 0
        while not stop_event.is_set():
            one(i)
            i += 1
    if stop_event is not None:
        threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
    else:
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, progress


def decode_urls(router: str) -> list[str]:
    return [i["url"] for i in status(router)["decode_instances"]]


def scale(up, **counts) -> dict:
    args = [f"--{k}={v}" for k, v in counts.items()]
    out = subprocess.run(pdserve_command("scale", "--ray", up["address"], *args, "--wait", "400"),
                         capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout + out.stderr + "".join(up["lines"])
    return json.loads(out.stdout[out.stdout.index("{"):])


def test_scale_decode_up_and_down_under_load(up):
    results, done = [], threading.Event()
    threads, progress = load(up["router"], 2, results, done, tokens=24)
    try:
        wait_for(lambda: progress["chunks"] > 0, "load started")
        got = scale(up, decode=2)
        assert [w["name"] for w in got["state"]["decode"]] == ["pdserve-decode-0", "pdserve-decode-1"]
        st = status(up["router"])
        assert sorted(i["ray_actor"] for i in st["decode_instances"]) == ["pdserve-decode-0", "pdserve-decode-1"]
        assert all(i["healthy"] for i in st["decode_instances"])
        # the new worker takes requests (round robin over both)
        new = next(i["url"] for i in st["decode_instances"] if i["ray_actor"] == "pdserve-decode-1")
        wait_for(lambda: metric(new, "pdserve:generation_tokens_total") > 0, "the added worker serves")
        got = scale(up, decode=1)
        assert [w["name"] for w in got["state"]["decode"]] == ["pdserve-decode-0"]
        assert [i["ray_actor"] for i in status(up["router"])["decode_instances"]] == ["pdserve-decode-0"]
        with pytest.raises(ValueError):
            ray.get_actor("pdserve-decode-1", namespace="pdserve")
    finally:
        done.set()
        for t in threads:
            t.join(300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert results and all(r[0] == "ok" for r in results), [r for r in results if r[0] != "ok"]


def all_workers_idle(router: str) -> bool:
    st = status(router)
    insts = st["prefill_instances"] + st["decode_instances"]
    return all(i["healthy"] for i in insts) and all(
        metric(i["url"], "pdserve:num_kv_blocks_used") == 0 and metric(i["url"], "pdserve:num_requests_held") == 0
        for i in insts)


def test_killed_decode_actor_restarts_and_router_recovers(up):
    router = up["router"]
    before = decode_urls(router)
    handle = ray.get_actor("pdserve-decode-0", namespace="pdserve")
    old_pid = ray.get(handle.info.remote())["pid"]
    results = []
    threads, progress = load(router, 4, results)
    wait_for(lambda: progress["chunks"] >= 4, "streams under way")
    ray.kill(handle, no_restart=False)
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(results) == 4
    for kind, text in results:   # its answer, or an error that says what happened
        assert kind == "ok" or "decode" in text or "503" in text or "healthy" in text, text
    wait_for(lambda: decode_urls(router) and decode_urls(router) != before
             and all(i["healthy"] for i in status(router)["decode_instances"]), "restarted decode back",
             lines=up["lines"])
    info = ray.get(handle.info.remote())
    assert info["restarted"] and info["pid"] != old_pid and not psutil.pid_exists(old_pid)
    (d,) = status(router)["decode_instances"]
    assert d["restarted"] is True and d["url"] == info["url"]
    assert complete(router, temperature=0) == complete(up["ref"], temperature=0)
    wait_for(lambda: all_workers_idle(router), "KV usage back to 0 everywhere")


def test_lost_node_worker_replaced_on_another(up):
    c, router = up["cluster"], up["router"]
    spare = c.add_node(num_cpus=2, resources={"decode_node": 4}, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    (d,) = status(router)["decode_instances"]
    old = ray.get(ray.get_actor("pdserve-decode-0", namespace="pdserve").info.remote())
    c.remove_node(up["nodes"]["decode"], allow_graceful=False)
    # the lost node's actor and its `pdserve serve` go with it (nothing on the node is left to stop them)
    wait_for(lambda: not any(running(old[k]) for k in ("pid", "actor_pid")), "the lost node's processes gone",
             timeout=60, lines=up["lines"])
    wait_for(lambda: [i["ray_node_id"] for i in status(router)["decode_instances"]] == [spare.node_id]
             and all(i["healthy"] for i in status(router)["decode_instances"]), "decode re-placed on the spare node",
             lines=up["lines"])
    assert complete(router, temperature=0) == complete(up["ref"], temperature=0)
    wait_for(lambda: all_workers_idle(router), "KV usage back to 0 everywhere")


def test_lost_controller_comes_back_with_its_counts(up):
    """The wanted counts outlive their actor: the driver starts it again with what it last read,
    and goes on watching the workers meanwhile."""
    ctrl = ray.get_actor(CONTROLLER, namespace="pdserve")
    counts = ray.get(ctrl.get.remote())["counts"]
    ray.kill(ctrl, no_restart=True)

    def back():
        try:
            got = ray.get(ray.get_actor(CONTROLLER, namespace="pdserve").get.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None
        return got if got["state"] else None
    got = wait_for(back, "the controller back", timeout=120, lines=up["lines"])
    assert got["counts"] == counts and got["router_url"] == up["router"]
    assert [w["name"] for w in got["state"]["decode"]] == ["pdserve-decode-0"]
    assert "the controller died" in "".join(up["lines"])
    assert scale(up, decode=1)["reached"]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_nothing_left_running(up):
    """Last: stop `pdserve up --ray`; its actors and their servers are gone, those that Ray
    restarted or placed again on another node included."""
    proc = up["proc"]
    pids = [int(p) for p in re.findall(r" pid (\d+)", "".join(up["lines"]))]
    for name in ray.util.list_named_actors(all_namespaces=False):
        if re.fullmatch(r"pdserve-(prefill|decode|both)-\d+", name):
            info = ray.get(ray.get_actor(name, namespace="pdserve").info.remote(), timeout=60)
            pids += [info["pid"], info["actor_pid"]]
    assert len(pids) >= 3 + 2 * 2   # the router and the first servers, then each worker's actor and server
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(120) == 0
    assert not [n for n in ray.util.list_named_actors(all_namespaces=True) if "pdserve" in str(n)]
    wait_for(lambda: not any(running(p) for p in pids), "worker processes gone", timeout=60)
