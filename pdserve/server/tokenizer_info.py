"""GET /tokenizer_info in vLLM's shape: the tokenizer's class and its config (init kwargs,
special tokens, chat template), so clients (lm-eval's remote tokenizer) can tokenize as
the server does."""
from __future__ import annotations


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    return str(v)   # AddedToken and the like: their text


def tokenizer_info(tokenizer) -> dict:
    config = dict(getattr(tokenizer, "init_kwargs", None) or {})
    for k in ("tokenizer_object", "added_tokens_decoder", "tokenizer_file", "vocab_file", "merges_file"):
        config.pop(k, None)   # objects and local paths, as vLLM drops them
    for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
        config[name] = getattr(tokenizer, name, None)
    config["chat_template"] = getattr(tokenizer, "chat_template", None)
    config["model_max_length"] = getattr(tokenizer, "model_max_length", None)
    config["tokenizer_class"] = type(tokenizer).__name__
    return _jsonable(config)
