"""Float32 weights kept as the codes they were dequantized from (models/weight_codes.py): found
where GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 spell them and only there, checked bit for bit, and
the coded linears' outputs on the FMA tiles bit for bit those of the float panels (the same sums
in the same order), over row counts past a tile, a row block and the coded row block, columns
past a panel, k past a block; on AMX (where the CPU has it) no further from float64 than the FMA
tiles' float32 sums."""
import pytest
import torch

from pdserve.models.cpu_kernels import linear_op


@pytest.fixture(scope="module")
def ops():
    if linear_op() is None:
        pytest.skip("no C++ kernels here: float32 linears run unpacked or by oneDNN")
    return torch.ops.pdserve_cpu


def q4_1(n, k, seed=0):
    """A weight as GGUF's Q4_1 dequantizes: per 32 inputs a half-precision step d and least value
    m, codes 0..15 (0 and 15 both used, as ggml's rounding makes them), d * code + m in float32."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(n, k // 32, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 3], q[..., 17] = 0, 15
    return (q * d + m).reshape(n, k)


def q8_0(n, k, seed=0):
    """As GGUF's Q8_0: a half-precision d per 32 inputs, codes -127..127 (one of them +-127), d * code."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
    q[..., 5] = torch.where(torch.rand(n, k // 32, generator=g) < 0.5, 127.0, -127.0)
    return (q * d).reshape(n, k)


def q4_0(n, k, seed=0):
    """As GGUF's Q4_0: d = (the group's value of largest magnitude) / -8 in half precision, codes
    0..15, (code - 8) * d: the largest magnitude has code 0; d of either sign."""
    g = torch.Generator().manual_seed(seed)
    d = ((torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4) *
         torch.where(torch.rand(n, k // 32, 1, generator=g) < 0.5, 1.0, -1.0)).half().float()
    q = torch.randint(1, 16, (n, k // 32, 32), generator=g).float()
    q[..., 7] = 0
    return ((q - 8) * d).reshape(n, k)


def q5(n, k, seed=0, symmetric=False):
    """As GGUF's Q5_1 (codes 0..31, d * code + m) or Q5_0 (d = largest magnitude / -16, (code - 16) * d)."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    q = torch.randint(0, 32, (n, k // 32, 32), generator=g).float()
    if symmetric:
        q[..., 2] = 0
        return ((q - 16) * -d).reshape(n, k)
    m = (-torch.rand(n, k // 32, 1, generator=g) * 0.1).half().float()
    q[..., 3], q[..., 9] = 0, 31
    return (q * d + m).reshape(n, k)


@pytest.mark.parametrize("make,bits", [(q4_1, 4), (q4_0, 4), (q8_0, 8), (q5, 8),
                                       (lambda n, k: q5(n, k, symmetric=True), 8)])
def test_codes_found_and_exact(ops, make, bits):
    from pdserve.models.weight_codes import find_codes
    w = make(100, 576)
    found = find_codes(w)
    assert found is not None and found[3] == bits
    back = ops.unpack_codes(*found, 100)
    assert torch.equal(back, w)   # -0.0 (Q4_0's code 8 times a negative d) comes back as +0.0
    assert found[0].numel() * 8 // bits >= w.numel()   # codes: bits a weight (plus scales)


def test_a_weight_no_codes_spell_stays_float(ops):
    from pdserve.models.weight_codes import find_codes
    assert find_codes(torch.randn(64, 64)) is None
    w = q4_1(64, 128)
    w[10, 70] += 1e-6                       # one value off its group's grid
    assert find_codes(w) is None
    assert find_codes(q4_1(8, 64)[:, :40].contiguous()) is None            # k not a multiple of 32
    bad = q4_1(8, 64)
    bad[0, 0] = float("nan")
    assert find_codes(bad) is None
    assert find_codes(q4_1(8, 64).double()) is None
    mixed = torch.cat([q4_1(8, 64), q4_0(8, 64, seed=1)], dim=1)     # groups of either kind: still 4 bits
    assert find_codes(mixed)[3] == 4


@pytest.mark.parametrize("rows", [1, 5, 9, 97, 300, 500])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (64, 37)])
@pytest.mark.parametrize("make", [q4_1, q8_0, q4_0])   # q4_0: weights of -0.0 among them
@pytest.mark.parametrize("bias", [False, True])
def test_coded_linear_is_the_float_panels_bit_for_bit(ops, rows, k, n, make, bias):
    from pdserve.models.weight_codes import find_codes
    w = make(n, k, seed=rows + n)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k + 3, generator=g)[:, :k]
    b = torch.randn(n, generator=g) if bias else None
    coded = find_codes(w)
    y = ops.linear_codes(x, *coded, n, b)
    assert torch.equal(y, ops.linear(x, ops.pack_linear(w), n, b))
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(y.double(), want, atol=1e-4 * k ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 9, 97, 500])
@pytest.mark.parametrize("bias", [False, True])
def test_coded_silu_mul_is_the_float_panels_bit_for_bit(ops, rows, bias):
    from pdserve.models.weight_codes import find_codes
    inter, k = 192, 576
    w = q4_1(2 * inter, k, seed=rows)
    x = torch.randn(rows, k)
    b = torch.randn(2 * inter) if bias else None
    y = ops.linear_silu_mul_codes(x, *find_codes(w), inter, b)
    assert torch.equal(y, ops.linear_silu_mul(x, ops.pack_linear(w), inter, b))


def test_coded_ops_refuse_what_does_not_match(ops):
    from pdserve.models.weight_codes import find_codes
    coded = find_codes(q4_1(50, 64))
    with pytest.raises(RuntimeError, match="does not match"):
        ops.linear_codes(torch.randn(2, 96), *coded, 50, None)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.linear_codes(torch.randn(2, 64), *coded, 200, None)
    with pytest.raises(RuntimeError, match="bits must be"):
        ops.linear_codes(torch.randn(2, 64), *coded[:3], 2, 50, None)
    with pytest.raises(RuntimeError, match="above 15"):
        ops.pack_codes(torch.full((4, 32), 16, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1), 4)
    with pytest.raises(RuntimeError, match="multiple of"):
        ops.pack_codes(torch.zeros(4, 40, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1), 8)


def test_modules_keep_codes_and_give_the_same_numbers(ops, monkeypatch):
    """pack_linears_for_cpu: a coded weight's Linear runs from codes (no float panels, the plain
    weight dropped unless tied), a float one's from panels; the gated MLP from the coded gate/up;
    every output bit for bit what float panels give. PDSERVE_CPU_CODES=0 keeps panels."""
    from pdserve.models.layers import GatedMLP, Linear, pack_linears_for_cpu

    def build():
        torch.manual_seed(0)
        m = torch.nn.ModuleDict({"mlp": GatedMLP(64, 96), "o": Linear(64, 64, bias=True),
                                 "plain": Linear(64, 48, bias=False), "emb": torch.nn.Embedding(80, 64),
                                 "head": Linear(64, 80, bias=False)})
        with torch.no_grad():
            m["mlp"].gate_up_proj.weight.copy_(q4_1(192, 64, 1))
            m["mlp"].down_proj.weight.copy_(q4_1(64, 96, 2))
            m["o"].weight.copy_(q4_1(64, 64, 3))
            m["emb"].weight.copy_(q8_0(80, 64, 4))
        m["head"].weight = m["emb"].weight
        return m

    x = torch.randn(7, 64)
    coded = build()
    pack_linears_for_cpu(coded)
    monkeypatch.setenv("PDSERVE_CPU_CODES", "0")
    floats = build()
    pack_linears_for_cpu(floats)
    for name in ("o", "head"):
        assert coded[name].codes is not None and coded[name].panels is None
        assert floats[name].codes is None and floats[name].panels is not None
    assert coded["mlp"].gate_up_proj.codes[3] == 4 and coded["head"].codes[3] == 8
    assert coded["plain"].codes is None and coded["plain"].panels is not None   # random: float panels
    assert coded["o"].weight is None and coded["head"].weight is coded["emb"].weight
    for name in ("mlp", "o", "plain", "head"):
        assert torch.equal(coded[name](x), floats[name](x)), name


@pytest.fixture(scope="module")
def amx(ops):
    if not ops.amx_coded_linears():
        pytest.skip("no AMX-BF16 here (or Linux does not grant the tiles): the FMA tiles serve")
    return ops


@pytest.mark.parametrize("rows", [1, 16, 17, 130, 300])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (64, 37)])
@pytest.mark.parametrize("make", [q4_1, q8_0])
def test_amx_coded_linear_has_float32_accuracy(amx, rows, k, n, make):
    """On AMX (from amx_rows rows on) the products are exact and only the float32 sums round: no
    further from the exact result (float64) than the FMA tiles' float32 sums, and a bias added."""
    from pdserve.models.weight_codes import find_codes
    w = make(n, k, seed=rows * 5 + n)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k + 3, generator=g)[:, :k]
    b = torch.randn(n, generator=g)
    coded = find_codes(w)
    want = torch.nn.functional.linear(x.double(), w.double())
    fma = amx.linear_codes(x, *coded, n, None, 0)
    on = amx.linear_codes(x, *coded, n, None, 1)
    assert (on.double() - want).abs().max() <= 1.5 * (fma.double() - want).abs().max() + 1e-7
    assert torch.equal(amx.linear_codes(x, *coded, n, b, 1), on + b)
    assert torch.equal(amx.linear_codes(x, *coded, n, None, rows + 1), fma)   # fewer rows than amx_rows


@pytest.mark.parametrize("rows", [16, 97, 300])
def test_amx_coded_silu_mul_has_float32_accuracy(amx, rows):
    from pdserve.models.weight_codes import find_codes
    inter, k = 192, 576
    w = q4_1(2 * inter, k, seed=rows)
    x = torch.randn(rows, k)
    b = torch.randn(2 * inter)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    want = torch.nn.functional.silu(ref[:, :inter]) * ref[:, inter:]
    on = amx.linear_silu_mul_codes(x, *find_codes(w), inter, b, 1)
    fma = amx.linear_silu_mul_codes(x, *find_codes(w), inter, b, 0)
    assert (on.double() - want).abs().max() <= 1.5 * (fma.double() - want).abs().max() + 1e-7
