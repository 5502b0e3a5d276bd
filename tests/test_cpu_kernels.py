"""The CPU decode attention kernel against the torch backend's gather + SDPA, on the same paged
cache: grouped-query heads, contexts that end inside a block, scattered block tables, a q that
is a strided view (as the merged qkv projection gives), half-precision caches, head sizes the
kernel compiles in (64, 128) and any other, fewer rows than threads (a row split by its heads),
and scores far apart (the polynomial e^x at the bottom of its range)."""
import os
import shutil

import pytest
import torch

from pdserve.models.attention import _decode_attention
from pdserve.models.cpu_kernels import paged_decode_op


@pytest.fixture(scope="module")
def op():
    op = paged_decode_op()
    if op is None and os.environ.get("PDSERVE_CPU_KERNELS") != "0":
        # with a compiler here, a library that does not build is a bug, not a reason to skip
        assert shutil.which(os.environ.get("CXX", "c++")) is None, "the CPU kernels did not build (see stderr)"
    if op is None:
        pytest.skip("no C++ kernels here: the torch backend serves (tested by test_numerics)")
    return op


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (9, 3)])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_kernel_matches_gather_and_sdpa(op, dtype, tol, heads, kv_heads, d):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    blocks, bs = 50, 4
    cache = torch.randn(2, blocks, bs, kv_heads, d, generator=g).to(dtype)
    lens = torch.tensor([1, 4, 5, 17, 23])              # 1 token, a full block, block + 1, ...
    width = -(-int(lens.max()) // bs)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:width] for _ in lens])
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q = qkv[:, :heads * d].view(len(lens), heads, d)   # strided rows, as after the merged projection
    mask = (torch.arange(width * bs)[None, :] < lens[:, None])[:, None, None, :]
    want = _decode_attention(q, cache, tables, mask, 0.3)
    got = op(q, cache, tables, lens, 0.3)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_kernel_reads_only_each_rows_own_blocks(op):
    """Poisoning every block a row does not own (and the unused tail of its last block) with
    NaN must not change its output."""
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 8, 4, 2, 16, generator=g)
    tables = torch.tensor([[3, 5, 0], [6, 1, 0]])
    lens = torch.tensor([6, 3])
    q = torch.randn(2, 4, 16, generator=g)
    clean = op(q, cache, tables, lens, 0.25)
    poisoned = torch.full_like(cache, float("nan"))
    for row, (t, n) in enumerate(zip(tables.tolist(), lens.tolist())):
        for p in range(n):
            poisoned[:, t[p // 4], p % 4] = cache[:, t[p // 4], p % 4]
    torch.testing.assert_close(op(q, poisoned, tables, lens, 0.25), clean)


@pytest.mark.parametrize("rows", [1, 3])
def test_fewer_rows_than_threads_and_far_apart_scores(op, rows):
    g = torch.Generator().manual_seed(rows)
    cache = torch.randn(2, 40, 16, 3, 64, generator=g) * 4
    lens = torch.tensor([300, 17, 1][:rows])
    width = -(-int(lens.max()) // 16)
    tables = torch.stack([torch.randperm(40, generator=g)[:width] for _ in range(rows)])
    q = torch.randn(rows, 9, 64, generator=g) * 4    # scores spread over hundreds: e^x down to underflow
    mask = (torch.arange(width * 16)[None, :] < lens[:, None])[:, None, None, :]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = op(q, cache, tables, lens, 1.0)
    finally:
        torch.set_num_threads(threads)
    exact = _decode_attention(q.double(), cache.double(), tables, mask, 1.0)
    torch_err = (_decode_attention(q, cache, tables, mask, 1.0).double() - exact).abs().max()
    # float32 sums of 300 terms this large are off by ~1e-5 in any order: as good as the torch
    # backend's within a small factor (the first kernel, with std::exp, was 2x it here too)
    assert (got.double() - exact).abs().max() <= 3 * torch_err


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_silu_and_mul_matches_torch(op, dtype, tol, rows):
    from pdserve.models.cpu_kernels import silu_and_mul_op
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 2 * 192, generator=g) * 30).to(dtype)   # far into both tails of the sigmoid
    x[0, :4] = torch.tensor([0.0, -0.0, 88.0, -100.0]).to(dtype)
    gate, up = x.float().chunk(2, -1)
    want = torch.nn.functional.silu(gate) * up
    got = silu_and_mul_op()(x)
    assert got.dtype == dtype and got.shape == (rows, 192)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    strided = torch.randn(rows, 2 * 192 + 10, generator=g)[:, :2 * 192]   # rows with a stride of their own
    gate, up = strided.chunk(2, -1)
    torch.testing.assert_close(silu_and_mul_op()(strided), torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rope_matches_torch_on_a_view_of_merged_qkv(op, dtype, tol):
    from pdserve.models.cpu_kernels import rope_op
    from pdserve.models.layers import RotaryEmbedding
    g = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(64, 512, 10000.0, None)
    cos, sin = rope(torch.tensor([0, 5, 17, 300, 511]))
    qkv = torch.randn(5, (9 + 2 * 3) * 64, generator=g).to(dtype)
    qk = qkv[:, :12 * 64].view(5, 12, 64)              # q and k heads of a merged projection: strided rows
    xf = qk.float()
    want = xf * cos + xf.roll(32, -1) * sin
    got = rope_op()(qk, cos, sin)
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
