"""--kv-cache-dtype: a 16-bit KV cache beside float32 weights. The CPU kernels read it as the
same kernels read a float32 cache of the rounded values (bit for bit where both take the vector
path); the torch path widens what it gathers; an engine holds twice the blocks per byte, its
logits stay within the rounding's reach of transformers' float32 ones through chunked prefill and
decode; the KV hand-off names the cache's dtype; the simulator counts its bytes."""
import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.models.attention import _decode_attention, paged_attention
from pdserve.models.cpu_kernels import paged_decode_op, paged_prefill_op
from engine_drive import drive_with_logits, worst_logit_error


def _decode_case(g, cache_dtype, heads=9, kv_heads=3, d=64, bs=16):
    blocks = 40
    cache = torch.randn(2, blocks, bs, kv_heads, d, generator=g).to(cache_dtype)
    lens = torch.tensor([1, 16, 17, 90, 200])
    width = -(-int(lens.max()) // bs)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:width] for _ in lens])
    q = torch.randn(len(lens), heads, d, generator=g)
    mask = (torch.arange(width * bs)[None, :] < lens[:, None])[:, None, None, :]
    return q, cache, tables, lens, mask


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_decode_kernel_reads_a_16bit_cache_under_float_queries(cache_dtype):
    op = paged_decode_op()
    if op is None:
        pytest.skip("no C++ kernels here")
    q, cache, tables, lens, mask = _decode_case(torch.Generator().manual_seed(1), cache_dtype)
    got = op(q, cache, tables, lens, 0.125)
    want = op(q, cache.float(), tables, lens, 0.125)   # the rounded values, widened
    assert got.dtype == torch.float32
    if cache_dtype == torch.bfloat16:   # the same vector path: widening is exact
        assert torch.equal(got, want)
    else:                               # half: the scalar path, another order of sums
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="KV cache under BFloat16 queries"):
        op(q.bfloat16(), cache.float(), tables, lens, 0.125)


def test_torch_decode_path_widens_the_gathered_cache():
    q, cache, tables, lens, mask = _decode_case(torch.Generator().manual_seed(2), torch.bfloat16)
    got = _decode_attention(q, cache, tables, mask, 0.125)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _decode_attention(q, cache.float(), tables, mask, 0.125))


@pytest.mark.parametrize("kernel", [True, False])
def test_prefill_reads_a_bfloat16_cache_under_float_queries(kernel):
    """Prompt chunks after a cached prefix: the prefill kernel (or paged_attention's SDPA path)
    over a bfloat16 cache gives what it gives over a float32 cache of the same rounded values;
    this step's own K and V are rounded on their way in."""
    from test_cpu_kernels import _prefill_case
    if kernel and paged_prefill_op() is None:
        pytest.skip("no C++ kernels here")
    g = torch.Generator().manual_seed(3)
    q, k, v, cache, meta, _ = _prefill_case(g, [(100, 130), (1, 17), (20, 20)], 9, 3, 64, 16, torch.float32)
    half = cache.bfloat16()
    got = paged_attention(q, k, v, half, meta(kernel), 0.125)
    assert got.dtype == torch.float32 and half.dtype == torch.bfloat16
    widened = half.float()
    want = paged_attention(q, k.bfloat16().float(), v.bfloat16().float(), widened, meta(kernel), 0.125)
    assert torch.equal(half.float(), widened)   # the step's K and V went in rounded, as into `widened`
    if kernel:
        assert torch.equal(got, want)
    else:   # a whole prompt attends to its own K and V as computed, not as stored
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf = transformers.LlamaForCausalLM(cfg).eval().float()
    d = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(d)
    return str(d), hf


