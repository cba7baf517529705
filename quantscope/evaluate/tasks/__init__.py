"""Multiple-choice and cloze tasks: loaders for local files and log-likelihood scoring.

Why not call lm-evaluation-harness? It is a heavy optional dependency (datasets, pandas, pyarrow,
scikit-learn ...) that downloads its data from the Hub; quantscope must score the published files
offline with torch alone. `lmeval_adapter.py` runs lm-eval itself where it is installed. This package
reproduces lm-eval's (v0.4) prompts and scoring so the numbers are comparable with published ones.

- `items`: `Item` (one question), `Task` (a loaded task), `TaskScores` (one model's per-item answers);
- `loaders`: one reader per published file layout, with lm-eval's prompts;
- `table`: `TASKS`, the table of task names -> reader, category and kind, and `load_task` over it;
- `scoring`: lm-eval's causal tokenisation and batched log-likelihoods, `score_task`;
- `summaries`: accuracy intervals, paired deltas, per-category deltas, cloze perplexity.
"""

from quantscope.evaluate import stats
from quantscope.evaluate.tasks.items import CATEGORY_NAMES, CLOZE, MULTIPLE_CHOICE, Item, Task, TaskScores
from quantscope.evaluate.tasks.scoring import encode_pair, loglikelihoods, score_task
from quantscope.evaluate.tasks.summaries import category_deltas, cloze_perplexity, flips, summarize
from quantscope.evaluate.tasks.table import CATEGORIES, TASKS, TaskEntry, load_task

__all__ = [
    "flips",
    "CATEGORIES", "CATEGORY_NAMES", "CLOZE", "MULTIPLE_CHOICE", "TASKS", "Item", "Task", "TaskEntry",
    "TaskScores", "category_deltas", "cloze_perplexity", "encode_pair", "load_task", "loglikelihoods",
    "score_task", "stats", "summarize",
]
