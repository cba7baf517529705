"""What a comparison is asked to do (:class:`CompareConfig`) and what one worker is given (:class:`Job`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import QuantscopeError
from ..logs import check_threads
from ..measure.speed import SpeedConfig

# The default run: the baseline plus the formats people reach for first. With 8 windows of 512 tokens
# it finishes in a few minutes on 2 CPU cores.
DEFAULT_FORMATS = ("fp32", "bf16", "int8", "int4-g128", "nf4")
# Fewer windows than this and the paired bootstrap over windows has too little to resample.
MIN_WINDOWS_FOR_CI = 5


@dataclass(frozen=True)
class CompareConfig:
    model: str = "default"  # 'default' (embedded SmolLM2), a local HF folder, a Hub id or a .gguf file
    # the baseline when it is another model than `model` (the original of a saved .gguf, say): KLD,
    # top-1 and paired deltas are against it; it must share the model's vocabulary (harness.reference)
    reference: str | None = None
    formats: tuple[str, ...] = DEFAULT_FORMATS
    text: str = "python-docs"  # 'python-docs', a .txt or a .jsonl (field 'text')
    ctx: int = 512  # tokens per window
    windows: int = 8  # windows scored: 8 x 512 = 4,096 tokens keeps the default run to minutes
    score_second_half: bool = False  # llama.cpp convention: score only the second half of each window
    include: tuple[str, ...] = ()  # module-name patterns added to the default selection
    exclude: tuple[str, ...] = ()  # module-name patterns removed from it
    calib: str | None = None  # calibration text for GPTQ/AWQ; None: the evaluation text's head
    calib_samples: int = 128
    calib_seqlen: int = 512
    # keep the calibration head out of the evaluation windows even when no format of this run needs
    # calibration, so that runs with and without calibrated formats score the same windows
    # (recommend measures its ladder one format at a time)
    reserve_calib: bool = False
    speed: SpeedConfig = SpeedConfig()
    measure_speed: bool = True
    isolate: bool = True  # one worker process per format (separate peak RSS, crash isolation)
    # where the baseline and every format run, and the baseline's dtype: "auto" = the first GPU (else
    # MPS, else the CPU) and the checkpoint's own dtype there, float32 on the CPU (quantscope.placement)
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # torch threads in workers (None: torch's default)
    trust_remote_code: bool = False
    tasks: tuple[tuple, ...] = ()  # (task name, path) or (task name, path, limit) tuples, see evaluate.tasks
    task_limit: int | None = None  # questions per task, for tasks that do not give their own limit
    task_sample_seed: int | None = None
    task_shots: int = 0
    # lm-evaluation-harness task names run on every format (pip install 'quantscope[lmeval]'); with
    # lm_eval_include, tasks come from that directory of YAML configs only (lm-eval's own are not indexed)
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: str | None = None
    ctx_sweep: tuple[int, ...] = ()  # extra context lengths: perplexity and KLD at each (long context)
    # The baseline's log-probabilities of the scored positions are kept in this process's memory and
    # served to each format's worker window by window, when they fit in this budget: every format is
    # then compared with one reference pass instead of recomputing it (half the work). Larger
    # evaluations fall back to computing the reference side by side in each worker.
    reference_cache_bytes: int = 6 * 2**30
    progress: bool = False  # progress bars with ETA on stderr (the CLI turns them on for a terminal)
    # generation agreement: a JSONL of {"prompt"} or {"messages"} lines, or 'default' (the shipped set);
    # each prompt's greedy continuation of gen_tokens tokens under each format against the baseline's
    gen_prompts: str | None = None
    gen_tokens: int = 32  # long enough for a sentence to drift, short enough for 20 prompts to be quick
    # streamed evaluation (harness.stream): the model read block by block, every format in one pass, never
    # whole in memory. None: chosen when the planner's in-memory estimate exceeds the memory available
    stream: bool | None = None

    def __post_init__(self):
        check_threads(self.threads)
        if self.gen_tokens < 1:
            raise QuantscopeError(f"--gen-tokens must be at least 1, got {self.gen_tokens}")
        if self.ctx < 2:
            raise QuantscopeError(f"--ctx must be at least 2, got {self.ctx}")
        if self.windows < 1:
            raise QuantscopeError(f"--windows must be at least 1, got {self.windows}")
        if not self.formats:
            raise QuantscopeError("no formats given")
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise QuantscopeError("--calib-samples must be >= 1 and --calib-seqlen >= 2")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["formats"] = list(self.formats)
        return d


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to measure one format (picklable). Frozen: a variant of a job is
    made with dataclasses.replace, never by changing the one the caller holds."""

    format: str
    is_baseline: bool
    model_path: str
    model_name: str
    model_ref: str
    dtype: str  # resolved: float32, bfloat16 or float16
    trust_remote_code: bool
    windows: torch.Tensor
    score_from: int
    calib: torch.Tensor | None
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    speed: SpeedConfig
    measure_speed: bool
    threads: int | None
    common: dict = field(default_factory=dict)  # fields copied into the record
    tasks: tuple = ()  # loaded Task objects
    sweep_windows: dict = field(default_factory=dict)  # {ctx: [n, ctx] windows} for --ctx-sweep
    progress: bool = False  # tqdm bars on stderr (only when it is a terminal)
    ref_mode: str = "local"  # baseline: "export" its log-probs; others: "serve" (from the parent) or "local"
    lm_eval: dict = field(default_factory=dict)  # {"tasks", "include", "limit"} for --lm-eval-task
    device: str = "cpu"  # resolved: cpu, cuda:N or mps
    gen_prompts: tuple = ()  # --gen-prompts: each prompt's token ids
    gen_kinds: tuple = ()  # "text" or "chat" per prompt
    gen_tokens: int = 0
    gen_baseline: tuple | None = None  # the baseline's continuations (the run fills them in for formats)
    streamed: bool = False  # measured by the streamed pass (harness.stream), not by a worker of its own
    # where the streamed pass reads the weights when not from model_path: a GGUF file, read block by block
    # (model_path is then its dequantized cache, which the streamed pass never builds nor reads)
    source_path: str = ""
    work_dir: str | None = None  # LoRA-recovered formats keep their training checkpoints here (run dir)
    reference_path: str | None = None  # --reference: the baseline's model, when it is not model_path

    @property
    def n_ctx(self) -> int:
        """The longest window this job scores (llama.cpp sizes its context to it)."""
        return max([self.windows.shape[1], *(int(c) for c in self.sweep_windows)])
