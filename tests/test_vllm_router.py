"""pdserve's workers behind vLLM's own Rust router (`vllm-router --vllm-pd-disaggregation`, the
PyPI package), not pdserve's: the same tokens and logprobs as one colocated `both` worker.

vllm-router sends the client's body to the prefill worker with `max_tokens: 1`, `min_tokens: 1`,
`stream: false` and `kv_transfer_params: {"do_remote_decode": true, ...nulls}`, then the body to
the decode worker with the prefill's `kv_transfer_params`; both carry SGLang's fields
(`no_stop_trim`, `return_hidden_states`, and on chat `separate_reasoning`, `stream_reasoning`,
`include_reasoning`) at their defaults and an empty `Authorization: Bearer`. The reference is
an independent process (a colocated worker) answering the client's own request.
"""
from __future__ import annotations

import re
import sys
import urllib.request

import pytest
from openai import OpenAI

from pdserve import procs
from helpers import MODEL

pytestmark = pytest.mark.slow

ENGINE = ["--kv-cache-memory", "64MiB", "--max-num-batched-tokens", "512"]
PROMPT = "The prefill worker reads the prompt and hands its KV cache to the decode worker, which"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
# vllm-router parses sampling floats as f32 and sends e.g. 0.9 as 0.8999999761581421: values
# exact in f32 keep the comparison about pdserve, not about the router's rounding
SAMPLING = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 0.75, "top_p": 0.875, "seed": 1234}}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(default_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm_router")
    ports = procs.distinct_free_ports("127.0.0.1", 4)
    urls = {name: f"http://127.0.0.1:{p}" for name, p in zip(("ref", "prefill", "decode", "router"), ports)}
    ps = {}
    try:
        for name, role in (("ref", "both"), ("prefill", "prefill"), ("decode", "decode")):
            ps[name] = procs.start(procs.pdserve_command("serve", "--role", role, "--port", urls[name].rsplit(":", 1)[1],
                                                         *ENGINE), logs / f"{name}.log", env={"OMP_NUM_THREADS": "1"})
        for name in ("ref", "prefill", "decode"):
            procs.wait_healthy(urls[name], ps[name], timeout=300)
        ps["router"] = procs.start([sys.executable, "-m", "vllm_router.launch_router", "--vllm-pd-disaggregation",
                                    "--prefill", urls["prefill"], "--decode", urls["decode"],
                                    "--host", "127.0.0.1", "--port", str(ports[3]), "--policy", "round_robin"],
                                   logs / "router.log")
        procs.wait_healthy(urls["router"], ps["router"], timeout=60)
        yield urls
    finally:
        for p in ps.values():
            procs.stop(p)


def client(urls, name) -> OpenAI:
    return OpenAI(base_url=urls[name] + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


def pulled_bytes(urls) -> float:
    text = urllib.request.urlopen(urls["decode"] + "/metrics", timeout=10).read().decode()
    return sum(float(m.group(1)) for m in
               re.finditer(r'^pdserve:kv_transfer_bytes_total\{[^}]*direction="pulled"[^}]*\} (\S+)$', text, re.M))


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    assert all(abs(a - b) <= 1e-4 for a, b in zip(got, want)), (got, want)


def completion(urls, name, mode, **kw):
    return client(urls, name).completions.create(model=MODEL, prompt=f"[{mode}] {PROMPT}", max_tokens=MAX_TOKENS,
                                                 logprobs=2, **SAMPLING[mode], **kw)


def chat(urls, name, mode, **kw):
    return client(urls, name).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": mode}, *MESSAGES], max_tokens=MAX_TOKENS,
        logprobs=True, top_logprobs=2, **SAMPLING[mode], **kw)


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_completions_equal_colocated(cluster, mode):
    ref = completion(cluster, "ref", mode).choices[0]
    before = pulled_bytes(cluster)
    out = completion(cluster, "router", mode).choices[0]
    assert pulled_bytes(cluster) > before   # the decode worker pulled the KV, it did not prefill
    assert out.text == ref.text and out.finish_reason == ref.finish_reason
    lp, rlp = out.logprobs, ref.logprobs
    assert lp.tokens == rlp.tokens and len(lp.tokens) == MAX_TOKENS
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert_close(lp.token_logprobs, rlp.token_logprobs)
    assert lp.text_offset == rlp.text_offset
    for got, want in zip(lp.top_logprobs, rlp.top_logprobs):
        assert got.keys() == want.keys() and len(got) == 2
        assert_close([got[k] for k in want], list(want.values()))


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_chat_equal_colocated(cluster, mode):
    ref = chat(cluster, "ref", mode).choices[0]
    before = pulled_bytes(cluster)
    resp = chat(cluster, "router", mode)
    out = resp.choices[0]
    assert pulled_bytes(cluster) > before
    assert out.message.content == ref.message.content and out.finish_reason == ref.finish_reason
    got, want = out.logprobs.content, ref.logprobs.content
    assert len(got) == resp.usage.completion_tokens == len(want)
    assert [t.token for t in got] == [t.token for t in want]
    assert_close([t.logprob for t in got], [t.logprob for t in want])
    for g, w in zip(got, want):
        assert [t.token for t in g.top_logprobs] == [t.token for t in w.top_logprobs] and len(g.top_logprobs) == 2
        assert_close([t.logprob for t in g.top_logprobs], [t.logprob for t in w.top_logprobs])


def test_streamed_completion_equal_colocated(cluster):
    ref = completion(cluster, "ref", "seeded").choices[0]
    before = pulled_bytes(cluster)
    chunks = list(completion(cluster, "router", "seeded", stream=True, stream_options={"include_usage": True}))
    assert pulled_bytes(cluster) > before
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in choices) == ref.text
    tokens = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
    lps = [x for c in choices if c.logprobs for x in c.logprobs.token_logprobs]
    assert tokens == ref.logprobs.tokens and len(lps) == len(tokens)
    assert_close(lps, ref.logprobs.token_logprobs)
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert choices[-1].finish_reason == ref.finish_reason


@pytest.mark.parametrize("case", [{"n": 2, **SAMPLING["seeded"]}, {"prompt": [PROMPT, "One plus one is"], "temperature": 0.0}])
def test_n_and_prompt_lists_equal_colocated(cluster, case):
    """vllm-router sends n and prompt lists through unchanged: P prefills each prompt once,
    D pulls and forks."""
    body = {"prompt": f"[n] {PROMPT}", "max_tokens": MAX_TOKENS, "logprobs": 0, **case}
    ref = client(cluster, "ref").completions.create(model=MODEL, **body)
    before = pulled_bytes(cluster)
    out = client(cluster, "router").completions.create(model=MODEL, **body)
    assert pulled_bytes(cluster) > before
    assert len(out.choices) == len(ref.choices) == 2
    for got, want in zip(sorted(out.choices, key=lambda c: c.index), sorted(ref.choices, key=lambda c: c.index)):
        assert got.text == want.text and got.logprobs.tokens == want.logprobs.tokens
        assert_close(got.logprobs.token_logprobs, want.logprobs.token_logprobs)
