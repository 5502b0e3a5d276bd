"""Request fields that pdserve knows but does not honour: each is refused with a 400 that
names it (`param`), unless its value is one that changes nothing. A field pdserve does not
know at all is refused the same way. Nothing is dropped in silence: docs/openai_fields.md
lists every OpenAI and vLLM field and what pdserve does with it.
"""
from __future__ import annotations

from pdserve.errors import RequestError

CHAT, COMPLETION = "chat", "completion"

# Accepted, with no effect on the answer (metadata about the caller), as OpenAI and vLLM do.
NO_EFFECT = {"metadata", "safety_identifier", "prompt_cache_key",
             # SGLang's (vllm-router sends them on every chat request): they act only with a
             # server-side reasoning parser, which pdserve has none of, so the content is the
             # whole output, as SGLang's without --reasoning-parser
             "separate_reasoning", "stream_reasoning"}

_STRUCTURED = ("not implemented: structured output is llguidance's, with its own whitespace rules "
               "(response_format, structured_outputs or guided_*)")

# field -> (values that change nothing, why the others are refused). A value given per endpoint
# is a dict {kind: values}.
REFUSED: dict[str, tuple] = {
    # OpenAI
    "suffix": ((None, ""), "insertion (text after the completion) is not implemented"),
    "functions": ((None,), "deprecated by OpenAI: send tools"),
    "function_call": ((None, "none"), "deprecated by OpenAI: send tool_choice"),
    "reasoning_effort": ((None,), "the served models have no reasoning mode"),
    "store": ((None, False), "pdserve stores no completions"),
    "modalities": ((None, ["text"]), "only text is served"),
    "audio": ((None,), "only text is served"),
    "prediction": ((None,), "predicted outputs are not implemented"),
    "web_search_options": ((None,), "pdserve does no web search"),
    "verbosity": ((None,), "not a sampling control pdserve has"),
    "service_tier": ((None, "auto", "default"), "pdserve has one service tier"),
    # vLLM
    "guided_decoding_backend": ((None,), _STRUCTURED),
    "guided_whitespace_pattern": ((None,), _STRUCTURED),
    "use_beam_search": ((None, False), "beam search is not implemented"),
    "length_penalty": ((None, 1, 1.0), "only beam search uses it, and it is not implemented"),
    "spaces_between_special_tokens": ((None, True), "special tokens are always detokenized with spaces"),
    "truncate_prompt_tokens": ((None,), "prompts are never truncated: a too long one is a 400"),
    "add_special_tokens": ({COMPLETION: (None, True), CHAT: (None, False)},
                           "the tokenizer's default is always used"),
    "add_generation_prompt": ((None, True), "the chat template always gets the generation prompt"),
    "continue_final_message": ((None, False), "not implemented"),
    "echo": ((None, False), "echo is implemented for /v1/completions only"),   # chat (vLLM's)
    "documents": ((None,), "not implemented"),
    "chat_template_kwargs": ((None, {}), "not implemented"),
    "mm_processor_kwargs": ((None, {}), "only text is served"),
    "priority": ((None, 0), "scheduling is first come, first served"),
    "logits_processors": ((None, []), "custom logits processors are not loaded"),
    "return_tokens_as_token_ids": ((None, False), "not implemented"),
    "cache_salt": ((None,), "the prefix cache is not partitioned"),
    "vllm_xargs": ((None, {}), "not implemented"),
    "prompt_embeds": ((None,), "prompts are text or token ids"),
    "include_reasoning": ((None, True), "pdserve has no reasoning parser: reasoning stays in the content"),
    # SGLang's, which vllm-router fills in with these defaults on every request it forwards
    "no_stop_trim": ((None, False), "the stop string is trimmed: send include_stop_str_in_output"),
    "return_hidden_states": ((None, False), "hidden states are not returned"),
}


def _harmless(name: str, value, kind: str) -> bool:
    ok = REFUSED[name][0]
    if isinstance(ok, dict):
        ok = ok.get(kind, (None,))
    return any(value == v and type(value) is type(v) for v in ok)   # True is not 1


def check(req, kind: str) -> None:
    """Raise RequestError naming the first field that pdserve would otherwise ignore."""
    for name, value in (req.model_extra or {}).items():
        if name in NO_EFFECT:
            continue
        if name not in REFUSED:
            raise RequestError(f"unknown field {name!r}: pdserve does not implement it "
                               "(see docs/openai_fields.md)", name)
        if not _harmless(name, value, kind):
            raise RequestError(f"{name} is not supported by pdserve: {REFUSED[name][1]}", name)
