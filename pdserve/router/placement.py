"""Where a request's prefill runs: on a prefill worker (remote) or on the decode worker it was
routed to (local), as Dynamo's conditional disaggregation. Pure Python, no I/O: the router and
the simulator decide with these same functions."""
from __future__ import annotations

# The router does not tokenize (it would need the model's tokenizer and chat template); prompt
# sizes for conditional disaggregation are estimated from characters. English BPE vocabularies
# average about four characters per token, and the threshold is a coarse knob anyway.
CHARS_PER_TOKEN = 4


def cached_tokens(key, matched: int) -> int:
    """The prompt prefix the decode worker is believed to cache, in tokens, from the `matched`
    leading items of the routing key (the policy's Choice.matched): token ids count as they
    are, text by characters."""
    return matched if isinstance(key, list) else matched // CHARS_PER_TOKEN


def local_prefill_reason(max_tokens: int | None, have_prefill: bool, prompt_tokens: float, cached: int,
                         local_prefill_max_tokens: int) -> str | None:
    """Why this request should prefill on its decode worker; None: on a prefill worker.

    A request of max_tokens 0 or 1 is all prefill: a hand-off only adds work (n > 1, several
    prompts, logprobs of the prompt and first token go remote: the hand-off carries them all).
    With a threshold, a prompt whose uncached part is at most that short stays local too."""
    if max_tokens in (0, 1):
        return "max_tokens=1"
    if not have_prefill:
        return "no_prefill_worker"
    if local_prefill_max_tokens > 0 and prompt_tokens - cached <= local_prefill_max_tokens:
        return "short_prompt"
    return None
