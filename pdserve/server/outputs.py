"""Engine outputs -> OpenAI fields: finish reasons, usage, logprobs."""
from __future__ import annotations


def finish_reason(reason: str | None) -> str | None:
    # a prefill for remote decode stops because its length (one token) is reached, as in vLLM
    return "length" if reason == "remote_decode" else reason


def usage(children) -> dict:
    prompts: dict[int, object] = {}
    for c in children:
        prompts.setdefault(c.prompt_index, c.last)
    prompt = sum(len(o.prompt_token_ids) for o in prompts.values() if o is not None)
    cached = sum(o.num_cached_tokens for o in prompts.values() if o is not None)
    completion = sum(len(c.last.outputs[0].token_ids) for c in children if c.last is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _tok(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, lps) -> dict:
    tokens, offsets, off = [], [], 0
    for lp in lps:
        t = _tok(tokenizer, lp.token_id)
        tokens.append(t)
        offsets.append(off)
        off += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{_tok(tokenizer, i): v for i, v in lp.top} for lp in lps], "text_offset": offsets}


def chat_logprobs(tokenizer, lps) -> dict:
    def entry(i, v):
        t = _tok(tokenizer, i)
        return {"token": t, "logprob": v, "bytes": list(t.encode())}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}
