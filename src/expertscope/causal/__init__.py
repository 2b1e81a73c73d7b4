"""Driver experts (docs/methods.md §3): causal effects of experts on the prediction, driver rules, the causal rate."""

from .drivers import DriverTable, causal_rate, causal_rate_from_selections, driver_experts, spearman_by_layer
from .effects import CausalEffects, causal_effects

__all__ = [
    "CausalEffects",
    "DriverTable",
    "causal_effects",
    "causal_rate",
    "causal_rate_from_selections",
    "driver_experts",
    "spearman_by_layer",
]
