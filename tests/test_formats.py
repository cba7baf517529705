"""Round-trip bounds, storage sizes and packing of quantscope's own formats."""

import math

import pytest
import torch

from quantscope.errors import QuantscopeError
from quantscope.formats import parse_format, quantize_tensor
from quantscope.formats.codebook import FP4_CODEBOOK, NF4_CODEBOOK
from quantscope.formats.packing import pack_bits, pack_ternary, unpack_bits, unpack_ternary
from quantscope.formats.spec import UnknownFormatError
from quantscope.formats.registry import storage_bytes
from quantscope.methods.config import GPTQConfig


def sqnr_db(w, d):
    return 10 * math.log10(w.pow(2).mean().item() / (w - d).pow(2).mean().item())


@pytest.fixture
def gauss():
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 576, generator=g) * 0.02


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_exact(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 64, 576, 577):
        codes = torch.randint(0, 2 ** bits, (5, n), generator=g, dtype=torch.int32).to(torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.shape[1] == math.ceil(n / (8 // math.gcd(8, bits))) * (8 // math.gcd(8, bits)) * bits // 8
        assert torch.equal(unpack_bits(packed, bits, n), codes)  # integer codes: exact


def test_pack_density():
    codes = torch.zeros(1, 576, dtype=torch.uint8)
    assert pack_bits(codes, 4).numel() == 288
    assert pack_bits(codes, 3).numel() == 216  # 8 codes in 3 bytes
    assert pack_bits(codes, 2).numel() == 144


def test_ternary_pack_exact():
    g = torch.Generator().manual_seed(1)
    for n in (1, 5, 6, 576):
        t = torch.randint(0, 3, (4, n), generator=g).to(torch.uint8)
        p = pack_ternary(t)
        assert p.shape[1] == math.ceil(n / 5)
        assert torch.equal(unpack_ternary(p, n), t)  # integer codes: exact


def test_int8_error_within_half_step(gauss):
    qt = quantize_tensor(gauss, parse_format("int8"))
    d = qt.dequantize()
    step = qt.tensors["scales"].float()  # [out, 1]: one scale per output row
    assert step.shape == (256, 1)
    assert ((gauss - d).abs() <= step / 2 + 1e-7).all()
    assert "zeros" not in qt.tensors  # symmetric


@pytest.mark.parametrize("name,floor", [("int4-g128", 19.0), ("int4-g64", 19.5), ("nf4", 19.5),
                                        ("fp4", 17.0), ("int3-g128", 12.5), ("int2-g64", 6.0),
                                        ("int4-g128-sym", 17.5), ("fp8-e4m3", 30.0), ("bf16", 50.0)])
def test_sqnr_floor_on_gaussian(gauss, name, floor):
    d = quantize_tensor(gauss, parse_format(name)).dequantize()
    assert sqnr_db(gauss, d) > floor


def test_more_bits_less_error(gauss):
    errs = [sqnr_db(gauss, quantize_tensor(gauss, parse_format(f"int{b}-g64")).dequantize()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs)


def test_asym_group_error_within_half_step(gauss):
    spec = parse_format("int4-g128")
    qt = quantize_tensor(gauss, spec)
    d = qt.dequantize()
    # each element within half a step of its group's scale (576 = 4 x 128 + 64: a partial last group)
    scales = qt.tensors["scales"].float().repeat_interleave(128, dim=1)[:, :576]
    assert qt.tensors["scales"].shape == (256, 5)
    err = (gauss - d).abs() / scales
    # the integer zero point shifts the grid by up to half a step, so a group's extreme value may be
    # clipped by up to one step; everything else rounds to within half a step
    assert (err <= 1.0 + 1e-4).all()
    assert (err <= 0.5 + 1e-4).float().mean() > 0.999


def test_nf4_codebook_published_values():
    assert NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[7] == 0.0 and NF4_CODEBOOK[-1] == 1.0
    assert abs(NF4_CODEBOOK[1] - (-0.6961928009986877)) < 1e-12
    assert abs(NF4_CODEBOOK[8] - 0.07958029955625534) < 1e-12
    assert abs(NF4_CODEBOOK[14] - 0.7229568362236023) < 1e-12
    assert len(NF4_CODEBOOK) == 16 and sorted(NF4_CODEBOOK) == list(NF4_CODEBOOK)
    assert sorted({abs(v) for v in FP4_CODEBOOK}) == pytest.approx([0, 1 / 192, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1])


def test_nf4_codebook_matches_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    for variant, ours in (("nf4", NF4_CODEBOOK), ("fp4", FP4_CODEBOOK)):
        ref = F.get_4bit_type(variant, device="cpu").tolist()
        assert ref == pytest.approx(list(ours), abs=1e-7)


def test_codebook_values_on_grid(gauss):
    qt = quantize_tensor(gauss, parse_format("nf4"))
    d = qt.dequantize()
    absmax = qt.tensors["absmax"].float().repeat_interleave(64, dim=1)[:, :576]
    normed = d / absmax
    cb = torch.tensor(NF4_CODEBOOK)
    assert (normed.unsqueeze(-1) - cb).abs().min(-1).values.max() < 1e-5


def test_double_quant_smaller_and_close(gauss):
    a = quantize_tensor(gauss, parse_format("nf4"))
    b = quantize_tensor(gauss, parse_format("nf4-dq"))
    assert b.nbytes < a.nbytes
    assert sqnr_db(gauss, b.dequantize()) > sqnr_db(gauss, a.dequantize()) - 0.5


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "fp8-e4m3", "fp8-e5m2", "int8", "int4-g128", "int3-g128",
                                  "int2-g64", "int4-g128-sym", "int5-g32", "nf4", "nf4-dq", "fp4-dq", "ternary",
                                  "binary", "ternary-g32"])
@pytest.mark.parametrize("shape", [(64, 576), (33, 100), (7, 129)])
def test_storage_bytes_match_definition_and_rows(name, shape):
    spec = parse_format(name)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    qt = quantize_tensor(w, spec)
    assert qt.nbytes == storage_bytes(spec, *shape)
    rows = torch.tensor([0, shape[0] - 1, 2])
    assert torch.equal(qt.dequantize(rows), qt.dequantize()[rows])  # per-row elementwise ops: exact


def test_int4_g128_bits_per_weight_exact():
    spec = parse_format("int4-g128")
    # 1024 inputs: 8 groups of 128; 4 bits per code + (16-bit scale + 16-bit zero) / 128
    assert 8 * storage_bytes(spec, 512, 1024) / (512 * 1024) == 4 + 32 / 128  # powers of two: exact
    # 576 inputs: 5 groups per row (the last one partial)
    assert storage_bytes(spec, 10, 576) == 10 * 288 + 10 * 5 * 4


def test_ternary_binary_values(gauss):
    t = quantize_tensor(gauss, parse_format("ternary")).dequantize()
    s = quantize_tensor(gauss, parse_format("ternary")).tensors["scales"].float().repeat_interleave(64, 1)[:, :576]
    assert set(torch.round(t / s).unique().tolist()) <= {-1.0, 0.0, 1.0}
    b = quantize_tensor(gauss, parse_format("binary")).dequantize()
    assert (b.sign() == torch.where(gauss >= 0, 1.0, -1.0)).all()


def test_constant_and_zero_groups():
    w = torch.zeros(4, 128)
    w[1] = 0.5
    w[2] = -0.25
    for name in ("int4-g64", "int3-g128", "int8", "nf4", "int4-g64-sym"):
        d = quantize_tensor(w, parse_format(name)).dequantize()
        assert torch.allclose(d, w, atol=1e-3), name


def test_nan_weights_refused():
    w = torch.randn(4, 8)
    w[0, 0] = float("nan")
    with pytest.raises(QuantscopeError, match="NaN"):
        quantize_tensor(w, parse_format("int8"))


def test_parse_names_and_suggestions():
    assert parse_format("INT4-G128").name == "int4-g128"
    assert parse_format("int8-sym").name == "int8"
    s = parse_format("gptq-int4-g128-act-damp0.05-b64")
    cfg = GPTQConfig.from_spec(s)
    assert (s.method, cfg.act_order, cfg.damp, cfg.block_size) == ("gptq", True, 0.05, 64)
    assert parse_format(s.name) == s
    assert s.rtn().name == "int4-g128"
    with pytest.raises(UnknownFormatError, match="did you mean 'int4-g128'"):
        parse_format("in4-g128")
    for bad in ("int9-g128", "int4-g0", "nf5", "awq-int4-g128-act", ""):
        with pytest.raises(UnknownFormatError):
            parse_format(bad)
