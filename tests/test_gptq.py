"""GPTQ solver: lower output error than RTN on correlated inputs, exact storage round trip, layout
identical to RTN's, act-order with static groups, dead columns, dampening and its fallback."""

import pytest
import torch

from quantscope.formats.packing import unpack_bits
from quantscope.formats.qtensor import quantize_tensor
from quantscope.formats.spec import parse_format
from quantscope.methods.gptq import GPTQ, _gram, gptq_quantize, split_rows
from quantscope.formats.registry import storage_bytes


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: one thread avoids OpenMP stalls when the shared machine is busy
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _problem(out_f=64, in_f=200, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    X = torch.randn(tokens, in_f, generator=g) @ A  # correlated input channels
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    acc = GPTQ(in_f)
    for chunk in X.split(300):
        acc.add_batch(chunk)
    return X, W, acc.hessian()


def _out_err(X, W, Q):
    return float(torch.linalg.norm(X @ (W - Q).t()))


@pytest.mark.parametrize("name", ["gptq-int4-g128", "gptq-int3-g32", "gptq-int4-g128-act",
                                  "gptq-int3-g64-sym", "gptq-int3-g64-act-b32", "gptq-int4",
                                  "gptq-int2-g64", "gptq-int8-g128"])
def test_gptq_beats_rtn_on_correlated_inputs(name):
    X, W, H = _problem()
    spec = parse_format(name)
    res = gptq_quantize(W, H, spec)
    rtn = quantize_tensor(W, spec.rtn()).dequantize()
    assert res.fallback is None
    assert _out_err(X, W, res.weight) < 0.85 * _out_err(X, W, rtn)


@pytest.mark.parametrize("name,in_f", [("gptq-int4-g128", 576), ("gptq-int4-g128-act", 576),
                                       ("gptq-int3-g128", 200), ("gptq-int3-g64-sym-act", 200),
                                       ("gptq-int4-g128-b48", 200)])
def test_storage_is_rtn_layout_and_dequantizes_exactly(name, in_f):
    X, W, H = _problem(out_f=24, in_f=in_f, tokens=1500)
    spec = parse_format(name)
    res = gptq_quantize(W, H, spec)
    rtn = quantize_tensor(W, spec.rtn())
    qt = res.qtensor
    assert set(qt.tensors) == set(rtn.tensors)
    for k in qt.tensors:
        assert qt.tensors[k].shape == rtn.tensors[k].shape and qt.tensors[k].dtype == rtn.tensors[k].dtype
    assert qt.nbytes == rtn.nbytes == storage_bytes(spec, 24, in_f)
    # the solver's weights, bit for bit on any processor: both are (code - zero), an exact small
    # integer, times the same fp16 scale, one correctly rounded float32 multiply each
    assert torch.equal(qt.dequantize(), res.weight)
    codes = unpack_bits(qt.tensors["qweight"], spec.bits, in_f)
    assert int(codes.max()) <= 2 ** spec.bits - 1
    assert not torch.equal(codes, unpack_bits(rtn.tensors["qweight"], spec.bits, in_f))  # GPTQ chose


def test_act_order_uses_static_groups_of_original_columns():
    X, W, H = _problem(in_f=200)
    spec = parse_format("gptq-int4-g64-act")
    res = gptq_quantize(W, H, spec)
    rtn = quantize_tensor(W, spec.rtn())
    # static groups: parameters are min-max of consecutive ORIGINAL columns, exactly RTN's (the
    # same elementwise computation on the same weights: exact)
    assert torch.equal(res.qtensor.tensors["scales"], rtn.tensors["scales"])
    assert torch.equal(res.qtensor.tensors["zeros"], rtn.tensors["zeros"])
    assert torch.equal(res.qtensor.dequantize(), res.weight)  # exact: same (code - zero) x scale


def test_hessian_accumulator_matches_formula():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 50, 40, generator=g)
    acc = GPTQ(40)
    acc.add_batch(X[:2])
    acc.add_batch(X[2])
    flat = X.reshape(-1, 40).double()
    assert acc.n == 150
    assert acc.hessian().dtype == torch.float64
    # float32 products summed in float64: within float32 rounding (~1e-6 relative) of the float64 formula
    assert torch.allclose(acc.hessian(), 2 / 150 * flat.t() @ flat, rtol=1e-5, atol=1e-5)
    assert torch.equal(acc.hessian(), acc.hessian().t())  # exact by construction (see _gram)


