"""Router adapters on a tiny model of every family: exact capture, working transforms, clean removal."""

from __future__ import annotations

import pytest
import torch

from expertscope.errors import ConfigError, ModelError
from expertscope.models.hooks import RouterHooks
from expertscope.models.model import MoEModel
from expertscope.testing import TINY_BUILDERS

FAMILIES = sorted(TINY_BUILDERS)

DTYPES = [torch.float32, torch.bfloat16]


def _ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, seq), generator=g)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _own_router_outputs(moe: MoEModel) -> tuple[dict[int, list], list]:
    """The routers' own outputs, read by a plain forward hook independent of expertscope."""
    seen: dict[int, list] = {s.layer: [] for s in moe.sites}
    handles = [
        s.module.register_forward_hook(lambda m, a, out, layer=s.layer: seen[layer].append(out)) for s in moe.sites
    ]
    return seen, handles


def _hook_free(moe: MoEModel) -> bool:
    return all(not s.module._forward_hooks and not s.module._forward_pre_hooks for s in moe.sites)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_is_exact_and_removable(family: str, dtype: torch.dtype, make_tiny) -> None:
    model = make_tiny(family, dtype)
    moe = MoEModel.from_model(model)
    assert all(s.verified for s in moe.sites)
    ids = _ids()
    clean = _logits(model, ids)

    seen, handles = _own_router_outputs(moe)
    try:
        with RouterHooks(moe, record=True) as hooks:
            hooked = _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    # (1) recording changes nothing, bit for bit
    assert torch.equal(clean, hooked)
    n_tokens = ids.numel()
    for site in moe.sites:
        (call,) = hooks.calls[site.layer]
        assert call.logits.dtype == torch.float32 and call.logits.shape == (n_tokens, site.num_experts)
        assert call.indices.shape == (n_tokens, site.top_k)
        out = seen[site.layer][0]
        if isinstance(out, tuple):
            # (2) the recorded selection is the router's own output (sets per token; some use sorted=False)
            own_idx = next(t for t in out if not t.is_floating_point() and t.shape[-1] == site.top_k)
            own_w = next(t for t in out if t.is_floating_point() and t.shape == own_idx.shape)
            assert torch.equal(call.indices, own_idx.reshape(-1, site.top_k).long())
            assert torch.equal(call.weights, own_w.reshape(-1, site.top_k).float())
            if out[0].is_floating_point() and out[0].shape[-1] == site.num_experts:
                assert torch.equal(call.logits, out[0].reshape(n_tokens, -1).float())
        else:  # a 4.x linear gate returns logits; the block routes them
            assert torch.equal(call.logits, out.float())
    # (4) everything removed, outputs identical again
    assert _hook_free(moe)
    assert torch.equal(clean, _logits(model, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_large_added_logit_selects_expert_everywhere(family: str, make_tiny) -> None:
    model = make_tiny(family)
    moe = MoEModel.from_model(model)
    ids = _ids(seed=2)
    clean = _logits(model, ids)
    site = moe.sites[-1]
    with RouterHooks(moe, record=True) as hooks:
        base = _logits(model, ids)
    target = int(torch.bincount(hooks.calls[site.layer][0].indices.flatten(), minlength=site.num_experts).argmin())

    def push(s, z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[:, target] += 50.0
        return z

    with RouterHooks(moe, transforms={site.layer: push}, record=True) as hooks:
        steered = _logits(model, ids)
    chosen = hooks.calls[site.layer][0].indices
    assert bool((chosen == target).any(-1).all()), "the pushed expert must be selected for every token"
    assert torch.equal(base, clean)
    assert not torch.equal(steered, clean)
    assert _hook_free(moe)
    assert torch.equal(clean, _logits(model, ids))


def test_linear_gate_selection_matches_experts_called(make_tiny) -> None:
    model = make_tiny("linear_gate_4x")
    moe = MoEModel.from_model(model)
    site = moe.sites[1]
    counts = torch.zeros(site.num_experts, dtype=torch.long)
    handles = [
        e.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + a[0].shape[0]))
        for i, e in enumerate(site.block.experts)
    ]
    try:
        with RouterHooks(moe, record=[site.layer]) as hooks:
            _logits(model, _ids())
    finally:
        for h in handles:
            h.remove()
    routed = torch.bincount(hooks.calls[site.layer][0].indices.flatten(), minlength=site.num_experts)
    assert torch.equal(routed, counts)


def test_hooks_removed_after_exception(make_tiny) -> None:
    model = make_tiny("mixtral")
    moe = MoEModel.from_model(model)

    def boom(site, z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), RouterHooks(moe, transforms={moe.layers[0]: boom}):
        _logits(model, _ids())
    assert _hook_free(moe)
    assert torch.equal(_logits(model, _ids()), _logits(model, _ids()))
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()


def test_dense_layers_excluded_and_shared_experts_reported(make_tiny) -> None:
    moe = MoEModel.from_model(make_tiny("deepseek_v3"))
    assert moe.layers == [1, 2]  # first_k_dense_replace=1
    assert all(s.num_shared == 1 for s in moe.sites)
    qwen = MoEModel.from_model(make_tiny("qwen2_moe"))
    assert all(s.num_shared == 1 for s in qwen.sites)  # shared_expert_gate is not a router
    assert all(s.path.endswith("mlp.gate") for s in qwen.sites)


def test_unknown_layer_is_a_config_error(make_tiny) -> None:
    moe = MoEModel.from_model(make_tiny("mixtral"))
    with pytest.raises(ConfigError, match="no MoE layer 7"):
        RouterHooks(moe, transforms={7: lambda s, z: z})


def test_dense_model_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ModelError, match="no MoE layers"):
        MoEModel.from_model(model)


def test_unadaptable_moe_refused_naming_supported() -> None:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, num_experts=4)
    with pytest.raises(ModelError, match=r"supported router families are .*mixtral"):
        MoEModel.from_model(SwitchTransformersForConditionalGeneration(cfg))


def test_self_check_catches_a_router_that_routes_differently(make_tiny) -> None:
    from expertscope.models.adapters.softmax_topk import MixtralAdapter
    from expertscope.models.model import verify_site

    moe = MoEModel.from_model(make_tiny("mixtral"))
    site = moe.sites[0]

    class Wrong(MixtralAdapter):
        def route(self, logits, top_k):
            return super().route(-logits, top_k)  # the least likely experts

    site.adapter = Wrong()
    with pytest.raises(ModelError, match="routing disagrees"):
        verify_site(site)
