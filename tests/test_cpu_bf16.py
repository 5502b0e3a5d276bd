"""bfloat16 weights and KV on CPU (opt-in with dtype="bfloat16"): logits stay within bfloat16's
precision of transformers' float32 ones, through prefill, the decode kernel and the
oneDNN-packed linears."""
import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import SamplingParams, Sequence
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.models.layers import Linear
from pdserve.models.loader import read_hf_config
from engine_drive import drive_with_logits, worst_logit_error

transformers = pytest.importorskip("transformers")


def test_bf16_logits_close_to_float32_reference(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(cfg).eval().float()
    hf.save_pretrained(tmp_path)
    d = str(tmp_path)
    ecfg = EngineConfig(model=d, device="cpu", dtype="bfloat16", block_size=4, kv_cache_memory=1 << 22)
    runner = ModelRunner(ecfg, d, read_hf_config(d), 128)
    head = runner.model.lm_head   # a packable Linear too (its packed copy when packed)
    assert runner.kv_cache.dtype == torch.bfloat16 and (head.weight if head.weight is not None else head.packed).dtype == torch.bfloat16
    linears = [m for m in runner.model.modules() if isinstance(m, Linear)]
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():   # oneDNN-packed where the CPU has bf16 support
        assert linears and all(m.packed is not None and m.weight is None for m in linears)
    else:                                              # an AVX2-only host: plain bf16 matmuls
        assert linears and all(m.packed is None and m.weight is not None for m in linears)
    sched = Scheduler(SchedulerConfig(max_model_len=128), BlockManager(runner.num_blocks, 4))
    g = torch.Generator().manual_seed(1)
    seqs = [Sequence(str(i), torch.randint(0, 256, (n,), generator=g).tolist(),
                     SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)) for i, n in enumerate((9, 3, 14))]
    logits = drive_with_logits(runner, sched, seqs)
    worst = worst_logit_error(hf, seqs, logits)
    # bfloat16 keeps 8 bits of mantissa (~0.4% per rounding); two layers of them stay within a few %
    assert worst < 0.05, worst


def test_float32_packs_where_the_cpu_has_avx2_or_avx512(monkeypatch):
    from pdserve.engine import model_runner as mr
    monkeypatch.delenv("PDSERVE_CPU_PACK", raising=False)
    monkeypatch.setattr(mr, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert mr.packs_on_cpu(torch.float32) and mr.packs_on_cpu(torch.bfloat16)
    monkeypatch.setattr(mr, "cpu_flags", lambda: {"avx2", "fma"})
    assert mr.packs_on_cpu(torch.float32) and mr.packs_on_cpu(torch.bfloat16)
    monkeypatch.setattr(mr, "cpu_flags", lambda: {"sse4_2"})   # or an Arm CPU's flags: no oneDNN fast path known
    assert not mr.packs_on_cpu(torch.float32) and mr.packs_on_cpu(torch.bfloat16)
    monkeypatch.setenv("PDSERVE_CPU_PACK", "1")
    assert mr.packs_on_cpu(torch.float32)
    monkeypatch.setenv("PDSERVE_CPU_PACK", "0")
    assert not mr.packs_on_cpu(torch.bfloat16)
