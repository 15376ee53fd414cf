"""course_utils.moe vs transformers DeepseekV2/V3 MoE, plus routing and balancing properties."""

from __future__ import annotations

import pytest
import torch
from fake_models import tiny_moe_deepseek
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils import moe
from course_utils.moe import (
    AuxLossFreeBalancer,
    DeepSeekMoE,
    DeepSeekV2Router,
    DeepSeekV3Router,
    MoEConfig,
)

torch.set_num_threads(1)


# -- transformers references ----------------------------------------------------------------


def _hf_config(version: int, **moe_keys):
    if version == 3:
        from transformers import DeepseekV3Config as Config
    else:
        from transformers import DeepseekV2Config as Config
    base = dict(
        vocab_size=32,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
        hidden_act="silu",
    )
    return Config(**base, **moe_keys)


def _hf_moe(version: int, seed: int, **moe_keys):
    """A transformers MoE block with random weights (its own init leaves them empty/zero)."""
    cfg = _hf_config(version, **moe_keys)
    if version == 3:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as MoE
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as MoE
    g = torch.Generator().manual_seed(seed)
    block = MoE(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if version == 3:
            bias = block.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=g) * 0.1)
    return cfg, block


V3_CASES = [
    dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        moe_intermediate_size=16,
    ),
    dict(
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_shared_experts=2,
        moe_intermediate_size=12,
    ),
    dict(
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        moe_intermediate_size=8,
    ),
    dict(
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=3,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        n_shared_experts=1,
        moe_intermediate_size=8,
    ),
]

V2_CASES = [
    dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        routed_scaling_factor=1.0,
        n_shared_experts=2,
        moe_intermediate_size=16,
    ),
    dict(
        n_routed_experts=8,
        num_experts_per_tok=3,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=2,
        routed_scaling_factor=16.0,
        n_shared_experts=1,
        moe_intermediate_size=8,
    ),
    dict(
        n_routed_experts=16,
        num_experts_per_tok=3,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        n_shared_experts=1,
        moe_intermediate_size=8,
    ),
]


def _ours_from_hf(cfg, block, scoring_func: str) -> DeepSeekMoE:
    extra = {}  # V2: scoring_func="softmax" follows from transformers' topk_method
    if scoring_func == "sigmoid":
        extra["topk_method"] = "noaux_tc"
    else:
        extra["norm_topk_prob"] = False  # transformers' V2 router never renormalises
    ours = DeepSeekMoE(MoEConfig.from_dict(cfg.to_dict(), **extra)).eval()
    moe.load_fused_experts(ours, block.state_dict())
    return ours


def _hf_choice(block, x):
    _, weights, indices = block.gate(x)
    order = indices.argsort(dim=-1)
    return indices.gather(1, order), weights.gather(1, order)


def _sorted_choice(r: moe.Routing):
    order = r.indices.argsort(dim=-1)
    return r.indices.gather(1, order), r.weights.gather(1, order)


