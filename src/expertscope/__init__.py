"""expertscope: what gets activated inside Mixture-of-Experts language models.

``import expertscope as es`` — load a model, profile its routing over domains, find domain experts.
"""

from __future__ import annotations

from . import data  # noqa: F401  (es.data.sources)
from .causal import (
    CausalEffects,
    DriverTable,
    causal_effects,
    causal_rate,
    driver_experts,
    replicate_drivers,
)
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
from .report import report
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
