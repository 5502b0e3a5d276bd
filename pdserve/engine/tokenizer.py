"""Hugging Face tokenizer, chat template and an incremental detokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        chat_template: str | None = None, tools: list[dict] | None = None,
                        max_chars: int = 1 << 20) -> list[int]:
    """Render the messages with the model's (or the given) template in pdserve's budgeted
    sandbox, then tokenize as transformers does (the template writes the special tokens).
    Raises ValueError for bad messages, a template that fails, or one past its budget."""
    from pdserve.engine.chat_template import render
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    normalized = []
    for i, m in enumerate(messages):
        # an assistant message that calls tools may have no content (OpenAI sends null or nothing)
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise ValueError(f"messages[{i}] needs a 'role' and a 'content'")
        if not isinstance(m["role"], str):
            raise ValueError(f"messages[{i}].role must be a string")
        normalized.append({**m, "content": _content_text(m.get("content"), i)})
    if sum(len(m["content"]) for m in normalized) > max_chars:
        raise ValueError(f"the messages have more than {max_chars} characters, more than the context can hold")
    source = chat_template or tokenizer.chat_template
    if not source:
        raise ValueError("this model has no chat template; send chat_template or use /v1/completions")
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    try:
        text = render(source, max_chars, messages=normalized, add_generation_prompt=add_generation_prompt,
                      tools=tools or None, documents=None, **special)
    except ValueError:
        raise
    except Exception as e:   # whatever a template does wrong is the template's (or its sender's) fault
        raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from e
    return list(tokenizer.encode(text, add_special_tokens=False))


def _content_text(content, i: int = 0) -> str:
    """OpenAI allows content as a list of parts; text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text":
                raise ValueError("only text content parts are supported")
            if not isinstance(p.get("text", ""), str):
                raise ValueError(f"messages[{i}].content: a text part's text must be a string")
            parts.append(p.get("text", ""))
        return "".join(parts)
    raise ValueError(f"messages[{i}].content must be a string or a list of text parts")


@dataclass
class IncrementalDetokenizer:
    """Turns a growing token list into text deltas without splitting multi-byte characters.

    Decodes a small window of tokens before and after the last emitted point and emits the
    difference, holding text back while it ends in an incomplete UTF-8 sequence (U+FFFD).
    """
    tokenizer: object
    prompt_ids: list[int]
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self):
        # start the window a few prompt tokens back so the first word gets its leading space right
        self.ids = list(self.prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        dec = lambda a, b: self.tokenizer.decode(self.ids[a:b], skip_special_tokens=self.skip_special_tokens)
        prefix = dec(self.prefix_offset, self.read_offset)
        full = dec(self.prefix_offset, len(self.ids))
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a request, emit whatever is still held back."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        delta = full[len(prefix):] if full.startswith(prefix) else ""
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
