"""Offline throughput: pdserve's engine against Hugging Face transformers' generate, same run.

Mixed prompt and output lengths (ignore_eos so both produce exactly the asked-for tokens).
transformers runs the same requests in padded batches, each batch generating until its
longest request is done; only the tokens a request asked for are counted for either side.

    python benchmarks/engine_throughput.py [--num-requests 64] [--hf-batch-sizes 16,64]
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch


def make_requests(tokenizer, n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    words = ("the model serves prompts while decode workers stream tokens to many users across "
             "a cluster of machines and caches keys and values in paged blocks").split()
    reqs = []
    for _ in range(n):
        n_in = rng.randint(16, 320)
        text = " ".join(rng.choice(words) for _ in range(n_in * 2))
        ids = tokenizer.encode(text)[:n_in]
        reqs.append((ids, rng.randint(16, 128)))
    return reqs


def run_pdserve(model_dir: str, reqs, args) -> tuple[float, int]:
    from pdserve import SamplingParams
    from pdserve.llm import LLM
    llm = LLM(model_dir, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    llm.generate("warm up", SamplingParams(max_tokens=4), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in reqs], params)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == sum(m for _, m in reqs)
    return dt, n


@torch.inference_mode()
def run_hf(model_dir: str, reqs, batch_size: int) -> tuple[float, int]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    t = time.perf_counter()
    n = 0
    for i in tqdm(range(0, len(reqs), batch_size), desc="transformers", unit="batch"):
        batch = reqs[i:i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (p, _) in enumerate(batch):  # left padding, as decoder-only generation needs
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        model.generate(ids, attention_mask=mask, max_new_tokens=max(m for _, m in batch),
                       min_new_tokens=max(m for _, m in batch), do_sample=False, pad_token_id=0)
        n += sum(m for _, m in batch)
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--hf-batch-sizes", default="16,64",
                    help="comma-separated batch sizes to run transformers with (each is a baseline)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.models.loader import resolve_model
    name, model_dir = resolve_model(args.model)
    reqs = make_requests(load_tokenizer(model_dir), args.num_requests, args.seed)
    n_in = sum(len(i) for i, _ in reqs)
    print(f"{name}: {len(reqs)} requests, {n_in} prompt tokens, {sum(m for _, m in reqs)} output tokens, "
          f"torch threads {torch.get_num_threads()}")
    pd_t, pd_n = run_pdserve(model_dir, reqs, args)
    res = {"model": name, "num_requests": len(reqs), "prompt_tokens": n_in, "output_tokens": pd_n,
           "torch_threads": torch.get_num_threads(), "pdserve_s": pd_t,
           "pdserve_output_tok_s": pd_n / pd_t, "pdserve_total_tok_s": (pd_n + n_in) / pd_t,
           "transformers": []}
    for bs in [int(b) for b in args.hf_batch_sizes.split(",")]:
        hf_t, hf_n = run_hf(model_dir, reqs, bs)
        res["transformers"].append({"batch_size": bs, "seconds": hf_t, "output_tok_s": hf_n / hf_t,
                                    "total_tok_s": (hf_n + n_in) / hf_t, "speedup": hf_t / pd_t})
    print(f"{'':26}{'seconds':>9}{'output tok/s':>14}{'total tok/s':>13}{'pdserve speedup':>17}")
    print(f"{'pdserve':26}{pd_t:9.2f}{res['pdserve_output_tok_s']:14.1f}{res['pdserve_total_tok_s']:13.1f}")
    for r in res["transformers"]:
        print(f"{'transformers, batch ' + str(r['batch_size']):26}{r['seconds']:9.2f}{r['output_tok_s']:14.1f}"
              f"{r['total_tok_s']:13.1f}{r['speedup']:16.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
