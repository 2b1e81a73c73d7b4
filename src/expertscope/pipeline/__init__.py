"""The study as a pipeline of stages writing into one run directory.

* :mod:`.registry`: one :class:`~.registry.Stage` record per stage, in order (:data:`~.registry.PIPELINE`);
* :mod:`.context`: what the stages of a run share (inputs, model, executor, tables loaded once);
* :mod:`.prepare`: every check before the first stage;
* :mod:`.stages`: the stage functions;
* :mod:`.runner`: :func:`run_study`, one loop for new, resumed and added-to runs;
* :mod:`.jobs`: work outside the loop (``eval``'s config, recorded routes, the synthetic benchmark's files).
"""

from __future__ import annotations

from .context import StudyContext, StudyInputs
from .prepare import prepare
from .registry import PIPELINE, Pipeline, Stage
from .runner import config_of_run, run_study, study_fingerprint

__all__ = ["PIPELINE", "Pipeline", "Stage", "StudyContext", "StudyInputs", "config_of_run", "prepare", "run_study",
           "study_fingerprint"]
