"""`pdserve chat` on the default model: answers stream piece by piece as the engine generates
them, equal to the whole answer generated at once; /exit and end of input end the chat."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from pdserve import SamplingParams
from pdserve.cli.generate import chat
from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.llm import LLM

pytestmark = pytest.mark.slow  # loads the default model

PARAMS = SamplingParams(max_tokens=8, temperature=0)


class Writes(io.StringIO):
    """A terminal that remembers each write."""

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, s):
        self.pieces.append(s)
        return super().write(s)


@pytest.fixture(scope="module")
def llm(default_model_dir):
    # one thread: on a shared 2-core machine two threads per process are several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = LLM.__new__(LLM)
    llm.engine = LLMEngine(EngineConfig(model=default_model_dir, kv_cache_memory="64MiB"))
    llm.tokenizer = llm.engine.tokenizer
    yield llm
    torch.set_num_threads(threads)


def answers(pieces: list[str]) -> list[list[str]]:
    """The writes of each answer: those between 'assistant> ' and the stats line."""
    out, cur = [], None
    for p in pieces:
        if p == "assistant> ":
            cur = []
        elif cur is not None and p.startswith("\n  ["):
            out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(p)
    return out


def test_chat_streams_each_answer_and_keeps_the_conversation(llm):
    q1, q2 = "What is the capital of France?", "And of Italy?"
    out = Writes()
    assert chat(llm.engine, PARAMS, stdin=io.StringIO(f"{q1}\n{q2}\n"), stdout=out) == 0   # then end of input
    got = answers(out.pieces)
    assert len(got) == 2
    # reference: the same conversation generated whole, not streamed
    r1 = llm.chat([{"role": "user", "content": q1}], PARAMS, use_tqdm=False)[0].outputs[0]
    r2 = llm.chat([{"role": "user", "content": q1}, {"role": "assistant", "content": r1.text},
                   {"role": "user", "content": q2}], PARAMS, use_tqdm=False)[0].outputs[0]
    assert "".join(got[0]) == r1.text and "".join(got[1]) == r2.text
    assert all(len(pieces) > 1 for pieces in got), got   # printed as generated, not at the end
    assert f"[{len(r1.token_ids)} tokens," in out.getvalue()


def test_exit_ends_the_chat(llm):
    out = Writes()
    assert chat(llm.engine, PARAMS, stdin=io.StringIO("Hi\n/exit\nnever sent\n"), stdout=out) == 0
    assert len(answers(out.pieces)) == 1
    assert not llm.engine.has_unfinished()


def test_chat_command_through_a_pipe(default_model_dir):
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "chat", default_model_dir, "--max-tokens", "6",
                           "--kv-cache-memory", "64MiB"], input="Hi\n\n/quit\n", capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 1 and "6 tokens" in proc.stdout   # the empty line is skipped
