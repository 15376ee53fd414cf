"""Mixture of experts: vectorised vs per-token-loop dispatch, and DeepSeekMoE vs a dense SwiGLU.

Layer: hidden 256, 16 routed experts of width 128, 4 per token, 1 shared expert, V3 router,
float32, 2048 tokens (batch 8 x 256). The dense FFN has the same active width, (4 + 1) x 128 =
640, so the same matmul FLOPs per token as the routed + shared experts (router excluded).
"""

from __future__ import annotations

import torch

from course_utils.kernels import median_seconds
from course_utils.layers import SwiGLU
from course_utils.moe import DeepSeekMoE, MoEConfig, dispatch_reference, dispatch_vectorized

_CONFIG = MoEConfig(
    hidden_size=256,
    moe_intermediate_size=128,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
)


@torch.no_grad()
def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    repeats = 3 if quick else 15
    layer = DeepSeekMoE(_CONFIG).eval()
    x = torch.randn(8, 256, _CONFIG.hidden_size)
    flat = x.reshape(-1, _CONFIG.hidden_size)
    n_tokens = flat.shape[0]
    routing = layer.gate(flat)
    loop_tokens = 64 if quick else 256

    def fast():
        dispatch_vectorized(flat, layer.experts, routing.indices, routing.weights)

    def loop():
        dispatch_reference(
            flat[:loop_tokens],
            layer.experts,
            routing.indices[:loop_tokens],
            routing.weights[:loop_tokens],
        )

    t_fast = median_seconds(fast, repeats) / n_tokens
    t_loop = median_seconds(loop, max(1, repeats // 5)) / loop_tokens
    active_width = (
        _CONFIG.num_experts_per_tok + _CONFIG.n_shared_experts
    ) * _CONFIG.moe_intermediate_size
    dense = SwiGLU(_CONFIG.hidden_size, active_width).eval()
    t_moe = median_seconds(lambda: layer(x), repeats) / n_tokens
    t_dense = median_seconds(lambda: dense(x), repeats) / n_tokens
    return [
        {
            "what": "routed dispatch, vectorised (sort + index_add)",
            "value": 1 / t_fast,
            "unit": "tok/s",
            "note": f"{n_tokens} tokens, loop over 16 experts",
        },
        {
            "what": "routed dispatch, per-token loop",
            "value": 1 / t_loop,
            "unit": "tok/s",
            "note": f"timed on {loop_tokens} tokens",
        },
        {"what": "dispatch speed-up, vectorised vs loop", "value": t_loop / t_fast, "unit": "x"},
        {
            "what": "DeepSeekMoE layer forward (router + 4 routed + 1 shared)",
            "value": 1 / t_moe,
            "unit": "tok/s",
        },
        {
            "what": f"dense SwiGLU forward, same active width {active_width}",
            "value": 1 / t_dense,
            "unit": "tok/s",
        },
        {
            "what": "time ratio, DeepSeekMoE / dense with equal active parameters",
            "value": t_moe / t_dense,
            "unit": "x",
            "note": "the price of sparsity on CPU",
        },
    ]
