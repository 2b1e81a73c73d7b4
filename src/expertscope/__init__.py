"""expertscope: what gets activated inside Mixture-of-Experts language models.

``import expertscope as es`` — load a model, profile its routing over domains, find domain experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._lazy import lazy_getattr

# The public names and the module each comes from, imported on first use: `import expertscope` (and so
# `expertscope --help`) loads no torch, transformers or pandas until a name that needs them is used.
_EXPORTS: dict[str, str] = {
    "causal_effects": ".causal",
    "causal_rate": ".causal",
    "CausalConfig": ".config",
    "CausalEffects": ".causal",
    "coactivation": ".stats.structure",
    "CoactivationStats": ".stats.coactivation",
    "ConfigError": ".errors",
    "confirm": ".interventions.hypotheses",
    "Confirmation": ".interventions.hypotheses",
    "DataError": ".errors",
    "Domain": ".data.types",
    "domain_experts": ".stats.domain_experts",
    "DomainExpertConfig": ".config",
    "DomainExpertTable": ".stats.domain_experts",
    "driver_experts": ".causal",
    "DriverConfig": ".config",
    "DriverTable": ".causal",
    "EvalConfig": ".config",
    "EvalResult": ".evaluation",
    "evaluate": ".evaluation",
    "Example": ".data.types",
    "expert_map": ".stats.expert_map",
    "ExpertscopeError": ".errors",
    "finetune_router": ".interventions",
    "Hypotheses": ".interventions.hypotheses",
    "InputTypeError": ".errors",
    "intervention_study": ".interventions.steering_study",
    "InterventionConfig": ".config",
    "InterventionResult": ".interventions.steering_study",
    "LmEvalConfig": ".config",
    "load_domain": ".data.sources",
    "load_domains": ".data.sources",
    "load_model": ".models.loading",
    "load_routes": ".integrations.engine_routes",
    "ModelError": ".errors",
    "MoEModel": ".models.model",
    "OutputError": ".errors",
    "phase_comparison": ".stats.phases",
    "plan": ".pipeline.plan",
    "position_profile": ".stats.tokens",
    "profile": ".stats.profile",
    "profile_routes": ".integrations.engine_routes",
    "ProfileConfig": ".config",
    "record_tokens": ".stats.tokens",
    "replicate_domain_experts": ".stats.replication",
    "replicate_drivers": ".causal",
    "Replication": ".stats.replication",
    "RouterCall": ".models.hooks",
    "RouterFinetune": ".interventions",
    "RouterHooks": ".models.hooks",
    "routing_overlap": ".stats.overlap",
    "RoutingProfile": ".stats.profile",
    "run_study": ".pipeline",
    "SequenceRoutes": ".stats.token_selections",
    "steer": ".interventions",
    "Steering": ".interventions",
    "SteeringSpec": ".interventions",
    "StudyConfig": ".config",
    "token_associations": ".stats.tokens",
}
#: Subpackages reachable as attributes (``es.data.sources``), imported on first use too.
_SUBPACKAGES = ("causal", "cli", "config", "data", "demo", "evaluation", "integrations", "interventions", "io",
                "models", "pipeline", "report", "stats", "testing")

if TYPE_CHECKING:  # the real imports, for type checkers and editors
    from .causal import CausalEffects, DriverTable, causal_effects, causal_rate, driver_experts, replicate_drivers
    from .config import (
        CausalConfig,
        DomainExpertConfig,
        DriverConfig,
        EvalConfig,
        InterventionConfig,
        LmEvalConfig,
        ProfileConfig,
        StudyConfig,
    )
    from .data.sources import load_domain, load_domains
    from .data.types import Domain, Example
    from .errors import ConfigError, DataError, ExpertscopeError, InputTypeError, ModelError, OutputError
    from .evaluation import EvalResult, evaluate
    from .integrations.engine_routes import load_routes, profile_routes
    from .interventions import RouterFinetune, Steering, SteeringSpec, finetune_router, steer
    from .interventions.hypotheses import Confirmation, Hypotheses, confirm
    from .interventions.steering_study import InterventionResult, intervention_study
    from .models.hooks import RouterCall, RouterHooks
    from .models.loading import load_model
    from .models.model import MoEModel
    from .pipeline import run_study
    from .stats.coactivation import CoactivationStats
    from .stats.domain_experts import DomainExpertTable, domain_experts
    from .stats.expert_map import expert_map
    from .stats.overlap import routing_overlap
    from .stats.profile import RoutingProfile, profile
    from .stats.replication import Replication, replicate_domain_experts
    from .stats.structure import coactivation
    from .stats.token_selections import SequenceRoutes
    from .stats.tokens import position_profile, record_tokens, token_associations

__version__ = "0.1.0"

# `report` is both a subpackage and a public function: load the (light) package first, so that the name below
# is the function and a later import of a report module cannot put the package in its place.
from . import report as _report_package  # noqa: E402, F401


def report(*args: Any, **kwargs: Any) -> Any:
    """Build a run's ``report.html`` from its saved tables: :func:`expertscope.report.html.report` (same
    arguments), imported on first use."""
    from .report.html import report as build

    return build(*args, **kwargs)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals(), _SUBPACKAGES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))



__all__ = [
    "CausalConfig",
    "CausalEffects",
    "CoactivationStats",
    "ConfigError",
    "Confirmation",
    "DataError",
    "Domain",
    "DomainExpertConfig",
    "DomainExpertTable",
    "DriverConfig",
    "DriverTable",
    "EvalConfig",
    "EvalResult",
    "Example",
    "ExpertscopeError",
    "Hypotheses",
    "InputTypeError",
    "InterventionConfig",
    "InterventionResult",
    "LmEvalConfig",
    "MoEModel",
    "ModelError",
    "OutputError",
    "ProfileConfig",
    "Replication",
    "RouterCall",
    "RouterFinetune",
    "RouterHooks",
    "RoutingProfile",
    "SequenceRoutes",
    "Steering",
    "SteeringSpec",
    "StudyConfig",
    "__version__",
    "causal_effects",
    "causal_rate",
    "coactivation",
    "confirm",
    "domain_experts",
    "driver_experts",
    "evaluate",
    "expert_map",
    "finetune_router",
    "intervention_study",
    "load_domain",
    "load_domains",
    "load_model",
    "load_routes",
    "phase_comparison",
    "plan",
    "position_profile",
    "profile",
    "profile_routes",
    "record_tokens",
    "replicate_domain_experts",
    "replicate_drivers",
    "report",
    "routing_overlap",
    "run_study",
    "steer",
    "token_associations",
]
