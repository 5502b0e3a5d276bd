"""Tensor parallelism on this machine: one engine step at TP=1 (all cores, as many threads)
against TP=N (each rank on its own core(s)), in the same run, on the default model.

Measures a prefill step of a long prompt and decode steps at several batch sizes, with the
share of rank 0's step time spent in the all-reduces (two per layer); then the KV hand-off of
that prompt from a prefill engine at TP=N to a decode engine at TP=1 against TP=1 -> TP=1, over
tcp and shm (each engine with its real connector and KV server, in this process). Prints a table and writes
JSON (and a Markdown report with --md).

    python benchmarks/tensor_parallel.py [--tp 2] [--prompt 2000] [--batches 1,8,32] [--md benchmarks/tensor_parallel.md]

The default model has 9 heads and 3 KV heads, which 2 does not divide: for TP=2 the benchmark
builds a random-weight model of the default model's size with --heads 8 --kv-heads 4 (same
hidden size, layers and MLP; the step cost is the same, the text is noise).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from pdserve import cpu_threads

cpu_threads.prepare_env()

import torch  # noqa: E402

from pdserve.config import EngineConfig  # noqa: E402
from pdserve.engine.block_manager import BlockManager  # noqa: E402
from pdserve.engine.model_runner import ModelRunner  # noqa: E402
from pdserve.engine.request import SamplingParams, Sequence  # noqa: E402
from pdserve.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from pdserve.engine.tp_ranks import Ranks  # noqa: E402
from pdserve.models.loader import read_hf_config, resolve_model  # noqa: E402


class ReduceTimer:
    """Wraps the group's all_reduce: seconds spent in it on rank 0."""

    def __init__(self, group):
        self.group, self.real, self.seconds = group, group.all_reduce, 0.0
        group.all_reduce = self

    def __call__(self, x):
        t = time.perf_counter()
        try:
            return self.real(x)
        finally:
            self.seconds += time.perf_counter() - t


def timed_steps(runner, sched, reducer, steps: int) -> tuple[list[float], list[float]]:
    """Run `steps` scheduled steps; (wall seconds, all-reduce seconds) per step."""
    walls, reduces = [], []
    for _ in range(steps):
        out = sched.schedule()
        before = reducer.seconds if reducer else 0.0
        t = time.perf_counter()
        tokens, _ = runner.execute(out, lambda s: ())
        walls.append(time.perf_counter() - t)
        reduces.append((reducer.seconds if reducer else 0.0) - before)
        sched.update(out, tokens)
    return walls, reduces


def measure(model_dir: str, hf: dict, tp: int, prompt: int, batches: list[int], repeats: int) -> dict:
    cfg = EngineConfig(model=model_dir, device="cpu", dtype="float32", kv_cache_memory="512MiB",
                       max_num_batched_tokens=max(prompt, 64), max_num_seqs=max(batches), tensor_parallel_size=tp)
    ranks = Ranks(cfg, model_dir, prompt + 256) if tp > 1 else None
    if ranks is None:
        cpu_threads.apply(cpu_threads.plan())
    try:
        runner = ModelRunner(cfg, model_dir, hf, prompt + 256, tp=ranks.group if ranks else None)
        reducer = ReduceTimer(runner.tp) if ranks else None
        g = torch.Generator().manual_seed(0)
        vocab = runner.model_config.vocab_size
        res = {"tp": tp, "threads": torch.get_num_threads(), "prefill": [], "decode": {}}
        for r in range(repeats):   # a long prompt in one step
            sched = Scheduler(SchedulerConfig(max_model_len=prompt + 256, max_num_batched_tokens=prompt), BlockManager(runner.num_blocks, 16, False))
            sched.add(Sequence(f"p{r}", torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                               SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)))
            w, a = timed_steps(runner, sched, reducer, 1)
            res["prefill"].append((w[0], a[0]))
        for b in batches:          # decode steps of b rows with 128-token contexts
            sched = Scheduler(SchedulerConfig(max_model_len=prompt + 256, max_num_batched_tokens=max(prompt, 128 * b),
                                              max_num_seqs=b),
                              BlockManager(runner.num_blocks, 16, False))
            for i in range(b):
                sched.add(Sequence(f"d{b}-{i}", torch.randint(0, vocab, (128,), generator=g).tolist(),
                                   SamplingParams(temperature=0, max_tokens=repeats + 2, ignore_eos=True)))
            timed_steps(runner, sched, reducer, 1)                      # the prefills (and first tokens)
            res["decode"][b] = list(zip(*timed_steps(runner, sched, reducer, repeats)))
        return res
    finally:
        if ranks:
            ranks.stop()


