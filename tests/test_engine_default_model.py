"""The engine on the default model (SmolLM2-135M-Instruct) against transformers and against itself."""
import pytest
import torch

from pdserve import SamplingParams
from pdserve.llm import LLM

pytestmark = pytest.mark.slow  # loads the default model

CHATS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three prime numbers and explain why they are prime.",
    "hi",
    "Explain, in a few sentences, how a paged KV cache works in an LLM inference server.",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, kv_cache_memory="256MiB", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def chat_ids(llm):
    return [llm.engine.chat_prompt_ids([{"role": "user", "content": c}]) for c in CHATS]


@pytest.fixture(scope="module")
def hf_greedy(default_model_dir, chat_ids):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for ids in chat_ids:  # one at a time: no padding in the reference
            g = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
            outs.append(g[0, len(ids):].tolist())
    return outs


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_equals_transformers_alone(llm, chat_ids, hf_greedy):
    for ids, ref in zip(chat_ids, hf_greedy):
        got = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert got == ref


def test_greedy_equals_transformers_batched(llm, chat_ids, hf_greedy):
    outs = llm.generate([{"prompt_token_ids": i} for i in chat_ids], GREEDY, use_tqdm=False)
    assert token_ids(outs) == hf_greedy


def test_chunked_prefill_and_prefix_hit_give_same_tokens(default_model_dir, chat_ids, hf_greedy):
    small = LLM(default_model_dir, kv_cache_memory="128MiB", max_num_batched_tokens=16,
                enable_prefix_caching=True)
    prompts = [{"prompt_token_ids": i} for i in chat_ids]
    first = token_ids(small.generate(prompts, GREEDY, use_tqdm=False))  # chunks of 16 tokens
    hits_before = small.engine.block_manager.prefix_hits
    second = token_ids(small.generate(prompts, GREEDY, use_tqdm=False))  # the system prompt is cached
    assert small.engine.block_manager.prefix_hits > hits_before
    assert first == second == hf_greedy


def test_seeded_request_same_alone_and_in_batch(llm, chat_ids):
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=MAX_NEW, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": chat_ids[1]}, p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=MAX_NEW)
    batch = llm.generate([{"prompt_token_ids": i} for i in chat_ids],
                         [others, p, others, others, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=MAX_NEW, ignore_eos=True)
    assert llm.generate({"prompt_token_ids": chat_ids[1]}, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_eos_stops_and_text_matches_tokens(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert "Paris" in out.text
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_stop_string_truncates(llm, chat_ids):
    full = llm.generate({"prompt_token_ids": chat_ids[2]}, GREEDY, use_tqdm=False)[0].outputs[0].text
    words = full.split()
    stop = words[len(words) // 2]
    out = llm.generate({"prompt_token_ids": chat_ids[2]}, SamplingParams(temperature=0, max_tokens=MAX_NEW, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)]


def test_min_tokens_and_max_tokens(llm):
    p = SamplingParams(temperature=0, max_tokens=20, min_tokens=12)
    out = llm.generate("The capital of France is Paris.", p, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 12
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_logprobs_are_log_softmax_of_reference(llm, default_model_dir, chat_ids):
    out = llm.generate({"prompt_token_ids": chat_ids[0]}, SamplingParams(temperature=0, max_tokens=3, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3
    for lp in out.logprobs:
        assert lp.top[0][0] == lp.token_id and abs(lp.top[0][1] - lp.logprob) < 1e-6 and lp.logprob <= 0


def test_n_samples_differ_and_are_reproducible(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = llm.generate("Tell me a story", p, use_tqdm=False)[0]
    b = llm.generate("Tell me a story", p, use_tqdm=False)[0]
    assert len(a.outputs) == 3
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


@pytest.mark.parametrize("prompt,params,match", [
    ("", SamplingParams(), "empty"),
    ("x " * 5000, SamplingParams(), "maximum context length"),
    ({"prompt_token_ids": [1, 2, 10 ** 9]}, SamplingParams(), "token ids"),
])
def test_bad_prompts_are_clear_errors(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, params, use_tqdm=False)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("kw,field", [({"max_tokens": 0}, "max_tokens"), ({"top_p": 0.0}, "top_p"),
                                      ({"top_p": 1.5}, "top_p"), ({"temperature": -1}, "temperature"),
                                      ({"top_k": -5}, "top_k")])
def test_bad_sampling_params(kw, field):
    with pytest.raises(ValueError, match=field) as e:
        SamplingParams(**kw)
    assert e.value.param == field


def test_unknown_model_path_is_clear():
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM("/no/such/model")


def test_incremental_detokenizer_never_splits_characters(llm):
    from pdserve.engine.tokenizer import IncrementalDetokenizer
    text = "Grüße aus Köln! 東京タワー 🚀🎉 naïve café — ok"
    ids = llm.tokenizer.encode(text)
    det = IncrementalDetokenizer(llm.tokenizer, [], skip_special_tokens=True)
    deltas = [det.add(t) for t in ids] + [det.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == llm.tokenizer.decode(ids)


def test_default_model_runs_from_its_gguf_codes_with_the_same_numbers(llm, default_model_dir, chat_ids, monkeypatch):
    """The default model's float32 weights come from a GGUF's Q4_1 linears and Q8_0 embedding:
    with the CPU kernels every Linear keeps those codes (models/weight_codes.py), and on the FMA
    tiles (PDSERVE_CPU_AMX=0) the logprobs of a greedy run are bit for bit those of float32
    panels (PDSERVE_CPU_CODES=0); on AMX (where the CPU has it) within float32 rounding of them."""
    from pdserve.models.cpu_kernels import linear_op
    from pdserve.models.layers import Linear
    if linear_op() is None:
        pytest.skip("no C++ kernels here")
    mods = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert mods and all(m.codes is not None and m.panels is None for m in mods)
    assert sorted({m.codes[3] for m in mods}) == [4, 8]          # layers Q4_1, the tied lm_head Q8_0
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": i} for i in chat_ids[:3]]
    monkeypatch.setattr(llm.engine.block_manager, "enable_prefix_caching", False)   # each run computes all
    on_amx = llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("PDSERVE_CPU_AMX", "0")
    coded = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(on_amx, coded):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-3
    monkeypatch.setenv("PDSERVE_CPU_CODES", "0")
    floats = LLM(default_model_dir, kv_cache_memory="64MiB", dtype="float32", device="cpu",
                 enable_prefix_caching=False)
    assert all(m.codes is None and m.panels is not None
               for m in floats.engine.runner.model.modules() if isinstance(m, Linear))
    for a, b in zip(coded, floats.generate(prompts, params, use_tqdm=False)):
        assert len(a.outputs[0].logprobs) == 6
        assert [(lp.token_id, lp.logprob, lp.top) for lp in a.outputs[0].logprobs] == \
               [(lp.token_id, lp.logprob, lp.top) for lp in b.outputs[0].logprobs]