def _check_equal(cfg, block, scoring_func, seed):
    ours = _ours_from_hf(cfg, block, scoring_func)
    x = torch.randn(3, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        want = block(x)
        got = ours(x)
        hf_idx, hf_w = _hf_choice(block, x)
    our_idx, our_w = _sorted_choice(ours.last_routing)
    assert torch.equal(our_idx, hf_idx)
    torch.testing.assert_close(our_w, hf_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(len(V3_CASES)))
def test_v3_moe_equals_transformers(case):
    cfg, block = _hf_moe(3, case, **V3_CASES[case])
    assert block.gate.e_score_correction_bias.abs().sum() > 0
    _check_equal(cfg, block, "sigmoid", case)


@pytest.mark.parametrize("case", range(len(V2_CASES)))
def test_v2_moe_equals_transformers(case):
    cfg, block = _hf_moe(2, 10 + case, **V2_CASES[case])
    _check_equal(cfg, block, "softmax", case)


def test_v3_bias_changes_choice_like_transformers():
    """A large bias on one expert must pull it into every token's choice, in both codes."""
    cfg, block = _hf_moe(3, 5, **V3_CASES[0])
    with torch.no_grad():
        block.gate.e_score_correction_bias.zero_()
        block.gate.e_score_correction_bias[5] = 10.0
    ours = _ours_from_hf(cfg, block, "sigmoid")
    x = torch.randn(20, cfg.hidden_size)
    with torch.no_grad():
        r = ours.gate(x)
        hf_idx, _ = _hf_choice(block, x)
    assert (r.indices == 5).any(dim=-1).all()
    assert torch.equal(_sorted_choice(r)[0], hf_idx)


def test_hf_checkpoint_names_match():
    ours = DeepSeekMoE(MoEConfig(n_routed_experts=4, num_experts_per_tok=2))
    names = set(ours.state_dict())
    assert "gate.e_score_correction_bias" in names
    assert ours.gate.e_score_correction_bias.dtype == torch.float32
    assert {"gate.weight", "experts.3.down_proj.weight", "shared_experts.up_proj.weight"} <= names


# -- config errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, word",
    [
        (dict(n_routed_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(n_routed_experts=6, n_group=4, topk_group=1, num_experts_per_tok=1), "n_group"),
        (dict(n_routed_experts=8, n_group=2, topk_group=3), "topk_group"),
        (dict(n_routed_experts=4, n_group=4, topk_group=2, num_experts_per_tok=1), "at least 2"),
        (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),
        (dict(scoring_func="softmax", topk_method="noaux_tc"), "topk_method"),
        (dict(scoring_func="relu"), "scoring_func"),
    ],
)
def test_config_errors(bad, word):
    with pytest.raises(ValueError, match=word):
        MoEConfig(**bad)


def test_config_from_dict_ignores_unrelated_keys():
    c = MoEConfig.from_dict(
        {
            "hidden_size": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 1,
            "vocab_size": 99,
            "kv_lora_rank": 8,
            "n_group": None,
            "topk_group": None,
        }
    )
    assert (c.hidden_size, c.n_group, c.topk_group) == (16, 1, 1)
    v2 = MoEConfig.from_dict({"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1})
    assert v2.scoring_func == "softmax"


def test_v2_norm_topk_prob_renormalises():
    c = MoEConfig(
        hidden_size=8,
        n_routed_experts=6,
        num_experts_per_tok=2,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=True,
        routed_scaling_factor=2.0,
    )
    r = DeepSeekV2Router(c)(torch.randn(10, 8))
    torch.testing.assert_close(r.weights.sum(-1), torch.full((10,), 2.0))


# -- properties -----------------------------------------------------------------------------

_group_layouts = st.sampled_from(
    [(8, 1, 1), (8, 2, 1), (8, 4, 2), (12, 3, 2), (16, 4, 3), (16, 8, 4)]
)


@settings(max_examples=25, deadline=None)
@given(
    layout=_group_layouts, k_frac=st.floats(0.0, 1.0), seed=st.integers(0, 10_000), v3=st.booleans()
)
def test_exactly_k_experts_inside_chosen_groups(layout, k_frac, seed, v3):
    e, g, tg = layout
    per = e // g
    k = 1 + int(k_frac * (tg * per - 1))
    common = dict(
        hidden_size=8, n_routed_experts=e, num_experts_per_tok=k, n_group=g, topk_group=tg
    )
    torch.manual_seed(seed)
    if v3:
        router = DeepSeekV3Router(MoEConfig(**common))
        router.e_score_correction_bias.normal_(std=0.2)
    else:
        method = "greedy" if g == 1 else "group_limited_greedy"
        router = DeepSeekV2Router(MoEConfig(**common, scoring_func="softmax", topk_method=method))
    r = router(torch.randn(32, 8))
    assert r.indices.shape == (32, k)
    assert all(len(set(row.tolist())) == k for row in r.indices)  # k distinct experts
    groups_used = r.indices // per
    assert all(len(set(row.tolist())) <= tg for row in groups_used)  # only topk_group groups
    if g > 1:  # and those are the groups with the best group scores
        s = r.scores if not v3 else r.scores + router.e_score_correction_bias
        grouped = s.view(32, g, per)
        gs = grouped.amax(-1) if not v3 else grouped.topk(2, dim=-1).values.sum(-1)
        best = gs.topk(tg, dim=-1).indices
        for row_groups, row_best in zip(groups_used, best, strict=True):
            assert set(row_groups.tolist()) <= set(row_best.tolist())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), norm=st.booleans(), scale=st.floats(0.5, 3.0))
def test_bias_changes_choice_not_weights(seed, norm, scale):
    torch.manual_seed(seed)
    c = MoEConfig(
        hidden_size=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=2,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    router = DeepSeekV3Router(c)
    x = torch.randn(64, 8)
    before = router(x)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.linspace(-1.0, 1.0, 8))
    after = router(x)
    assert not torch.equal(before.indices.sort(-1).values, after.indices.sort(-1).values)
    torch.testing.assert_close(after.scores, before.scores)  # scores ignore the bias
    # the weights of whatever was chosen come from the unbiased scores only
    w = after.scores.gather(1, after.indices)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(after.weights, w * scale)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    e=st.sampled_from([4, 8]),
    k=st.integers(1, 3),
    tokens=st.integers(1, 12),
    shared=st.integers(0, 2),
)
def test_vectorized_dispatch_equals_reference(seed, e, k, tokens, shared):
    torch.manual_seed(seed)
    c = MoEConfig(
        hidden_size=8,
        moe_intermediate_size=6,
        n_routed_experts=e,
        num_experts_per_tok=k,
        n_shared_experts=shared,
    )
    layer = DeepSeekMoE(c)
    x = torch.randn(1, tokens, 8)
    fast = layer(x)
    layer.dispatch = "reference"
    slow = layer(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_vectorized_dispatch_gradients_match_reference():
    torch.manual_seed(0)
    layer = DeepSeekMoE(MoEConfig(hidden_size=8, moe_intermediate_size=6, n_routed_experts=4))
    x = torch.randn(2, 5, 8)
    grads = []
    for mode in ("vectorized", "reference"):
        layer.zero_grad()
        layer.dispatch = mode
        layer(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in layer.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# -- balancing ------------------------------------------------------------------------------


def test_bias_update_moves_load_toward_uniform():
    """A skewed token stream: the router favours experts 0-1; the bias rule must even it out."""
    torch.manual_seed(0)
    c = MoEConfig(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, bias_update_speed=0.01)
    layer = DeepSeekMoE(c).train()
    d = torch.randn(16)
    d = d / d.norm()
    with torch.no_grad():  # expert 0 favoured most by the stream's mean direction, 7 least
        layer.gate.weight += torch.linspace(1.0, -1.0, 8)[:, None] * d
    balancer = AuxLossFreeBalancer(layer)
    imbalance = []
    for _ in range(150):
        x = torch.randn(8, 32, 16) + 2.0 * d
        with torch.no_grad():
            layer(x)
        imbalance.append(moe.load_statistics(layer.last_routing.indices, 8).max_over_mean)
        balancer.step()
    start, end = sum(imbalance[:5]) / 5, sum(imbalance[-20:]) / 20
    assert start > 2.5, start
    assert end < 1.4, end
    bias = layer.gate.e_score_correction_bias
    assert bias[:2].max() < bias[3:].min()  # overloaded experts were pushed down
    assert not bias.requires_grad


def test_bias_update_rule_and_dtype():
    b = torch.zeros(4)
    moe.update_correction_bias(b, torch.tensor([10.0, 2.0, 2.0, 2.0]), 0.001)
    torch.testing.assert_close(b, torch.tensor([-0.001, 0.001, 0.001, 0.001]))
    with pytest.raises(ValueError, match="float32"):
        moe.update_correction_bias(torch.zeros(4, dtype=torch.bfloat16), torch.ones(4), 0.1)


def test_balancer_needs_v3_router():
    v2 = DeepSeekMoE(MoEConfig(scoring_func="softmax", topk_method="greedy"))
    with pytest.raises(ValueError, match="sigmoid"):
        AuxLossFreeBalancer(v2)


def _onehot_scores(indices, e):
    return torch.nn.functional.one_hot(indices[..., 0], e).float()


def test_balance_losses_on_known_loads():
    e = 4
    uniform_idx = torch.arange(8).remainder(e)[:, None]
    uniform_scores = torch.full((8, e), 1 / e)
    assert moe.expert_balance_loss(uniform_scores, uniform_idx).item() == pytest.approx(1.0)
    assert moe.switch_aux_loss(uniform_scores, uniform_idx).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 1, dtype=torch.long)
    # everyone picks expert 0 with probability 1: f_0 = E, P_0 = 1 -> loss E
    assert moe.expert_balance_loss(_onehot_scores(collapsed, e), collapsed).item() == pytest.approx(
        e
    )
    # two devices of two experts: all load on device 0 -> f'_0 = 2 (mean of 4, 0), P'_0 = 1
    assert moe.device_balance_loss(
        _onehot_scores(collapsed, e), collapsed, 2
    ).item() == pytest.approx(2.0)
    assert moe.device_balance_loss(uniform_scores, uniform_idx, 2).item() == pytest.approx(1.0)
    # communication: every token goes to device 0 -> f''_0 = D/M = 2, P''_0 = 1
    assert moe.communication_balance_loss(
        _onehot_scores(collapsed, e), collapsed, 2, 1
    ).item() == pytest.approx(2.0)
    assert moe.communication_balance_loss(
        uniform_scores, uniform_idx, 2, 1
    ).item() == pytest.approx(1.0)


def test_sequence_loss_sees_per_sequence_imbalance():
    """Two sequences each using only one expert are balanced over the batch, not per sequence."""
    idx = torch.tensor([[[0], [0]], [[1], [1]]])
    scores = torch.tensor([[[0.9, 0.1], [0.9, 0.1]], [[0.1, 0.9], [0.1, 0.9]]])
    batch = moe.expert_balance_loss(scores.reshape(-1, 2), idx.reshape(-1, 1)).item()
    seq = moe.sequence_balance_loss(scores, idx).item()
    assert batch == pytest.approx(1.0)
    assert seq == pytest.approx(2 * 0.9)
    # the gradient flows through the scores
    s = scores.clone().requires_grad_()
    moe.sequence_balance_loss(s, idx).backward()
    assert s.grad.abs().sum() > 0


def test_load_statistics():
    stats = moe.load_statistics(torch.tensor([[0, 1], [0, 2], [0, 3]]), 4)
    torch.testing.assert_close(stats.counts, torch.tensor([3.0, 1.0, 1.0, 1.0]))
    assert stats.max_over_mean == pytest.approx(2.0)
    assert stats.min_over_mean == pytest.approx(2 / 3)


def test_topk_router_noise_only_in_training():
    torch.manual_seed(0)
    r = moe.TopKRouter(8, 6, 2, noise_std=1.0)
    x = torch.randn(50, 8)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights.sum(-1), torch.ones(50))
    r.train()
    assert not torch.equal(r(x).indices, a.indices)
    with pytest.raises(ValueError, match="top_k"):
        moe.TopKRouter(8, 4, 5)


