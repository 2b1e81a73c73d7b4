"""Tiny randomly initialised MoE models of every supported router family, built from transformers' own
config classes. For tests, examples and benchmarks: they need no download.

Also two stand-ins for router styles that the installed transformers does not ship: the remote-code
DeepSeek-MoE-16B ``MoEGate`` block and the transformers-4.x ``nn.Linear`` gate block. Both are faithful
copies of those blocks' routing, placed into a tiny Mixtral host.

And :class:`DieOnItem`, an executor wrapper whose worker process dies on a chosen item (failure tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_COMMON: dict[str, Any] = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def _cfg(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> Any:
    import transformers

    return getattr(transformers, name)(**{**_COMMON, **defaults, **overrides})


def _build(model_cls: str, config: Any) -> nn.Module:
    import transformers

    return getattr(transformers, model_cls)(config)


def _mixtral(**kw: Any) -> nn.Module:
    return _build("MixtralForCausalLM", _cfg("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), kw))


def _qwen2_moe(**kw: Any) -> nn.Module:
    cfg = _cfg("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24), kw)
    return _build("Qwen2MoeForCausalLM", cfg)


def _qwen3_moe(**kw: Any) -> nn.Module:
    cfg = _cfg("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8), kw)
    return _build("Qwen3MoeForCausalLM", cfg)


def _olmoe(**kw: Any) -> nn.Module:
    return _build("OlmoeForCausalLM", _cfg("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2), kw))


_DS_COMMON: dict[str, Any] = dict(
    num_key_value_heads=4, num_experts_per_tok=2, moe_intermediate_size=16, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
)


def _deepseek_v2(**kw: Any) -> nn.Module:
    cfg = _cfg("DeepseekV2Config", {**_DS_COMMON, "n_routed_experts": 4, "q_lora_rank": None}, kw)
    return _build("DeepseekV2ForCausalLM", cfg)


def _deepseek_v3(**kw: Any) -> nn.Module:
    cfg = _cfg("DeepseekV3Config", {**_DS_COMMON, "n_routed_experts": 8, "q_lora_rank": 16, "n_group": 2,
                                     "topk_group": 1}, kw)
    model = _build("DeepseekV3ForCausalLM", cfg)
    # A non-zero correction bias, so that tests exercise "bias for choice only".
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.linspace(-0.05, 0.05, buf.numel()))
    return model


def _gpt_oss(**kw: Any) -> nn.Module:
    cfg = _cfg("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8), kw)
    return _build("GptOssForCausalLM", cfg)


def _granitemoe(**kw: Any) -> nn.Module:
    cfg = _cfg("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2), kw)
    return _build("GraniteMoeForCausalLM", cfg)


def _phimoe(**kw: Any) -> nn.Module:
    cfg = _cfg("PhimoeConfig", dict(num_local_experts=4, num_experts_per_tok=2), kw)
    return _build("PhimoeForCausalLM", cfg)


class _MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Stand-in for DeepSeek-MoE-16B's remote-code ``MoEGate`` (softmax scoring, eval path)."""

    def __init__(self, hidden: int, n_routed_experts: int, top_k: int, norm_topk_prob: bool = False) -> None:
        super().__init__()
        self.top_k = top_k
        self.n_routed_experts = n_routed_experts
        self.norm_topk_prob = norm_topk_prob
        self.gating_dim = hidden
        self.weight = nn.Parameter(torch.empty((n_routed_experts, hidden)))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        logits = F.linear(hidden_states, self.weight, None)
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight, None


class DeepseekMoE(nn.Module):
    """Stand-in for DeepSeek-MoE-16B's remote-code MoE block: routed experts + always-on shared experts."""

    def __init__(self, config: Any, hidden: int, inter: int, n_experts: int, top_k: int, n_shared: int) -> None:
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList([_MLP(hidden, inter) for _ in range(n_experts)])
        self.gate = MoEGate(hidden, n_experts, top_k)
        self.shared_experts = _MLP(hidden, inter * n_shared)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        x = hidden_states.view(-1, shape[-1])
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(topk_idx == e)
            if tok.numel():
                y.index_add_(0, tok, expert(x[tok]) * topk_weight[tok, slot, None].to(x.dtype))
        return y.view(*shape) + self.shared_experts(identity)


