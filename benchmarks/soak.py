"""Soak: mixed traffic through `pdserve up` for a long time while workers and the router are
killed (SIGKILL) and frozen (SIGSTOP, then SIGCONT). Records every request's outcome, the
RSS of every process over time, and writes soak.json, soak.png and a markdown summary.

    python benchmarks/soak.py --minutes 30 --md benchmarks/soak.md

Outcomes: `right` (finish_reason set, and the text equal to the first answer to the same
request: greedy, or sampled with the same seed, which gives the same tokens by design),
`error` (a clear error: an OpenAI error body or an SSE error event), `refused` (the router's port refused the connection: it is being restarted),
`cut` (the connection broke while a SIGKILL of the router fell inside the request: the one
process holding the client's socket died, nobody can answer on it), `lost` (no answer and no
clear error otherwise: a hang past --request-timeout, a reset connection, a stream cut without
[DONE]). The goal is lost = 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Write one sentence about the sea.",
           "Prefill and decode are the two phases of serving a language model. " * 6 + "Explain why they differ.",
           "List three colours:", "Once upon a time"]


def children(pid: int) -> list[int]:
    """Direct children of pid (workers and router of `pdserve up`)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def describe(pid: int) -> str:
    try:
        cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
        return "gone"
    if "pdserve.router.cli" in cmd:
        return "router"
    return cmd[cmd.index("--role") + 1] if "--role" in cmd else "up"