def test_total_and_active_parameters():
    c = MoEConfig(
        hidden_size=10,
        moe_intermediate_size=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
    )
    layer = DeepSeekMoE(c)
    total, active = moe.total_and_active_parameters(layer)
    assert total == sum(p.numel() for p in layer.parameters())
    assert active == 80 + 120 + 2 * 120


# -- the balancing study (notebook 18) ------------------------------------------------------


class _CausalMeanLM(torch.nn.Module):
    """TEMPORARY stand-in for the course decoder (not available to this test yet): token mixing
    is a causal mean over previous tokens, then a DeepSeekMoE feed-forward."""

    def __init__(self, vocab_size: int, config: MoEConfig, max_len: int = 64):
        super().__init__()
        h = config.hidden_size
        self.embed = torch.nn.Embedding(vocab_size, h)
        self.pos = torch.nn.Embedding(max_len, h)
        self.mix = torch.nn.Linear(h, h, bias=False)
        self.moe = DeepSeekMoE(config)
        self.head = torch.nn.Linear(h, vocab_size, bias=False)

    def forward(self, ids):
        s = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(s))
        x = x + self.mix(x.cumsum(1) / torch.arange(1, s + 1)[:, None])
        return self.head(x + self.moe(x))


def test_balancing_study_runs_every_arm_at_equal_budget():
    from course_utils import moe_training as mt

    cfg = MoEConfig(
        hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2
    )
    runs = mt.run_balancing_study(
        lambda v: _CausalMeanLM(v, cfg),
        steps=25,
        batch_size=8,
        aux_alphas=(0.01, 1.0),
        n_train_lines=300,
        n_eval_problems=8,
        lr=1e-2,
        gamma=0.01,
        progress=False,
    )
    assert list(runs) == ["none", "switch α=0.01", "switch α=1", "bias", "bias+seq"]
    assert [(r.method, r.alpha) for r in runs.values()][1:3] == [("switch", 0.01), ("switch", 1.0)]
    for name, run in runs.items():
        assert run.loads.shape == (25, 1, 4)
        torch.testing.assert_close(run.loads.sum(-1), torch.ones(25, 1))
        assert sum(run.losses[-5:]) < sum(run.losses[:5]), name  # it learns
        assert 0.0 <= run.accuracy <= 1.0 and run.eval_loss > 0
        moved = run.biases[-1].abs().sum().item()
        assert (moved > 0) == name.startswith("bias"), name
    # same seed, same init and batches: the first step's loss is identical in every run
    first = {round(r.losses[0], 5) for r in runs.values()}
    assert len(first) == 1
    # a weight-1 Switch loss balances the router harder than a weight-0.01 one
    assert runs["switch α=1"].max_over_mean()[-5:].mean() < runs["none"].max_over_mean()[-5:].mean()
    rows = mt.summarize(runs, last=5)
    assert [r["method"] for r in rows] == list(runs)
    with pytest.raises(ValueError, match="method"):
        mt.run_balancing_study(lambda v: _CausalMeanLM(v, cfg), methods=["magic"])
    with pytest.raises(ValueError, match="aux_alphas"):
        mt.run_balancing_study(lambda v: _CausalMeanLM(v, cfg), aux_alphas=(0.0,))
    with pytest.raises(ValueError, match="batch_size"):
        mt.run_balancing_study(lambda v: _CausalMeanLM(v, cfg), batch_size=400, n_train_lines=300)
    with pytest.raises(ValueError, match="steps"):
        mt.run_balancing_study(lambda v: _CausalMeanLM(v, cfg), steps=0)


