"""The sequential calibrated driver on tiny random Llama / Qwen2 models: end to end, lower KL than
RTN at 3 bits, RTN storage layout, determinism, both block paths agree, selection, bad input."""

import copy

import pytest
import torch
from torch import nn

from conftest import make_tiny_model, tiny_llama
from quantscope.errors import QuantscopeError
from quantscope.formats.spec import parse_format
from quantscope.methods import calibrate
from quantscope.methods.calibrate import CalibConfig, quantize_calibrated
from quantscope.modules.qmodules import QuantEmbedding, QuantLinear
from quantscope.api import quantize
from quantscope.methods.config import GPTQConfig
from quantscope.formats.registry import storage_bytes


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _calib(n=16, length=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=g) for _ in range(n)]


def _kl(ref_model, model, ids):
    with torch.no_grad():
        ref = ref_model(ids).logits.log_softmax(-1)
        lp = model(ids).logits.log_softmax(-1)
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("fmt", ["gptq-int3-g32", "gptq-int3-g32-act", "awq-int3-g32", "awq+gptq-int3-g32"])
def test_calibrated_beats_rtn_at_3_bits(arch, fmt):
    base = make_tiny_model(arch, tied=False)
    calib = _calib()
    ids = torch.stack(calib)
    spec = parse_format(fmt)
    rtn = quantize(copy.deepcopy(base), spec.rtn())
    model, report = quantize_calibrated(copy.deepcopy(base), spec, calib)
    assert _kl(base, model, ids) < 0.9 * _kl(base, rtn, ids)
    qlin = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(qlin) == 14 and not any(isinstance(m, nn.Linear) and "layers." in n
                                       for n, m in model.named_modules())
    for _, m in qlin:  # same bytes as the RTN format
        assert m.qtensor().nbytes == storage_bytes(spec.rtn(), m.out_features, m.in_features)
        assert m.spec == spec
    assert set(report["layers"]) == {n for n, _ in qlin}
    assert report["total_seconds"] > 0 and report["fallbacks"] == []
    assert all(r["seconds"] >= 0 for r in report["layers"].values())
    if spec.method != "awq":
        assert all(r["damp"] == pytest.approx(0.01) for r in report["layers"].values())
        assert [b["path"] for b in report["blocks"]] == ["parts", "parts"]
    if spec.method != "gptq":
        assert report["layers"]["model.layers.0.mlp.down_proj"]["awq_folded_into"] == "model.layers.0.mlp.up_proj"


def _storage(model):
    return {n: b for n, b in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["gptq-int4-g32-act", "awq-int3-g32"])
def test_deterministic(fmt):
    base = make_tiny_model(tied=False)
    a, _ = quantize_calibrated(copy.deepcopy(base), parse_format(fmt), _calib())
    b, _ = quantize_calibrated(copy.deepcopy(base), parse_format(fmt), _calib())
    sa, sb = _storage(a), _storage(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the same computation twice in one process: exact


def test_block_path_equals_parts_path(monkeypatch):
    base = make_tiny_model("qwen2", tied=False)
    spec = parse_format("gptq-int3-g32")
    a, ra = quantize_calibrated(copy.deepcopy(base), spec, _calib())
    monkeypatch.setattr(calibrate, "_parts_match", lambda *args, **kw: False)
    b, rb = quantize_calibrated(copy.deepcopy(base), spec, _calib())
    assert [x["path"] for x in ra["blocks"]] == ["parts"] * 2 and [x["path"] for x in rb["blocks"]] == ["block"] * 2
    sa, sb = _storage(a), _storage(b)
    assert sa.keys() == sb.keys()
    # exact: the parts call the block's own submodules on the same tensors in the block's order, so
    # both paths run the same ops in one process and accumulate bit-identical Hessians
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_forward(arch):
    """-bf16fwd: calibration passes in bfloat16, solves from float32 weights; the model comes back in
    float32 with its unquantized parameters bit-identical, and its error stays that of GPTQ."""
    base = make_tiny_model(arch, tied=False)
    calib = _calib()
    ids = torch.stack(calib)
    spec = parse_format("gptq-int3-g32-bf16fwd")
    assert GPTQConfig.from_spec(spec).calib_dtype == "bfloat16" and spec.rtn().name == "int3-g32"
    rtn = quantize(copy.deepcopy(base), spec.rtn())
    full, _ = quantize_calibrated(copy.deepcopy(base), parse_format("gptq-int3-g32"), calib)
    model, report = quantize_calibrated(copy.deepcopy(base), spec, calib)
    assert report["calib_dtype"] == "bfloat16" and any("bfloat16" in n for n in report["notes"])
    assert [b["path"] for b in report["blocks"]] == ["parts", "parts"]
    kl, kl_full, kl_rtn = _kl(base, model, ids), _kl(base, full, ids), _kl(base, rtn, ids)
    assert kl < 0.9 * kl_rtn and kl < 1.5 * kl_full
    ref = base.state_dict()
    for k, v in model.state_dict().items():
        assert v.dtype != torch.bfloat16, k
        if k in ref:  # norms, embeddings, biases: untouched
            assert torch.equal(v, ref[k]), k  # copies: exact
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qs) == 14 and all(m.spec == spec for m in qs)