class LegacyLinearGateMoeBlock(nn.Module):
    """Stand-in for a transformers-4.57 Mixtral/Qwen block: ``gate = nn.Linear(H, E)``, routing in the block."""

    def __init__(self, hidden: int, inter: int, n_experts: int, top_k: int, norm_topk_prob: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList([_MLP(hidden, inter) for _ in range(n_experts)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(selected == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * routing_weights[tok, slot, None])
        return out.view(b, s, h)


def _with_blocks(make_block: Callable[[Any, int], nn.Module], dense_first: bool, **kw: Any) -> nn.Module:
    # config and decoder layers are plain attributes; nn.Module types attributes as Tensor | Module
    model: Any = _mixtral(**kw)
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        layer.mlp = _MLP(cfg.hidden_size, cfg.intermediate_size) if (dense_first and i == 0) else make_block(cfg, i)
    _reinit(model, cfg.initializer_range)
    return model


def _reinit(model: nn.Module, std: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear | MoEGate):
            nn.init.normal_(m.weight, std=std)


def _deepseek_moe_remote(**kw: Any) -> nn.Module:
    return _with_blocks(lambda cfg, i: DeepseekMoE(_ShimConfig(2), cfg.hidden_size, 16, 4, 2, 2), True, **kw)


def _linear_gate(**kw: Any) -> nn.Module:
    return _with_blocks(lambda cfg, i: LegacyLinearGateMoeBlock(cfg.hidden_size, 24, 4, 2), False, **kw)


class _ShimConfig:
    def __init__(self, n_shared_experts: int) -> None:
        self.n_shared_experts = n_shared_experts


TINY_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "granitemoe": _granitemoe,
    "phimoe": _phimoe,
    "deepseek_moe_remote": _deepseek_moe_remote,
    "linear_gate_4x": _linear_gate,
}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any) -> nn.Module:
    """A tiny random causal LM of ``family`` (a key of :data:`TINY_BUILDERS`), in eval mode.

    ``config`` overrides the config fields (e.g. ``initializer_range=0.3`` for measurable effects).
    """
    if family not in TINY_BUILDERS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown tiny family {family!r}: choose from {sorted(TINY_BUILDERS)}")
    torch.manual_seed(seed)
    model = TINY_BUILDERS[family](**config)
    return model.to(dtype).eval()


def save_tiny_model(directory: Any, family: str, **config: Any) -> Any:
    """A tiny model of ``family`` (config overrides as :func:`tiny_model`) and the tiny tokenizer saved as a
    Hugging Face directory, so that ``load_model(directory)`` is the real loading path; returns ``directory``."""
    model: Any = tiny_model(family, **config)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def tiny_tokenizer(vocab_size: int = 128) -> Any:
    """A character-level fast tokenizer for the tiny models: ids 0–2 are pad/bos/eos, each printable ASCII
    character has its own id, anything else maps to ``<unk>``. Adds ``<s>`` in front of every text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)][: vocab_size - len(specials)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class DieOnItem:
    """An executor that fails the way a worker dies for real, for failure tests: it runs ``inner`` (a process
    or Ray executor), but the worker process that receives item ``index`` of a job kills itself with SIGKILL
    (as the kernel's out-of-memory killer would) instead of computing it. Which item dies is fixed, whatever
    the timing of the others; where the death is seen first depends on the executor."""

    def __init__(self, inner: Any, index: int) -> None:
        self.inner, self.index = inner, index
        self.name = inner.name

    def run_items(self, model: Any, items: Any, factory: Callable[[Any], Callable[[Any], Any]]) -> Any:
        import functools
        import os

        dying = functools.partial(_dying_worker, factory=factory, index=self.index, caller=os.getpid())
        return self.inner.run_items(model, list(enumerate(items)), dying)


def _dying_worker(model: Any, factory: Callable[[Any], Callable[[Any], Any]], index: int, caller: int
                  ) -> Callable[[tuple[int, Any]], Any]:
    import os
    import signal

    if os.getpid() == caller:
        raise RuntimeError("DieOnItem would kill the calling process: wrap a process or Ray executor")
    worker = factory(model)

    def run(numbered: tuple[int, Any]) -> Any:
        i, item = numbered
        if i == index:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        return worker(item)

    return run
