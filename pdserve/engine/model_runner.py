"""Turns a scheduled step into tensors, runs the model on its device and samples.

Owns the model and the KV cache: one tensor [layers, 2, num_blocks, block_size, kv_heads,
head_dim], so one block of one layer's K (or V) is a contiguous run of bytes that the KV
transports can copy without reshaping.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from pdserve.config import EngineConfig
from pdserve.engine.core import StepShape
from pdserve.engine.cuda_graphs import DecodeGraphRunner
from pdserve.engine.request import Sequence, TokenLogprobs
from pdserve.engine.sampler import SampleRow, Sampler
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.step_split import PartWorkers, plan_parts
from pdserve.models.attention import AttentionMetadata, plan_decode_groups
from pdserve.models.cpu_kernels import paged_decode_op
from pdserve.models.decoder import CausalLM, ModelConfig
from pdserve.models.layers import pack_linears_for_cpu
from pdserve.models.loader import load_weights
from pdserve.models.tensor_parallel import TPGroup

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 1 << 30
# Decode attention runs in groups of rows padded to the group's widest; one more group costs about
# as much as gathering this many more padded blocks (per row-block). Measured with
# benchmarks/decode_groups.py; on CUDA (eager) a call's launch costs weigh more.
DECODE_GROUP_COST = {"cpu": 8, "cuda": 64}

# allocate(shape, dtype, device) -> tensor; the shm transport swaps in shared memory
KVAllocator = Callable[[tuple, torch.dtype, torch.device], torch.Tensor]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return dev


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln for ln in f if ln.startswith("flags")), "").partition(":")[2].split())
    except OSError:
        return set()


# CPU instructions that run a dtype's matmuls natively; without them oneDNN emulates (slowly)
NATIVE_CPU_DTYPE_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16"}, torch.float16: {"avx512_fp16", "amx_fp16"}}


def packs_on_cpu(dtype: torch.dtype) -> bool:
    """Whether the CPU linears run from packed weights (Linear.pack_for_cpu: float32 in pdserve's
    own panels where the CPU kernels build; 16-bit, and float32 elsewhere, in oneDNN's layout).
    bfloat16: always (1.3-1.45x per linear at 1-256 rows). float32: on x86 CPUs with AVX2 or AVX-512. Measured on this project's
    2-core AVX-512 host: packed 2.3-2.8x faster from 8 rows and as fast at 1 (a 2,000-token
    prefill 1.54x, decode at batch 32 1.32x). On a 2-core AVX2 host (2 threads, GFLOP/s plain /
    packed, best of 4): 16-128 rows 57-113 / 75-140, 1,024 rows 127-161 / 140-144, the 49,152-wide
    lm_head 39-88 / 89-140; at 1 row the layers' own linears are 10-40% slower packed but the
    lm_head 2.3x faster, per token 31 / 26 ms in all; the 64-request workload of
    benchmarks/engine_vs_vllm_cpu.py 44.2 s plain, 38.0 s packed (both oneDNN's).
    $PDSERVE_CPU_PACK=0/1 overrides (for measurements)."""
    env = os.environ.get("PDSERVE_CPU_PACK")
    if env in ("0", "1"):
        return env == "1"
    return dtype == torch.bfloat16 or (dtype == torch.float32 and bool({"avx2", "avx512f"} & cpu_flags()))


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA, float32 on CPU (bfloat16 on CPU is opt-in: faster where the CPU
    has the instructions, 2-3x on this machine's AMX, but not the reference's numerics)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    dtype = DTYPES[name]
    native = NATIVE_CPU_DTYPE_FLAGS.get(dtype)
    if device.type == "cpu" and native and not native & cpu_flags():
        import sys
        print(f"pdserve: this CPU has none of {sorted(native)}: {name} matmuls are emulated and "
              f"likely slower than float32", file=sys.stderr)
    return dtype


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, hf_config: dict, max_positions: int,
                 kv_allocator: KVAllocator | None = None, tp: TPGroup | None = None):
        """tp: this process's rank of a tensor-parallel group (pdserve.engine.tp_ranks); rank 0
        decides and samples, every rank runs the same forward on its shard."""
        self.config = config
        self.tp = tp or TPGroup()
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else DTYPES[config.kv_cache_dtype]
        self.model_config = ModelConfig.from_hf(hf_config)
        self.block_size = config.block_size
        torch.manual_seed(config.seed)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = CausalLM(self.model_config, max_positions, self.tp)
        finally:
            torch.set_default_dtype(prev)
        load_weights(self.model, model_dir)
        self.model.rope.float()  # keep cos/sin in float32 whatever the weights' dtype
        if self.device.type == "cpu" and packs_on_cpu(self.dtype):
            # packed weights: the matmul stops re-packing each weight on every call
            pack_linears_for_cpu(self.model)
        self.model.eval()
        self.sampler = Sampler(config.seed)
        self.prompt_logprobs: dict = {}   # of the last step: see _prompt_logprobs
        self.kv_heads = self.model.layout.local_kv_heads   # this rank's heads
        self.num_blocks = self._num_blocks()
        mc = self.model_config
        # one block more than the block manager gets: the scratch block that padded rows of a
        # CUDA-graph decode batch write to, so they never touch a request's KV
        self.scratch_block = self.num_blocks
        self.kv_shape = (mc.num_layers, 2, self.num_blocks + 1, self.block_size, self.kv_heads, mc.head_dim)
        if self.tp.rank > 0 and kv_allocator is None:   # rank 0 maps this rank's pool (tp_pools)
            from pdserve.engine.tp_pools import RankPoolAllocator
            kv_allocator = RankPoolAllocator()
        alloc = kv_allocator or (lambda shape, dtype, dev: torch.zeros(shape, dtype=dtype, device=dev))
        self.kv_cache = alloc(self.kv_shape, self.kv_dtype, self.device)
        # every rank's KV pool on rank 0, its own first: a KV connector serves and fills them all
        self.rank_pools, self.rank_ipc = [self.kv_cache], []
        if self.tp.size > 1:
            from pdserve.engine import tp_pools
            if self.tp.rank == 0:
                self.rank_pools, self.rank_ipc = tp_pools.open_pools(self.tp, self.kv_cache, kv_allocator)
            else:
                tp_pools.share_pool(self.tp, kv_allocator)
        # CPU decode and prefill attention from the cache in place (no gathered copy), where the
        # kernels build (the prefill kernel takes head sizes in multiples of 16) and read this
        # cache's dtype (the weights' or, beside float32 weights, a 16-bit one; else the torch path)
        self.decode_kernel = (self.device.type == "cpu" and paged_decode_op() is not None
                              and (self.kv_dtype == self.dtype or self.dtype == torch.float32))
        self.prefill_kernel = self.decode_kernel and mc.head_dim % 16 == 0
        # CPU: a step's sequences in independent parts, one thread each (pdserve.engine.step_split):
        # always with step_parts N > 1; by default (None) only while neighbours hold cores (busy,
        # set by the engine between steps), in as many parts as the engine has threads at start
        self.can_split = self.device.type == "cpu" and self.tp.size == 1
        self.max_parts = torch.get_num_threads() if config.step_parts is None else config.step_parts
        self.busy = False
        self.part_workers: PartWorkers | None = None   # started on first use
        self.decode_graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and self.tp.size == 1:
            self.decode_graphs = DecodeGraphRunner(self.model, self.kv_cache, self.block_size,
                                                   config.max_num_seqs, max_positions, self.scratch_block)

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V, of this rank's KV heads."""
        mc = self.model_config
        return 2 * mc.num_layers * self.kv_heads * mc.head_dim * self.kv_dtype.itemsize * self.block_size

    def _num_blocks(self) -> int:
        budget = self.config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                activations = 4 * self.config.max_num_batched_tokens * self.model_config.vocab_size
                budget = int(total * self.config.gpu_memory_utilization) - (total - free) - activations
            else:
                budget = DEFAULT_CPU_KV_BYTES
        n = self.tp.min_int(budget // self.kv_bytes_per_block)   # the same block ids on every rank
        if n < 1:
            raise ValueError(f"KV cache budget of {budget / 2**20:.1f} MiB holds no block of "
                             f"{self.block_size} tokens; raise --kv-cache-memory")
        return int(n)

    # ---- one step ---------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, banned: Callable[[Sequence], tuple[int, ...]]):
        """Run one scheduled step. Returns (token or None per out.seqs entry, logprobs per entry)."""
        # prefills first (in schedule order), then decodes from the shortest context up: attention
        # groups decode rows by width
        def row_order(i: int) -> tuple[bool, int]:
            decode = out.num_new_tokens[i] == 1
            return decode, out.seqs[i].num_computed_tokens if decode else 0
        order = sorted(range(len(out.seqs)), key=row_order)
        parts = self._parts(out, order)
        steps = [StepInputs.of(out, part, banned, self.block_size) for part in parts]
        if len(steps) > 1:
            results = self.part_workers.run(self._run_part, [(s,) for s in steps])
        else:
            results = [self._run_part(steps[0])]
        prompt_rows, offset = [], 0   # prompt logprobs read the step's hidden rows, parts in order
        for s, (hidden, _) in zip(steps, results):
            prompt_rows += [(seq, first, offset + row, count) for seq, first, row, count in s.prompt_rows]
            offset += len(s.ids)
        self.prompt_logprobs = {}
        if prompt_rows:
            hidden = results[0][0] if len(results) == 1 else torch.cat([h for h, _ in results])
            self.prompt_logprobs = self._prompt_logprobs(hidden, prompt_rows)
        tokens: list[int | None] = [None] * len(out.seqs)
        logprobs = [None] * len(out.seqs)
        sample_at = [(i, r) for s in steps for i, _, r in s.sample_at]   # the logits' row order
        if sample_at:
            logits = torch.cat([lg for _, lg in results if lg is not None]) if len(results) > 1 else results[0][1]
            by_seq = sorted(range(len(sample_at)), key=lambda j: sample_at[j][0])
            if by_seq != list(range(len(by_seq))):   # sample in out.seqs order, whatever the batch order
                logits = logits[by_seq]
                sample_at = [sample_at[j] for j in by_seq]
            sampled, lps = self.sampler(logits, [r for _, r in sample_at])
            for (i, _), t, lp in zip(sample_at, sampled, lps):
                tokens[i], logprobs[i] = t, lp
        return tokens, logprobs

    def _parts(self, out: SchedulerOutput, order: list[int]) -> list[list[int]]:
        """The step's rows (indices into out.seqs, in `order`) as parts for the part workers,
        or one part (pdserve.engine.step_split)."""
        parts = self.max_parts if self.config.step_parts is not None or self.busy else 1
        if not self.can_split or parts < 2 or len(order) < 2:
            return [order]
        costs = [StepShape.of([out.seqs[i]], [out.num_new_tokens[i]]).flops(self.model_config) for i in order]
        groups = plan_parts(costs, parts)
        if groups is None:
            return [order]
        if self.part_workers is None:
            self.part_workers = PartWorkers(parts)
        return [[order[j] for j in g] for g in groups]

    def _run_part(self, s: "StepInputs"):
        """One part's forward and the logits of the rows it samples: (hidden, logits or None)."""
        with torch.inference_mode():   # per thread: a part worker enters it too
            if (self.decode_graphs is not None and s.dec_tables and not s.meta.prefill_query_lens
                    and self.decode_graphs.fits(s.dec_tables, s.dec_lens)):
                hidden = self.decode_graphs.forward(s.ids, s.pos, s.slots, s.dec_tables, s.dec_lens)
            else:
                meta = s.meta
                if self.tp.size > 1:   # the other ranks run the same forward on their shards
                    self.tp.broadcast_step((s.ids, s.pos, s.slots, s.dec_tables, s.dec_lens, meta.prefill_query_lens,
                                            meta.prefill_context_lens, meta.prefill_block_tables))
                hidden = self._forward_eager(s.ids, s.pos, s.slots, s.dec_tables, s.dec_lens, meta)
            rows = [j for _, j, _ in s.sample_at]
            return hidden, self.model.compute_logits(hidden[rows]) if rows else None

    PROMPT_LOGITS_ROWS = 256   # logits of this many prompt positions at a time: [rows, vocab] float32

    def _prompt_logprobs(self, hidden, prompt_rows) -> dict:
        """request id -> (first position, [TokenLogprobs of prompt token position+1, ...]): the
        logprob, rank and top-k of each prompt token given the tokens before it."""
        res = {}
        for seq, first, row, count in prompt_rows:
            k, entries = seq.params.prompt_logprobs, []
            for s in range(0, count, self.PROMPT_LOGITS_ROWS):
                m = min(self.PROMPT_LOGITS_ROWS, count - s)
                lp = torch.log_softmax(self.model.compute_logits(hidden[row + s:row + s + m]), dim=-1).cpu()
                targets = torch.tensor(seq.token_ids[first + s + 1:first + s + 1 + m])
                chosen = lp.gather(1, targets[:, None])[:, 0]
                ranks = (lp > chosen[:, None]).sum(dim=1) + 1
                top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
                for j in range(m):
                    top = list(zip(top_i[j].tolist(), top_v[j].tolist())) if k else []
                    entries.append(TokenLogprobs(int(targets[j]), chosen[j].item(), top, int(ranks[j])))
            res[seq.request_id] = (first + 1, entries)
        return res

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks 1..N-1: run each step rank 0 broadcasts, until the group breaks (RankLostError)."""
        while True:
            ids, pos, slots, dec_tables, dec_lens, qlens, ctxlens, tables = self.tp.broadcast_step(None)
            meta = AttentionMetadata(slot_mapping=None, prefill_query_lens=qlens, prefill_context_lens=ctxlens,
                                     prefill_block_tables=tables)
            self._forward_eager(ids, pos, slots, dec_tables, dec_lens, meta)

    def _forward_eager(self, ids, pos, slots, dec_tables, dec_lens, meta: AttentionMetadata):
        dev, bs = self.device, self.block_size
        meta.slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        if self.prefill_kernel and meta.prefill_query_lens:
            w = max(len(t) for t in meta.prefill_block_tables)
            starts = [0]
            for n in meta.prefill_query_lens[:-1]:
                starts.append(starts[-1] + n)
            meta.prefill_kernel_args = (torch.tensor([(t + [0] * w)[:w] for t in meta.prefill_block_tables]),
                                        torch.tensor(starts), torch.tensor(meta.prefill_query_lens),
                                        torch.tensor(meta.prefill_context_lens))
        else:   # SDPA per sequence reads these
            meta.prefill_block_tables = [torch.tensor(t, device=dev) for t in meta.prefill_block_tables]
        if dec_tables:
            widths = [-(-n // bs) for n in dec_lens]   # blocks each row reads (ascending)
            meta.decode_context_lens = torch.tensor(dec_lens, device=dev)
            meta.decode_groups = []
            start = 0
            # the CPU kernel reads each row to its own length: padding costs it nothing, one call
            sizes = [len(widths)] if self.decode_kernel else \
                plan_decode_groups(widths, DECODE_GROUP_COST.get(dev.type, DECODE_GROUP_COST["cuda"]))
            for rows in sizes:
                w = widths[start + rows - 1]
                rows_tables = [(t + [0] * w)[:w] for t in dec_tables[start:start + rows]]   # padded with block 0
                tables = torch.tensor(rows_tables, device=dev)
                lens = meta.decode_context_lens[start:start + rows]
                mask = None if self.decode_kernel else \
                    (torch.arange(w * bs, device=dev)[None, :] < lens[:, None])[:, None, None, :]
                meta.decode_groups.append((rows, tables, mask, lens))
                start += rows
        return self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), self.kv_cache, meta)


@dataclass
class StepInputs:
    """One part of a step as the forward takes it: token rows, their positions and cache slots,
    the attention metadata, and which rows sample or score prompt tokens."""
    ids: list[int]
    pos: list[int]
    slots: list[int]
    dec_tables: list[list[int]]
    dec_lens: list[int]
    meta: AttentionMetadata
    sample_at: list[tuple[int, int, SampleRow]]        # (index in out.seqs, row, how to sample)
    prompt_rows: list[tuple[Sequence, int, int, int]]  # (seq, first position, row, rows) for prompt logprobs

    @classmethod
    def of(cls, out: SchedulerOutput, rows: list[int], banned, bs: int) -> "StepInputs":
        s = cls([], [], [], [], [], AttentionMetadata(slot_mapping=None, prefill_query_lens=[],
                                                      prefill_context_lens=[], prefill_block_tables=[]), [], [])
        meta = s.meta
        for i in rows:
            seq, n = out.seqs[i], out.num_new_tokens[i]
            c = seq.num_computed_tokens
            if seq.computes_prompt_logprobs:
                last = min(c + n, seq.num_prompt_tokens - 1)   # position p predicts prompt token p+1
                if last > c:
                    s.prompt_rows.append((seq, c, len(s.ids), last - c))
            s.ids.extend(seq.token_ids[c:c + n])
            s.pos.extend(range(c, c + n))
            table = seq.block_table
            s.slots.extend(table[p // bs] * bs + p % bs for p in range(c, c + n))
            if n == 1:
                s.dec_tables.append(table)
                s.dec_lens.append(c + 1)
            else:
                meta.prefill_query_lens.append(n)
                meta.prefill_context_lens.append(c + n)
                meta.prefill_block_tables.append(table[:-(-(c + n) // bs)])
            if c + n == seq.num_tokens:
                s.sample_at.append((i, len(s.ids) - 1, SampleRow(seq.params, seq.num_tokens, banned(seq), seq=seq,
                                                                 grammar=seq.grammar)))
        s.sample_at.sort(key=lambda x: x[0])   # logits in out.seqs order within the part
        return s
