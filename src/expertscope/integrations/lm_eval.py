"""lm-evaluation-harness under expertscope steering.

lm-eval's own ``steered`` model edits hooked modules' outputs, which for transformers 5.x routers changes
nothing (the selection is computed inside the router). Here the model is wrapped as
``HFLM(pretrained=<model instance>)`` and expertscope's router interception stays attached while
lm-eval runs, so every request is routed with the steered logits.

Offline tasks: :func:`write_synthetic_tasks` writes the synthetic domains as local JSONL plus task YAMLs
(``dataset_path: json``, ``dataset_kwargs.data_files``) that lm-eval loads with ``include_path``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_write, make_dirs
from ..models.model import MoEModel
from ..progress import quiet_logger

SYNTHETIC_TASKS = {"emotion": "expertscope_emotion", "knowledge": "expertscope_knowledge", "math": "expertscope_math"}

_MC_YAML = """task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_MATH_YAML = """task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n\\n", "\\nQuestion:"]
  do_sample: false
  max_gen_toks: 64
filter_list:
  - name: final-number
    filter:
      - function: regex
        regex_pattern: "#### (-?[0-9.,]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
metadata:
  version: 1.0
"""


def write_synthetic_tasks(
    directory: str | Path, domains: Sequence[str] = ("emotion", "knowledge", "math"), n: int = 100,
    seed: int = 0, split: str = "test",
) -> dict[str, str]:
    """Write ``{domain}.jsonl`` and ``{task}.yaml`` for each synthetic domain; returns ``{domain: task name}``.

    Classification and multiple choice become lm-eval ``multiple_choice`` over the label / letter
    continuations that :mod:`expertscope.evaluation.prompts` defines; math becomes ``generate_until`` scored
    by exact match of the ``#### n`` number.
    """
    from ..data import prompts
    from ..data.synthetic import generate

    d = make_dirs(directory).resolve()
    names = {}
    for dom in domains:
        if dom not in SYNTHETIC_TASKS:
            raise ConfigError(f"unknown synthetic domain {dom!r}: use emotion, knowledge or math")
        data = generate(dom, n=n, seed=seed, split=split)
        kind = data.task or ""  # generate() always sets the task; prompt() refuses an empty one
        rows = []
        for ex in data.examples:
            text = prompts.prompt(kind, ex)
            if kind == "classification":
                labels = list(prompts.LABELS)
                rows.append({"prompt": text, "choices": [prompts.verbalise(x) for x in labels],
                             "gold": labels.index(str(ex.label))})
            elif kind == "multiple_choice":
                letters = list(prompts.LETTERS[: len(ex.choices or ())])
                rows.append({"prompt": text, "choices": [prompts.LETTER_VERBALISATIONS[x] for x in letters],
                             "gold": letters.index(str(ex.label))})
            else:
                rows.append({"prompt": text, "answer": ex.answer})
        task = SYNTHETIC_TASKS[dom]
        with atomic_write(d / f"{dom}.jsonl") as fh:
            fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
        template = _MATH_YAML if data.task == "math" else _MC_YAML
        with atomic_write(d / f"{task}.yaml") as fh:
            fh.write(template.format(task=task, data=json.dumps(str(d / f"{dom}.jsonl"))))
        names[dom] = task
    return names


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """An lm-eval ``TaskManager`` that knows every name in ``tasks``; unknown names raise :class:`ConfigError`.

    Tasks found in ``include_path`` alone use a manager without lm-eval's own task index (indexing its
    thousands of YAML files takes seconds); otherwise the full index is built and checked.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed: pip install lm_eval") from None
    if isinstance(tasks, str):
        raise ConfigError(f"tasks must be a list of task names, got the string {tasks!r}: wrap it in a list")
    if not tasks:
        raise ConfigError("no lm-eval task given: pass e.g. --tasks expertscope_emotion")
    inc = str(include_path) if include_path else None
    if inc is not None:
        local = TaskManager(include_path=inc, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=inc)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see `lm_eval --tasks list`"
        raise ConfigError(f"unknown lm-eval task {unknown[0]!r}: {hint}")
    return manager


def lm_eval_steered(
    model: MoEModel,
    tasks: Sequence[str],
    steering: Any = None,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
    manager: Any = None,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` with ``steering`` (a :class:`~expertscope.SteeringSpec`) attached.

    Returns lm-eval's results dict (``results[task][metric]``, and ``samples`` when ``log_samples``).
    ``manager``: a :func:`task_manager` already built for ``tasks`` (built here when None).
    """
    manager = manager if manager is not None else task_manager(tasks, include_path)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed: pip install lm_eval") from None
    from ..interventions.steering import steer

    # Targets are checked against the model before lm-eval starts (an expert out of range is one line).
    ctx = steer(model, spec=steering) if steering is not None else contextlib.nullcontext()
    with quiet_logger("lm_eval.models.huggingface"):  # HFLM warns that it was handed a loaded model: on purpose
        lm = HFLM(pretrained=model.model, tokenizer=model.tokenizer, batch_size=batch_size,
                  device=str(model.device))
    with ctx, _quiet_git(), _env_info_once():
        out = simple_evaluate(lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0,
                              log_samples=log_samples, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                              fewshot_random_seed=0)
    if out is None:
        raise ConfigError("lm-eval returned no results: check the task names")
    return out


@contextlib.contextmanager
def _evaluator_patch(name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Inside the block, ``lm_eval.evaluator.<name>`` is ``make(<the original>)``; restored on exit. Without
    lm-eval, or on an lm-eval whose evaluator has no such name, nothing is replaced."""
    try:
        from lm_eval import evaluator
    except ImportError:
        yield
        return
    real = getattr(evaluator, name, None)
    if real is None:  # another lm-eval layout: leave it alone
        yield
        return
    setattr(evaluator, name, make(real))
    try:
        yield
    finally:
        setattr(evaluator, name, real)


#: What lm-eval's ``add_env_info`` added to a result, per working directory (the record names the git commit of
#: the directory above it), collected once per process.
_ENV_INFO: dict[str, dict[str, Any]] = {}


def _env_info_once() -> contextlib.AbstractContextManager[None]:
    """lm-eval adds the environment to every result: torch's ``collect_env`` (``pip list`` and a few other
    subprocesses, about 0.75 s) and the versions. None of it changes while a process runs, so it is collected for
    the first result and the same fields are copied into every later one (a study evaluates many arms)."""
    import copy

    def make(real: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        def add_env_info(storage: dict[str, Any]) -> None:
            key = os.getcwd()
            if key not in _ENV_INFO:
                added: dict[str, Any] = {}
                real(added)
                _ENV_INFO[key] = added
            storage.update(copy.deepcopy(_ENV_INFO[key]))

        return add_env_info

    return _evaluator_patch("add_env_info", make)


def _quiet_git() -> contextlib.AbstractContextManager[None]:
    """lm-eval records ``git describe`` of the working directory; outside a repository git prints
    ``fatal: not a git repository`` on stderr. Run the same command with git's stderr discarded."""
    import subprocess

    def git_commit_hash() -> str | None:
        from lm_eval.loggers import utils as lm_utils

        try:
            out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)
            return out.strip().decode()
        except (subprocess.CalledProcessError, OSError):
            return lm_utils.get_commit_from_path(os.getcwd())  # lm-eval's own fallback: read .git directly

    return _evaluator_patch("get_git_commit_hash", lambda real: git_commit_hash)
