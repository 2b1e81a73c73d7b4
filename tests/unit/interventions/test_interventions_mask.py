"""Ablation (``mode="mask"``) on every router family: the masked experts never appear in the router's own
selection, the token goes to its next choice, and nothing else changes where nothing was masked."""

from __future__ import annotations

import pytest
import torch

import expertscope as es
from expertscope.interventions import steer
from expertscope.models.model import MoEModel
from expertscope.testing import TINY_BUILDERS

FAMILIES = sorted(TINY_BUILDERS)


def _ids(seed: int = 4) -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def _selected(moe: MoEModel, ids: torch.Tensor, generate: bool = False) -> dict[int, torch.Tensor]:
    """The router's own indices per layer over every call (prompt and generated tokens)."""
    with es.RouterHooks(moe, record=True) as h, torch.no_grad():
        if generate:
            moe.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        else:
            moe.model(input_ids=ids)
    return {layer: torch.cat([c.indices for c in calls]) for layer, calls in h.calls.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_removes_the_experts_from_every_selection(family: str, make_tiny) -> None:
    moe = MoEModel.from_model(make_tiny(family, initializer_range=0.3))
    ids = _ids()
    clean = _selected(moe, ids)
    # Mask at every MoE layer the expert selected most often (so the mask has something to remove), and a
    # second one where the layer has room (E - masked >= k).
    targets = []
    for layer, idx in clean.items():
        site = moe.site(layer)
        counts = torch.bincount(idx.flatten(), minlength=site.num_experts)
        order = counts.argsort(descending=True).tolist()
        n = min(2, site.num_experts - site.top_k)
        targets += [(layer, e) for e in order[:n]]
    with steer(moe, targets, mode="mask") as s:
        masked = _selected(moe, ids)
        generated = _selected(moe, ids[:1], generate=True)
    for sel in (masked, generated):
        for layer, idx in sel.items():
            banned = [e for (lay, e) in targets if lay == layer]
            assert not torch.isin(idx, torch.tensor(banned)).any(), (family, layer, banned)
            # k distinct experts are still selected (the next choices).
            assert idx.shape[1] == moe.site(layer).top_k
            assert (idx.sort(-1).values.diff(dim=-1) != 0).all()
    assert s.total_changed > 0  # the most used experts were removed: selections changed
    # Unmasked: bit-identical again.
    after = _selected(moe, ids)
    assert all(torch.equal(after[k], clean[k]) for k in clean)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_mask_is_the_next_choice(family: str, make_tiny) -> None:
    """Masking expert e gives the family's routing of the logits with e removed (by hand for DeepSeek-V3's
    grouped choice); on ungrouped routers each token keeps its unmasked experts and takes the next best."""
    moe = MoEModel.from_model(make_tiny(family, initializer_range=0.3))
    ids = _ids(7)
    layer = moe.layers[-1]
    site = moe.site(layer)
    with es.RouterHooks(moe, record=[layer]) as h, torch.no_grad():
        moe.model(input_ids=ids)
    call = h.calls[layer][0]
    e = int(torch.bincount(call.indices.flatten(), minlength=site.num_experts).argmax())
    with steer(moe, [(layer, e)], mode="mask"), es.RouterHooks(moe, record=[layer]) as h2, torch.no_grad():
        moe.model(input_ids=ids)
    # The layer's input is unchanged by a mask at this (last) layer, so the logits are the clean ones.
    z = h.calls[layer][0].logits.clone()
    z[:, e] = float("-inf")
    want, _ = site.adapter.site_route(site, z) if family != "deepseek_v3" else _v3_masked(site, z, e)
    got = h2.calls[layer][0].indices
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    if family != "deepseek_v3":  # grouped routing may move a token to another group: nothing is "kept" there
        kept = [set(a.tolist()) - {e} for a in call.indices]
        assert all(k <= set(g.tolist()) for k, g in zip(kept, got, strict=True))


def _v3_masked(site, z: torch.Tensor, e: int):
    """DeepSeek-V3's routing with expert e's choice score at -inf (by hand, from the router's attributes)."""
    m = site.module
    scores = z.float().sigmoid()
    choice = scores + m.e_score_correction_bias.float()
    choice[:, e] = float("-inf")
    n, E = scores.shape
    g = choice.view(n, m.num_group, E // m.num_group).topk(2, dim=-1)[0].sum(-1)
    gi = torch.topk(g, k=m.topk_group, dim=-1)[1]
    gm = torch.zeros_like(g).scatter_(1, gi, 1).unsqueeze(-1).expand(n, m.num_group, E // m.num_group).reshape(n, E)
    choice = choice.masked_fill(~gm.bool(), float("-inf"))
    return torch.topk(choice, k=site.top_k, dim=-1)[1], None


def test_mask_reaches_deepseek_v3_choice_scores(make_tiny) -> None:
    """A -inf logit alone leaves DeepSeek-V3's choice score at its correction bias: with a large bias the
    expert would still be chosen. The mask sets the choice score itself to -inf."""
    model = make_tiny("deepseek_v3", initializer_range=0.3)
    moe = MoEModel.from_model(model)
    layer = moe.layers[-1]
    bias = moe.site(layer).module.e_score_correction_bias
    saved = bias.clone()
    try:
        bias.zero_()
        bias[3] = 10.0  # expert 3 wins every choice unless the mask reaches the choice score
        ids = _ids()
        assert bool((_selected(moe, ids)[layer] == 3).any(-1).all())
        with steer(moe, [(layer, 3)], mode="mask"):
            assert not bool((_selected(moe, ids)[layer] == 3).any())
    finally:
        bias.copy_(saved)


def test_mask_refuses_to_leave_fewer_than_top_k(make_tiny) -> None:
    moe = MoEModel.from_model(make_tiny("mixtral"))
    with pytest.raises(es.ConfigError, match="leaves fewer than its top-2"), steer(moe, [(0, 0), (0, 1), (0, 2)],
                                                                                   mode="mask"):
        pass


def test_mask_spec_round_trips(tmp_path) -> None:
    from expertscope.interventions import SteeringSpec

    spec = SteeringSpec(targets=((0, 1),), mode="mask")
    spec.save(tmp_path / "m.json")
    assert SteeringSpec.load(tmp_path / "m.json") == spec
