"""--device and --dtype (issue 15): resolved once, refused in one line when the machine cannot do
them, and carried into every record. The CUDA half runs where a GPU is (tests/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from quantscope.errors import QuantscopeError
from quantscope.placement import module_device, resolve_device, resolve_dtype

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_the_cpu_here_and_cpu_is_cpu():
    if NO_CUDA:
        assert resolve_device("auto") in ("cpu", "mps")
    assert resolve_device("cpu") == "cpu" and resolve_device(" CPU ") == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is present")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_device_that_is_not_here_is_one_line(name):
    with pytest.raises(QuantscopeError, match=rf"--device {name}: no CUDA device here .*use --device cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name,needle", [("gpu", "unknown --device 'gpu'"), ("cuda:x", "GPU index must be a number")])
def test_device_names_that_mean_nothing(name, needle):
    with pytest.raises(QuantscopeError, match=needle):
        resolve_device(name)


def test_cuda_index_beyond_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == "cuda:0" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(QuantscopeError, match=r"has 2 CUDA device\(s\) \(cuda:0\.\.cuda:1\)"):
        resolve_device("cuda:2")


def test_auto_dtype_is_float32_on_the_cpu_and_the_checkpoints_own_on_a_gpu(monkeypatch):
    assert resolve_dtype("auto", "cpu", "bfloat16") == "float32"
    assert resolve_dtype("bf16", "cpu") == "bfloat16" and resolve_dtype("fp16", "cpu") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda:0", "bfloat16") == "bfloat16"
    assert resolve_dtype("auto", "cuda:0", "torch.float16") == "float16"
    assert resolve_dtype("auto", "cuda:0", None) == "float32"
    assert resolve_dtype("auto", "cuda:0", "int8") == "float32"  # not a dtype we measure in: the reference


def test_bf16_on_a_gpu_that_cannot_compute_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(QuantscopeError, match="Tesla T4 cannot compute in bfloat16"):
        resolve_dtype("bf16", "cuda:0")
    with pytest.raises(QuantscopeError, match="unknown --dtype 'int3'"):
        resolve_dtype("int3", "cpu")


def test_module_device():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is present")
def test_every_command_that_loads_a_model_refuses_a_missing_device_before_any_work(capsys, tmp_path,
                                                                                   tiny_model_dir):
    d, text = tiny_model_dir
    for argv in (("compare", "--model", str(d), "--text", str(text), "--out", str(tmp_path / "run")),
                 ("save", "int8", "--model", str(d), "--out", str(tmp_path / "ck")),
                 ("sensitivity", "--model", str(d), "--text", str(text)),
                 ("recommend", "--model", str(d), "--text", str(text), "--max-kld", "0.1",
                  "--out", str(tmp_path / "rec"))):
        code, _, err = run_cli(capsys, *argv, "--device", "cuda", "--quiet")
        assert_one_line_error(code, err, "--device cuda: no CUDA device here")
        code, _, err = run_cli(capsys, *argv, "--dtype", "fp12", "--quiet")
        assert_one_line_error(code, err, "unknown --dtype 'fp12'")
    assert not any(tmp_path.glob("run*")) and not (tmp_path / "ck").exists() and not (tmp_path / "rec").exists()


def test_a_bf16_baseline_on_the_cpu_is_named_in_every_record(capsys, tmp_path, tiny_model_dir):
    import json

    d, text = tiny_model_dir
    code, out, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--ctx", "32",
                             "--windows", "2", "--no-speed", "--no-isolate", "--quiet", "--device", "cpu",
                             "--dtype", "bf16", "--formats", "int8", "--no-store", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    got = json.loads((tmp_path / "r.json").read_text())
    recs = {r["format"]: r for r in (got if isinstance(got, list) else got["records"])}
    assert set(recs) == {"bf16", "int8"} and recs["bf16"]["baseline"]
    assert all(r["device"] == "cpu" and r["dtype"] == "bfloat16" for r in recs.values())
    assert all(r["peak_device_bytes"] is None for r in recs.values())
    assert "baseline in bfloat16 on cpu" in out + err


def test_auto_and_cpu_on_a_cpu_machine_are_one_run(tmp_path):
    from quantscope.harness.config import CompareConfig
    from quantscope.harness.run import default_run_dir

    if not NO_CUDA:
        pytest.skip("a CUDA device is present: auto is not the CPU")
    a = default_run_dir(CompareConfig())
    assert a == default_run_dir(CompareConfig(device="cpu", dtype="fp32"))
    assert a != default_run_dir(CompareConfig(dtype="bf16"))
