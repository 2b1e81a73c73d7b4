"""The stages of a study as records: one :class:`Stage` per stage, in pipeline order (:data:`PIPELINE`).

A stage's record says everything the runner, the pre-flight checks, the fingerprint and the CLI need to know
about it, so none of them keeps a list of its own: which :class:`~expertscope.config.StudyConfig` sections
and run-level fields it reads (its commands offer their fields as options), which tables it reads and writes
(each table has one writing stage), whether it needs the model and the domains, whether ``expertscope run``
includes it, and what it needs of the domains' rows (a check run before the model loads).

The records name their function (``fn``, in :mod:`expertscope.pipeline.stages`) rather than hold it, so that
reading the registry (``--help``, the fingerprint of a finished run) imports none of the analyses.

How to add a stage: write ``NAME(ctx) -> dict`` in :mod:`.stages` (call one library function with the
settings of ``ctx.config.<section>``, never a literal; write its tables into ``ctx.out``; return a small JSON
summary for the manifest), and add its :class:`Stage` here, where it runs. A new command running a set of
stages is one entry in ``cli/commands.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ..config import StudyConfig

if TYPE_CHECKING:
    from .context import StudyContext, StudyInputs

__all__ = ["PIPELINE", "Pipeline", "Stage"]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    ``fn``: the name of its function in :mod:`expertscope.pipeline.stages`; ``sections``: the StudyConfig
    sections it reads; ``run_fields``: run-level StudyConfig fields only some stages read (``train_limit``,
    the executor's); ``reads``/``writes``: the tables (file stems) it reads and writes; ``needs_model`` /
    ``needs_data``: False when it reads only earlier tables (or needs no domains); ``in_study``: part of
    ``expertscope run``; ``row_check``: the name of a check in :mod:`expertscope.pipeline.prepare` of the rows
    it will read (run before the model loads); ``parts``: which parts of the data it reads (``discovery``;
    ``confirm`` and ``train`` for the steering study; ``all`` for ``eval``, which is no part of a study).
    """

    name: str
    fn: str
    sections: tuple[str, ...] = ()
    run_fields: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    needs_model: bool = True
    needs_data: bool = True
    in_study: bool = True
    row_check: str | None = None
    parts: tuple[str, ...] = ("discovery",)

    @property
    def tables_only(self) -> bool:
        """It reads earlier tables only: a run of such stages needs neither the model nor the data."""
        return not self.needs_model and not self.needs_data

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        """Run the stage's function on ``ctx``: its manifest summary."""
        fn: Callable[[StudyContext], dict[str, Any]] = getattr(importlib.import_module(f"{__package__}.stages"),
                                                               self.fn)
        return fn(ctx)

    def check_rows(self, inputs: StudyInputs) -> None:
        """Check the rows this stage will read (nothing when it has no check)."""
        if self.row_check is not None:
            getattr(importlib.import_module(f"{__package__}.prepare"), self.row_check)(inputs)


