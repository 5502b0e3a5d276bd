"""Hugging Face tokenizer, chat template and an incremental detokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        chat_template: str | None = None, tools: list[dict] | None = None) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        # an assistant message that calls tools may have no content (OpenAI sends null or nothing)
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise ValueError("each message needs a 'role' and a 'content'")
    normalized = [{**m, "content": _content_text(m.get("content"))} for m in messages]
    kw = {"tools": tools} if tools else {}
    ids = tokenizer.apply_chat_template(normalized, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, chat_template=chat_template, **kw)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _content_text(content) -> str:
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
            parts.append(p.get("text", ""))
        return "".join(parts)
    raise ValueError("message content must be a string or a list of text parts")


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
