"""quantscope's packed-code CPU kernels against the reference path (dequantize + fp32 matmul), per format."""

import pytest
import torch

from conftest import tiny_llama
from quantscope.formats.qtensor import quantize_tensor
from quantscope.formats.spec import parse_format
from quantscope.modules import cpu_kernels as ck
from quantscope.modules.qmodules import QuantLinear, kernels_used, set_kernels
from quantscope.quantization import quantize

needs_kernels = pytest.mark.skipif(not ck.available(), reason=f"CPU kernels unavailable: {ck.unavailable_reason()}")

# every format family with a kernel: per-channel int8, grouped 4-bit (asymmetric, symmetric, a ragged last
# group: 576 = 4 x 128 + 64), grouped 8-bit (uint8 codes with zeros; signed symmetric), NF4/FP4 lookups,
# bf16/fp16 storage
KERNEL_FORMATS = ("int8", "int4-g64", "int4-g128", "int4-g32-sym", "int8-g64", "int8-g128-sym", "nf4", "fp4",
                  "nf4-dq", "fp4-dq", "bf16", "fp16")
SHAPES = ((96, 576), (40, 70), (17, 130))  # [out, in]: embedded-model width, odd widths with scalar tails


def _builds():
    """The kernel builds this CPU runs: AVX2 always, AVX-512 where it has it (the product's 16-wide path)."""
    return ("avx2", "avx512") if ck.build() == "avx512" else ("avx2",)


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.05


@needs_kernels
@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matvec_equals_the_reference_path(fmt, shape):
    for isa in _builds():  # the AVX-512 build's 4-bit, 8-bit and table steps differ from the AVX2 build's
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("QUANTSCOPE_KERNEL_ISA", isa)
            ck._load.cache_clear()
            try:
                _check_matvec(fmt, shape)
            finally:
                ck._load.cache_clear()