class Pipeline:
    """The stages in order, and what follows from their records."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)
        writers: dict[str, str] = {}
        for s in self.stages:
            for t in s.writes:
                if t in writers:
                    raise ValueError(f"table {t!r} has two writing stages: {writers[t]} and {s.name}")
                writers[t] = s.name

    def __iter__(self) -> Any:
        return iter(self.stages)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def get(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def study(self) -> list[str]:
        """The stages of ``expertscope run``, in order."""
        return [s.name for s in self.stages if s.in_study]

    def chosen(self, names: Sequence[str] | None) -> list[Stage]:
        """The named stages in pipeline order (None: the study's)."""
        want = set(self.study() if names is None else names)
        return [s for s in self.stages if s.name in want]

    def tables_only(self, names: Sequence[str]) -> bool:
        """A run of ``names`` needs neither the model nor the data."""
        return all(self.get(n).tables_only for n in names)

    def data_free(self, names: Sequence[str]) -> bool:
        """A run of ``names`` needs no domains."""
        return all(not self.get(n).needs_data for n in names)

    def sections(self, names: Sequence[str]) -> list[str]:
        """The StudyConfig sections a run of ``names`` reads, in stage order (repeats kept out)."""
        return list(dict.fromkeys(s for n in names for s in self.get(n).sections))

    def run_fields(self, names: Sequence[str]) -> list[str]:
        """The run-level StudyConfig fields that matter to a run of ``names``: a field some stage lists in its
        ``run_fields`` matters when such a stage runs; ``domains`` and ``limit`` when a stage reads the data;
        every other field (model, device, seed, ...) always, except for a run of table-only stages (seed)."""
        if self.tables_only(names):
            return ["seed"]
        claimed = {f for s in self.stages for f in s.run_fields}
        data = [n for n in names if self.get(n).needs_data]
        out = []
        for f in fields(StudyConfig):
            if f.name in StudyConfig.sections():
                continue
            if f.name in claimed:
                if any(f.name in self.get(n).run_fields for n in names):
                    out.append(f.name)
            elif f.name in ("domains", "limit"):
                if data:
                    out.append(f.name)
            else:
                out.append(f.name)
        return out


_EXECUTOR = ("executor", "workers", "gpus_per_worker")

#: The study's stages, in the order they run.
PIPELINE = Pipeline([
    Stage("profile", "profile_stage", sections=("profile",), run_fields=_EXECUTOR,
          writes=("profile", "routing_mi", "routes", "coactivation_stats", "phase_comparison")),
    Stage("coactivation", "coactivation", reads=("profile",), needs_model=False, needs_data=False,
          writes=("coactivation", "transitions", "paths", "routing_consistency", "importance")),
    Stage("drivers", "drivers", sections=("causal", "drivers"), writes=("ce", "drivers"), row_check="task_rows"),
    Stage("domain_experts", "domain_experts_stage", sections=("domain_experts",), reads=("profile", "drivers"),
          needs_model=False, needs_data=False, writes=("domain_experts",)),
    Stage("replication", "replication", reads=("profile", "domain_experts", "drivers", "ce"),
          writes=("replication",)),
    Stage("causal_rate", "causal_rate_stage", sections=("causal",), reads=("drivers",), writes=("causal_rate",)),
    Stage("tokens", "tokens", sections=("profile",), reads=("domain_experts", "drivers"),
          writes=("token_positions", "token_associations")),
    Stage("expert_map", "expert_map_stage", reads=("profile", "drivers"),
          writes=("expert_map_router", "expert_map_output")),
    Stage("hypotheses", "hypotheses_stage", sections=("intervention",), reads=("profile", "domain_experts", "drivers"),
          needs_model=False, writes=("hypotheses",)),
    Stage("steering", "steering", sections=("intervention",), run_fields=("train_limit", *_EXECUTOR),
          reads=("domain_experts", "drivers"), writes=("steering", "steering_dose", "steering_arms",
                                                       "steering_selectivity", "router_lora"),
          row_check="split_rows", parts=("confirm", "train")),
    Stage("routing_overlap", "routing_overlap", sections=("intervention", "causal"),
          reads=("domain_experts", "drivers", "router_lora"), writes=("routing_overlap",), parts=("confirm",)),
    Stage("confirmation", "confirmation", sections=("intervention",), run_fields=("confirm", "hypotheses",
                                                                                     *_EXECUTOR),
          reads=("hypotheses", "steering_dose", "steering_selectivity"), writes=("confirmation",),
          row_check="second_rows", parts=("confirm", "second")),
    Stage("report", "report", needs_model=False, needs_data=False, writes=("report",)),
    Stage("eval", "evaluation", sections=("evaluation",), in_study=False, writes=("results",),
          row_check="eval_rows", parts=("all",)),
    Stage("lm_eval", "lm_eval", sections=("lm_eval",), needs_data=False, in_study=False,
          writes=("lm_eval_results",)),
])