def test_dead_columns_keep_their_weights_rounded_to_nearest():
    X, W, _ = _problem(in_f=96)
    X[:, 5] = 0.0
    acc = GPTQ(96)
    acc.add_batch(X)
    spec = parse_format("gptq-int4-g32")
    res = gptq_quantize(W, acc.hessian(), spec)
    assert res.dead_columns == 1 and res.fallback is None
    step = res.qtensor.tensors["scales"][:, 0].float()
    assert torch.all((res.weight[:, 5] - W[:, 5]).abs() <= step / 2 + 1e-6)
    assert res.weight[:, 5].abs().sum() > 0  # not zeroed


def test_dampening_grows_geometrically_when_cholesky_fails():
    n = 64
    d = torch.ones(n, dtype=torch.float64)
    d[-1] = -0.05  # indefinite: 0.01 x mean diag does not fix it, 0.1 x does
    W = torch.randn(8, n, generator=torch.Generator().manual_seed(1))
    res = gptq_quantize(W, torch.diag(d), parse_format("gptq-int4-g32"))
    assert res.fallback is None
    assert res.damp == pytest.approx(0.1)


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_fallback_to_rtn_with_warning(bad):
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    H = torch.full((64, 64), float("nan"), dtype=torch.float64) if bad == "nan" else -torch.eye(64, dtype=torch.float64)
    spec = parse_format("gptq-int4-g32")
    res = gptq_quantize(W, H, spec)
    assert res.fallback and "nearest" in res.fallback
    rtn = quantize_tensor(W, spec.rtn())
    for k in rtn.tensors:  # exact: the fallback is the RTN computation itself on the same W
        assert torch.equal(res.qtensor.tensors[k], rtn.tensors[k])
    assert torch.equal(res.weight, rtn.dequantize())


def test_deterministic():
    _, W, H = _problem()
    spec = parse_format("gptq-int3-g32-act")
    a, b = gptq_quantize(W, H, spec), gptq_quantize(W, H, spec)
    for k in a.qtensor.tensors:  # exact: the same computation twice in one process
        assert torch.equal(a.qtensor.tensors[k], b.qtensor.tensors[k])


def test_split_rows_of_stacked_weights():
    X, W, H = _problem(out_f=48, in_f=96)
    res = gptq_quantize(W, H, parse_format("gptq-int4-g32"))
    parts = split_rows(res.qtensor, [16, 8, 24])
    assert [p.shape for p in parts] == [(16, 96), (8, 96), (24, 96)]
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), res.weight)  # row copies: exact
    with pytest.raises(ValueError):
        split_rows(res.qtensor, [16, 8])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cols", [7, 255, 576, 600, 1536])
def test_block_triangle_gram_is_symmetric_and_equals_full_product(cols, dtype):
    rows = 300
    x = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(cols))
    x = x.to(dtype)
    g = _gram(x)
    assert g.dtype == dtype
    assert torch.equal(g, g.t())  # exact: guaranteed by construction (see _gram), whatever the BLAS
    # Closeness to the full product, with a bound that holds on any processor: each entry is a sum
    # of `rows` products, and any summation order (any BLAS blocking, SIMD width, FMA or not) is
    # within rows * u * sum_k |x_ki x_kj| of the exact value (u = eps/2), so the two computations
    # differ by at most twice that; the symmetrizing average adds one more rounding.
    xd = x.double()
    ref = xd.t() @ xd if dtype == torch.float32 else x.t() @ x
    bound = (rows + 1) * torch.finfo(dtype).eps * (xd.abs().t() @ xd.abs())
    assert ((g.double() - ref).abs() <= bound).all()
