"""Decode steps with grouped attention against one padded group (the old behaviour), same run.

A decode batch pads every row's gathered KV to the longest context in its attention group. With
one group, one long request among short ones multiplies the attention work of the whole batch;
`plan_decode_groups` splits the rows where padding costs more than another group. This measures
engine steps (default model, this machine's CPU, one thread) for batches of several length mixes,
alternating the two settings, and prints the median step times, their ratio and the groups
planned. `--group-costs` also tries other values of model_runner.DECODE_GROUP_COST. Each mix's
prompts repeat across settings and rounds, so the prefix cache spares their prefills.

    python benchmarks/decode_groups.py [--rounds 5] [--steps 4] [--group-costs 2 32]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

MIXES = {  # name -> prompt lengths of the decoding batch
    "uniform 16x256": [256] * 16,
    "13x230 + 1x630": [230] * 13 + [630],
    "16 spread 32..1024": [32 + 64 * i for i in range(16)],
    "4x64 + 4x900": [64] * 4 + [900] * 4,
}
ONE_GROUP = float("inf")


def decode_step_ms(engine, lengths: list[int], steps: int, seed: int) -> float:
    from pdserve.engine.request import SamplingParams
    vocab = engine.runner.model_config.vocab_size
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True, temperature=0)
    rids = [engine.add_request({"prompt_token_ids": [rng.randrange(vocab) for _ in range(n)]}, params) for n in lengths]
    while any(engine.states[r].seq.num_output_tokens == 0 for r in rids):
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    for r in rids:
        engine.abort(r)
    engine.step()
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--group-costs", type=float, nargs="*", default=[])
    ap.add_argument("--output", default="benchmarks/results/decode_groups.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import pdserve.engine.model_runner as mr
    from pdserve.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    engine = LLMEngine(EngineConfig(device="cpu", kv_cache_memory=1 << 30, max_num_batched_tokens=4096))
    default = mr.DECODE_GROUP_COST["cpu"]
    settings = [ONE_GROUP] + sorted(set(args.group_costs) | {default})
    decode_step_ms(engine, [64, 64], 2, -1)   # warm-up
    times = {(m, s): [] for m in MIXES for s in settings}
    with tqdm(total=args.rounds * len(times), desc="decode steps", unit="point") as bar:
        for _ in range(args.rounds):
            for seed, (mix, lengths) in enumerate(MIXES.items()):
                for s in settings:   # alternate settings inside a round: drift hits them alike
                    mr.DECODE_GROUP_COST["cpu"] = s
                    times[(mix, s)].append(decode_step_ms(engine, lengths, args.steps, seed))
                    bar.update(1)
    mr.DECODE_GROUP_COST["cpu"] = default
    from pdserve.models.attention import plan_decode_groups
    bs = engine.config.block_size
    rows = []
    for mix, lengths in MIXES.items():
        base = statistics.median(times[(mix, ONE_GROUP)])
        widths = sorted(-(-(n + args.steps // 2) // bs) for n in lengths)
        for s in settings[1:]:
            t = statistics.median(times[(mix, s)])
            rows.append({"mix": mix, "group_cost": s, "groups": plan_decode_groups(widths, s), "one_group_ms": base,
                         "grouped_ms": t, "speedup": base / t})
    print(f"{'batch':20s} {'cost':>5s} {'groups (rows)':>16s} {'one group ms':>13s} {'grouped ms':>11s} {'speedup':>8s}")
    for r in rows:
        mark = " (default)" if r["group_cost"] == default else ""
        print(f"{r['mix']:20s} {r['group_cost']:5g} {str(r['groups']):>16s} {r['one_group_ms']:13.1f} "
              f"{r['grouped_ms']:11.1f} {r['speedup']:7.2f}x{mark}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"rounds": args.rounds, "steps": args.steps, "rows": rows,
                                             "raw": {f"{m}|{s}": v for (m, s), v in times.items()}}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