def handoff(model_dir: str, p_tp: int, prompt: int, transport: str, repeats: int) -> list[float]:
    """Seconds of each KV pull of a `prompt`-token prompt from a prefill engine at TP=p_tp to a
    decode engine at TP=1 (both in this process, each with its real connector and KV server)."""
    import asyncio
    from pdserve.config import KVTransferConfig
    from pdserve.engine.async_engine import AsyncEngine
    from pdserve.engine.engine import LLMEngine
    from pdserve.kv.connector import KVConnector
    from pdserve.kv.params import RemotePrefill
    from pdserve.kv.shm import ShmPoolAllocator
    common = dict(model=model_dir, device="cpu", dtype="float32", kv_cache_memory="384MiB",
                  max_model_len=prompt + 64, max_num_batched_tokens=prompt)
    shm = ShmPoolAllocator()
    p = LLMEngine(EngineConfig(role="prefill", tensor_parallel_size=p_tp, **common), kv_allocator=shm)
    d = LLMEngine(EngineConfig(role="decode", **common))
    pae, dae = AsyncEngine(p).start(), AsyncEngine(d).start()
    kc = KVTransferConfig(kv_transport=transport)
    pc = KVConnector(p, kc, shm_allocator=shm, wake=pae.wake)
    dc = KVConnector(d, kc, wake=dae.wake)
    seconds: list[float] = []
    dc.on_event = lambda kind, **kw: seconds.append(kw["seconds"]) if kind == "pulled" else None

    async def run(ae, ids, rid, **kw):
        return [o async for o in ae.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0),
                                             rid, **kw)]
    g = torch.Generator().manual_seed(1)
    try:
        for r in range(repeats + 1):   # the first is a warm-up (connections, mappings)
            ids = torch.randint(0, p.runner.model_config.vocab_size, (prompt,), generator=g).tolist()
            outs = asyncio.run(run(pae, ids, f"p{r}", remote_decode=True))
            rp = RemotePrefill.from_params(outs[-1].kv_transfer_params)
            asyncio.run(run(dae, ids, f"d{r}", remote_prefill=rp))
    finally:
        for c in (pc, dc):
            c.close()
        for ae in (pae, dae):
            ae.shutdown()
        if p.ranks:
            p.ranks.stop()
        shm.close()
    return seconds[1:]


def random_like(model_dir: str, heads: int, kv_heads: int) -> str:
    """A random-weight copy of the model's shape with other head counts (cached in a temp dir)."""
    import tempfile
    import transformers
    out = os.path.join(tempfile.gettempdir(), f"pdserve-bench-tp-{heads}h{kv_heads}kv")
    if not os.path.isfile(os.path.join(out, "config.json")):
        cfg = dict(read_hf_config(model_dir))
        cfg.update(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=cfg["hidden_size"] // heads)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(out)
    import shutil
    for name in os.listdir(model_dir):   # the tokenizer: a served engine needs one (the hand-off runs engines)
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(os.path.join(model_dir, name), out)
    return out


def summary(rows) -> tuple[float, float]:
    walls = [w for w, _ in rows]
    reduce = [a for _, a in rows]
    return statistics.median(walls) * 1000, 100 * sum(reduce) / max(sum(walls), 1e-9)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--heads", type=int, default=8, help="random-weight model's heads when --model is not given")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--prompt", type=int, default=2000)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="benchmarks/results/tensor_parallel.json")
    p.add_argument("--md", default=None)
    a = p.parse_args()
    _, model_dir = resolve_model(a.model)
    if a.model is None:
        model_dir = random_like(model_dir, a.heads, a.kv_heads)
    hf = read_hf_config(model_dir)
    batches = [int(x) for x in a.batches.split(",")]
    affinity = os.sched_getaffinity(0)
    load_before = os.getloadavg()[0]
    results = []
    for tp in (1, a.tp):
        print(f"TP={tp} ...", file=sys.stderr, flush=True)
        results.append(measure(model_dir, hf, tp, a.prompt, batches, a.repeats))
        os.sched_setaffinity(0, affinity)
    base, tpr = results
    lines = [f"| step | TP=1 ({base['threads']} threads) ms | TP={a.tp} (1 rank per core) ms | TP=1 / TP={a.tp} "
             f"| all-reduce share at TP={a.tp} |", "|---|---:|---:|---:|---:|"]
    rows = [(f"prefill {a.prompt} tokens", base["prefill"], tpr["prefill"])]
    rows += [(f"decode batch {b}", base["decode"][b], tpr["decode"][b]) for b in batches]
    for name, x, y in rows:
        (mx, _), (my, share) = summary(x), summary(y)
        lines.append(f"| {name} | {mx:.1f} | {my:.1f} | {mx / my:.2f}x | {share:.0f}% |")
    kv = [f"| KV hand-off of the {a.prompt}-token prompt | P TP=1 -> D TP=1 ms | P TP={a.tp} -> D TP=1 ms | "
          f"TP=1 / TP={a.tp} |", "|---|---:|---:|---:|"]
    handoffs = {}
    for transport in ("tcp", "shm"):
        print(f"hand-off over {transport} ...", file=sys.stderr, flush=True)
        one, many = (handoff(model_dir, t, a.prompt, transport, a.repeats) for t in (1, a.tp))
        os.sched_setaffinity(0, affinity)
        handoffs[transport] = {"tp1": one, f"tp{a.tp}": many}
        m1, mn = statistics.median(one) * 1000, statistics.median(many) * 1000
        kv.append(f"| over {transport} | {m1:.1f} | {mn:.1f} | {m1 / mn:.2f}x |")
    table = "\n".join(lines) + "\n\n" + "\n".join(kv)
    print(table)
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"model": model_dir, "results": results, "handoff_seconds": handoffs}, f, indent=1, default=list)
    if a.md:
        with open(a.md, "w") as f:
            f.write(f"# Tensor parallelism on this machine\n\n`python benchmarks/tensor_parallel.py --tp {a.tp}` "
                    f"(default model unless named: {os.path.basename(model_dir)}, float32, {os.cpu_count()} cores; "
                    f"median of {a.repeats} steps, both in the same run; load average {load_before:.1f} before, "
                    f"{os.getloadavg()[0]:.1f} after).\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
