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


def completion_logprobs(tokenizer, lps, offset: int = 0) -> dict:
    """OpenAI's legacy logprobs object; text_offset counts from `offset` (a streamed choice's
    earlier chunks, an echoed prompt), by the characters of each token's text, as vLLM."""
    tokens, offsets, off = [], [], offset
    for lp in lps:
        t = _tok(tokenizer, lp.token_id)
        tokens.append(t)
        offsets.append(off)
        off += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{_tok(tokenizer, i): v for i, v in lp.top} for lp in lps], "text_offset": offsets}


def text_end(lp: dict, offset: int = 0) -> int:
    """Where the text after a logprobs object's tokens starts."""
    if not lp["tokens"]:
        return offset
    return lp["text_offset"][-1] + len(lp["tokens"][-1])


def echo_logprobs(tokenizer, prompt_ids: list[int], prompt_lps, out_lps) -> dict:
    """echo + logprobs: the prompt's tokens (the first has no logprob: nothing precedes it, as
    OpenAI and vLLM answer), then the completion's, text offsets running through both."""
    first = _tok(tokenizer, prompt_ids[0])
    rest = completion_logprobs(tokenizer, (prompt_lps or [None])[1:] + list(out_lps), len(first))
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


def vllm_prompt_logprobs(tokenizer, prompt_lps) -> list | None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} with the prompt token itself and the top ones."""
    if prompt_lps is None:
        return None
    out = []
    for lp in prompt_lps:
        if lp is None:
            out.append(None)
            continue
        d = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": _tok(tokenizer, i)} for r, (i, v) in enumerate(lp.top)}
        d[str(lp.token_id)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": _tok(tokenizer, lp.token_id)}
        out.append(d)
    return out


def chat_logprobs(tokenizer, lps) -> dict:
    def entry(i, v):
        t = _tok(tokenizer, i)
        return {"token": t, "logprob": v, "bytes": list(t.encode())}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}
