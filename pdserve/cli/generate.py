"""`pdserve generate` and `pdserve chat`: the engine from the terminal, with tokens/s."""
from __future__ import annotations

import argparse
import os
import sys
import time

from pdserve.cli.args import WORKER_FIELDS, add_engine_args, engine_config_from_args

HISTORY = os.path.join(os.path.expanduser("~"), ".cache", "pdserve", "chat_history")


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    if name == "generate":
        p.add_argument("prompts", nargs="*", help="prompts (default: read one per line from stdin)")
        p.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user chat message")
        add_engine_args(p, model_positional=False, exclude=WORKER_FIELDS)
    else:
        add_engine_args(p, exclude=WORKER_FIELDS)
        p.add_argument("--system", default=None, help="system message")
        p.add_argument("--history-file", default=HISTORY, metavar="PATH",
                       help="line-editing history kept across sessions ('' for none)")
    from pdserve import cpu_threads
    cpu_threads.add_arguments(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=128, help="most tokens generated per answer")
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this mass")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top token's probability")
    s.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed (default: none)")
    s.add_argument("--stop", action="append", default=None, help="stop at this string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


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
        return chat(llm.engine, params, args.system, history_file=args.history_file)
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


def stream_reply(engine, messages: list[dict], params):
    """Yield the assistant's text piece by piece as the engine steps, then the final output."""
    rid = engine.add_request({"prompt_token_ids": engine.chat_prompt_ids(messages)}, params)
    try:
        while True:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                if out.error:
                    raise RuntimeError(out.error)
                if out.outputs[0].new_text:
                    yield out.outputs[0].new_text
                if out.finished:
                    yield out.outputs[0]
                    return
    finally:
        engine.abort(rid)   # Ctrl+C or an early close: nothing left running (a no-op once finished)


def _readline_history(path: str | None):
    """Line editing (arrows, Ctrl+R) for input() on a terminal; returns a function that saves the history."""
    try:
        import readline
    except ImportError:   # e.g. Windows without pyreadline
        return lambda: None
    if not path:
        return lambda: None
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save():
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass
    return save


def chat(engine, params, system: str | None = None, stdin=None, stdout=None,
         history_file: str | None = None) -> int:
    """The chat loop: each answer is printed as it is generated. `/exit`, `/quit` or end of input
    (Ctrl+D) ends it; Ctrl+C stops the answer in progress."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = stdin is sys.stdin and stdin.isatty()
    save_history = _readline_history(history_file) if tty else (lambda: None)
    messages = [{"role": "system", "content": system}] if system else []
    print("pdserve chat: type a message; /exit or Ctrl+D to quit, Ctrl+C to stop an answer.", file=stdout)
    try:
        while True:
            try:
                if tty:
                    line = input("you> ")
                else:
                    stdout.write("you> ")
                    stdout.flush()
                    line = stdin.readline()
                    if not line:
                        raise EOFError
            except EOFError:
                stdout.write("\n")
                break
            line = line.strip()
            if line in ("/exit", "/quit"):
                break
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            stdout.write("assistant> ")
            stdout.flush()
            t0, text, out = time.perf_counter(), [], None
            try:
                for piece in stream_reply(engine, messages, params):
                    if isinstance(piece, str):
                        text.append(piece)
                        stdout.write(piece)
                        stdout.flush()
                    else:
                        out = piece
            except KeyboardInterrupt:
                stdout.write(" [stopped]")
            except (ValueError, RuntimeError) as e:   # e.g. the conversation outgrew --max-model-len
                stdout.write(f"[error: {e}]\n")
                messages.pop()
                continue
            dt = time.perf_counter() - t0
            n = len(out.token_ids) if out else 0
            stdout.write(f"\n  [{n} tokens, {n / dt:.1f} tokens/s]\n" if out else "\n")
            stdout.flush()
            messages.append({"role": "assistant", "content": "".join(text)})
    finally:
        save_history()
    return 0
