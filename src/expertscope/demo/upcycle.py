"""Fine-grained upcycling: a Mixtral model becomes a DeepSeek-MoE-like Qwen2-MoE model with the same function.

Each of the Mixtral model's ``E`` experts (SwiGLU, intermediate size ``I``) is cut into ``split`` experts of
intermediate size ``I / split`` along its hidden units ("expert segmentation", as in DeepSeekMoE), and each
piece gets a copy of its parent's router row. With ``top_k * split`` experts selected, the pieces of the same
parents are selected together; a SwiGLU expert's output is a sum over its hidden units, so the pieces add
up to the parent. The renormalised top-k weights give each piece ``1/split`` of its parent's weight, so each
piece's output projection is scaled by ``split``: the new model computes the same function. A shared expert
(always on, behind a sigmoid gate) is added with a zero output projection, so it starts silent and is
learned in the fine-tune that follows. Attention, norms, embeddings and the LM head are copied (Qwen2-MoE's
q/k/v biases start at zero). Qwen1.5-MoE was upcycled from a dense model in the same spirit.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError


def upcycle_mixtral(model: Any, split: int = 2, shared_intermediate_size: int = 256,
                    router_aux_loss_coef: float = 0.001) -> Any:
    """A ``Qwen2MoeForCausalLM`` computing the same function as the ``MixtralForCausalLM`` ``model``.

    Routed experts: ``E * split`` of intermediate size ``I / split``, ``top_k * split`` selected per token;
    one shared expert of ``shared_intermediate_size`` with a zero ``down_proj``. Weights are copied (fp32).
    """
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    mc = model.config
    if mc.model_type != "mixtral":
        raise ConfigError(f"upcycling needs a Mixtral model, got {mc.model_type!r}: pass the Mixtral demo")
    if mc.intermediate_size % split:
        raise ConfigError(f"intermediate size {mc.intermediate_size} is not divisible by split {split}")
    inter = mc.intermediate_size // split
    rope = dict(getattr(mc, "rope_parameters", None) or {"rope_theta": 1e6, "rope_type": "default"})
    config = Qwen2MoeConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        moe_intermediate_size=inter,
        shared_expert_intermediate_size=shared_intermediate_size,
        num_hidden_layers=mc.num_hidden_layers,
        num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads,
        num_experts=mc.num_local_experts * split,
        num_experts_per_tok=mc.num_experts_per_tok * split,
        norm_topk_prob=True,  # Mixtral renormalises its top-k weights
        decoder_sparse_step=1,
        max_position_embeddings=mc.max_position_embeddings,
        rms_norm_eps=mc.rms_norm_eps,
        rope_parameters=rope,
        use_sliding_window=False,
        router_aux_loss_coef=router_aux_loss_coef,
        output_router_logits=False,
        tie_word_embeddings=False,
        pad_token_id=mc.pad_token_id,
        bos_token_id=mc.bos_token_id,
        eos_token_id=mc.eos_token_id,
    )
    new = Qwen2MoeForCausalLM(config).float()
    src = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in new.state_dict().items():
        if ".mlp." not in name:
            if name.endswith("_proj.bias"):
                out[name] = torch.zeros_like(tensor)
            else:
                out[name] = src[name].clone()
            continue
        prefix = name.split(".mlp.")[0] + ".mlp."
        if name.endswith("mlp.gate.weight"):
            out[name] = src[prefix + "gate.weight"].repeat_interleave(split, dim=0)  # (E*split, H)
        elif name.endswith("experts.gate_up_proj"):
            gu = src[prefix + "experts.gate_up_proj"]  # (E, 2I, H): gate rows, then up rows
            gate, up = gu[:, : mc.intermediate_size], gu[:, mc.intermediate_size :]
            pieces = [torch.cat([gate[:, j * inter : (j + 1) * inter], up[:, j * inter : (j + 1) * inter]], 1)
                      for j in range(split)]
            out[name] = torch.stack(pieces, 1).reshape(-1, 2 * inter, mc.hidden_size)
        elif name.endswith("experts.down_proj"):
            down = src[prefix + "experts.down_proj"]  # (E, H, I)
            # Renormalised over top_k * split experts, each piece gets 1/split of its parent's weight; scaling
            # its output projection by split restores the parent's weight.
            pieces = [down[:, :, j * inter : (j + 1) * inter] * split for j in range(split)]
            out[name] = torch.stack(pieces, 1).reshape(-1, mc.hidden_size, inter)
        elif name.endswith("shared_expert.down_proj.weight"):
            out[name] = torch.zeros_like(tensor)  # the shared expert starts silent
        else:
            out[name] = tensor.clone()  # the shared expert's gate/up and gate projections: fresh init
    new.load_state_dict(out)
    new.eval()
    return new
