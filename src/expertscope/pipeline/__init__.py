"""The study as a pipeline of stages writing into one run directory.

* :mod:`.registry`: one :class:`~.registry.Stage` record per stage, in order (:data:`~.registry.PIPELINE`);
* :mod:`.context`: what the stages of a run share (inputs, model, executor, tables loaded once);
* :mod:`.prepare`: every check before the first stage;
* :mod:`.stages`: the stage functions;
* :mod:`.runner`: :func:`run_study`, one loop for new, resumed and added-to runs;
* :mod:`.jobs`: work outside the loop (``eval``'s config, recorded routes, the synthetic benchmark's files).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .registry import PIPELINE, Pipeline, Stage  # the records only: reading them imports no analysis

# The rest on first use, so that `--help` (which reads the registry) loads no torch.
_LAZY = {"StudyContext": ".context", "StudyInputs": ".context", "prepare": ".prepare", "config_of_run": ".runner",
         "run_study": ".runner", "study_fingerprint": ".runner"}

if TYPE_CHECKING:
    from .context import StudyContext, StudyInputs
    from .prepare import prepare
    from .runner import config_of_run, run_study, study_fingerprint


__getattr__ = lazy_getattr(__name__, _LAZY, globals())

__all__ = ["PIPELINE", "Pipeline", "Stage", "StudyContext", "StudyInputs", "config_of_run", "prepare", "run_study",
           "study_fingerprint"]
