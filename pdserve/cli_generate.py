"""`pdserve generate` and `pdserve chat`: the engine from the terminal, with tokens/s."""
from __future__ import annotations

import argparse
import sys
import time

from pdserve.cli_args import add_engine_args, engine_config_from_args


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    if name == "generate":
        p.add_argument("prompts", nargs="*", help="prompts (default: read one per line from stdin)")
        p.add_argument("--model", default=None, help="model directory, .gguf file or hub id")
        p.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user chat message")
        add_engine_args(p, model_positional=False)
    else:
        add_engine_args(p)
        p.add_argument("--system", default=None, help="system message")
    from pdserve import cpu_threads
    cpu_threads.add_arguments(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    s.add_argument("--stop", action="append", default=None)
    s.add_argument("--ignore-eos", action="store_true")


def _params(args):
    from pdserve import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.sample_seed, stop=args.stop,
                          ignore_eos=args.ignore_eos)


def run(args: argparse.Namespace) -> int:
    from pdserve import cpu_threads
    from pdserve.llm import LLM
    params = _params(args)  # bad sampling flags fail before the model loads
    cpu_threads.setup_from_args(args)
    llm = LLM.__new__(LLM)
    from pdserve.engine.engine import LLMEngine
    llm.engine = LLMEngine(engine_config_from_args(args))
    llm.tokenizer = llm.engine.tokenizer
    if args.command == "chat":
        return _chat(llm, params, args.system)
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("pdserve generate: no prompts given", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.chat_template:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    for p, o in zip(prompts, outs):
        print(f"--- prompt: {p!r}\n{o.outputs[0].text}\n[{len(o.outputs[0].token_ids)} tokens, "
              f"finish: {o.outputs[0].finish_reason}]")
    print(f"\n{len(outs)} requests, {n_in} prompt + {n_out} generated tokens in {dt:.2f}s: "
          f"{n_out / dt:.1f} generated tokens/s, {(n_in + n_out) / dt:.1f} total tokens/s")
    return 0


def _chat(llm, params, system: str | None) -> int:
    messages = [{"role": "system", "content": system}] if system else []
    print("pdserve chat: type a message, an empty line or Ctrl+D to quit.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        t0 = time.perf_counter()
        out = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
        dt = time.perf_counter() - t0
        print(f"assistant> {out.text}\n  [{len(out.token_ids)} tokens, {len(out.token_ids) / dt:.1f} tokens/s]")
        messages.append({"role": "assistant", "content": out.text})
    return 0
