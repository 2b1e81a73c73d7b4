"""Router adapters: one small class per router family, found through a registry keyed by class.

An adapter knows, for one family of MoE router modules, how many experts and shared experts a layer has,
its top-k, how to read the selected experts and gate weights from the router's output, and how the family
routes (``route``), so that it can check itself against the real module before use. It never names a
model: the core finds routers by asking each registered adapter whether it ``matches`` a module.

Every transformers 5.x router computes its logits with one ``F.linear`` call inside its own forward;
:mod:`expertscope.models.hooks` intercepts exactly that call, so the family's own softmax/sigmoid,
grouping and top-k run unchanged on the (possibly transformed) logits.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import ModelError

RouteOutput = tuple[torch.Tensor, torch.Tensor]  # (indices (N, k) int64, weights (N, k) float32)


def lazy_classes(*dotted: str) -> tuple[type, ...]:
    """Import ``"module:Class"`` names that exist in the installed transformers; skip the others."""
    found: list[type] = []
    for spec in dotted:
        module_name, _, cls_name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception:  # missing optional model code must not break the registry
            continue
        cls = getattr(module, cls_name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


@dataclass(eq=False)
class RouterSite:
    """One MoE layer's router as found in a model.

    ``layer`` is the decoder-layer index, ``path`` the router's module path, ``block`` its parent MoE block.
    """

    layer: int
    path: str
    module: nn.Module
    block: nn.Module | None
    adapter: RouterAdapter
    num_experts: int
    top_k: int
    num_shared: int = 0
    verified: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.adapter.family


def module_attr(module: object, name: str) -> Any:
    """A plain attribute the model's code set on ``module`` (a config value such as ``top_k``).

    Typed ``Any``: ``nn.Module.__getattr__`` is typed for parameters and submodules (``Tensor | Module``).
    """
    return getattr(module, name)


class RouterAdapter(ABC):
    """Base class. Subclasses set ``family`` and implement ``classes`` (or ``matches``) and ``route``."""

    family: ClassVar[str] = "base"
    #: Dotted ``module:Class`` names of the router classes this adapter handles.
    class_names: ClassVar[tuple[str, ...]] = ()
    _classes: ClassVar[tuple[type, ...] | None] = None

    # ----- discovery -----------------------------------------------------------------------------
    @classmethod
    def classes(cls) -> tuple[type, ...]:
        classes = cls.__dict__.get("_classes")
        if classes is None:
            classes = cls._classes = lazy_classes(*cls.class_names)
        return classes

    @classmethod
    def matches(cls, module: nn.Module, parent: nn.Module | None) -> bool:
        """Whether ``module`` is a router of this family (exact class, so subclasses need their own)."""
        return type(module) in cls.classes()

    def make_site(self, layer: int, path: str, module: nn.Module, parent: nn.Module | None) -> RouterSite:
        return RouterSite(
            layer=layer,
            path=path,
            module=module,
            block=parent,
            adapter=self,
            num_experts=self.num_experts(module, parent),
            top_k=self.top_k(module, parent),
            num_shared=self.num_shared(module, parent),
        )

    # ----- structure -----------------------------------------------------------------------------
    def num_experts(self, module: nn.Module, parent: nn.Module | None) -> int:
        n = getattr(module, "num_experts", None)
        return int(n) if n is not None else int(module_attr(module, "weight").shape[0])

    def top_k(self, module: nn.Module, parent: nn.Module | None) -> int:
        return int(module_attr(module, "top_k"))

    def num_shared(self, module: nn.Module, parent: nn.Module | None) -> int:
        """Always-on shared experts of the block (0 when there are none)."""
        if parent is None:
            return 0
        if getattr(parent, "shared_expert", None) is not None:
            return 1
        config = getattr(parent, "config", None)
        if getattr(parent, "shared_experts", None) is not None:
            return int(getattr(config, "n_shared_experts", 1) or 1)
        return 0

    # ----- reading and reproducing the routing ----------------------------------------------------
    def selection(self, site: RouterSite, output: Any, logits: torch.Tensor) -> RouteOutput:
        """The experts the model selected and their gate weights, each ``(N, k)``, for one router call."""
        return self.parse_output(output, logits, site.top_k)

    def parse_output(self, output: Any, logits: torch.Tensor, top_k: int) -> RouteOutput:
        """Selected experts and gate weights from the router's own output.

        Found by structure, not position (return orders drift across versions): the integer tensor with
        ``top_k`` columns is the indices, the float tensor of the same shape the weights.
        """
        tensors = list(output) if isinstance(output, tuple | list) else [output]
        idx = next(
            (t for t in tensors if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() >= 1
             and t.shape[-1] == top_k),
            None,
        )
        if idx is None:
            return self.route(logits, top_k)
        w = next(
            (t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()
             and t.shape == idx.shape),
            None,
        )
        idx = idx.reshape(-1, top_k).long()
        if w is None:
            w = torch.gather(torch.softmax(logits.float(), -1), 1, idx)
        return idx, w.reshape(-1, top_k).float()

    @abstractmethod
    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        """Reproduce the family's routing from logits ``(N, E)``: ``(indices, weights)``, each ``(N, k)``."""

    def site_route(self, site: RouterSite, logits: torch.Tensor) -> RouteOutput:
        """``route`` with the site's own settings (grouping, bias, scaling) where the family has them."""
        return self.route(logits, site.top_k)

    # ----- ablation (mode="mask") ----------------------------------------------------------------
    #: Whether the family corrects its scores after the logits (DeepSeek-V3's ``e_score_correction_bias``),
    #: so that a mask must also reach those choice scores (:meth:`mask_choice`).
    masks_choice: ClassVar[bool] = False

    def mask_logits(self, site: RouterSite, logits: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """``logits`` (..., E) with ``experts`` at ``-inf``: every softmax/sigmoid-then-top-k family then never
        selects them and gives them zero weight (a new tensor; the router's own is untouched)."""
        idx = torch.as_tensor(experts, dtype=torch.long, device=logits.device)
        return logits.index_fill(-1, idx, float("-inf"))

    def mask_choice(self, site: RouterSite, func: Any, args: tuple, out: Any, experts: list[int]) -> Any:
        """For :attr:`masks_choice` families: ``out`` of one torch call made after the logits, with the masked
        experts' choice scores at ``-inf`` where that call computes them; return ``out`` itself otherwise."""
        return out

    def probe(self, site: RouterSite, hidden: torch.Tensor) -> Any:
        """Run the router on ``hidden`` ``(N, H)`` the way its block does."""
        return site.module(hidden)

    def hidden_size(self, site: RouterSite) -> int:
        return int(module_attr(site.module, "weight").shape[1])

    def expert_outputs(self, site: RouterSite, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each selected expert's own output ``f_i(x)`` (before its gate weight): ``(N, k, H)`` for router
        inputs ``hidden`` ``(N, H)`` and selections ``indices`` ``(N, k)``.

        transformers 5.x (every family): the block's fused ``experts`` module (``gate_up_proj``/``down_proj``
        tensors; layout, activation and biases are the family's own) is called once per slot with that
        slot's expert and a gate weight of 1, so the model's own code computes the output.
        """
        experts = getattr(site.block, "experts", None)
        if experts is None:
            raise ModelError(f"the MoE block at {site.path} has no experts module: output norms are not "
                             "available for this model")
        if isinstance(experts, nn.ModuleList):
            return module_list_outputs(experts, hidden, indices)
        ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        return torch.stack([experts(hidden, indices[:, j:j + 1], ones) for j in range(indices.shape[1])], dim=1)

    def all_expert_outputs(self, site: RouterSite, hidden: torch.Tensor) -> torch.Tensor:
        """Every routed expert's own output on every token ``(N, E, H)``: :meth:`expert_outputs` with each token
        sent to every expert (per-expert modules are called on all tokens at once)."""
        experts = getattr(site.block, "experts", None)
        if isinstance(experts, nn.ModuleList):
            return torch.stack([experts[e](hidden) for e in range(site.num_experts)], dim=1)
        every = torch.arange(site.num_experts, device=hidden.device).expand(hidden.shape[0], site.num_experts)
        return self.expert_outputs(site, hidden, every)


_REGISTRY: list[type[RouterAdapter]] = []


def register_adapter(cls: type[RouterAdapter]) -> type[RouterAdapter]:
    """Class decorator: add an adapter to the registry (earlier registrations are tried first)."""
    _REGISTRY.append(cls)
    return cls


def registered_adapters() -> list[type[RouterAdapter]]:
    return list(_REGISTRY)


def find_adapter(module: nn.Module, parent: nn.Module | None) -> RouterAdapter | None:
    """The first registered adapter that matches ``module``, instantiated; None if none does."""
    for cls in _REGISTRY:
        if cls.matches(module, parent):
            return cls()
    return None


def supported_families() -> list[str]:
    return [cls.family for cls in _REGISTRY]


def module_list_outputs(experts: nn.ModuleList, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(N, k, H)``: ``experts[indices[t, j]](hidden[t])`` for per-expert modules (4.x blocks, remote code)."""
    out = hidden.new_zeros(*indices.shape, hidden.shape[-1])
    for e in torch.unique(indices).tolist():
        tok, slot = torch.where(indices == e)
        out[tok, slot] = experts[e](hidden[tok]).to(out.dtype)
    return out


def softmax_topk(logits: torch.Tensor, top_k: int, renormalise: bool) -> RouteOutput:
    """softmax over all experts in fp32, top-k, optionally renormalised over the k."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w


def topk_then_softmax(logits: torch.Tensor, top_k: int) -> RouteOutput:
    """top-k on the logits, then softmax over the k (GPT-OSS, GraniteMoE)."""
    top, idx = torch.topk(logits.float(), top_k, dim=-1)
    return idx, torch.softmax(top, dim=-1)

