"""`quantscope save`: compressed-tensors checkpoints that transformers (and vLLM) load, checked bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from quantscope.api import quantize
from quantscope.errors import QuantscopeError
from quantscope.model.export import save_compressed_tensors, weight_args
from conftest import quantized_modules
from quantscope.quantization import resolve
from quantscope.save import SaveConfig, _integer_formats, save

from conftest import tiny_llama, tiny_qwen

pytest.importorskip("compressed_tensors")


def _load_back(path):
    """The checkpoint as transformers loads it, independently of quantscope's own check."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def _calib(n=4, seqlen=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (seqlen,), generator=g) for _ in range(n)]


@pytest.mark.parametrize("fmt,args", [
    ("int4-g32", {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}),
    ("int4-g32-sym", {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}),
    ("int3-g16", {"num_bits": 3, "symmetric": False, "strategy": "group", "group_size": 16}),
    ("int8", {"num_bits": 8, "symmetric": True, "strategy": "channel", "group_size": None}),
    ("gptq-int4-g32", {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}),
    ("awq-int4-g32", {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}),
    ("qwen2:gptq-int4-g32-sym", {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}),
])
def test_round_trip_is_exact(tmp_path, fmt, args):
    """Reloaded by transformers + compressed-tensors: every quantized weight equals quantscope's dequantized
    weight exactly, every other parameter (AWQ's folded norms, Qwen2's biases) is unchanged, logits agree."""
    arch, _, fmt = fmt.rpartition(":")
    model = tiny_qwen() if arch == "qwen2" else tiny_llama()
    spec = resolve(fmt).spec
    quantize(model, spec, calib=_calib() if spec.calibrated else None)
    deq = {n: m.dequantized_weight().clone() for n, m in quantized_modules(model)}
    others = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids.unsqueeze(0)).logits[0]
    out = tmp_path / "ckpt"
    report = save_compressed_tensors(model, None, out, ids, {"format": fmt})
    assert report.linears == len(deq) == 14 and report.max_weight_diff == 0.0
    assert bool(report.notes) == (args["num_bits"] not in (4, 8))  # vLLM's kernels: 4 and 8 bits
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert {k: group["weights"][k] for k in args} == args and sorted(group["targets"]) == sorted(deq)
    back = _load_back(out)
    mods = dict(back.named_modules())
    # exact on any processor: both sides compute (code - zero) x scale elementwise (one rounding, no
    # sums), and the other parameters are copies
    for n, w in deq.items():
        assert torch.equal(mods[n].weight, w), n
    params = dict(back.named_parameters())
    for n, p in others.items():
        assert torch.equal(params[n], p), n
    with torch.no_grad():
        got = back(input_ids=ids.unsqueeze(0)).logits[0]
    # the same weights through other modules (nn.Linear vs QuantLinear): float32 rounding only
    assert torch.allclose(got, want, atol=1e-5)
    assert json.loads((out / "quantscope.json").read_text())["checkpoint"]["max_weight_diff"] == 0.0


def test_mixed_plan_becomes_one_group_per_format(tmp_path):
    """A mixed-precision plan (first/last blocks int8, the rest int4) keeps each layer's own format."""
    model = tiny_llama(layers=4)
    quantize(model, "mixed-edges:int4-g32/int8")
    fmts = {n: m.spec.name for n, m in quantized_modules(model)}
    deq = {n: m.dequantized_weight() for n, m in quantized_modules(model)}
    ids = torch.arange(30) % 256
    report = save_compressed_tensors(model, None, tmp_path / "m", ids, {})
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    by_bits = {g["weights"]["num_bits"]: set(g["targets"]) for g in qc["config_groups"].values()}
    assert by_bits == {4: {n for n, f in fmts.items() if f == "int4-g32"}, 8: {n for n, f in fmts.items() if f == "int8"}}
    assert len(by_bits[4]) == 14 and len(by_bits[8]) == 14
    # transformers' loader applies one group's scheme to every layer (5.24), so the check decompresses each
    # layer under its own group with compressed-tensors; here, independently, one layer of each group
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    comp = BaseCompressor.get_value_from_registry("pack-quantized")
    for g in qc["config_groups"].values():
        name = g["targets"][0]
        own = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        w = comp.decompress(own, QuantizationScheme.model_validate(g))["weight"]
        assert torch.equal(w, deq[name]), name  # elementwise (code - zero) x scale both ways: exact
    assert report.max_weight_diff == 0.0 and report.max_logit_diff < 1e-5


