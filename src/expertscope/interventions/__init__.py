"""Acting on experts: steering at inference, router-only LoRA, and the intervention study (``study``: the
paper's Tables 1–2, with "not applicable" rows where a domain has nothing to steer)."""

from .router_lora import RouterFinetune, finetune_router, load_router_adapter, router_parameter_names
from .steering import Steering, SteeringSpec, steer, targets_from

__all__ = [
    "RouterFinetune",
    "Steering",
    "SteeringSpec",
    "finetune_router",
    "load_router_adapter",
    "router_parameter_names",
    "steer",
    "targets_from",
]
