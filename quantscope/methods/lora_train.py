"""Training the adapters: next-token loss or distillation from the baseline, logged, checkpointed, resumable.

Objectives (per scored token, mean over a batch):

- ``lm``: cross-entropy of the next token of the training text;
- ``distill``: KL(baseline || adapted) between the two models' next-token distributions, the
  baseline's computed on the fly for each batch (no logits are stored). This is the very quantity
  the comparison reports as KLD, so it targets what quantscope measures.

Every `log_every` steps the mean training loss and the KLD on held-out sequences (cut from the end of
the training text, never trained on) are logged, and a checkpoint is written into the training folder:
``ckpt-<step>/`` with ``adapter.safetensors`` (the adapters), ``optimizer.pt`` (AdamW's state, read back
with ``weights_only=True``) and ``state.json`` (step, log, seconds). A killed training resumes from the
newest complete checkpoint; the order of training sequences is a pure function of (seed, step), so a
resumed run sees the batches the uninterrupted one would have. A NaN or infinite loss stops training
with the step and a one-line error; the last good checkpoint is kept.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import QuantscopeError
from ..fileio import write_json_atomic
from ..placement import module_device
from .lora import adapter_parameters, adapter_state, load_adapter_state
from .recover_config import RecoverConfig


def training_rows(tokens: list[torch.Tensor], seqlen: int, source: str = "the training text"):
    """The training tokens cut into [n, seqlen] rows: (train rows, held-out rows). Up to 2 rows are
    held out from the end (none when the text has fewer than 4 rows)."""
    flat = torch.cat([t.reshape(-1) for t in tokens]) if tokens else torch.zeros(0, dtype=torch.long)
    n = len(flat) // seqlen
    if n < 1:
        raise QuantscopeError(f"{source} has {len(flat)} tokens, fewer than one training sequence of "
                              f"--seqlen {seqlen}: give a longer text or a shorter --seqlen")
    rows = flat[: n * seqlen].view(n, seqlen).clone()
    k = min(2, n // 4)
    return rows[: n - k], rows[n - k:]


def batch_indices(n_rows: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Rows of step `step` (0-based): a seeded permutation per pass over the rows, a pure function of
    (seed, step) so that a resumed training draws the same batches."""
    out = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(j, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[pos]))
    return torch.tensor(out)


def learning_rate(config: RecoverConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / (config.warmup + 1)
    span = max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - config.warmup) / span))


def log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


