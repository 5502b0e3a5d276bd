"""Scheduler: token budget, chunked prefill, preemption, roles, abort. Driven without a model."""
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import FinishReason, SamplingParams, Sequence, Status
from pdserve.engine.scheduler import Scheduler, SchedulerConfig

TOKEN = 5  # what the fake model always samples


def make(num_blocks=64, block_size=4, **kw):
    cfg = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 16, "max_model_len": 256, **kw})
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def seq(rid, n_prompt, max_tokens=4, first=0, **kw):
    return Sequence(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw))


def run(s: Scheduler, max_steps=500, now=0.0):
    """Step until idle; return (finished sequences, per-step outputs)."""
    finished, steps = [], []
    for _ in range(max_steps):
        if not s.has_work():
            break
        out = s.schedule()
        steps.append((list(out.seqs), list(out.num_new_tokens)))
        finished += s.update(out, [TOKEN] * len(out.seqs), now)
    return finished, steps


def test_budget_and_chunked_prefill():
    s = make()
    for i in range(3):
        s.add(seq(f"r{i}", 10, first=100 * i))
    finished, steps = run(s)
    assert sorted(f.request_id for f in finished) == ["r0", "r1", "r2"]
    assert all(sum(n) <= 16 for _, n in steps)
    assert steps[0][1] == [10, 6]  # the second prompt is chunked into the leftover budget
    assert all(f.output_token_ids == [TOKEN] * 4 and f.finish_reason == FinishReason.LENGTH for f in finished)
    assert s.bm.num_free_blocks == s.bm.num_blocks


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s = make(max_num_batched_tokens=256, enable_chunked_prefill=False)
    s.add(seq("a", 200))
    s.add(seq("b", 100, first=1000))
    out = s.schedule()
    assert out.num_new_tokens == [200]


def test_max_num_seqs():
    s = make(max_num_seqs=2, max_num_batched_tokens=256)
    for i in range(5):
        s.add(seq(f"r{i}", 3, first=10 * i))
    out = s.schedule()
    assert len(out.seqs) == 2
    _, steps = run(s)
    assert max(len(x) for x, _ in steps) <= 2


