"""A CPU step's sequences as independent parts on their own threads (pdserve.engine.step_split):
how a step is divided, that each part worker runs one OpenMP thread, and that a split step gives
the logits an unsplit one does."""
import threading

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import SamplingParams, Sequence
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.engine.step_split import PartWorkers, plan_parts
from pdserve.models.loader import read_hf_config
from engine_drive import drive_with_logits
from tiny_model import save_random_family


def test_decodes_split_into_halves_of_equal_work():
    costs = [1.0] * 6 + [2.0] * 2
    groups = plan_parts(costs, 2)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert [sum(costs[i] for i in g) for g in groups] == [5.0, 5.0]
    assert all(g == sorted(g) for g in groups)   # each part keeps the step's row order


def test_a_step_that_cannot_be_balanced_runs_as_one_part():
    assert plan_parts([2000.0, 1.0, 1.0], 2) is None    # one long prefill beside two decodes
    assert plan_parts([5.0], 2) is None                 # one sequence
    assert plan_parts([1.0, 1.0], 1) is None            # one part asked for
    assert plan_parts([3.0, 1.0], 2, share=0.75) == [[0], [1]]
    assert plan_parts([3.1, 1.0], 2, share=0.75) is None


def test_no_more_parts_than_sequences():
    assert plan_parts([1.0, 1.0, 1.0], 8) == [[0], [1], [2]]


def test_a_sequences_work_counts_linears_pairs_and_the_sample():
    """What a part's share is measured in: StepShape.flops of one sequence's rows."""
    from pdserve.engine.core import StepShape
    from pdserve.engine.request import Sequence
    from pdserve.models.shape import ModelShape
    m = ModelShape("m", num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1,
                   head_dim=4, vocab_size=10)
    per_token, per_pair, per_sample = m.flops_per_token, m.flops_per_pair, m.flops_per_sample
    seq = Sequence("a", list(range(10)), SamplingParams(max_tokens=4))
    seq.num_computed_tokens = 9   # a decode at context 10 attends 10 keys and samples
    assert StepShape.of([seq], [1]).flops(m) == per_token + 10 * per_pair + per_sample
    seq.num_computed_tokens = 6   # a 4-token prefill chunk after 6 cached: 7+8+9+10 pairs
    assert StepShape.of([seq], [3]).flops(m) == 3 * per_token + (7 + 8 + 9) * per_pair
    assert StepShape.of([seq], [4]).flops(m) == 4 * per_token + 34 * per_pair + per_sample


def test_each_part_worker_runs_one_thread_and_the_caller_keeps_its_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        workers = PartWorkers(2)
        seen = workers.run(lambda: (threading.get_ident(), torch.get_num_threads()), [(), ()])
        assert [n for _, n in seen] == [1, 1]
        assert torch.get_num_threads() == 2
        workers.close()
    finally:
        torch.set_num_threads(before)


COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save_random_family("LlamaConfig", "LlamaForCausalLM", COMMON, d)
    return str(d)


def run(model_dir, parts, prompts, params, busy=False):
    """Drive the prompts to the end; returns the sequences, their logits, the parts of each split
    step and the prompt logprobs."""
    cfg = EngineConfig(model=model_dir, device="cpu", dtype="float32", block_size=4, kv_cache_memory=1 << 22,
                       max_num_batched_tokens=64, step_parts=parts)
    runner = ModelRunner(cfg, model_dir, read_hf_config(model_dir), 128)
    runner.busy = busy
    calls, scores = [], {}
    execute = runner.execute
    runner.execute = lambda out, banned: (execute(out, banned), scores.update(runner.prompt_logprobs))[0]
    real = PartWorkers.run
    PartWorkers.run = lambda self, fn, args: calls.append(len(args)) or real(self, fn, args)
    try:
        return _drive(runner, prompts, params) + (calls, scores)
    finally:
        PartWorkers.run = real


def _drive(runner, prompts, params):
    sched = Scheduler(SchedulerConfig(max_model_len=128, max_num_batched_tokens=64), BlockManager(runner.num_blocks, 4))
    seqs = [Sequence(str(i), p, params(i)) for i, p in enumerate(prompts)]
    return seqs, drive_with_logits(runner, sched, seqs)


def test_split_steps_give_the_unsplit_logits_and_tokens(tiny_llama):
    """Prefill chunks, decodes of different lengths, seeded sampling and prompt logprobs: every
    row's logits, tokens and prompt scores are those of the same steps run as one part."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 30, 3, 17, 5, 12)]

    def params(i):
        if i % 3 == 0:
            return SamplingParams(temperature=0.8, seed=i, max_tokens=8, ignore_eos=True)
        if i == 5:   # the engine's own generator: drawn in out.seqs order however the step was split
            return SamplingParams(temperature=0.7, max_tokens=8, ignore_eos=True)
        return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=2 if i == 1 else None)

    one, one_logits, one_calls, one_scores = run(tiny_llama, 1, prompts, params)
    two, two_logits, two_calls, two_scores = run(tiny_llama, 2, prompts, params)
    assert one_calls == [] and two_calls and set(two_calls) == {2}
    assert list(one_scores) == list(two_scores) == ["1"]
    (first_a, rows_a), (first_b, rows_b) = one_scores["1"], two_scores["1"]
    assert first_a == first_b and [r.token_id for r in rows_a] == [r.token_id for r in rows_b] == prompts[1][1:]
    assert [r.rank for r in rows_a] == [r.rank for r in rows_b]
    torch.testing.assert_close([r.logprob for r in rows_a], [r.logprob for r in rows_b], atol=1e-5, rtol=1e-5)
    for a, b in zip(one, two):
        assert a.output_token_ids == b.output_token_ids
        for x, y in zip(one_logits[a.request_id], two_logits[b.request_id]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_by_default_steps_split_only_while_neighbours_hold_cores(tiny_llama):
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    params = lambda i: SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)   # the engine's threads: the parts while busy
    try:
        *_, idle_calls, _ = run(tiny_llama, None, prompts, params, busy=False)
        *_, busy_calls, _ = run(tiny_llama, None, prompts, params, busy=True)
    finally:
        torch.set_num_threads(before)
    assert idle_calls == [] and busy_calls and set(busy_calls) == {2}


def test_a_failed_part_raises_only_after_every_part_ended():
    import time
    workers, ended = PartWorkers(2), []

    def part(fail):
        if fail:
            raise ValueError("bad row")
        time.sleep(0.2)   # still running when the other part has failed
        ended.append(True)
    with pytest.raises(ValueError, match="bad row"):
        workers.run(part, [(True,), (False,)])
    assert ended == [True]
    workers.close()
