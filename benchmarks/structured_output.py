"""Structured output's cost: one batch with half its requests JSON-schema constrained against the
same batch unconstrained, same engine, same run, alternating rounds.

Every request asks for exactly --max-tokens tokens (ignore_eos), and the schema is an array of
records without maxItems, so a constrained request stays inside its grammar (a mask to compute
at every step) for the whole run rather than finishing early. Reports output tokens per second of
both batches and the grammar engine's share of the constrained batch's step time (mask
computation and application, plus advancing the matchers, over the engine's whole step time).

    python benchmarks/structured_output.py [--num-requests 32] [--max-tokens 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
    "name": {"type": "string", "maxLength": 16},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "new", "old"]}, "maxItems": 3},
    "price": {"type": "number"}}, "required": ["id", "name", "tags", "price"], "additionalProperties": False}}
TOPICS = ["books", "cars", "plants", "songs", "tools", "games", "shoes", "films"]


def run_batch(llm, prompts, params) -> dict:
    eng = llm.engine
    step_s, steps = 0.0, 0
    grammar0 = eng.grammars.mask_seconds
    for seq in [eng.make_sequence(p, sp, f"b{i}")[0] for i, (p, sp) in enumerate(zip(prompts, params))]:
        eng.add_sequence(seq)
    t = time.perf_counter()
    outs = {}
    while eng.has_unfinished():
        s = time.perf_counter()
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        step_s += time.perf_counter() - s
        steps += 1
    wall = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs.values())
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "steps": steps, "step_s": step_s,
            "grammar_s": eng.grammars.mask_seconds - grammar0, "outputs": [outs[f"b{i}"] for i in range(len(prompts))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--output", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    from pdserve.engine.request import SamplingParams, StructuredOutputsParams
    from pdserve.llm import LLM
    llm = LLM(args.model, kv_cache_memory=args.kv_cache_memory, max_num_seqs=max(64, args.num_requests))
    eng = llm.engine
    prompts = [{"prompt_token_ids": eng.chat_prompt_ids([{"role": "user", "content":
               f"List some {TOPICS[i % len(TOPICS)]} for sale as JSON records (request {i})."}])}
               for i in range(args.num_requests)]
    free = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    mixed = [constrained if i % 2 == 0 else free for i in range(args.num_requests)]
    run_batch(llm, prompts[:4], [constrained, free] * 2)   # warm up: the grammar tokenizer, the schema's compile

    rounds = []
    for r in range(args.rounds):
        if r % 2 == 0:   # alternate which batch goes first: the machine's drift then favours neither
            a = run_batch(llm, prompts, [free] * args.num_requests)
            b = run_batch(llm, prompts, mixed)
        else:
            b = run_batch(llm, prompts, mixed)
            a = run_batch(llm, prompts, [free] * args.num_requests)
        same = all(x.outputs[0].token_ids == y.outputs[0].token_ids
                   for i, (x, y) in enumerate(zip(a["outputs"], b["outputs"])) if i % 2)
        rounds.append({"unconstrained": {k: v for k, v in a.items() if k != "outputs"},
                       "half_constrained": {k: v for k, v in b.items() if k != "outputs"},
                       "unconstrained_rows_identical": same})
        print(f"round {r + 1}: unconstrained {a['tok_per_s']:.1f} tok/s ({1e3 * a['step_s'] / a['steps']:.1f} ms/step), half constrained {b['tok_per_s']:.1f} "
              f"tok/s; grammar {1e3 * b['grammar_s'] / b['steps']:.2f} ms of {1e3 * b['step_s'] / b['steps']:.1f} ms "
              f"per step ({100 * b['grammar_s'] / b['step_s']:.2f}%); unconstrained rows unchanged: {same}",
              flush=True)
    med = lambda key, f: statistics.median(f(r[key]) for r in rounds)
    summary = {
        "num_requests": args.num_requests, "constrained_requests": sum(1 for p in mixed if p is constrained),
        "max_tokens": args.max_tokens, "rounds": args.rounds,
        "unconstrained_tok_per_s": med("unconstrained", lambda x: x["tok_per_s"]),
        "half_constrained_tok_per_s": med("half_constrained", lambda x: x["tok_per_s"]),
        "grammar_ms_per_step": med("half_constrained", lambda x: 1e3 * x["grammar_s"] / x["steps"]),
        "step_ms": med("half_constrained", lambda x: 1e3 * x["step_s"] / x["steps"]),
        "unconstrained_step_ms": med("unconstrained", lambda x: 1e3 * x["step_s"] / x["steps"]),
        "grammar_share_of_step": med("half_constrained", lambda x: x["grammar_s"] / x["step_s"]),
        "rounds_detail": rounds,
    }
    # the machine's speed drifts between rounds more than the grammar costs: compare within a round
    summary["throughput_ratio_per_round"] = [r["half_constrained"]["tok_per_s"] / r["unconstrained"]["tok_per_s"]
                                             for r in rounds]
    summary["throughput_ratio"] = statistics.median(summary["throughput_ratio_per_round"])
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds_detail"}, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