def test_summary_over_seeds_gives_each_figure_its_spread():
    from course_utils import moe_training as mt

    def run(seed, acc):
        r = mt.BalancingRun(
            "bias",
            seed=seed,
            losses=[1.0, 0.5],
            eval_loss=0.4 + seed,
            accuracy=acc,
            loads=torch.full((2, 1, 4), 0.25),
        )
        return {"bias": r}

    table = mt.summarize_over_seeds({0: run(0, 0.5), 1: run(1, 0.7), 2: run(2, 0.9)}, last=2)
    acc = table["bias"]["accuracy"]
    assert acc.values == (0.5, 0.7, 0.9) and acc.min == 0.5 and acc.max == 0.9
    assert acc.mean == pytest.approx(0.7)
    assert table["bias"]["eval_loss"].values == (0.4, 1.4, 2.4)
    assert table["bias"]["max_over_mean"].mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same arms"):
        mt.summarize_over_seeds({0: run(0, 0.5), 1: {}})
    with pytest.raises(ValueError, match="empty"):
        mt.summarize_over_seeds({})


def test_greedy_accuracy_of_a_model_that_only_stops_is_zero():
    from course_utils import moe_training as mt
    from course_utils.data import sample_arithmetic_problems
    from course_utils.tokenizer import CharTokenizer

    tok = CharTokenizer()

    class Stopper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            logits = torch.zeros(*ids.shape, tok.vocab_size)
            logits[..., tok.encode("\n")[0]] = 1.0
            return logits

    class Oracle(Stopper):
        """Reads the prompt and writes the right direct answer."""

        def __init__(self, problems):
            super().__init__()
            self.answers = {p.prompt: p.direct_answer for p in problems}

        def forward(self, ids):
            logits = torch.zeros(*ids.shape, tok.vocab_size)
            for b, row in enumerate(ids.tolist()):
                text = tok.decode(row)
                prompt = text[: text.index("=") + 1]
                written = text[len(prompt) :]
                nxt = self.answers[prompt][len(written)]
                logits[b, -1, tok.encode(nxt)[0]] = 1.0
            return logits

    problems = sample_arithmetic_problems(6, seed=3, split="test")
    assert mt.greedy_accuracy(Stopper(), tok, problems) == 0.0
    assert mt.greedy_accuracy(Oracle(problems), tok, problems) == 1.0