def _run(model_dir, kv_dtype):
    from pdserve.engine.block_manager import BlockManager
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.engine.request import SamplingParams, Sequence
    from pdserve.engine.scheduler import Scheduler, SchedulerConfig
    from pdserve.models.loader import read_hf_config
    ecfg = EngineConfig(model=model_dir, device="cpu", dtype="float32", kv_cache_dtype=kv_dtype, block_size=4,
                        kv_cache_memory=1 << 20)
    runner = ModelRunner(ecfg, model_dir, read_hf_config(model_dir), 256)
    # chunks of 24 tokens: a long prompt's later chunks attend to keys read back from the cache
    sched = Scheduler(SchedulerConfig(max_model_len=256, max_num_batched_tokens=24), BlockManager(runner.num_blocks, 4))
    g = torch.Generator().manual_seed(1)
    seqs = [Sequence(str(i), torch.randint(0, 256, (n,), generator=g).tolist(),
                     SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for i, n in enumerate((70, 5, 33))]
    return runner, seqs, drive_with_logits(runner, sched, seqs)


def test_engine_with_a_bfloat16_cache_stays_close_to_float32(tiny_llama):
    model_dir, hf = tiny_llama
    r32, _, _ = _run(model_dir, "auto")
    r16, seqs, logits = _run(model_dir, "bfloat16")
    assert r32.kv_cache.dtype == torch.float32 and r16.kv_cache.dtype == torch.bfloat16
    assert r16.dtype == torch.float32 and r16.num_blocks == 2 * r32.num_blocks
    worst = worst_logit_error(hf, seqs, logits)
    # float32 weights, keys and values rounded once to bfloat16 (~0.4%): within 2%, not exact
    assert 0 < worst < 0.02, worst


def test_kv_spec_names_the_cache_dtype():
    from types import SimpleNamespace
    from pdserve.kv.spec import KVHandshakeError, KVSpec
    mc = SimpleNamespace(num_kv_heads=3, head_dim=64, num_layers=30)
    runner = SimpleNamespace(model_config=mc, dtype=torch.float32, kv_dtype=torch.bfloat16, block_size=16)
    spec = KVSpec.from_engine(SimpleNamespace(runner=runner, model_name="m"))
    assert spec.dtype == "bfloat16" and spec.torch_dtype == torch.bfloat16
    other = {**spec.to_dict(), "dtype": "float32"}   # a worker with a float32 cache
    with pytest.raises(KVHandshakeError) as e:
        spec.check(other)
    assert e.value.field == "dtype"


def test_config_refuses_an_unknown_kv_cache_dtype():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")


def test_sim_counts_the_kv_cache_dtype():
    from pdserve.sim.cluster_config import InstanceSpec
    from pdserve.sim.hardware import get_hardware
    from pdserve.sim.instance import SimInstance
    hw = get_hardware("H100")
    spec = InstanceSpec("t", "Qwen/Qwen3-0.6B", hw.name, "both", 1, hw.mem_size, hw.mem_bw)
    same = SimInstance(spec, EngineConfig(dtype="bfloat16"))
    wide = SimInstance(spec, EngineConfig(dtype="bfloat16", kv_cache_dtype="float32"))
    assert wide.kv_bytes_per_token == 2 * same.kv_bytes_per_token
    assert wide.perf.kv_tok == 2 * same.perf.kv_tok
    assert wide.weight_bytes == same.weight_bytes
    assert wide.bm.num_blocks < same.bm.num_blocks


@pytest.mark.slow
def test_a_hand_off_between_bfloat16_caches_decodes_what_the_decode_engine_computes(default_model_dir):
    """A prefill and a decode engine, both with float32 weights and a bfloat16 cache, over the real
    KV server on loopback: the pulled blocks decode the tokens the decode engine gets by itself."""
    import asyncio
    from pdserve.config import KVTransferConfig
    from pdserve.engine.async_engine import AsyncEngine
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.request import SamplingParams
    from pdserve.kv.connector import KVConnector
    from pdserve.kv.params import RemotePrefill
    from test_kv_connector import _run
    made = []

    def make(role):
        eng = LLMEngine(model=default_model_dir, kv_cache_memory="24MiB", max_model_len=256, role=role,
                        kv_cache_dtype="bfloat16")
        ae = AsyncEngine(eng).start()
        made.append((ae, KVConnector(eng, KVTransferConfig(kv_transport="tcp"), wake=ae.wake)))
        return eng, ae, made[-1][1]
    try:
        (p_eng, p_ae, _), (d_eng, d_ae, d_conn) = make("prefill"), make("decode")
        assert p_eng.runner.kv_cache.dtype == d_eng.runner.kv_cache.dtype == torch.bfloat16
        prompt = "A bfloat16 cache travels as it is stored, two bytes a value. " * 2
        greedy = SamplingParams(max_tokens=8, temperature=0)
        outs = asyncio.run(_run(p_ae, prompt, SamplingParams(max_tokens=1, temperature=0), "p1", remote_decode=True))
        rp = RemotePrefill.from_params(outs[-1].kv_transfer_params)
        events = []
        d_conn.on_event = lambda kind, **kw: events.append(kind)
        got = asyncio.run(_run(d_ae, {"prompt_token_ids": rp.prompt_token_ids}, greedy, "d1", remote_prefill=rp))
        assert got[-1].error is None and events == ["pulled"]
        alone = AsyncEngine(LLMEngine(model=default_model_dir, kv_cache_memory="24MiB", max_model_len=256,
                                      kv_cache_dtype="bfloat16")).start()
        try:   # a colocated engine with a bfloat16 cache of its own
            ref = asyncio.run(_run(alone, {"prompt_token_ids": rp.prompt_token_ids}, greedy, "ref1"))
        finally:
            alone.shutdown()
        assert got[-1].outputs[0].token_ids == ref[-1].outputs[0].token_ids
    finally:
        for ae, conn in made:
            conn.close()
            ae.shutdown()


def test_a_pair_the_cpu_kernels_do_not_read_takes_the_torch_path(tiny_llama):
    """bfloat16 weights over a float32 cache: the kernels refuse that pair, so the runner gathers
    and widens instead of failing every step."""
    from pdserve.engine.block_manager import BlockManager
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.engine.request import SamplingParams, Sequence
    from pdserve.engine.scheduler import Scheduler, SchedulerConfig
    from pdserve.models.loader import read_hf_config
    model_dir, _ = tiny_llama
    ecfg = EngineConfig(model=model_dir, device="cpu", dtype="bfloat16", kv_cache_dtype="float32", block_size=4,
                        kv_cache_memory=1 << 20)
    runner = ModelRunner(ecfg, model_dir, read_hf_config(model_dir), 256)
    assert runner.kv_cache.dtype == torch.float32 and not runner.decode_kernel and not runner.prefill_kernel
    sched = Scheduler(SchedulerConfig(max_model_len=256, max_num_batched_tokens=24), BlockManager(runner.num_blocks, 4))
    seqs = [Sequence("a", list(range(1, 40)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))]
    logits = drive_with_logits(runner, sched, seqs)
    assert len(logits["a"]) == 4 and all(torch.isfinite(x).all() for x in logits["a"])
