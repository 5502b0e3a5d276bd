"""`pdserve profile`: measure the real engine's step time over a grid -> PROFILE.json.

Prefill: one request of n prompt tokens, timed for the step that computes it.
Decode: b requests that share one prompt of c tokens (the prefix cache computes it once), timed
over several steps once all b are decoding. Mixed: b such decoders plus a fresh prompt of n
tokens, timed for the one step that runs both (chunked prefill beside decodes). Each point is
timed over `LLMEngine.step()`, scheduling and detokenizing included, as the server runs it:
`repeats` steps per visit, and `passes` visits spread over the run (a burst of other load then
spoils one visit, not a point); the point's time is the median of its visits. The simulator's
ProfilePerf interpolates in these numbers (`pdserve sim --profile PROFILE.json`).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from pdserve.cli.args import WORKER_FIELDS, add_engine_args, engine_config_from_args

GRIDS = {  # (prefill tokens, decode batch sizes, decode contexts, mixed prefill tokens, mixed batches)
    "full": ([16, 32, 64, 128, 256, 512, 1024], [1, 2, 4, 8, 16, 32, 64], [64, 256, 1024, 2048],
             [64, 256, 512], [2, 8]),
    "quick": ([16, 64, 256], [1, 4], [64, 256], [64], [2]),
}


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    from pdserve import cpu_threads
    add_engine_args(p, exclude=WORKER_FIELDS)
    cpu_threads.add_arguments(p)
    p.add_argument("--output", default="PROFILE.json", help="where the profile is written")
    p.add_argument("--grid", choices=sorted(GRIDS), default="full", help="points measured (quick: a few of each kind, for a first try)")
    p.add_argument("--prefill-tokens", type=int, nargs="*", default=None, help="override the grid")
    p.add_argument("--decode-batches", type=int, nargs="*", default=None, help="decode batch sizes (override the grid)")
    p.add_argument("--decode-contexts", type=int, nargs="*", default=None,
                   help="decode context lengths (override the grid)")
    p.add_argument("--mixed-tokens", type=int, nargs="*", default=None,
                   help="prefill tokens of the mixed (prefill + decode) points; none: no mixed points")
    p.add_argument("--mixed-batches", type=int, nargs="*", default=None, help="decoders beside them")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per visit of a point")
    p.add_argument("--passes", type=int, default=3, help="visits of every point, in separate sweeps")
    p.add_argument("--serve-calibration", action="store_true",
                   help="also measure what serving over HTTP adds per step (starts one worker on 127.0.0.1)")
    p.add_argument("--pd-calibration", action="store_true",
                   help="also measure what the real prefill->decode path adds (starts 1P+1D and a router on "
                        "127.0.0.1): prefill request overhead and KV hand-off")
    p.add_argument("--pd-prompt-tokens", type=int, nargs="*", default=None,
                   help="prompt lengths for --pd-calibration (default: the measured prefill points of 64-512)")


def _timed_step(engine) -> float:
    t0 = time.perf_counter()
    engine.step()
    return time.perf_counter() - t0


def measure_prefill(engine, n: int, repeats: int, rng: random.Random) -> float:
    from pdserve.engine.request import SamplingParams
    vocab = engine.runner.model_config.vocab_size
    times = []
    for _ in range(repeats):
        rid = engine.add_request({"prompt_token_ids": [rng.randrange(vocab) for _ in range(n)]},
                                 SamplingParams(max_tokens=1, ignore_eos=True))
        times.append(_timed_step(engine))
        while rid in engine.states:   # a prompt longer than the token budget takes more steps
            times[-1] += _timed_step(engine)
    return statistics.median(times)


def measure_decode(engine, batch: int, context: int, repeats: int, rng: random.Random) -> float:
    from pdserve.engine.request import SamplingParams
    vocab = engine.runner.model_config.vocab_size
    prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(context)]}
    params = SamplingParams(max_tokens=repeats + 64, ignore_eos=True)
    first = engine.add_request(prompt, params)
    while engine.states[first].seq.num_output_tokens == 0:
        engine.step()
    rids = [first] + [engine.add_request(prompt, params) for _ in range(batch - 1)]
    while any(engine.states[r].seq.num_output_tokens == 0 for r in rids):
        engine.step()
    times = [_timed_step(engine) for _ in range(repeats)]
    for r in rids:
        engine.abort(r)
    return statistics.median(times)


def measure_mixed(engine, n: int, batch: int, context: int, repeats: int, rng: random.Random) -> float:
    from pdserve.engine.request import SamplingParams
    vocab = engine.runner.model_config.vocab_size
    prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(context)]}
    params = SamplingParams(max_tokens=repeats + 64, ignore_eos=True)
    rids = [engine.add_request(prompt, params) for _ in range(batch)]
    while any(engine.states[r].seq.num_output_tokens == 0 for r in rids):
        engine.step()
    times = []
    for _ in range(repeats):   # each step: one new prompt's whole prefill beside the decodes
        engine.add_request({"prompt_token_ids": [rng.randrange(vocab) for _ in range(n)]},
                           SamplingParams(max_tokens=1, ignore_eos=True))
        times.append(_timed_step(engine))
    for r in rids:
        engine.abort(r)
    return statistics.median(times)


def _calibrate(args, result: dict, engine) -> dict:
    from pdserve.sim.perf import ProfilePerf
    from pdserve.profile.serve_calibration import calibrate
    perf = ProfilePerf(result)
    flags = ["--device", args.device, "--dtype", args.dtype, "--block-size", str(args.block_size),
             "--tensor-parallel-size", str(engine.config.tensor_parallel_size), "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.kv_cache_memory:
        flags += ["--kv-cache-memory", str(args.kv_cache_memory)]
    if args.model:
        flags = [args.model] + flags
    batches = [b for b in (1, 4, 8) if b <= engine.config.max_num_seqs]
    context = min(128, engine.max_model_len // 4)
    cal = calibrate(flags, batches, context, perf.decode_time, engine.runner.model_config.vocab_size)
    print(f"serving adds {cal['per_step_s'] * 1e3:.1f} ms per step + {cal['per_seq_s'] * 1e3:.2f} ms per sequence")
    return cal


def _pd_calibrate(args, result: dict, engine) -> dict:
    from pdserve.sim.models import get_model
    from pdserve.profile.pd_calibration import calibrate, pd_lengths
    from pdserve.sim.perf import ProfilePerf
    eng = {"max_num_seqs": engine.config.max_num_seqs, "max_num_batched_tokens": engine.config.max_num_batched_tokens,
           "block_size": engine.config.block_size, "dtype": args.dtype, "device": args.device,
           "tensor_parallel_size": engine.config.tensor_parallel_size}
    if args.kv_cache_memory:
        eng["kv_cache_memory"] = args.kv_cache_memory
    kv_tok = get_model(engine.model_name).kv_bytes_per_token(engine.runner.kv_dtype.itemsize)
    lengths = [n for n in (args.pd_prompt_tokens or pd_lengths(result)) if n < engine.max_model_len // 2]
    cal = calibrate(eng, lengths, ProfilePerf(result), engine.runner.model_config.vocab_size, kv_tok,
                    model=args.model)
    print(f"P->D path adds {cal['prefill_s'] * 1e3:.1f} ms before the first token and "
          f"{cal['handoff_s'] * 1e3:.1f} ms to the hand-off")
    return cal


def run(args: argparse.Namespace) -> int:
    from pdserve import cpu_threads
    from pdserve.engine.engine import LLMEngine
    cpu_threads.setup_from_args(args)
    engine = LLMEngine(engine_config_from_args(args, enable_prefix_caching=True))
    try:
        return _profile(args, engine)
    finally:
        if engine.ranks is not None:   # the other tensor-parallel ranks (processes) end with the run
            engine.ranks.stop()


def _profile(args: argparse.Namespace, engine) -> int:
    from tqdm import tqdm
    pre, batches, contexts, mixed_tokens, mixed_batches = GRIDS[args.grid]
    pre = [n for n in (args.prefill_tokens or pre) if n < engine.max_model_len]
    batches = args.decode_batches or batches
    limit = engine.max_model_len - args.repeats - 64
    contexts = [c for c in (args.decode_contexts or contexts) if c <= limit]
    batches = [b for b in batches if b <= engine.config.max_num_seqs]
    # a mixed point must fit one step: its prompt and decoders within the token budget and the model
    mixed_ctx = min(256, limit // 2)
    mixed_batches = [b for b in (mixed_batches if args.mixed_batches is None else args.mixed_batches)
                     if b < engine.config.max_num_seqs]
    budget = engine.config.max_num_batched_tokens
    mixed = [(n, b) for n in (mixed_tokens if args.mixed_tokens is None else args.mixed_tokens)
             for b in mixed_batches if n + b <= budget and n < engine.max_model_len]
    rng = random.Random(0)
    measure_prefill(engine, pre[0], 2, rng)   # warm-up: first calls allocate and compile
    result = {"model": engine.model_name, "device": str(engine.runner.device), "dtype": str(engine.runner.dtype),
              "tp_size": engine.config.tensor_parallel_size, "block_size": engine.config.block_size,
              "max_num_batched_tokens": engine.config.max_num_batched_tokens, "prefill": [], "decode": [],
              "mixed": []}
    points = ([("prefill", n, 0) for n in pre] + [("decode", b, c) for c in contexts for b in batches]
              + [("mixed", n, b) for n, b in mixed])
    visits: dict[tuple, list[float]] = {pt: [] for pt in points}
    with tqdm(total=len(points) * args.passes, desc="profiling", unit="point") as bar:
        for _ in range(args.passes):
            for pt in points:
                kind, x, c = pt
                if kind == "prefill":
                    t = measure_prefill(engine, x, args.repeats, rng)
                elif kind == "decode":
                    t = measure_decode(engine, x, c, args.repeats, rng)
                else:
                    t = measure_mixed(engine, x, c, mixed_ctx, args.repeats, rng)
                visits[pt].append(t)
                label = {"prefill": f"prefill {x}", "decode": f"decode {x}x{c}", "mixed": f"mixed {x}+{c}x{mixed_ctx}"}
                bar.set_postfix(point=label[kind], ms=f"{t * 1e3:.1f}")
                bar.update(1)
    for (kind, x, c), ts in visits.items():
        t = statistics.median(ts)
        result[kind].append({"prefill": {"tokens": x, "time_s": t}, "decode": {"batch": x, "context": c, "time_s": t},
                             "mixed": {"tokens": x, "batch": c, "context": mixed_ctx, "time_s": t}}[kind])
    if args.serve_calibration:
        result["serve_overhead"] = _calibrate(args, result, engine)
    if args.pd_calibration:
        result["pd_overhead"] = _pd_calibrate(args, result, engine)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.output}: {len(result['prefill'])} prefill, {len(result['decode'])} decode and "
          f"{len(result['mixed'])} mixed points for {result['model']} on {result['device']}")
    return 0
