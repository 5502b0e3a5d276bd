"""Logits controls of a request, as vLLM defines and orders them: allowed_token_ids, bad_words,
the min_tokens ban, logit_bias, then the repetition / frequency / presence penalties.

They read only the sequence's own tokens (prompt + output), so a decode worker that continues
a remote prefill (it has the prompt and the first token) applies exactly what a colocated
worker applies.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad words: each word as is and with a leading space (a word in
    the middle of a text is another token), the second only when it makes a different word."""
    out: list[list[int]] = []
    for w in words:
        for prefix in ("", " "):
            ids = tokenizer.encode(prefix + w.lstrip(), add_special_tokens=False)
            if not ids:
                continue
            if not prefix or (out and ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    return out


def apply(logits: torch.Tensor, params, prompt_ids: list[int], output_ids: list[int],
          banned: tuple[int, ...] = ()) -> torch.Tensor:
    """One row [V] (float32, CPU), changed in place and returned."""
    V = logits.numel()
    if params.allowed_token_ids:
        keep = torch.zeros(V, dtype=torch.bool)
        keep[torch.tensor(params.allowed_token_ids)] = True
        logits.masked_fill_(~keep, NEG_INF)
    for word in params.bad_words_token_ids or ():
        # banned when the output so far ends with all of the word but its last token
        if len(word) == 1 or (len(output_ids) >= len(word) - 1 and output_ids[len(output_ids) - len(word) + 1:] == word[:-1]):
            logits[word[-1]] = NEG_INF
    if banned:
        logits[list(banned)] = NEG_INF
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias.keys()))
        logits.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype))
    rep, freq, pres = params.repetition_penalty, params.frequency_penalty, params.presence_penalty
    if rep != 1.0 or freq or pres:
        out = torch.tensor(output_ids, dtype=torch.long)
        counts = torch.bincount(out, minlength=V)[:V].to(logits.dtype)
        if rep != 1.0:
            seen = counts > 0
            if prompt_ids:
                seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
            scaled = torch.where(logits > 0, logits / rep, logits * rep)
            logits.copy_(torch.where(seen, scaled, logits))
        if freq:
            logits.sub_(freq * counts)
        if pres:
            logits.sub_(pres * (counts > 0).to(logits.dtype))
    return logits
