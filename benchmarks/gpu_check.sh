#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (issue 15): the CUDA tests, then a short comparison
# of a synthetic Llama-2-7B-shaped bf16 model in memory on the GPU. Prints tables; writes JSON under $OUT
# (or benchmarks/results). Usage: bash benchmarks/gpu_check.sh   (not yet run: no GPU has been lent so far)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -m pytest -q tests/test_cuda.py tests/test_placement.py 2>&1 | tail -5
model="${SYNTH_DIR:-/tmp/qs-synth-7b}"
[ -d "$model" ] || python benchmarks/synthetic_model.py --shape llama-7b --dtype bf16 --out "$model"
quantscope compare --model "$model" --device cuda --dtype bf16 --formats bf16,int8,int4-g128,nf4,bnb-nf4,torchao-int8wo \
  --windows 4 --ctx 512 --no-store --json "$out/gpu_check.json"
