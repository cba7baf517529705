"""AWQ: folding scales leaves the float model unchanged (Llama, Qwen2 with q/k/v biases), the scale
and clipping searches reduce output error vs RTN, storage is RTN's layout, bad norms are refused."""

import pytest
import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from conftest import make_tiny_model
from quantscope.errors import QuantscopeError
from quantscope.formats.qtensor import quantize_tensor
from quantscope.formats.spec import parse_format
from quantscope.methods import awq


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _perturb_norms(model):
    # random-init norms are all ones; make them generic so the fold is really exercised
    g = torch.Generator().manual_seed(5)
    for n, p in model.named_parameters():
        if "layernorm" in n:
            p.data = 0.5 + torch.rand(p.shape, generator=g)


@pytest.mark.parametrize("arch,kv_heads,n_groups", [("llama", 4, 4), ("llama", 2, 3), ("qwen2", 2, 3)])
def test_folding_scales_leaves_outputs_unchanged(arch, kv_heads, n_groups):
    model = make_tiny_model(arch, tied=False, num_key_value_heads=kv_heads)
    _perturb_norms(model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        g = torch.Generator().manual_seed(2)
        for block in model.model.layers:
            groups = awq.scale_groups(block)
            assert len(groups) == n_groups  # v->o only when num_kv_heads == num_heads
            for group in groups:
                width = block.get_submodule(group.linears[0]).in_features
                s = torch.exp(torch.randn(width, generator=g))  # scales over ~1e-1 .. 1e1
                awq.fold_scales(block, group, s)
        after = model(ids).logits
    if isinstance(model, Qwen2ForCausalLM):
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert (after - before).abs().max().item() < 1e-4
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))


def _outlier_layer(seed=0, tokens=4096, in_f=256, out_f=128):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, in_f, generator=g)
    X[:, [3, 77, 130, 190]] *= 40.0  # a few high-magnitude input channels
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    return X, W


def test_awq_reduces_3bit_error_on_outlier_channels():
    X, W = _outlier_layer()
    Xtest, _ = _outlier_layer(seed=1)  # held-out inputs from the same distribution
    spec = parse_format("awq-int3-g64")
    stats = awq.ActStats(256, keep=2048, stride=2)
    stats.add_batch(X)
    res = awq.search_scales([W], stats.sample(), stats.mean_abs(), spec)
    assert res.alpha > 0 and res.loss < res.loss_rtn
    Ws, s = W * res.scales, res.scales
    qt = awq.quantize_clipped(Ws, awq.search_clip(Ws, X[:512] / s, spec), spec)
    err_awq = (Xtest / s @ (qt.dequantize() - Ws).t()).pow(2).mean()
    err_rtn = (Xtest @ (quantize_tensor(W, spec.rtn()).dequantize() - W).t()).pow(2).mean()
    assert err_awq < 0.6 * err_rtn


def test_scale_search_alpha_zero_is_rtn():
    X, W = _outlier_layer(tokens=512)
    spec = parse_format("awq-int4-g64")
    res = awq.search_scales([W], X, X.abs().mean(0), spec, grid=1)
    # exact: alpha is the grid's first value, and act_mean^0 / sqrt(1 x 1) is exactly 1
    assert res.alpha == 0.0 and torch.equal(res.scales, torch.ones(256))
    expected = (X @ (quantize_tensor(W, spec.rtn()).dequantize() - W).t()).pow(2).mean().item()
    # the same quantity two ways in float32 (gram form vs over tokens), sums of 512 x 256 positive
    # terms in a BLAS's own order: they agree to float32 accumulation error, not bit for bit
    assert res.loss == pytest.approx(expected, rel=1e-4)


def test_clip_search_never_worse_than_no_clip_on_its_tokens():
    X, W = _outlier_layer(tokens=512, in_f=200)  # partial last group (200 = 3 x 64 + 8)
    spec = parse_format("awq-int3-g64")
    mv = awq.search_clip(W, X, spec)
    assert mv.shape == (128, 4)
    clipped = awq.quantize_clipped(W, mv, spec).dequantize()
    plain = awq.quantize_clipped(W, None, spec).dequantize()
    err_clip = (X @ (clipped - W).t()).pow(2).mean()
    err_plain = (X @ (plain - W).t()).pow(2).mean()
    assert err_clip <= err_plain * (1 + 1e-5)
    assert err_clip < 0.99 * err_plain  # and on these weights clipping does help


def test_quantize_clipped_is_rtn_storage():
    _, W = _outlier_layer(in_f=200)
    spec = parse_format("awq-int4-g128")
    rtn = quantize_tensor(W, spec.rtn())
    mine = awq.quantize_clipped(W, None, spec)
    assert mine.nbytes == rtn.nbytes
    for k in rtn.tensors:  # exact on any processor: min/max and elementwise ops only, no sums
        assert torch.equal(mine.tensors[k], rtn.tensors[k])
    assert torch.equal(awq.fake_rtn(W, spec), rtn.dequantize())  # same (code - zero) x scale


def test_act_stats_mean_and_sample():
    x = torch.arange(40.0).reshape(10, 4) - 20
    st = awq.ActStats(4, keep=3, stride=4)
    st.add_batch(x[:3])
    st.add_batch(x[3:])
    assert torch.allclose(st.mean_abs(), x.abs().mean(0))  # sums in another order: to rounding
    assert torch.equal(st.sample(), x[[0, 4, 8]])  # every 4th row across batches (copies: exact)
    st.rescale(torch.tensor([1.0, 2.0, 4.0, 8.0]))
    assert torch.allclose(st.mean_abs(), (x / torch.tensor([1.0, 2.0, 4.0, 8.0])).abs().mean(0))


class _OnePlusNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * (1.0 + self.weight)


def test_fold_refuses_a_norm_that_is_not_linear_in_its_weight():
    block = nn.Module()
    block.norm, block.lin = _OnePlusNorm(8), nn.Linear(8, 4)
    w0, l0 = block.norm.weight.detach().clone(), block.lin.weight.detach().clone()
    with pytest.raises(QuantscopeError, match="cannot fold"):
        awq.fold_scales(block, awq.ScaleGroup("norm", ("lin",)), torch.full((8,), 2.0))
    assert torch.equal(block.norm.weight, w0) and torch.equal(block.lin.weight, l0)  # untouched: exact


def test_unsupported_block_is_refused():
    with pytest.raises(QuantscopeError, match="unsupported decoder block"):
        awq.scale_groups(nn.Sequential(nn.Linear(4, 4)))
