"""docs/openai_fields.md against the code: every field the request models know, every field
pdserve refuses and every field it accepts without effect is in the table, with that
disposition. (That each refused field really gets a 400 naming it, from a worker and through
the router, is in test_openai_surface.py.)"""
import re
from pathlib import Path

from pdserve.server import fields
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest

TABLE = Path(__file__).resolve().parents[1] / "docs" / "openai_fields.md"


def table() -> dict[tuple[str, str], str]:
    """(field, endpoint letter C or H) -> what pdserve does."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        m = re.match(r"^\| `([a-z_]+)` \| ([CH ]+) \| (.+) \|$", line)
        if m:
            for ep in m.group(2).split():
                assert (m.group(1), ep) not in rows, f"{m.group(1)} listed twice for {ep}"
                rows[(m.group(1), ep)] = m.group(3)
    return rows


def refused_rows() -> list[tuple[str, str]]:
    """(field, endpoint) of every row the table lists as refused."""
    return [k for k, v in table().items() if v.startswith("refused")]


def test_every_model_field_is_in_the_table_as_honoured_or_no_effect():
    rows = table()
    for model, ep in ((CompletionRequest, "C"), (ChatCompletionRequest, "H")):
        for name in model.model_fields:
            assert (name, ep) in rows, f"{name} ({ep}) missing from {TABLE.name}"
            assert rows[(name, ep)].startswith(("honoured", "accepted, no effect")), (name, ep)


def test_refused_and_no_effect_fields_match_the_code():
    rows = table()
    for name in fields.REFUSED:
        # refused where the request model does not know it (echo: honoured in completions only)
        for (f, ep), v in rows.items():
            model = CompletionRequest if ep == "C" else ChatCompletionRequest
            if f == name and name not in model.model_fields:
                assert v.startswith("refused"), (name, ep)
        assert any(f == name for f, _ in rows), name
    for name in fields.NO_EFFECT:
        assert any(f == name and v.startswith("accepted, no effect") for (f, _), v in rows.items()), name
    known = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    for (name, _), v in rows.items():
        assert name in known or name in fields.REFUSED or name in fields.NO_EFFECT, \
            f"{name} is in the table but the code does not know it"


def test_the_table_covers_openai_and_vllm_fields():
    """A sample of both APIs' fields that a client sends; a regression drops one of them."""
    names = {f for f, _ in table()}
    for name in ("suffix", "best_of", "logit_bias", "user", "response_format", "tools", "tool_choice",
                 "parallel_tool_calls", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "structured_outputs", "prompt_logprobs", "bad_words", "allowed_token_ids",
                 "repetition_penalty", "use_beam_search", "truncate_prompt_tokens", "priority"):
        assert name in names, name
