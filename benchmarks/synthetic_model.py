"""Write a seeded random-init Llama with a real model's shapes, as safetensors shards plus the embedded
model's tokenizer: for measuring memory and time at real sizes (its accuracy figures mean nothing).

    python benchmarks/synthetic_model.py --shape llama-7b --out /tmp/synth-7b [--dtype bf16]

Tensors are generated and written one shard at a time (about --shard-gb each), so writing a 7B model
never holds more than one shard in memory. The vocabulary is the embedded tokenizer's (49,152 tokens,
SmolLM2), not the original model's, so that every token id the tokenizer produces has an embedding row.
Delete what you generate when done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

SHAPES = {  # hidden, layers, MLP width, heads, KV heads, tied head (the real models' config.json)
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, tie_word_embeddings=False),  # Llama-2-7B
    "llama-3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
                     num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-3B
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-1B
}


def tensor_shapes(cfg: dict, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (vocab, h)))
    return out


def _tensor(name: str, shape, dtype, seed: int) -> torch.Tensor:
    if len(shape) == 1:  # norms: ones, as a fresh model's
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed ^ int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write(shape: str, out: Path, dtype: str = "bf16", seed: int = 0, shard_gb: float = 2.0) -> dict:
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quantscope.model.load import resolve

    if out.exists():
        raise SystemExit(f"{out} exists: refusing to overwrite it")
    tok_dir = Path(resolve("default")[1])
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = dict(SHAPES[shape])
    vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, partial / f.name)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "hidden_act": "silu", "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
              "bos_token_id": 1, "eos_token_id": 2, **cfg}
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    shapes = tensor_shapes(cfg, vocab)
    limit = shard_gb * 1e9
    groups, cur, size = [], [], 0
    for name, shp in shapes:
        n = torch.Size(shp).numel() * tdtype.itemsize
        if cur and size + n > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shp))
        size += n
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _tensor(name, shp, tdtype, seed) for name, shp in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(partial / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        del tensors
        print(f"  {fname}: {len(group)} tensors", file=sys.stderr)
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    partial.rename(out)
    n_params = sum(torch.Size(s).numel() for _, s in shapes)
    return {"shape": shape, "out": str(out), "dtype": dtype, "params": n_params, "bytes": total,
            "shards": len(groups), "seed": seed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    a = ap.parse_args()
    info = write(a.shape, a.out, a.dtype, a.seed, a.shard_gb)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
