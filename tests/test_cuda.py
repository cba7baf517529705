"""On a CUDA GPU (skipped without one; CI has none): every own format, GPTQ and AWQ quantize and are
scored on the GPU, and give the CPU's figures within float tolerance; the GPU's peak is recorded.
benchmarks/gpu_check.sh runs this file and a short benchmark on a machine with a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FORMATS = "int8,int4-g32,nf4,gptq-int4-g32,awq-int4-g32"


def _compare(capsys, tmp_path, d, text, device, name):
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--ctx", "64",
                           "--windows", "4", "--no-speed", "--no-isolate", "--quiet", "--device", device,
                           "--dtype", "fp32", "--formats", FORMATS, "--calib-samples", "4", "--calib-seqlen", "64",
                           "--no-store", "--json", str(tmp_path / f"{name}.json"))
    assert code == 0, err
    got = json.loads((tmp_path / f"{name}.json").read_text())
    return {r["format"]: r for r in (got if isinstance(got, list) else got["records"])}


def test_the_gpu_gives_the_cpus_figures(capsys, tmp_path, tiny_model_dir):
    d, text = tiny_model_dir
    cpu = _compare(capsys, tmp_path, d, text, "cpu", "cpu")
    gpu = _compare(capsys, tmp_path, d, text, "cuda", "gpu")
    for f, r in gpu.items():
        assert r["device"] == "cuda:0" and r["peak_device_bytes"] > 0, f
        assert r["perplexity"] == pytest.approx(cpu[f]["perplexity"], rel=2e-3), f
        assert r["weight_bytes"] == cpu[f]["weight_bytes"], f


def test_save_quantizes_on_the_gpu_and_writes_from_the_cpu(capsys, tmp_path, tiny_model_dir):
    d, _ = tiny_model_dir
    code, _, err = run_cli(capsys, "save", "int4-g32", "--model", str(d), "--out", str(tmp_path / "ck"),
                           "--device", "cuda", "--quiet")
    assert code == 0, err
    assert any((tmp_path / "ck").glob("*.safetensors"))