def _kl(ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(ref || model), both log-probabilities [..., vocab]."""
    return (ref.exp() * (ref - logp)).sum(-1).mean()


@dataclass
class TrainResult:
    log: list[dict] = field(default_factory=list)  # {step, loss, heldout_kld, lr, seconds}
    steps: int = 0
    seconds_per_step: float | None = None  # measured by the run that trained (a resumed one: its own steps)
    resumed_from: int | None = None
    peak_rss_bytes: int | None = None
    trained_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"log": self.log, "steps": self.steps, "seconds_per_step": self.seconds_per_step,
                "resumed_from": self.resumed_from, "train_peak_rss_bytes": self.peak_rss_bytes,
                "train_seconds": self.trained_seconds}


class Checkpoints:
    """`ckpt-<step>/` folders in one training folder, each written under a temporary name and renamed."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def latest(self) -> tuple[int, Path] | None:
        if not self.folder.is_dir():
            return None
        done = [(int(p.name[5:]), p) for p in self.folder.iterdir()
                if p.name.startswith("ckpt-") and p.name[5:].isdigit() and (p / "state.json").is_file()]
        return max(done) if done else None

    def save(self, step: int, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".ckpt-{step:06d}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.cpu() for k, v in adapter_state(model).items()}, str(tmp / "adapter.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        write_json_atomic(tmp / "state.json", state)
        final = self.folder / f"ckpt-{step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for p in self.folder.iterdir():  # the newest complete checkpoint is all a resume needs
            if p.name.startswith("ckpt-") and p != final:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer | None) -> dict:
        from safetensors.torch import load_file

        load_adapter_state(model, load_file(str(path / "adapter.safetensors")))
        if opt is not None:
            opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        return json.loads((path / "state.json").read_text())


def heldout_kld(model: nn.Module, rows: torch.Tensor, ref: list[torch.Tensor]) -> float | None:
    """Mean per-token KL(baseline || model) on the held-out rows (baseline log-probs given per row)."""
    if len(rows) == 0:
        return None
    was = model.training
    model.eval()
    dev = module_device(model)
    with torch.no_grad():
        klds = [float(_kl(r.to(dev), log_probs(model, row[None].to(dev))[0, :-1])) for row, r in zip(rows, ref)]
    model.train(was)
    return sum(klds) / len(klds)


def train(model: nn.Module, rows: torch.Tensor, config: RecoverConfig, *, teacher: nn.Module | None = None,
          heldout: torch.Tensor | None = None, heldout_ref: list[torch.Tensor] | None = None,
          folder: str | os.PathLike | None = None, progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train the adapters of `model` on `rows` [n, seqlen] for `config.steps` steps (resuming from the
    newest checkpoint in `folder`). `teacher` is the baseline (needed by the distill objective)."""
    from ..measure.memory import peak_rss_bytes

    if config.objective == "distill" and teacher is None:
        raise QuantscopeError("internal: the distill objective needs the baseline model")
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    ckpts = Checkpoints(folder) if folder is not None else None
    result, start = TrainResult(), 0
    found = ckpts.latest() if ckpts else None
    if found is not None:
        state = ckpts.load(found[1], model, opt)
        start, result.log = int(state["step"]), list(state["log"])
        result.resumed_from, result.trained_seconds = start, float(state.get("train_seconds", 0.0))
        result.seconds_per_step = state.get("seconds_per_step")
        result.peak_rss_bytes = state.get("train_peak_rss_bytes")
    heldout = heldout if heldout is not None else rows[:0]
    if start == 0:
        result.log.append({"step": 0, "loss": None, "heldout_kld": heldout_kld(model, heldout, heldout_ref or [])})
    dev = module_device(model)
    model.train()
    if teacher is not None:
        teacher.eval()
    losses: list[float] = []
    t_run, steps_run = time.perf_counter(), 0
    for step in range(start, config.steps):
        ids = rows[batch_indices(len(rows), config.batch, config.seed, step)].to(dev)
        for g in opt.param_groups:
            g["lr"] = learning_rate(config, step)
        logp = log_probs(model, ids)[:, :-1]
        if config.objective == "distill":
            with torch.no_grad():
                ref = log_probs(teacher, ids)[:, :-1]
            loss = _kl(ref, logp)
            del ref
        else:
            loss = nn.functional.nll_loss(logp.reshape(-1, logp.shape[-1]), ids[:, 1:].reshape(-1))
        del logp
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise _nan_error(loss_value, step + 1, config, ckpts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        if not math.isfinite(norm):
            raise _nan_error(norm, step + 1, config, ckpts, "gradient norm")
        opt.step()
        losses.append(loss_value)
        steps_run += 1
        done = step + 1
        if progress is not None:
            progress(done, config.steps)
        if done % config.log_every == 0 or done == config.steps:
            elapsed = time.perf_counter() - t_run
            result.log.append({"step": done, "loss": sum(losses) / len(losses), "lr": learning_rate(config, step),
                               "heldout_kld": heldout_kld(model, heldout, heldout_ref or []),
                               "seconds": result.trained_seconds + elapsed})
            losses = []
            result.seconds_per_step = elapsed / steps_run
            result.peak_rss_bytes = max(result.peak_rss_bytes or 0, peak_rss_bytes())
            if ckpts is not None:
                ckpts.save(done, model, opt, {"step": done, "log": result.log, "done": done == config.steps,
                                              "config": config.to_dict(), **result.to_dict(),
                                              "train_seconds": result.trained_seconds + elapsed})
    result.trained_seconds += time.perf_counter() - t_run if steps_run else 0.0
    result.steps = config.steps
    model.eval()
    return result


def _nan_error(value: float, step: int, config: RecoverConfig, ckpts: Checkpoints | None,
               what: str = "training loss") -> QuantscopeError:
    last = ckpts.latest() if ckpts else None
    kept = (f"the last good checkpoint (step {last[0]}) is kept in {last[1].parent}" if last
            else "no checkpoint was written before it")
    return QuantscopeError(f"{what} is {value} at step {step} of {config.steps}: training stopped; {kept}; "
                           f"try a lower --lr (now {config.lr:g})")