def test_preemption_recomputes_and_leaks_nothing():
    s = make(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    s.add(seq("a", 8, max_tokens=8))
    s.add(seq("b", 8, max_tokens=8, first=50))
    finished, _ = run(s)
    assert s.num_preemptions > 0
    assert sorted(f.request_id for f in finished) == ["a", "b"]
    assert all(len(f.output_token_ids) == 8 for f in finished)
    assert s.bm.num_free_blocks == 6


def test_eos_stop_ids_and_min_tokens():
    s = make()
    a = seq("a", 4, max_tokens=10)
    a.eos_token_ids = (TOKEN,)
    b = seq("b", 4, max_tokens=10, min_tokens=3, stop_token_ids=[TOKEN], first=20)
    s.add(a), s.add(b)
    finished, _ = run(s)
    by = {f.request_id: f for f in finished}
    assert by["a"].finish_reason == FinishReason.STOP and len(by["a"].output_token_ids) == 1
    assert by["b"].stop_reason == TOKEN and len(by["b"].output_token_ids) == 3


def test_prefill_role_holds_blocks_until_release_or_timeout():
    s = make(role="prefill")
    a, b = seq("a", 9, max_tokens=1), seq("b", 9, max_tokens=1, first=40)
    a.remote_decode = b.remote_decode = True
    s.add(a), s.add(b)
    finished, _ = run(s, now=10.0)
    assert {f.request_id for f in finished} == {"a", "b"}
    assert set(s.held) == {"a", "b"} and s.bm.num_used_blocks == 6
    s.release("a")
    assert s.bm.num_used_blocks == 3
    assert s.expire_held(now=15.0, timeout=10.0) == []
    assert [x.request_id for x in s.expire_held(now=20.0, timeout=10.0)] == ["b"]
    assert s.bm.num_used_blocks == 0


def test_decode_role_loads_remote_kv_then_decodes():
    s = make(role="decode")
    d = Sequence("d", list(range(10)), SamplingParams(max_tokens=3), remote_first_token=42)
    s.add(d)
    out = s.schedule()
    assert out.seqs == [] and out.kv_loads == [d] and d.status == Status.WAITING_FOR_KV
    assert len(d.block_table) == 3  # blocks for the whole prompt, to be filled remotely
    s.finish_kv_load("d", ok=True)
    assert d.output_token_ids == [42] and d.num_computed_tokens == 10
    finished, steps = run(s)
    assert steps[0][1] == [1]  # straight to decoding
    assert finished[0].output_token_ids == [42, TOKEN, TOKEN]
    assert s.bm.num_free_blocks == s.bm.num_blocks


def test_decode_role_failed_load_recomputes_and_keeps_first_token():
    s = make(role="decode")
    d = Sequence("d", list(range(10)), SamplingParams(max_tokens=2), remote_first_token=42)
    s.add(d)
    s.schedule()
    s.finish_kv_load("d", ok=False)
    finished, steps = run(s)
    assert steps[0][1] == [10]  # the prompt is prefilled here
    assert finished[0].output_token_ids == [42, TOKEN]


def test_remote_load_reuses_local_prefix_cache():
    s = make(role="decode")
    s.add(seq("warm", 12, max_tokens=1))
    run(s)
    d = Sequence("d", list(range(12)) + [90, 91], SamplingParams(max_tokens=2), remote_first_token=1)
    s.add(d)
    out = s.schedule()
    assert out.kv_loads == [d] and d.num_cached_tokens == 12  # only the last block must be pulled


def test_a_connector_decides_how_many_tokens_load_remotely():
    s = make(role="decode")
    asked = []
    s.get_num_new_matched_tokens = lambda sq, n: asked.append((sq.request_id, n))   # None: compute here
    d = Sequence("d", list(range(10)), SamplingParams(max_tokens=2), remote_first_token=42)
    s.add(d)
    out = s.schedule()
    assert asked == [("d", 0)] and out.kv_loads == [] and out.num_new_tokens == [10]
    finished, _ = run(s)
    assert finished[0].output_token_ids == [42, TOKEN]   # the prefill worker's first token still stands
    s.get_num_new_matched_tokens = lambda sq, n: 10 - n   # a plain request the connector says loads
    p = seq("p", 10, max_tokens=2)
    s.add(p)
    assert s.schedule().kv_loads == [p] and p.status == Status.WAITING_FOR_KV


def test_a_remote_prompt_cached_whole_loads_nothing_and_takes_its_first_token():
    s = make(role="decode")
    s.add(seq("warm", 12, max_tokens=1))
    run(s)
    d = Sequence("d", list(range(12)), SamplingParams(max_tokens=2), remote_first_token=1)
    s.add(d)
    out = s.schedule()
    assert out.kv_loads == [d] and out.seqs == [] and d.num_cached_tokens == 12   # no block to pull
    s.finish_kv_load("d", ok=True)
    assert d.output_token_ids == [1]


def test_abort_frees_blocks_in_every_state():
    s = make(role="both")
    run_seq, wait_seq = seq("run", 8, max_tokens=50), seq("wait", 8, first=30)
    held = seq("held", 8, max_tokens=1, first=60)
    held.remote_decode = True
    load = Sequence("load", list(range(70, 78)), SamplingParams(), remote_first_token=1)
    for x in (run_seq, held, load):
        s.add(x)
    for _ in range(3):
        out = s.schedule()
        s.update(out, [TOKEN] * len(out.seqs))
    s.add(wait_seq)
    assert "held" in s.held and "load" in s.loading and run_seq.status == Status.RUNNING
    for rid in ("run", "wait", "held", "load"):
        assert s.abort(rid) is not None
    assert s.bm.num_free_blocks == s.bm.num_blocks and not s.has_work()
    assert s.abort("nope") is None


def test_held_blocks_being_read_outlive_the_abort_clock():
    s = make(role="prefill")
    a = seq("a", 5, max_tokens=1)
    a.remote_decode = True
    s.add(a)
    run(s, now=0.0)
    asked = []
    reading = lambda rid: asked.append(rid) or True   # noqa: E731
    assert s.expire_held(now=11.0, timeout=10.0, keep=reading) == [] and asked == ["a"]   # clock restarts
    assert s.expire_held(now=20.0, timeout=10.0, keep=lambda rid: False) == []            # 9 s since then
    assert [x.request_id for x in s.expire_held(now=21.0, timeout=10.0, keep=lambda rid: False)] == ["a"]
    assert s.bm.num_free_blocks == s.bm.num_blocks
