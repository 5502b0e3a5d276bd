"""Prompt text of a chosen token length, and token counting, without importing torch.

A prompt is built from common English words, each a single token (with its leading space)
in the BPE vocabularies of the usual small models, so N words is about N tokens even when
no tokenizer is at hand. With a `tokenizers` tokenizer the length is made exact. Either
way the benchmark reports the server's own `usage` counts, not these estimates.
"""
from __future__ import annotations

import glob
import os
import random
from pathlib import Path

WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know get through back much go good new "
    "write our used me man too any day same right look think also around another came come work three "
    "word must because does part even place well such here take why things help put years different "
    "away again off went old number great tell men say small every found still between name should "
    "home big give air line set own under read last never us left end along while might next sound "
    "below saw something thought both few those always looked show large often together asked house "
    "world going want school important until form food keep children feet land side without boy once "
    "animals life enough took sometimes four head above kind began almost live page got earth need far "
    "hand high year mother light parts country father let night following picture being study second "
    "eyes soon times story boys since white days paper hard near sentence better best across during "
    "today others however sure means knew try told young miles sun ways thing whole hear example heard "
    "several change answer room sea against top turned learn point city play toward five using himself"
).split()


def load_tokenizer(path: str | None, model: str | None = None):
    """A `tokenizers.Tokenizer` from a local file or directory, or None to approximate.

    Only local files are read (a benchmark must not reach the network): `path` (a
    tokenizer.json or a directory holding one), else, for the default model, the copy that
    `pdserve serve` converted into its cache.
    """
    from tokenizers import Tokenizer
    candidates = []
    if path:
        p = Path(path).expanduser()
        candidates.append(p / "tokenizer.json" if p.is_dir() else p)
        if not candidates[0].is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path!r}")
    elif model is None or "smollm2-135m" in model.lower():
        root = os.environ.get("PDSERVE_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pdserve")
        candidates += sorted(Path(p) for p in glob.glob(os.path.join(root, "models", "SmolLM2-135M*", "tokenizer.json")))
    for c in candidates:
        if c.is_file():
            return Tokenizer.from_file(str(c))
    return None


class PromptText:
    """Makes prompts of about N tokens and counts tokens of given text."""

    def __init__(self, tokenizer=None, seed: int = 0):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return max(1, round(len(text) / 4))  # the usual ~4 characters per token of English

    def make(self, n_tokens: int) -> str:
        n_tokens = max(1, n_tokens)
        words = [self.rng.choice(WORDS) for _ in range(n_tokens)]
        text = " ".join(words)
        if self.tokenizer is None:
            return text
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids[:n_tokens]
        return self.tokenizer.decode(ids)

    def decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)
