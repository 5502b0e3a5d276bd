"""Penalties, logit_bias, allowed_token_ids and bad_words change logits exactly as vLLM's
definitions say, written out here once more in plain Python over the same logits:
repetition divides positive / multiplies negative logits of tokens seen in prompt or output;
frequency subtracts count * f and presence subtracts p (count > 0) over the output tokens."""
import math
import random

import pytest
import torch

from pdserve.engine.logits_controls import apply, bad_words_token_ids
from pdserve.engine.request import SamplingParams, Sequence
from pdserve.engine.sampler import SampleRow, Sampler

V = 50


def reference(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int],
              banned=()) -> list[float]:
    x = list(logits)
    if p.allowed_token_ids:
        x = [v if t in p.allowed_token_ids else -math.inf for t, v in enumerate(x)]
    for word in p.bad_words_token_ids or []:
        prefix = word[:-1]
        if not prefix or output[len(output) - len(prefix):] == prefix:
            x[word[-1]] = -math.inf
    for t in banned:
        x[t] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    counts = {t: output.count(t) for t in set(output)}
    for t in set(prompt) | set(output):   # the tokens every penalty leaves alone are the others
        count = counts.get(t, 0)
        if t in prompt or count:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * count
        x[t] -= p.presence_penalty * (1 if count else 0)
    return x


CASES = [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(frequency_penalty=0.8),
    dict(presence_penalty=-0.5),
    dict(frequency_penalty=-1.1, presence_penalty=1.5, repetition_penalty=1.2),
    dict(logit_bias={3: 5.0, 7: -100.0, 11: 0.25}),
    dict(logit_bias={3: 5.0}, repetition_penalty=1.5, frequency_penalty=0.3),   # bias, then penalties
    dict(allowed_token_ids=[1, 4, 9, 16, 25]),
    dict(allowed_token_ids=[1, 4, 9], logit_bias={4: 2.0}, presence_penalty=0.2),
]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(c) for c in CASES])
def test_controls_equal_reference_formula(kw):
    rng = random.Random(len(str(kw)))
    prompt = [rng.randrange(V) for _ in range(12)]
    output = [rng.randrange(V) for _ in range(20)] + [5, 5, 5]
    p = SamplingParams(**kw)
    logits = torch.randn(V, generator=torch.Generator().manual_seed(7)) * 4
    want = reference(logits.tolist(), p, prompt, output, banned=(2,))
    got = apply(logits.clone(), p, prompt, output, banned=(2,))
    for t in range(V):
        if math.isinf(want[t]):
            assert math.isinf(got[t]) and got[t] < 0, t
        else:
            assert abs(got[t].item() - want[t]) < 1e-5, (t, got[t].item(), want[t])
    assert not torch.equal(got, logits), "the control changed nothing"


def test_bad_words_ban_the_last_token_after_the_prefix():
    p = SamplingParams(bad_words=["x"])
    p.bad_words_token_ids = [[7], [3, 4, 8]]
    logits = torch.zeros(V)
    after_prefix = apply(logits.clone(), p, [1, 2], [9, 3, 4])
    assert after_prefix[7] == -math.inf and after_prefix[8] == -math.inf
    elsewhere = apply(logits.clone(), p, [1, 2], [9, 3, 5])
    assert elsewhere[7] == -math.inf and elsewhere[8] == 0.0
    assert reference([0.0] * V, p, [1, 2], [9, 3, 4]) == after_prefix.tolist()


@pytest.mark.slow
def test_bad_words_are_tokenized_with_and_without_a_leading_space(default_model_dir):
    from pdserve.engine.tokenizer import load_tokenizer
    tok = load_tokenizer(default_model_dir)
    ids = bad_words_token_ids(tok, ["Paris"])
    assert tok.encode("Paris", add_special_tokens=False) in ids
    assert tok.encode(" Paris", add_special_tokens=False) in ids


def test_sampler_greedy_follows_controlled_logits_and_reports_raw_logprobs():
    """The token is the argmax after the controls; its logprob is the model's own (vLLM's
    default raw_logprobs)."""
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    top = int(logits[0].argmax())
    target = (top + 1) % V
    p = SamplingParams(temperature=0, logit_bias={target: 100.0}, logprobs=1)
    seq = Sequence("a", [1, 2, 3], p)
    plain = SamplingParams(temperature=0, logprobs=1)
    tokens, lps = Sampler()(logits.clone(), [SampleRow(p, 3, (), seq=seq), SampleRow(plain, 3, (), seq=Sequence("b", [1], plain))])
    assert tokens == [target, int(logits[1].argmax())]
    raw = torch.log_softmax(logits[0], -1)
    assert abs(lps[0].logprob - raw[target].item()) < 1e-6
    assert lps[0].top[0][0] == top


def test_greedy_takes_the_first_of_tied_tokens():
    """A greedy row's token is the first index of its largest logit (argmax's rule), a tie
    included (a logit_bias of several tokens to one value makes one)."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5))
    logits[0, [7, 3, 11]] = 50.0
    logits[1] = 1.0
    logits[2, [5, 9]] = float("nan")   # a NaN propagates, as in argmax: the first one
    g = SamplingParams(temperature=0)
    tokens, _ = Sampler()(logits.clone(), [SampleRow(g, 1, ()) for _ in range(3)])
    assert tokens == [3, 0, 5] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("kw,param", [({"presence_penalty": 2.5}, "presence_penalty"),
                                      ({"frequency_penalty": -3}, "frequency_penalty"),
                                      ({"repetition_penalty": 0}, "repetition_penalty"),
                                      ({"logit_bias": {1: 101}}, "logit_bias"),
                                      ({"logit_bias": {"x": 1}}, "logit_bias"),
                                      ({"allowed_token_ids": []}, "allowed_token_ids"),
                                      ({"bad_words": [" "]}, "bad_words"),
                                      ({"prompt_logprobs": 21}, "prompt_logprobs"),
                                      ({"max_tokens": 0}, "max_tokens")])
def test_bad_controls_name_their_field(kw, param):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_max_tokens_zero_only_to_score_a_prompt():
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