def rss_mb(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def one_request(session: aiohttp.ClientSession, url: str, rng: random.Random, refs: dict, timeout: float):
    out = await _one_request(session, url, rng, refs, timeout)
    out["t_end"] = time.time()
    return out


async def _one_request(session: aiohttp.ClientSession, url: str, rng: random.Random, refs: dict, timeout: float):
    prompt = rng.choice(PROMPTS)
    chat, stream, greedy = rng.random() < 0.5, rng.random() < 0.6, rng.random() < 0.7
    body = {"model": MODEL, "max_tokens": rng.choice([8, 16, 32]), "temperature": 0 if greedy else 0.8}
    if not greedy:
        body["seed"] = rng.randrange(1000)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body["stream"] = stream
    disconnect_early = stream and rng.random() < 0.1
    path = "/v1/chat/completions" if chat else "/v1/completions"
    # greedy, or seeded: the same request gives the same answer, faults or not (DESIGN.md)
    key = (path, prompt, body["max_tokens"], body.get("seed"))
    t0 = time.time()
    try:
        async with session.post(url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                data = await r.json(content_type=None)
                ok = isinstance(data, dict) and isinstance(data.get("error"), dict)
                return {"t": t0, "outcome": "error" if ok else "lost", "status": r.status}
            if not stream:
                data = await r.json()
                choice = data["choices"][0]
                text = choice["message"]["content"] if chat else choice["text"]
                finish = choice.get("finish_reason")
            else:
                text, done, err, finish = "", False, False, None
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        err = True
                        continue
                    if event.get("choices"):
                        c = event["choices"][0]
                        finish = c.get("finish_reason") or finish
                        text += (c.get("delta", {}).get("content") or "") if chat else (c.get("text") or "")
                    if disconnect_early and len(text) > 5:
                        return {"t": t0, "outcome": "disconnected", "status": 200}
                if err:
                    return {"t": t0, "outcome": "error", "status": 200}
                if not done:
                    return {"t": t0, "outcome": "lost", "status": 200, "why": "stream ended without [DONE]"}
    except asyncio.TimeoutError:
        return {"t": t0, "outcome": "lost", "why": "timeout"}
    except aiohttp.ClientConnectorError as e:   # nothing listens on the router's port (restarting)
        return {"t": t0, "outcome": "refused", "why": f"{type(e).__name__}: {e}"[:200]}
    except (aiohttp.ClientError, json.JSONDecodeError, KeyError) as e:
        return {"t": t0, "outcome": "lost", "why": f"{type(e).__name__}: {e}"[:200]}
    if finish not in ("stop", "length"):
        return {"t": t0, "outcome": "wrong", "status": 200, "key": list(key), "stream": stream, "got": text,
                "why": f"finish_reason {finish!r}"}
    ref = refs.setdefault(key, text)   # an empty answer is an answer (a sampled EOS first)
    if text != ref:   # what differed, to tell a wrong answer from a wrong reference
        return {"t": t0, "outcome": "wrong", "status": 200, "key": list(key), "stream": stream, "got": text,
                "want": ref}
    return {"t": t0, "outcome": "right", "status": 200}


async def traffic(url: str, end: float, concurrency: int, seed: int, refs: dict, timeout: float, out: list):
    async with aiohttp.ClientSession() as session:
        async def client(i: int):
            rng = random.Random(seed * 1000 + i)
            while time.time() < end:
                out.append(await one_request(session, url, rng, refs, timeout))
                await asyncio.sleep(rng.expovariate(2.0))
        await asyncio.gather(*(client(i) for i in range(concurrency)))


async def faults(up_pid: int, end: float, every: float, seed: int, log: list):
    rng = random.Random(seed)
    await asyncio.sleep(max(0.0, min(every, end - time.time())))   # --fault-every past the end: none
    while time.time() < end - every / 2:
        kids = [(p, describe(p)) for p in children(up_pid)]
        kids = [(p, role) for p, role in kids if role in ("prefill", "decode", "router")]
        if kids:
            pid, role = rng.choice(kids)
            kind = rng.choice(["SIGKILL", "SIGSTOP"])
            log.append({"t": time.time(), "fault": kind, "target": role, "pid": pid})
            print(f"[{time.strftime('%H:%M:%S')}] fault: {kind} {role} (pid {pid})", flush=True)
            os.kill(pid, getattr(signal, kind))
            if kind == "SIGSTOP":
                await asyncio.sleep(rng.uniform(5, 20))
                os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(max(0.0, min(every, end - time.time())))


async def sample_rss(up_pid: int, end: float, samples: list):
    while time.time() < end:
        row = {"t": time.time()}
        for p in [up_pid, *children(up_pid)]:
            mb = rss_mb(p)
            if mb is not None:
                row[f"{describe(p)}:{p}"] = round(mb, 1)
        samples.append(row)
        await asyncio.sleep(5)


def plot(samples: list, fault_log: list, results: list, t0: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 2])
    names = sorted({k for s in samples for k in s if k != "t"})
    for name in names:
        pts = [((s["t"] - t0) / 60, s[name]) for s in samples if name in s]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    for f in fault_log:
        ax.axvline((f["t"] - t0) / 60, color="red" if f["fault"] == "SIGKILL" else "orange", alpha=0.4, lw=1)
    ax.set_ylabel("RSS (MB)")
    ax.set_title("pdserve soak: RSS of every process (a restarted process gets a new line)")
    ax.legend(fontsize=7, ncol=3)
    for outcome in sorted({r["outcome"] for r in results}):
        ts = sorted((r["t"] - t0) / 60 for r in results if r["outcome"] == outcome)
        ax2.step(ts, range(1, len(ts) + 1), where="post", label=outcome)
    for f in fault_log:
        ax2.axvline((f["t"] - t0) / 60, color="red" if f["fault"] == "SIGKILL" else "orange", alpha=0.4, lw=1)
    ax2.set_ylabel("requests (cumulative)")
    ax2.set_xlabel("minutes (red: SIGKILL, orange: SIGSTOP)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long traffic runs")
    ap.add_argument("--concurrency", type=int, default=4, help="clients sending one request after another")
    ap.add_argument("--fault-every", type=float, default=90.0, help="seconds between injected faults")
    ap.add_argument("--request-timeout", type=float, default=180.0, help="a request slower than this is lost")
    ap.add_argument("--seed", type=int, default=0, help="traffic and fault choices")
    ap.add_argument("--out-dir", default="benchmarks/results/soak", help="soak.json and soak.png go here")
    ap.add_argument("--md", default=None, help="also append a markdown summary here")
    ap.add_argument("--up-args", default="--prefill 1 --decode 1 --kv-cache-memory 256MiB",
                    help="arguments of `pdserve up`")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)   # a killed soak stops its deployment too

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = tempfile.mkdtemp(prefix="pdserve-soak-")
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--port", "0", "--log-dir", logs, *args.up_args.split()]
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    text = ""
    while "Ctrl+C" not in text:
        line = up.stdout.readline()
        if not line:
            print(text)
            return 1
        text += line
    url = re.search(r"pdserve is up: (\S+)/v1", text).group(1)
    print(text, flush=True)
    reader = subprocess.Popen(["cat"], stdin=up.stdout, stdout=open(Path(logs) / "up.out", "w"))

    results, samples, fault_log, refs = [], [], [], {}
    t0 = time.time()
    end = t0 + args.minutes * 60

    async def run():
        await asyncio.gather(traffic(url, end, args.concurrency, args.seed, refs, args.request_timeout, results),
                             faults(up.pid, end, args.fault_every, args.seed, fault_log),
                             sample_rss(up.pid, end, samples))
    try:
        asyncio.run(run())
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
        reader.wait(10)

    # a broken connection across a SIGKILL of the router: that process held the client's socket
    kills = [f["t"] for f in fault_log if f["fault"] == "SIGKILL" and f["target"] == "router"]
    for r in results:
        if r["outcome"] == "lost" and r.get("why") != "timeout" and any(r["t"] <= k <= r["t_end"] for k in kills):
            r["outcome"] = "cut"
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    first = {k: v for k, v in samples[0].items() if k != "t"} if samples else {}
    last = {k: v for k, v in samples[-1].items() if k != "t"} if samples else {}
    summary = {"minutes": args.minutes, "requests": len(results), "outcomes": counts, "faults": fault_log,
               "rss_first_mb": first, "rss_last_mb": last, "load_average_1m_at_end": os.getloadavg()[0],
               "up_log": logs, "lost_examples": [r for r in results if r["outcome"] == "lost"][:10],
               "wrong_examples": [r for r in results if r["outcome"] == "wrong"][:10]}
    (out_dir / "soak.json").write_text(json.dumps({"summary": summary, "rss": samples, "requests": results}, indent=1))
    plot(samples, fault_log, results, t0, str(out_dir / "soak.png"))
    print(json.dumps(summary, indent=2))
    if args.md:
        with open(args.md, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')}: {args.minutes:g} min, {args.concurrency} clients, "
                    f"a fault every {args.fault_every:g} s (`{args.up_args}`)\n\n")
            f.write(f"- requests: {len(results)}; lost: {counts.get('lost', 0)}; outcomes: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "\n")
            kinds = {}
            for x in fault_log:
                kinds[f"{x['fault']} {x['target']}"] = kinds.get(f"{x['fault']} {x['target']}", 0) + 1
            f.write("- faults: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) + "\n")
            f.write(f"- RSS at the start (MB): {first}\n- RSS at the end (MB): {last}\n")
            f.write(f"- load average at the end: {summary['load_average_1m_at_end']:.1f}\n\n"
                    f"![RSS over time](results/soak/soak.png)\n")
    return 0 if counts.get("lost", 0) == 0 and counts.get("wrong", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