def test_transformers_v2_ignores_norm_topk_prob():
    """A transformers quirk we rely on in the comparison: its V2 router never renormalises, so
    with norm_topk_prob=True it still equals ours with renormalisation off."""
    case = dict(V2_CASES[0], norm_topk_prob=True)
    cfg, block = _hf_moe(2, 21, **case)
    _check_equal(cfg, block, "softmax", 21)


def test_layer_input_and_dispatch_errors():
    with pytest.raises(ValueError, match="dispatch"):
        DeepSeekMoE(MoEConfig(), dispatch="fast")
    layer = DeepSeekMoE(MoEConfig(hidden_size=8, moe_intermediate_size=4))
    with pytest.raises(ValueError, match="batch, seq"):
        layer(torch.randn(5, 8))


def test_deepcopy_after_training_forward():
    """A model copied right after a training forward (GRPO's frozen reference, a teacher) must
    not carry the routing of that forward, whose tensors are still part of the autograd graph."""
    import copy

    layer = DeepSeekMoE(
        MoEConfig(
            hidden_size=8,
            moe_intermediate_size=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
        )
    )
    layer.train()
    out = layer(torch.randn(2, 3, 8))
    assert layer.last_routing is not None and layer.last_routing.scores.requires_grad
    clone = copy.deepcopy(layer)
    assert clone.last_routing is None and clone.last_counts is None
    assert layer.last_routing is not None  # the original keeps it (aux losses read it)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    out.sum().backward()


