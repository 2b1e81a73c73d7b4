"""Acting on experts: steering at inference and router-only LoRA."""

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