def test_bf16_forward_only_for_gptq():
    with pytest.raises(QuantscopeError, match="bf16fwd"):
        parse_format("awq-int4-g128-bf16fwd")
    assert parse_format("gptq-int4-g128-act-bf16fwd").name == "gptq-int4-g128-act-bf16fwd"


def test_batches_of_mixed_lengths_and_progress():
    base = make_tiny_model(tied=False)
    calib = _calib(5, 40) + _calib(3, 24, seed=2)
    seen = []
    model, report = quantize_calibrated(copy.deepcopy(base), parse_format("gptq-int4-g32"), calib,
                                        progress=lambda d, n, label: seen.append((d, n)),
                                        config=CalibConfig(batch_size=2))
    assert seen == [(1, 2), (2, 2)]
    assert report["calib_tokens"] == 5 * 40 + 3 * 24
    assert report["layers"]["model.layers.1.mlp.down_proj"]["hessian_tokens"] == 272


def test_include_exclude_and_outside_modules_rtn():
    base = make_tiny_model(tied=False)
    spec = parse_format("gptq-int4-g32")
    model, report = quantize_calibrated(copy.deepcopy(base), spec, _calib(), include=("lm_head",),
                                        exclude=("mlp.down_proj",))
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.spec == spec.rtn()
    assert report["rtn_modules"] == ["lm_head"] and report["notes"]
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert "model.layers.0.mlp.down_proj" not in report["layers"]
    assert [b["path"] for b in report["blocks"]] == ["parts", "parts"]


def test_tied_embedding_included_once():
    base = tiny_llama()
    model, report = quantize_calibrated(copy.deepcopy(base), parse_format("awq-int4-g32"), _calib(),
                                        include=("embed_tokens",))
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert sorted(report["rtn_modules"]) == ["lm_head", "model.embed_tokens"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.stack(_calib(2))).logits).all()


@pytest.mark.parametrize("calib,msg", [([], "empty"), ([torch.zeros(0, dtype=torch.long)], "no tokens"),
                                       (["some text"], "not a tensor"),
                                       ([torch.rand(8)], "not a tensor")])
def test_bad_calibration_input(calib, msg):
    with pytest.raises(QuantscopeError, match=msg):
        quantize_calibrated(make_tiny_model(tied=False), parse_format("gptq-int4-g32"), calib)


def test_rtn_format_refused():
    with pytest.raises(QuantscopeError, match="not a calibrated"):
        quantize_calibrated(make_tiny_model(tied=False), parse_format("int4-g32"), _calib())


def test_model_without_layers_refused():
    with pytest.raises(QuantscopeError, match="layers"):
        quantize_calibrated(nn.Sequential(nn.Linear(4, 4)), parse_format("gptq-int4-g32"), _calib())
