"""Imported once by the worker server (harness.processes), so that each worker forked from it starts with
everything a measurement imports: torch, transformers' auto classes (they import the installed
quantization libraries), the default model's architecture, quantscope's measuring code, and the CPU
kernel library built or loaded. Importing it has no other effect."""

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401  (the embedded default model)

from ..evaluate import perplexity  # noqa: F401
from ..measure import memory, speed  # noqa: F401
from ..model import load  # noqa: F401
from ..modules import cpu_kernels
from . import worker  # noqa: F401

cpu_kernels.available()
