"""What the stages of one run share: the checked inputs, the lazily loaded model and executor, and the
tables of earlier stages, each loaded at most once per run (a stage that writes a table hands it over, so
later stages never read it back from disk)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..causal.drivers import DriverTable
from ..config import StudyConfig
from ..data.parts import digest
from ..execution import ModelSpec, make_executor
from ..models.loading import load_model
from ..progress import ProgressCallback
from ..stats.domain_experts import DomainExpertTable
from ..stats.profile import RoutingProfile

__all__ = ["StudyContext", "StudyInputs"]


@dataclass
class StudyInputs:
    """What :func:`~expertscope.pipeline.prepare.prepare` parsed and checked once, before any stage: the
    model's source, the parsed domain specs, and the domains' rows (with the test and train splits when
    steering runs)."""

    model: Any
    specs: tuple[Any, ...]
    domains: list[Any]
    test: list[Any] | None = None
    train: list[Any] | None = None
    profile: Any = None
    """The input run's profile, read once before any stage (a run over another run's tables)."""
    second: list[Any] | None = None
    """The second, independent confirmation corpora (``StudyConfig.confirm_specs``), when a stage reads them."""
    overlap: dict[str, int] = field(default_factory=dict)
    """Per domain, confirmation or training items that are also discovery items (allowed with allow_overlap)."""

    def part(self, name: str) -> list[Any]:
        """The domains of part ``name`` (``discovery`` or ``all``: the domains; ``confirm``: the test split;
        ``train``: the training split; ``second``: the second confirmation corpora); empty when this run did not
        load it."""
        return {"confirm": self.test, "train": self.train, "second": self.second}.get(name, self.domains) or []

    def items(self, parts: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """What a stage reading ``parts`` read, per part and domain: the item count and a digest of the items'
        hashes (the manifest records it, so that overlaps between parts can be checked afterwards)."""
        return {p: {d.name: digest(d.examples) for d in self.part(p)} for p in parts if self.part(p)}

    def labels(self) -> dict[str, tuple[str, ...] | None]:
        """Each classification domain's label set, as read from its data (or its spec's ``?labels=``)."""
        return {d.name: d.labels for d in self.domains if d.task == "classification"}


#: How each shared table is read from a run directory: (file, loader).
_LOADERS: dict[str, tuple[str, Any]] = {
    "profile": ("profile.safetensors", lambda p: RoutingProfile.load(p.parent)),
    "drivers": ("drivers.parquet", DriverTable.load),
    "domain_experts": ("domain_experts.parquet", DomainExpertTable.load),
}


@dataclass
class StudyContext:
    """What stages share: the config, the output directory, the checked inputs, the lazily loaded model and
    executor, and the tables of earlier stages.

    ``inputs_dir`` is another run directory whose tables the stages read when ``out`` does not hold them
    (``expertscope domains RUN_DIR -o OUT``). ``loads`` counts the tables read from disk (each at most once).
    """

    config: StudyConfig
    out: Path
    inputs: StudyInputs
    inputs_dir: Path | None = None
    progress: ProgressCallback | None = None
    on_report: Any = None
    """Called by the report stage before it draws: the runner marks the run complete there."""
    loads: Counter[str] = field(default_factory=Counter)
    _model: Any = None
    _exec: Any = None
    _tables: dict[str, Any] = field(default_factory=dict)

    @property
    def executor(self) -> Any:
        """Where the profile and steering stages run their items (None: in this process): made once, so worker
        processes started by one stage serve the next; :meth:`close` stops them."""
        c = self.config
        if self._exec is None and c.executor != "local":
            spec = ModelSpec(c.model, dtype=c.dtype, device=c.device, trust_remote_code=c.trust_remote_code,
                             allow_pickle=c.allow_pickle, threads=c.threads)
            self._exec = make_executor(c.executor, spec, workers=c.workers, gpus_per_worker=c.gpus_per_worker)
        return self._exec

    def close(self) -> None:
        """Stop the run's worker processes, if any."""
        ex, self._exec = self._exec, None
        if ex is not None and hasattr(ex, "close"):
            ex.close()

    def __enter__(self) -> StudyContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model(self) -> Any:
        if self._model is None:
            c = self.config
            torch.manual_seed(c.seed)
            self._model = load_model(self.inputs.model, dtype=c.dtype, device=c.device,
                                     trust_remote_code=c.trust_remote_code, allow_pickle=c.allow_pickle)
        return self._model

    @property
    def model_loaded(self) -> Any:
        """The model if a stage loaded it, else None (for the manifest)."""
        return self._model

    @property
    def domains(self) -> list[Any]:
        return self.inputs.domains

    def path(self, name: str) -> Path:
        """``out/name``, or the input run's file of that name when this run has none."""
        here = self.out / name
        if here.exists() or self.inputs_dir is None:
            return here
        return self.inputs_dir / name

    def table(self, name: str) -> Any:
        """The shared table ``name`` (``profile``, ``drivers``, ``domain_experts``): handed over by the stage
        that wrote it in this run, else read from disk once; None when the run has none."""
        if name not in self._tables:
            if name == "profile" and self.inputs.profile is not None:
                self._tables[name] = self.inputs.profile
            else:
                file, load = _LOADERS[name]
                path = self.path(file)
                self._tables[name] = load(path) if path.exists() else None
                self.loads[name] += path.exists()
        return self._tables[name]

    def keep(self, name: str, table: Any) -> None:
        """Hand the table a stage just wrote to the later stages."""
        self._tables[name] = table

    def profile(self) -> Any:
        return self.table("profile")

    def drivers(self) -> Any:
        return self.table("drivers")

    def domain_experts(self) -> Any:
        return self.table("domain_experts")