# -- keep routing (DeepSeek-V3.2) -----------------------------------------------------------


def _tiny_moe_model(seed: int = 0):
    return tiny_moe_deepseek(seed, num_hidden_layers=3, first_k_dense_replace=1).eval()


def _perturb_routers(model, scale: float = 2.0, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in moe.moe_modules(model):
            m.gate.weight.add_(scale * torch.randn(m.gate.weight.shape, generator=g))


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_replayed_routing_equals_forcing_experts_by_hand(scoring_func):
    """Under replay_routing the layer uses the recorded experts, weighted by the router's
    *current* scores of them: equal to the per-token reference dispatch with those choices."""
    extra = {} if scoring_func == "sigmoid" else {"topk_method": "greedy"}
    c = MoEConfig(
        hidden_size=8,
        moe_intermediate_size=6,
        n_routed_experts=6,
        num_experts_per_tok=2,
        scoring_func=scoring_func,
        **extra,
    )
    torch.manual_seed(0)
    layer = DeepSeekMoE(c).eval()
    x = torch.randn(2, 5, 8)
    layer(x)
    kept = {"": layer.last_routing.indices.clone()}
    with torch.no_grad():
        layer.gate.weight.add_(3 * torch.randn_like(layer.gate.weight))
    free = layer(x)
    assert moe.routing_changed(kept, {"": layer.last_routing.indices}) > 0  # the choice moved
    with moe.replay_routing(layer, kept):
        replayed = layer(x)
    assert torch.equal(layer.last_routing.indices, kept[""])
    flat = x.reshape(-1, 8)
    scores = moe._router_logits(flat, layer.gate.weight)
    scores = scores.sigmoid() if scoring_func == "sigmoid" else scores.softmax(-1)
    w = scores.gather(1, kept[""])
    w = w / w.sum(-1, keepdim=True) * c.routed_scaling_factor
    by_hand = moe.dispatch_reference(flat, layer.experts, kept[""], w).view_as(x)
    by_hand = by_hand + layer.shared_experts(x)
    torch.testing.assert_close(replayed, by_hand)
    assert not torch.allclose(replayed, free)
    assert layer.forced_indices is None  # the context restores free routing


def test_replay_reproduces_the_recorded_forward_after_the_router_moved():
    model = _tiny_moe_model()
    ids = torch.randint(0, 16, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    kept = moe.recorded_routing(model)
    assert sorted(kept) == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert kept["model.layers.1.mlp"].shape == (36, 2)
    with torch.no_grad(), moe.replay_routing(model, kept):
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # same params: identical
    _perturb_routers(model)
    with torch.no_grad():
        moved = model(ids)
    changed = moe.routing_changed(kept, moe.recorded_routing(model))
    assert changed > 0.2
    with torch.no_grad(), moe.replay_routing(model, kept):
        replayed = model(ids)
    assert moe.routing_changed(kept, moe.recorded_routing(model)) == 0.0
    # the replayed output differs from `before` only through the gate weights, much less than
    # the freely routed one does
    assert (replayed - before).abs().max() < (moved - before).abs().max()


def test_replay_keeps_the_router_gradient():
    model = _tiny_moe_model().train()
    ids = torch.randint(0, 16, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    kept = moe.recorded_routing(model)
    with moe.replay_routing(model, kept):
        model(ids).logsumexp(-1).sum().backward()
    for m in moe.moe_modules(model):
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0


def test_replay_routing_refuses_bad_input():
    model = _tiny_moe_model()
    ids = torch.randint(0, 16, (2, 6))
    with pytest.raises(ValueError, match="forward pass first"):
        moe.recorded_routing(model)
    with torch.no_grad():
        model(ids)
    kept = moe.recorded_routing(model)
    with pytest.raises(ValueError, match="does not have"):
        with moe.replay_routing(model, {"model.layers.0.mlp": kept["model.layers.1.mlp"]}):
            pass
    with pytest.raises(ValueError, match="tokens, k"), torch.no_grad():
        with moe.replay_routing(model, kept):
            model(ids[:, :4])  # other tokens than recorded
    assert all(m.forced_indices is None for m in moe.moe_modules(model))
    with pytest.raises(ValueError, match=r"\[0, 8\)"), torch.no_grad():
        with moe.replay_routing(model, {n: k + 8 for n, k in kept.items()}):
            model(ids)
    with pytest.raises(ValueError, match="no DeepSeekMoE"):
        moe.recorded_routing(torch.nn.Linear(2, 2))