def test_refusals_name_the_reason():
    for fmt in ("nf4", "fp8-e4m3", "bnb-nf4"):
        with pytest.raises(QuantscopeError, match="compressed-tensors|save it with that library"):
            _integer_formats(resolve(fmt))
    with pytest.raises(QuantscopeError, match="576 input columns.*whole groups.*64, 32, 16"):
        weight_args(resolve("int4-g128").spec, 576, "model.layers.0.mlp.up_proj")
    with pytest.raises(QuantscopeError, match="no compressed-tensors encoding"):
        _integer_formats(resolve("mixed-edges:int4-g128/nf4"))


def test_existing_folder_and_failed_check_leave_nothing(tmp_path, monkeypatch):
    import quantscope.model.export as export

    model = tiny_llama()
    quantize(model, "int4-g32")
    ids = torch.arange(20)
    (tmp_path / "taken").mkdir()
    with pytest.raises(QuantscopeError, match="already exists"):
        save_compressed_tensors(model, None, tmp_path / "taken", ids, {})

    def broken(*a, **k):
        raise QuantscopeError("reload failed")

    monkeypatch.setattr(export, "_verify", broken)
    with pytest.raises(QuantscopeError, match="reload failed"):
        save_compressed_tensors(model, None, tmp_path / "new", ids, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no checkpoint, no partial folder


def test_save_draws_no_bar_and_leaves_stderr_alone(tmp_path, capfd):
    """compressed-tensors' progress bars stay off the terminal without redirecting stderr: what anything
    else writes there during the save still shows, and the library is as it was afterwards."""
    from compressed_tensors.compressors.model_compressors import model_compressor

    bar = model_compressor.tqdm
    model = tiny_llama()
    quantize(model, "int4-g32")
    real_save, seen = model.save_pretrained, []

    def save_pretrained(*args, **kwargs):  # runs inside the save's quiet section
        seen.append(sys.stderr)
        print("written during the save", file=sys.stderr)
        return real_save(*args, **kwargs)

    model.save_pretrained = save_pretrained
    capfd.readouterr()
    save_compressed_tensors(model, None, tmp_path / "out", torch.arange(20), {})
    err = capfd.readouterr().err
    assert seen == [sys.stderr] and "written during the save" in err
    assert "Compressing model" not in err and "Applying quantization config" not in err
    assert model_compressor.tqdm is bar


def test_save_refuses_before_loading(tmp_path):
    with pytest.raises(QuantscopeError, match="already exists"):
        save(SaveConfig(format="int4-g64", out=str(tmp_path), model=str(tmp_path / "no-such-model")))
    with pytest.raises(QuantscopeError, match="did you mean"):
        save(SaveConfig(format="int4-gx", out=str(tmp_path / "x")))


def test_cli_one_line_errors(tmp_path):
    for args, msg in ((["nf4"], "no compressed-tensors encoding"), (["int8", "--model", str(tmp_path / "nope")], "")):
        r = subprocess.run([sys.executable, "-m", "quantscope.cli", "save", *args, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_a_saved_checkpoint_is_measured_like_any_model(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """compare --model <saved folder>: its dense copy (dequantized by compressed-tensors) is the baseline,
    and it scores what the in-memory quantized model scored on the same windows."""
    from conftest import run_cli

    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    d, text = tiny_model_dir
    code, _, err = run_cli(capsys, "save", "int4-g32", "--model", str(d), "--out", str(tmp_path / "ck"), "--quiet")
    assert code == 0, err
    runs = {}
    for name, model, fmts in (("orig", d, "int4-g32"), ("saved", tmp_path / "ck", "int8")):
        code, out, err = run_cli(capsys, "compare", "--model", str(model), "--text", str(text), "--ctx", "32",
                                 "--windows", "3", "--no-speed", "--no-isolate", "--no-store", "--formats", fmts,
                                 "--json", str(tmp_path / f"{name}.json"))
        assert code == 0, err
        got = json.loads((tmp_path / f"{name}.json").read_text())
        runs[name] = {r["format"]: r for r in (got if isinstance(got, list) else got["records"])}
    assert "compressed-tensors checkpoint dequantized to float32" in out
    assert runs["saved"]["fp32"]["model"].startswith("ck (compressed-tensors")
    assert runs["saved"]["fp32"]["perplexity"] == pytest.approx(runs["orig"]["int4-g32"]["perplexity"], rel=1e-5)
    # a second run reads the dense copy from the cache (one folder, not rebuilt)
    assert len(list((tmp_path / "cache" / "models").glob("ck-ct-*"))) == 1
