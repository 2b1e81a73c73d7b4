"""The whole study as a resumable pipeline of stages writing into one run directory.

Each stage reads what earlier stages wrote, writes its own outputs atomically and is recorded in the
manifest as complete; ``resume=True`` skips completed stages, so an interrupted run continues where it
stopped and ends with the same tables as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import BaseConfig, DomainExpertConfig
from .errors import ConfigError
from .io import make_manifest, prepare_out_dir, write_json

DEMO_DOMAINS = (
    "emotion=synthetic:emotion@validation",
    "knowledge=synthetic:knowledge@validation",
    "math=synthetic:math@validation",
)


@dataclass(frozen=True)
class StudyConfig(BaseConfig):
    """Settings of :func:`run_study`. With no ``domains`` the synthetic three-domain benchmark is used."""

    model: str = "demo"
    domains: tuple[str, ...] = ()
    limit: int | None = 150
    batch_size: int = 16
    max_length: int = 512
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0
    z: float = 2.0
    entropy: Literal["bernoulli", "eq1"] = "bernoulli"
    n_boot: int = 1000
    n_perm: int = 1000
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"limit must be positive, got {self.limit}: pass --limit N with N > 0")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}: pass --batch-size N")

    @property
    def domain_specs(self) -> tuple[str, ...]:
        return self.domains or DEMO_DOMAINS


@dataclass
class StudyContext:
    """What stages share: the config, the output directory, and lazily loaded model and domains."""

    config: StudyConfig
    out: Path
    _model: Any = None
    _domains: Any = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        if self._model is None:
            from .models.loading import load_model

            c = self.config
            self._model = load_model(c.model, dtype=c.dtype, device=c.device, trust_remote_code=c.trust_remote_code)
        return self._model

    @property
    def domains(self) -> Any:
        if self._domains is None:
            from .data.sources import load_domains

            self._domains = load_domains(self.config.domain_specs, limit=self.config.limit, seed=self.config.seed)
        return self._domains


Stage = Callable[[StudyContext], dict[str, Any]]


def _stage_profile(ctx: StudyContext) -> dict[str, Any]:
    from .stats.profile import RoutingProfile, profile

    c = ctx.config
    previous = RoutingProfile.load(ctx.out) if (ctx.out / "profile.safetensors").exists() else None
    last = [time.perf_counter()]

    def checkpoint(p: RoutingProfile, step: int) -> None:
        if time.perf_counter() - last[0] > 30:
            p.save(ctx.out)
            last[0] = time.perf_counter()

    prof = profile(ctx.model, ctx.domains, batch_size=c.batch_size, max_length=c.max_length,
                   resume_from=previous, on_batch=checkpoint, progress=True)
    prof.save(ctx.out)
    n, _ = prof.totals()
    return {"tokens": {d: int(x) for d, x in zip(prof.domains, n, strict=True)}, "truncated": prof.truncated}


def _stage_domain_experts(ctx: StudyContext) -> dict[str, Any]:
    from .stats.domain_experts import domain_experts
    from .stats.profile import RoutingProfile

    c = ctx.config
    cfg = DomainExpertConfig(z=c.z, entropy=c.entropy, n_boot=c.n_boot, n_perm=c.n_perm, seed=c.seed)
    table = domain_experts(RoutingProfile.load(ctx.out), cfg)
    table.save(ctx.out / "domain_experts.parquet")
    counts = {d: len(table.experts(d)) for d in table.settings["domains"]}
    return {"domain_experts": counts, "rule": table.settings["rule_text"]}


#: The stages in order. Later stages (drivers, tokens, steering, report) append themselves here.
STAGES: list[tuple[str, Stage]] = [
    ("profile", _stage_profile),
    ("domain_experts", _stage_domain_experts),
]


def run_study(
    config: StudyConfig,
    out: str | Path,
    resume: bool = False,
    force: bool = False,
    on_stage: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Run every stage into ``out``; returns the final manifest. ``on_stage(name, "start"|"done"|"skip")``."""
    out = prepare_out_dir(out, "study", resume=resume, force=force)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if resume and manifest_path.exists() else {}
    if old and old.get("config") != json.loads(json.dumps(config.to_dict())):
        raise ConfigError(f"{out} holds a study with other settings: resume with the same options or use a new --out")
    stages: dict[str, Any] = dict(old.get("stages", {}))
    ctx = StudyContext(config, out)
    t_start = time.perf_counter()

    def save(status: str) -> dict[str, Any]:
        model_info = ctx._model.describe() if ctx._model is not None else old.get("model")
        m = make_manifest("study", config.to_dict(), status=status, seed=config.seed, model=model_info,
                          stages=stages)
        write_json(manifest_path, m)
        return m

    save("running")
    for name, stage in STAGES:
        if stages.get(name, {}).get("status") == "complete":
            if on_stage:
                on_stage(name, "skip")
            continue
        if on_stage:
            on_stage(name, "start")
        t = time.perf_counter()
        result = stage(ctx)
        stages[name] = {"status": "complete", "seconds": round(time.perf_counter() - t, 3), **result}
        save("running")
        if on_stage:
            on_stage(name, "done")
    stages["_total_seconds"] = {"status": "info", "seconds": round(time.perf_counter() - t_start, 3)}
    return save("complete")
