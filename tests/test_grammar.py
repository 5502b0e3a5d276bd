"""The grammar engine in the sampler, without the model: random logits, masked by the request's
grammar, sampled until EOS; what comes out is checked by independent references (Python's `re`,
the `jsonschema` package). Needs the default model's tokenizer."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from pdserve.engine.grammar import GrammarCompiler, GrammarError
from pdserve.engine.request import SamplingParams, StructuredOutputsParams as SO
from pdserve.engine.sampler import SampleRow, Sampler

pytestmark = pytest.mark.slow
EOS = 2


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, len(tok), (EOS,))


def run(compiler, tok, spec: SO, seed: int, max_tokens: int = 200, temperature: float = 1.0) -> tuple[str, bool]:
    """Sample from random logits under the grammar; (text, ended with EOS)."""
    sampler = Sampler(seed)
    sampler.grammars = compiler
    m = compiler.matcher(spec)
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    out = []
    for pos in range(max_tokens):
        logits = torch.randn(1, len(tok), generator=g) * 3
        logits[0, EOS] -= 4   # unconstrained, random text would end at once; the grammar must say when
        (t,), _ = sampler(logits, [SampleRow(params, pos, (), grammar=m)])
        if t == EOS:
            return tok.decode(out), True
        out.append(t)
        assert m.advance(out) is None
    return tok.decode(out), False


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                            "maxItems": 2}}, "required": ["id", "tags"],
        "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
]


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_json_schema_from_random_logits(compiler, tok, i):
    for seed in range(3):
        text, ended = run(compiler, tok, SO(json=SCHEMAS[i], disable_any_whitespace=True), seed)
        assert ended, text
        jsonschema.validate(json.loads(text), SCHEMAS[i])


def test_regex_choice_grammar_json_object(compiler, tok):
    pat = r"[A-Z][a-z]{2,6} \d{2,3}(-[xy])?"
    choices = ["yes", "no", "maybe later"]
    for seed in range(4):
        text, ended = run(compiler, tok, SO(regex=pat), seed)
        assert ended and re.fullmatch(pat, text), text
        text, ended = run(compiler, tok, SO(choice=choices), seed)
        assert ended and text in choices, text
        text, ended = run(compiler, tok, SO(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'), seed, max_tokens=40)
        assert re.fullmatch(r"\((?:[0-9]+\+)*[0-9]*\)?", text), text   # a prefix of the language at least
        assert not ended or re.fullmatch(r"\([0-9]+(\+[0-9]+)*\)", text), text
        text, ended = run(compiler, tok, SO(grammar='start: "<" /[a-c]{1,4}/ ">"'), seed)   # Lark
        assert ended and re.fullmatch(r"<[a-c]{1,4}>", text), text
    text, ended = run(compiler, tok, SO(json_object=True), 0, max_tokens=400, temperature=0.0)
    if ended:
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{"), text


def test_unconstrained_rows_untouched(compiler, tok):
    """A batch of a constrained and unconstrained rows: only the constrained one is masked."""
    sampler = Sampler(0)
    sampler.grammars = compiler
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, len(tok), generator=g)
    greedy = SamplingParams(temperature=0.0)
    rows = [SampleRow(greedy, 0), SampleRow(greedy, 0, (), grammar=compiler.matcher(SO(choice=["zebra"]))),
            SampleRow(SamplingParams(temperature=0.0, logprobs=2), 0)]
    tokens, lps = sampler(logits.clone(), rows)
    assert tokens[0] == logits[0].argmax().item() and tokens[2] == logits[2].argmax().item()
    assert tok.decode([tokens[1]]) in ("z", "ze", "zeb", "zebr", "zebra")
    ref = torch.log_softmax(logits[2], -1)
    assert lps[2].logprob == pytest.approx(ref.max().item(), abs=1e-5)


def test_bad_grammars_name_their_field(compiler):
    for spec in (SO(regex="[a-", param="guided_regex"), SO(json={"type": "nonsense"}, param="response_format"),
                 SO(json="{not json", param="guided_json"), SO(grammar="root ::= (", param="guided_grammar")):
        with pytest.raises(GrammarError) as e:
            compiler.matcher(spec)
        assert e.value.param == spec.param


def test_min_tokens_yields_to_a_finished_grammar(compiler, tok):
    """min_tokens bans EOS, but a grammar that is complete allows nothing else: the grammar wins
    (otherwise every token is -inf and the row samples garbage)."""
    sampler = Sampler(0)
    sampler.grammars = compiler
    m = compiler.matcher(SO(choice=["ok"]))
    ids = tok.encode("ok")
    assert m.advance(ids) is None
    (t,), _ = sampler(torch.randn(1, len(tok)), [SampleRow(SamplingParams(temperature=0.0), 5, (EOS,), grammar=m)])
    assert t == EOS
