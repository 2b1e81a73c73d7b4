"""Big-model loading: capture and steering stay exact under accelerate's device map with disk offload;
paths that bypass the router's forward are refused."""

from __future__ import annotations

import json

import pytest
import torch

import expertscope as es
from expertscope.testing import tiny_model, tiny_tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_disk_offload_gives_the_same_numbers(family: str, tmp_path) -> None:
    d = tmp_path / "m"
    tiny_model(family, initializer_range=0.3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    ref = es.load_model(str(d), dtype="float32")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    big = es.load_model(str(d), dtype="float32", device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert all(s.verified for s in big.sites)
    assert any(p.device.type == "meta" for p in big.model.parameters())  # really offloaded
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with es.RouterHooks(ref, record=True) as h1, torch.no_grad():
        a = ref.model(input_ids=ids).logits
    with es.RouterHooks(big, record=True) as h2, torch.no_grad():
        b = big.model(input_ids=ids).logits
    assert torch.equal(a, b)
    for layer in ref.layers:
        assert torch.equal(h1.calls[layer][0].logits, h2.calls[layer][0].logits)
        assert torch.equal(h1.calls[layer][0].indices, h2.calls[layer][0].indices)
    targets = [(1, 0), (2, 3)]
    with es.steer(ref, targets, scale=3.0) as s1, torch.no_grad():
        a = ref.model(input_ids=ids).logits
    with es.steer(big, targets, scale=3.0) as s2, torch.no_grad():
        b = big.model(input_ids=ids).logits
    assert torch.equal(a, b) and s1.changed == s2.changed
    pa = es.profile(ref, {"x": ["abc def", "ghi"], "y": ["123"]})
    pb = es.profile(big, {"x": ["abc def", "ghi"], "y": ["123"]})
    assert (pa.totals()[1]["sel"] == pb.totals()[1]["sel"]).all()


def test_mxfp4_and_kernels_are_refused(tmp_path) -> None:
    d = tmp_path / "g"
    tiny_model("gpt_oss").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    with pytest.raises(es.ModelError, match="bypass the router"):
        es.load_model(str(d), use_kernels=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(es.ModelError, match="MXFP4"):
        es.load_model(str(d))
