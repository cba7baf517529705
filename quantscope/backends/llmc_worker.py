"""Run llm-compressor's GPTQ or AWQ on a saved model, in llm-compressor's own Python environment.

This file is executed as a script by the interpreter of a separate virtualenv (llmcompressor 0.14
pins transformers 5.17 and compressed-tensors 0.19, which would downgrade quantscope's
environment). It imports neither quantscope nor anything quantscope ships; it reads only
safetensors and JSON and writes only safetensors and JSON, so no pickle crosses the boundary.

    python llmc_worker.py --model DIR --calib calib.safetensors --method gptq|awq --bits 4
                          --group 64 [--ignore NAME ...] --out codes.safetensors

`calib.safetensors` holds `input_ids` [samples, seqlen] int64. The model (a local Hugging Face
folder, weights in safetensors) is quantized with llm-compressor's `oneshot` and its own defaults
except what a quantscope format fixes: integer codes of `bits`, asymmetric (a zero point per group),
groups of `group` input columns, `lm_head` and the `--ignore` names left alone. For every quantized
linear the output holds `<name>.codes` (uint8, 0..2^bits-1), `<name>.scales` and `<name>.zeros`
([out, groups], float32, zero points shifted by 2^(bits-1) to be unsigned like the codes): exactly
the integers and scales llm-compressor would write into its compressed-tensors checkpoint. Every
other parameter llm-compressor changed (AWQ folds its scales into the preceding norms) is written
as `<parameter name>.float` (float32). A JSON
summary (versions, seconds, the recipe, the largest reconstruction error) goes to stdout's last line.

One workaround, in this process only: llm-compressor 0.14's AWQ pins its cached activations
(`IntermediatesCache.pin_memory`, to speed up host-to-GPU copies), and pinning raises "Cannot access
accelerator device when none is available" on a machine without one. Pinning changes no value, so
on such a machine the call is replaced by a no-op; GPTQ does not call it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--method", choices=("gptq", "awq"), required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--ignore", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import importlib.metadata as md

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # see the module docstring
    ids = load_file(args.calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=args.bits, type="int", symmetric=False, strategy="group",
                                 group_size=args.group))
    ignore = ["lm_head", *args.ignore]
    if args.method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = [GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)]
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(),
                  QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)]
    # the samples arrive tokenized (and of equal length: nothing to pad); oneshot insists on a
    # processor when given a dataset, so it gets a one-word tokenizer it never needs to use
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                        pad_token="<pad>")
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if not n.startswith("model.embed_tokens") and not n.startswith("lm_head")}
    t0 = time.perf_counter()
    oneshot(model=model, processor=processor, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, save_compressed=False)
    seconds = time.perf_counter() - t0

    out, worst, half = {}, 0.0, 2 ** (args.bits - 1)
    for name, mod in model.named_modules():
        scale = getattr(mod, "weight_scale", None)
        if not isinstance(mod, torch.nn.Linear) or scale is None:
            continue
        w = mod.weight.detach().float()
        s = scale.detach().float()
        z = mod.weight_zero_point.detach().float()
        g_idx = getattr(mod, "weight_g_idx", None)
        if g_idx is not None and not torch.equal(g_idx.cpu(), torch.arange(w.shape[1]) // args.group):
            raise SystemExit(f"{name}: non-contiguous groups (g_idx) are not exported")
        se = s.repeat_interleave(args.group, dim=1)[:, : w.shape[1]]
        ze = z.repeat_interleave(args.group, dim=1)[:, : w.shape[1]]
        q = torch.clamp(torch.round(w / se) + ze, -half, half - 1)
        worst = max(worst, float(((q - ze) * se - w).abs().max()))
        out[f"{name}.codes"] = (q + half).to(torch.uint8).contiguous()
        out[f"{name}.scales"] = s.contiguous()
        out[f"{name}.zeros"] = (z + half).contiguous()
    quantized = {k.removesuffix(".codes") + ".weight" for k in out if k.endswith(".codes")}
    for n, p in model.named_parameters():
        if n in before and n not in quantized and not torch.equal(p.detach(), before[n]):
            out[f"{n}.float"] = p.detach().float().contiguous()
    tmp = args.out + ".tmp"
    save_file(out, tmp)
    os.replace(tmp, args.out)
    print(json.dumps({"llmcompressor": md.version("llmcompressor"),
                      "compressed_tensors": md.version("compressed-tensors"),
                      "transformers": md.version("transformers"), "seconds": seconds,
                      "linears": len(quantized), "changed_float": sorted(k[:-6] for k in out if k.endswith(".float")),
                      "max_abs_reconstruction": worst,
                      "recipe": [type(m).__name__ for m in recipe]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
