"""Memory planner: exact bytes from config.json, KV cache, stated overhead, devices, config loading."""

import json
import math
from pathlib import Path

import pytest
import torch

from quantscope.errors import QuantscopeError
from quantscope.formats.spec import parse_format
from quantscope.plan import devices as dev
from quantscope.plan import planner
from quantscope.formats.registry import storage_bytes

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
LLAMA_8B = json.loads((FIXTURES / "llama-3.1-8b.json").read_text())
LLAMA_70B = json.loads((FIXTURES / "llama-3.1-70b.json").read_text())

# "total_size" of the published model.safetensors.index.json of each checkpoint (bf16 on disk).
LLAMA_8B_BF16_BYTES = 16_060_522_496
LLAMA_70B_BF16_BYTES = 141_107_412_992


def test_bf16_weights_equal_published_checkpoint_sizes():
    assert planner.weight_bytes_for_model_config(LLAMA_8B, "bf16") == LLAMA_8B_BF16_BYTES  # ~16.06 GB
    assert planner.weight_bytes_for_model_config(LLAMA_70B, "bf16") == LLAMA_70B_BF16_BYTES  # ~141 GB
    w = planner.weight_breakdown(LLAMA_8B, "bf16")
    assert w.params == 8_030_261_248
    assert w.baseline_dtype == "bf16"


def test_int4_weights_keep_embeddings_and_head_at_baseline():
    bf16 = planner.weight_breakdown(LLAMA_8B, "bf16")
    int4 = planner.weight_breakdown(LLAMA_8B, "int4-g128")
    assert int4.other_bytes == bf16.other_bytes  # embed, head, norms untouched
    assert int4.quantized_params == bf16.quantized_params
    # 8B: every linear's input width is a multiple of 128, so exactly 4 bits + 2 x 16 bits per 128 weights
    assert int4.quantized_bytes * 8 == int4.quantized_params * (4 * 128 + 32) // 128
    assert 5.7e9 < int4.total_bytes < 5.9e9
    # quantizing the (untied) embedding and head too shrinks exactly those two tensors
    both = planner.weight_breakdown(LLAMA_8B, "int4-g128", embed_format="int8")
    vocab, hidden = 128256, 4096
    int8 = storage_bytes(parse_format("int8"), vocab, hidden)
    assert int4.total_bytes - both.total_bytes == 2 * (vocab * hidden * 2 - int8)


def test_kv_cache_bytes():
    # 2 x 32 layers x 8 kv heads x 128 x 8192 tokens x 2 bytes = 1 GiB
    assert planner.kv_cache_bytes(LLAMA_8B, ctx=8192, batch=1, kv_dtype="bf16") == 2**30
    assert planner.kv_cache_bytes(LLAMA_70B, ctx=8192, batch=1) == 5 * 2**29
    assert planner.kv_cache_bytes(LLAMA_8B, ctx=8192, batch=4, kv_dtype="fp8") == 2 * 2**30
    with pytest.raises(QuantscopeError, match="KV cache dtype"):
        planner.kv_cache_bytes(LLAMA_8B, ctx=8192, batch=1, kv_dtype="int3")
    with pytest.raises(QuantscopeError, match="ctx must be a positive integer"):
        planner.kv_cache_bytes(LLAMA_8B, ctx=0, batch=1)


def test_activation_estimate_is_what_the_docstring_states():
    fused = planner.activation_bytes(LLAMA_8B, ctx=1024, batch=2)
    tokens = 2 * 1024
    # per token: residual + normed (2 x 4096), MLP (3 x 14336) is larger than attention; bf16; fp32 last logits
    assert fused == tokens * (2 * 4096 + 3 * 14336) * 2 + 2 * 128256 * 4
    eager = planner.activation_bytes(LLAMA_8B, ctx=1024, batch=2, assumptions=planner.RuntimeAssumptions(attention="eager"))
    attn_fused = tokens * (2 * 32 * 128 + 2 * 8 * 128)
    attn_eager = attn_fused + 2 * 2 * 32 * 1024 * 1024
    assert eager - fused == (attn_eager - tokens * 3 * 14336) * 2  # eager attention now dominates the MLP


def test_plan_rows_totals_and_device_fit():
    rows = {r.format: r for r in planner.plan(LLAMA_8B, ["bf16", "int8", "int4-g128"], ctx=8192, batch=1)}
    bf16, int8, int4 = rows["bf16"], rows["int8"], rows["int4-g128"]
    for r in rows.values():
        assert r.total_bytes == r.weight_bytes + r.kv_cache_bytes + r.overhead_bytes
        assert r.framework_bytes == 2**30
        assert r.kv_cache_bytes == 2**30
    assert bf16.dequant_bytes == 0  # plain floats: nothing to unpack
    assert int4.dequant_bytes == 14336 * 4096 * 2  # the largest quantized matrix, in bf16
    assert bf16.total_bytes > int8.total_bytes > int4.total_bytes
    assert int4.bits_per_weight == pytest.approx(4.25)
    assert "RTX 4090 24GB" in bf16.fits and "T4 16GB" not in bf16.fits
    assert "T4 16GB" in int4.fits
    seventy = {r.format: r for r in planner.plan(LLAMA_70B, ["bf16", "int4-g128"], ctx=8192, batch=1)}
    assert seventy["bf16"].fits == ()  # 141 GB fits no single device
    assert "L40S 48GB" in seventy["int4-g128"].fits and "A100 40GB" not in seventy["int4-g128"].fits
    custom = planner.plan(LLAMA_70B, ["int4-g128"], ctx=8192, batch=1, devices=[dev.parse_device("40GB")])
    assert custom[0].fits == ()
    assert custom[0].to_dict()["overhead_bytes"] == custom[0].overhead_bytes


TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)  # fmt: skip


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("llama", {"tie_word_embeddings": False}),
        ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {"tie_word_embeddings": False, "head_dim": 24}),
        ("mistral", {"tie_word_embeddings": False}),
    ],
)
def test_tensor_enumeration_matches_a_real_transformers_model(model_type, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **TINY, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    config = json.loads(cfg.to_json_string())
    real = {n: tuple(p.shape) for n, p in model.named_parameters()}  # shared (tied) parameters once
    planned = {t.name: t.shape for t in planner.model_tensors(config)}
    assert planned == real
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert planner.weight_bytes_for_model_config(config, "fp32", baseline_dtype="fp32") == fp32_bytes


@pytest.mark.parametrize("model_type, omitted", [("mistral", "num_key_value_heads"), ("qwen3", "head_dim")])
def test_keys_a_saved_config_omits_take_the_class_defaults(model_type, omitted):
    # save_pretrained drops keys equal to the class default; Mistral's kv-heads default is 8, Qwen3's head_dim 128.
    from transformers import AutoConfig, AutoModelForCausalLM

    written = dict(model_type=model_type, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=32)  # fmt: skip
    del written[omitted]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**written))
    real = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {t.name: t.shape for t in planner.model_tensors(written)} == real
    # 8 kv heads x head_dim 128; reading the file naively would give 16 x 128 (mistral) or 8 x 8 (qwen3)
    assert real["model.layers.0.self_attn.k_proj.weight"] == (8 * 128, 128)


def test_geometry_refuses_what_it_cannot_plan():
    with pytest.raises(QuantscopeError, match="model_type 'gpt2' is not planned"):
        planner.weight_bytes_for_model_config({**LLAMA_8B, "model_type": "gpt2"}, "bf16")
    bad = dict(LLAMA_8B)
    del bad["intermediate_size"]
    with pytest.raises(QuantscopeError, match="'intermediate_size'"):
        planner.weight_bytes_for_model_config(bad, "bf16")
    with pytest.raises(QuantscopeError, match="mixture-of-experts"):
        planner.weight_bytes_for_model_config({**LLAMA_8B, "num_local_experts": 8}, "bf16")
    with pytest.raises(QuantscopeError, match="did you mean"):
        planner.plan(LLAMA_8B, ["in4-g128"], ctx=512, batch=1)
    no_dtype = {k: v for k, v in LLAMA_8B.items() if k != "torch_dtype"}
    row = planner.plan(no_dtype, ["bf16"], ctx=512, batch=1)[0]
    assert row.weight_bytes > LLAMA_8B_BF16_BYTES  # fp32 embeddings/norms assumed, and said so
    assert any("float32" in n for n in row.notes)


def test_load_config_local_dir_file_and_errors(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA_8B))
    assert planner.load_config(tmp_path / "m") == LLAMA_8B
    assert planner.load_config(str(tmp_path / "m" / "config.json")) == LLAMA_8B
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantscopeError, match="no config.json"):
        planner.load_config(tmp_path / "empty")
    with pytest.raises(QuantscopeError, match="no such file or directory"):
        planner.load_config(str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text('{\n  "hidden_size": 4096,\n  oops\n}')
    with pytest.raises(QuantscopeError, match=r"bad\.json:3: invalid JSON"):
        planner.load_config(tmp_path / "bad.json")
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(QuantscopeError, match="reads config.json"):
        planner.load_config(tmp_path / "w.safetensors")


def test_load_config_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # so "owner/name" is not a local directory
    with pytest.raises(QuantscopeError, match="no such folder.*Hugging Face Hub is off"):
        planner.load_config("quantscope-test/not-a-model")
    with pytest.raises(QuantscopeError, match="not a valid Hub id"):
        planner.load_config("bad id!")


def test_memory_and_device_parsing():
    assert dev.parse_memory("24GB") == 24 * 10**9
    assert dev.parse_memory("24GiB") == 24 * 2**30
    assert dev.parse_memory("1.5 gib") == 3 * 2**29
    assert dev.parse_memory("512MiB") == 2**29
    for bad in ("24 parsecs", "GB", "-3GB", "0GB", ""):
        with pytest.raises(QuantscopeError):
            dev.parse_memory(bad)
    d = dev.parse_device("rtx-4090")
    assert d.name == "RTX 4090 24GB" and d.memory_bytes == 24 * 2**30
    assert dev.parse_device("A100 80GB").memory_bytes == 80 * 2**30
    custom = dev.parse_device("24GB")
    assert custom.kind == "custom" and custom.usable_bytes == 24 * 10**9
    with pytest.raises(QuantscopeError, match="unknown device"):
        dev.parse_device("a100")  # 40GB or 80GB: ambiguous
    mac = dev.parse_device("apple m 16gb")
    assert mac.kind == "unified" and mac.usable_bytes < mac.memory_bytes
    sizes = [d.memory_bytes for d in dev.DEVICES]
    assert sizes == sorted(sizes)
    assert math.isclose(dev.DEVICES[-1].memory_bytes / 2**30, 80)
