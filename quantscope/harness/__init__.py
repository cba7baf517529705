"""The comparison harness: every format measured the same way, each in its own worker process.

    config.py     CompareConfig (what to compare) and Job (what one worker measures)
    preparation.py  validation before any work, the calibration head, one job per format
    reference.py  --reference: the baseline is another model (its vocabulary checked)
    worker.py     one format measured in a worker process; the baseline-reference exchange
    pairing.py    paired statistics against the baseline (Δppl, tasks, categories)
    run.py        the run: store keys, run directory, resume
    sensitivity.py, recommend.py   the sensitivity scan and the recommendation on a real model
"""

from .config import DEFAULT_FORMATS, MIN_WINDOWS_FOR_CI, CompareConfig, Job
from .pairing import add_paired_statistics, paired_tasks
from .preparation import Inputs, calibration_head, load_inputs, prepare
from .run import compare, default_run_dir, eval_spec, job_key
from .worker import ReferenceStore, measure_format, run_job

__all__ = ["DEFAULT_FORMATS", "MIN_WINDOWS_FOR_CI", "CompareConfig", "Job", "add_paired_statistics", "paired_tasks",
           "Inputs", "calibration_head", "load_inputs", "prepare", "compare", "default_run_dir", "eval_spec",
           "job_key", "ReferenceStore", "measure_format", "run_job"]