def _check_matvec(fmt, shape):
    spec = parse_format(fmt)
    qt = quantize_tensor(_weight(shape), spec)
    k = ck.kernel_for(spec, qt.shape)
    assert k is not None
    ref_w = qt.dequantize()
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
        y = ck.matvec(k, x, qt.tensors, spec, qt.shape)
        ref = x @ ref_w.T
        # only the order of the fp32 sums differs
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_kernels
@pytest.mark.parametrize("isa", _builds())
@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_tiled_product_equals_the_reference_path(fmt, isa, monkeypatch):
    """The prefill path (cpu_gemm.cpp) for every kind and both builds: rows and weight rows that do not
    fill a register block or a tile, widths with a zero-padded tail (70, 130), 576 (embedded model)."""
    monkeypatch.setenv("QUANTSCOPE_KERNEL_ISA", isa)
    ck._load.cache_clear()
    try:
        spec = parse_format(fmt)
        for shape in SHAPES + ((33, 576),):
            qt = quantize_tensor(_weight(shape, 2), spec)
            bound = ck.Bound(ck.kernel_for(spec, qt.shape), qt.tensors, spec, qt.shape)
            ref_w = qt.dequantize()
            for rows in (2, 5, 17, 64):
                x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
                ref = x @ ref_w.T
                torch.testing.assert_close(bound.gemm(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    finally:
        ck._load.cache_clear()


@needs_kernels
@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_kernel_dequantize_is_bit_identical(fmt):
    spec = parse_format(fmt)
    for shape in SHAPES:
        qt = quantize_tensor(_weight(shape, 1), spec)
        w = ck.dequantize(ck.kernel_for(spec, qt.shape), qt.tensors, spec, qt.shape)
        assert torch.equal(w, qt.dequantize())  # evaluation figures do not move


@pytest.mark.parametrize("fmt", ("int3-g128", "int2-g64", "ternary", "binary", "fp8-e4m3"))
def test_formats_without_a_kernel_run_and_say_ref(fmt):
    qt = quantize_tensor(_weight((32, 64)), parse_format(fmt))
    layer = QuantLinear(qt)
    assert layer.kernel is None and layer.kernel_name() == ck.REF
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ qt.dequantize().T)


@needs_kernels
@pytest.mark.parametrize("fmt", ("int8", "int4-g64", "nf4"))
def test_quant_linear_fast_path_matches_reference_forward(fmt):
    qt = quantize_tensor(_weight((48, 128)), parse_format(fmt))
    layer = QuantLinear(qt, bias=torch.randn(48))
    x1, xpre, xmany = torch.randn(1, 1, 128), torch.randn(1, 64, 128), torch.randn(1, 200, 128)
    fast1, fastpre, fastmany = layer(x1), layer(xpre), layer(xmany)
    set_kernels(layer, False)
    assert layer.kernel_name() == ck.REF
    torch.testing.assert_close(fast1, layer(x1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fastpre, layer(xpre), rtol=1e-5, atol=1e-6)  # a prefill: the tiled product
    assert torch.equal(fastmany, layer(xmany))  # many rows: the same weight, the same matmul


@needs_kernels
def test_decoding_a_tiny_model_through_kernels_matches_the_reference():
    from quantscope.measure.speed import measure_speed, SpeedConfig

    model = tiny_llama(hidden=64)
    quantize(model, "int4-g32")
    assert kernels_used(model) == {"quantscope-avx2:int4": 14}
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3))
    cfg = SpeedConfig(prompt_tokens=16, new_tokens=8, repeats=1)
    fast = measure_speed(model, ids, cfg)["generated"]
    with torch.inference_mode():
        logits_fast = model(input_ids=ids[None, :1]).logits
    set_kernels(model, False)
    assert kernels_used(model) == {"ref": 14}
    assert measure_speed(model, ids, cfg)["generated"] == fast
    with torch.inference_mode():
        torch.testing.assert_close(logits_fast, model(input_ids=ids[None, :1]).logits, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_tied_quantized_head_uses_the_kernel():
    model = tiny_llama(hidden=64)
    quantize(model, "nf4", include=("embed_tokens",))
    assert kernels_used(model) == {"quantscope-avx2:nf4-lut": 15}  # 14 linears + the tied head
    x = torch.randint(0, 256, (1, 1))
    with torch.inference_mode():
        fast = model(input_ids=x).logits
        set_kernels(model, False)
        torch.testing.assert_close(fast, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_a_failed_build_is_reported_and_layers_take_the_reference_path(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    ck._load.cache_clear()
    try:
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            assert not ck.available() and "failed" in ck.unavailable_reason()
        layer = QuantLinear(quantize_tensor(_weight((16, 64)), parse_format("int4-g32")))
        assert layer.kernel_name() == ck.REF
        x = torch.randn(1, 64)
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T)
    finally:
        ck._load.cache_clear()  # the next test builds (or finds) the real library again


@needs_kernels
def test_a_bound_layer_rebinds_after_copy_and_move():
    """The decode path binds a layer's storage pointers once: a deep copy, a pickle round trip and `.to()`
    each bind again (a copy pointing into the original's freed storage would read garbage)."""
    import copy
    import pickle

    spec = parse_format("int4-g64")
    layer = QuantLinear(quantize_tensor(_weight((96, 576)), spec))
    x = torch.randn(1, 576)
    with torch.no_grad():
        want = x @ layer.dequantized_weight().T
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        assert layer.__dict__.get("_bound") is not None
        twin = copy.deepcopy(layer)
        assert twin.__dict__.get("_bound") is None
        del layer
        torch.testing.assert_close(twin(x), want, rtol=1e-5, atol=1e-5)
        again = pickle.loads(pickle.dumps(twin))
        torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)
        twin.to(torch.device("cpu"))
        assert twin.__dict__.get("_bound") is None
        torch.testing.assert_close(twin(x), want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_scored_windows_take_the_reference_path_at_any_length():
    """A 32-token window would take the tiled product in a plain forward; scoring it does not, so its
    figures equal the reference path's to the bit (they do not depend on --ctx choosing a kernel)."""
    from quantscope.evaluate.perplexity import score_windows
    from quantscope.modules.qmodules import reference_products

    model = tiny_llama(hidden=64)
    quantize(model, "int4-g32")
    wins = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        plain = model(input_ids=wins[:1]).logits
        with reference_products():
            exact = model(input_ids=wins[:1]).logits
        fast = score_windows(model, wins).summary()
        set_kernels(model, False)
        assert torch.equal(exact, model(input_ids=wins[:1]).logits)
        torch.testing.assert_close(plain, exact, rtol=1e-4, atol=1e-4)  # the product: only the sums' order
        assert score_windows(model, wins).summary() == fast
