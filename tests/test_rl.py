from __future__ import annotations

import json
import math

import pytest
import torch
from fake_models import tiny_moe_deepseek
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils import rl
from course_utils.arithmetic import ArithmeticTask
from course_utils.data import ArithmeticProblem
from course_utils.decoder import DecoderConfig, TinyDecoder
from course_utils.rl import grpo_loss

P = ArithmeticProblem((7, 45, 13))  # 065


# -- rewards and the verifier ----------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, right, well_formed",
    [
        ("065\n", 1.0, 0.0),
        ("65\n", 1.0, 0.0),  # unpadded but the same number
        ("<7+5+3=15;0+4+1+1=06>065\n", 1.0, 1.0),
        ("<7+5+3=15;0+4+1+1=06>065\njunk", 1.0, 1.0),  # text after the end token is ignored
        ("<7+5+3=19;0+4+1+1=99>065\n", 1.0, 1.0),  # wrong steps, right answer: format only
        ("<7+5+3=15;0+4+1+1=06>064\n", 0.0, 1.0),  # well formed but wrong
        ("<7+5+3=15>065\n", 1.0, 0.0),  # one step missing
        ("<7+5+3=15;0+4+1+1=06;0+0=00>065\n", 1.0, 0.0),  # one step too many
        ("<07=07;45=45>065\n", 1.0, 0.0),  # steps that add nothing
        ("065", 0.0, 0.0),  # unterminated: never said it finished
        ("<7+5+3=15;0+4+1+1=06>065", 0.0, 0.0),
        ("<7+5+3=15;0+4+1+1=06065\n", 0.0, 0.0),  # block never closed
        ("<7+5+3=15;;0+4+1+1=06>065\n", 1.0, 0.0),  # empty step
        ("<>065\n", 1.0, 0.0),
        ("\n", 0.0, 0.0),
        ("", 0.0, 0.0),
        ("0 65\n", 0.0, 0.0),
        ("065+\n", 0.0, 0.0),
        ("٠٦٥\n", 0.0, 0.0),  # Arabic-Indic digits are not ours
        ("<٧+5+3=15;0+4+1+1=06>065\n", 0.0, 0.0),  # a block of foreign digits is malformed
        ("065\n065\n", 1.0, 0.0),
        ("066\n065\n", 0.0, 0.0),  # only the first line counts
    ],
)
def test_verifier_and_format_reward_edge_cases(completion, right, well_formed):
    assert rl.correctness_reward(P, completion) == right
    assert rl.format_reward(P, completion) == well_formed


def test_combined_rewards_use_named_weights_and_custom_verifiers():
    fn = rl.make_reward_fn({"correctness": 1.0, "format": 0.25})
    completions = ["065\n", "<7+5+3=15;0+4+1+1=06>065\n", "<7+5+3=15;0+4+1+1=06>064\n", "6"]
    out = fn([P] * 4, completions)
    assert out.total.tolist() == [1.0, 1.25, 0.25, 0.0]
    assert out.components["format"].tolist() == [0.0, 1.0, 1.0, 0.0]

    def substring(problem, completion):  # a buggy verifier: the answer appears somewhere
        return float(str(problem.answer) in completion)

    buggy = rl.make_reward_fn({"substring": 1.0}, reward_fns={"substring": substring})
    assert buggy([P], ["1650\n"]).total.tolist() == [1.0]
    with pytest.raises(ValueError, match="unknown reward"):
        rl.make_reward_fn({"corectness": 1.0})
    with pytest.raises(ValueError, match="completions"):
        fn([P], ["1\n", "2\n"])


# -- masks and sampling ------------------------------------------------------------------------


def test_completion_mask_keeps_the_first_end_token_and_drops_the_rest():
    ids = torch.tensor([[3, 4, 0, 0, 0], [0, 0, 0, 0, 0], [5, 6, 7, 8, 9], [1, 0, 2, 0, 3]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert torch.equal(rl.completion_mask(ids, 0), want.bool())
    assert rl.completion_mask(ids, None).all()


def _tiny(vocab=16, seed=0, hidden=32):
    torch.manual_seed(seed)
    return TinyDecoder(
        DecoderConfig(
            vocab,
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    )


def test_sample_groups_logprobs_match_a_full_forward_and_groups_share_prompts():
    task = ArithmeticTask()
    model = _tiny()
    prompts = task.encode_prompts(task.problems(3, seed=2))
    g = torch.Generator().manual_seed(0)
    s = rl.sample_groups(model, prompts, 5, 12, temperature=0.7, eos_token_id=0, generator=g)
    assert s.prompt_ids.shape == (15, 9) and s.completion_ids.shape[0] == 15
    assert torch.equal(s.prompt_ids[5:10], prompts[1].expand(5, -1))
    assert torch.equal(s.mask, rl.completion_mask(s.completion_ids, 0))
    full = rl.completion_logprobs(model, s.prompt_ids, s.completion_ids, temperature=0.7)
    assert torch.allclose(full[s.mask], s.logprobs[s.mask], atol=1e-5)
    assert (s.logprobs[~s.mask] == 0).all() and (s.logprobs[s.mask] < 0).all()
    # at temperature 1 the log-probs are different numbers (the test above is not vacuous)
    full1 = rl.completion_logprobs(model, s.prompt_ids, s.completion_ids)
    assert not torch.allclose(full1[s.mask], s.logprobs[s.mask], atol=1e-3)
    # the same generator seed gives the same samples
    s2 = rl.sample_groups(model, prompts, 5, 12, 0.7, 0, torch.Generator().manual_seed(0))
    assert torch.equal(s.completion_ids, s2.completion_ids)
    with pytest.raises(ValueError, match="temperature"):
        rl.sample_groups(model, prompts, 5, 12, temperature=0.0)


# -- advantages --------------------------------------------------------------------------------


def test_group_advantages_hand_computed_with_the_unbiased_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 0.0, 2.0]])
    # group 0: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    # group 1: mean 2, unbiased std sqrt(8 / 3)
    want = torch.tensor(
        [[1.5, -0.5, -0.5, -0.5], [0.0, 2 / math.sqrt(8 / 3), -2 / math.sqrt(8 / 3), 0.0]]
    )
    assert torch.allclose(rl.group_advantages(r, eps=0.0), want, atol=1e-6)
    assert torch.allclose(
        rl.group_advantages(r, eps=0.0, scale_std=False), r - r.mean(1, keepdim=True)
    )


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([0.0, 0.1, 0.25, 1.0, 1.25]), min_size=2, max_size=9),
        min_size=1,
        max_size=5,
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_advantages_sum_to_zero_and_vanish_for_equal_rewards(rows):
    r = torch.tensor(rows)
    for scale in (True, False):
        a = rl.group_advantages(r, scale_std=scale)
        assert torch.allclose(a.sum(1), torch.zeros(len(rows)), atol=1e-5)
        equal = (r == r[:, :1]).all(1)
        assert (a[equal] == 0).all()  # exactly zero, not nearly
    assert rl.count_zero_variance_groups(r) == int(equal.sum())


def test_exactly_zero_even_where_the_mean_rounds():
    r = torch.full((1, 3), 0.1)  # 0.1 * 3 / 3 != 0.1 in floating point
    assert (rl.group_advantages(r, eps=0.0, scale_std=False) == 0).all()
    with pytest.raises(ValueError, match="at least 2"):
        rl.group_advantages(torch.ones(3, 1))


# -- KL and the loss ---------------------------------------------------------------------------


def test_k3_kl_is_zero_at_the_reference_and_matches_the_true_kl_in_expectation():
    lp = torch.log_softmax(torch.randn(5, 7), -1)
    assert (rl.k3_kl(lp, lp) == 0).all()
    # E_{x ~ p}[k3] = KL(p || q) exactly, summing over the vocabulary instead of sampling
    p, q = torch.log_softmax(torch.randn(7), -1), torch.log_softmax(torch.randn(7), -1)
    exact = (p.exp() * (p - q)).sum()
    assert torch.allclose((p.exp() * rl.k3_kl(p, q)).sum(), exact, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.floats(-30, 0), st.floats(-30, 0))
def test_k3_kl_is_never_negative(a, b):
    kl = rl.k3_kl(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
    assert kl.item() >= 0


def _case():
    new = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
    old = torch.tensor([[-1.3, -0.5, -1.5], [-0.3, -1.0, -9.0]])
    ref = torch.tensor([[-1.0, -0.7, -1.8], [-0.2, -1.2, -4.0]])
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    return new, old, ref, adv, mask


def test_loss_equals_a_hand_computed_value():
    new, old, ref, adv, mask = _case()
    beta, eps = 0.1, 0.2

    def k3(n, r):
        return math.exp(r - n) - (r - n) - 1

    # sequence 0, A = +1: ratios e^0.3 (clipped down to 1.2), e^0, e^-0.5 (min keeps it)
    seq0 = [
        min(math.exp(0.3), 1.2) - beta * k3(-1.0, -1.0),
        1.0 - beta * k3(-0.5, -0.7),
        math.exp(-0.5) - beta * k3(-2.0, -1.8),
    ]
    # sequence 1, A = -0.5: ratios e^0 and e^-0.2 (= 0.819 > 0.8, inside the clip range)
    seq1 = [-0.5 - beta * k3(-0.3, -0.2), -0.5 * math.exp(-0.2) - beta * k3(-1.2, -1.2)]
    want_seq = -(sum(seq0) / 3 + sum(seq1) / 2) / 2
    want_tok = -(sum(seq0) + sum(seq1)) / 5
    want_const = -(sum(seq0) + sum(seq1)) / (2 * 3)
    loss, stats = rl.grpo_loss(new, old, ref, adv, mask, eps, beta, "sequence")
    assert loss.item() == pytest.approx(want_seq, abs=1e-6)
    assert rl.grpo_loss(new, old, ref, adv, mask, eps, beta, "token")[0].item() == pytest.approx(
        want_tok, abs=1e-6
    )
    assert rl.grpo_loss(new, old, ref, adv, mask, eps, beta, "constant")[0].item() == pytest.approx(
        want_const, abs=1e-6
    )
    assert stats["clip_fraction"] == pytest.approx(1 / 5)
    kls = [k3(-1.0, -1.0), k3(-0.5, -0.7), k3(-2.0, -1.8), k3(-0.3, -0.2), k3(-1.2, -1.2)]
    assert stats["kl"] == pytest.approx(sum(kls) / 5, abs=1e-6)
    ratios = [math.exp(0.3), 1, math.exp(-0.5), 1, math.exp(-0.2)]
    assert stats["ratio"] == pytest.approx(sum(ratios) / 5, abs=1e-6)


def test_masked_tokens_do_not_change_the_loss_or_gradient():
    new, old, ref, adv, mask = _case()
    junk = ~mask
    grads = []
    for fill in (None, 5.0, float("inf")):
        leaf = new.clone().requires_grad_(True)
        n = leaf if fill is None else leaf.masked_fill(junk, fill)
        o = old if fill is None else old.masked_fill(junk, -fill)
        r = ref if fill is None else ref.masked_fill(junk, fill)
        loss, stats = rl.grpo_loss(n, o, r, adv, mask, 0.2, 0.1)
        loss.backward()
        grads.append((loss.item(), leaf.grad.clone(), stats))
    for value, grad, stats in grads[1:]:
        assert value == pytest.approx(grads[0][0], abs=1e-7)
        assert torch.equal(grad, grads[0][1]) and stats == grads[0][2]
    assert (grads[0][1][junk] == 0).all()


def test_one_update_per_batch_is_group_baseline_reinforce():
    torch.manual_seed(0)
    n, t, v = 6, 4, 5
    theta = torch.randn(n, t, v, requires_grad=True)
    tokens = torch.randint(0, v, (n, t))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]] * 2).bool()
    adv = rl.group_advantages(torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])).view(-1)

    def logp():
        return torch.log_softmax(theta, -1).gather(-1, tokens[..., None]).squeeze(-1)

    lp = logp()
    loss, stats = rl.grpo_loss(lp, lp.detach(), None, adv, mask, clip_eps=0.2, beta=0.0)
    assert stats["ratio"] == 1.0 and stats["clip_fraction"] == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)  # ~0: zero-mean advantages
    (grad,) = torch.autograd.grad(loss, theta)
    # REINFORCE with the group mean as baseline: - mean_i A_i / |o_i| sum_t grad log pi(o_t)
    lp = logp()
    surrogate = -((adv[:, None] * lp * mask).sum(1) / mask.sum(1)).mean()
    (want,) = torch.autograd.grad(surrogate, theta)
    assert torch.allclose(grad, want, atol=1e-7) and grad.abs().sum() > 0.1


def test_clipping_removes_the_gradient_past_the_trust_region():
    lp = torch.tensor([[-0.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.0, -0.45]])  # ratios e^0.5 (past 1.2) and e^-0.05 (inside)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = rl.grpo_loss(lp, old, None, torch.tensor([1.0]), mask, clip_eps=0.2)
    loss.backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] < 0 and stats["clip_fraction"] == 0.5
    # with a negative advantage a large ratio is not clipped: min picks the unclipped term
    lp.grad = None
    rl.grpo_loss(lp, old, None, torch.tensor([-1.0]), mask, clip_eps=0.2)[0].backward()
    assert lp.grad[0, 0] > 0


def test_kl_term_pulls_toward_the_reference():
    lp = torch.tensor([[-0.2]], requires_grad=True)
    ref = torch.tensor([[-1.0]])
    loss, stats = rl.grpo_loss(
        lp, lp.detach(), ref, torch.zeros(1), torch.ones(1, 1).bool(), beta=1.0
    )
    loss.backward()
    assert stats["kl"] == pytest.approx(math.exp(-0.8) + 0.8 - 1, abs=1e-6)
    assert lp.grad.item() > 0  # descending lowers logp_new, toward the reference's -1.0


def test_grpo_loss_argument_errors():
    new, old, ref, adv, mask = _case()
    with pytest.raises(ValueError, match="logp_ref"):
        rl.grpo_loss(new, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        rl.grpo_loss(new, old, ref, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="advantages"):
        rl.grpo_loss(new, old, ref, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="mask"):
        rl.grpo_loss(new, old, ref, adv, mask[:, :2])


def test_one_token_bandit_converges_to_the_rewarded_token():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(6, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    groups, size = 4, 8
    for _ in range(60):
        with torch.no_grad():
            tokens = torch.multinomial(logits.softmax(-1).expand(groups * size, -1), 1, generator=g)
        rewards = (tokens == 4).float().view(groups, size)
        adv = rl.group_advantages(rewards).view(-1)
        lp = torch.log_softmax(logits, -1)[tokens]
        loss, _ = rl.grpo_loss(lp, lp.detach(), None, adv, torch.ones_like(lp, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logits.softmax(-1)[4] > 0.95


# -- the loop ----------------------------------------------------------------------------------


def _opens_block(problem, completion):
    return float(completion.startswith("<"))


def test_grpo_steps_raise_the_rewarded_behaviour():
    task = ArithmeticTask()
    model = _tiny(seed=1)
    problems = task.problems(64, seed=0)
    reward_fn = rl.make_reward_fn({"opens": 1.0}, {"opens": _opens_block})
    config = rl.GRPOConfig(prompts_per_step=4, group_size=8, lr=3e-2, max_new_tokens=2)
    before = rl.sample_groups(
        model, task.encode_prompts(problems[:16]), 8, 1, 1.0, 0, torch.Generator().manual_seed(5)
    )
    history = rl.train_grpo(
        model, problems, steps=25, config=config, reward_fn=reward_fn, progress=False, seed=0
    )
    after = rl.sample_groups(
        model, task.encode_prompts(problems[:16]), 8, 1, 1.0, 0, torch.Generator().manual_seed(5)
    )
    opens = task.tokenizer.stoi["<"]
    rate_before = (before.completion_ids[:, 0] == opens).float().mean().item()
    rate_after = (after.completion_ids[:, 0] == opens).float().mean().item()
    assert rate_before < 0.2 and rate_after > 0.8, (rate_before, rate_after)
    assert len(history) == 25 and history["reward"][-1] > history["reward"][0]
    assert set(history.records[0]) >= {
        "reward",
        "accuracy",
        "length",
        "worked_fraction",
        "zero_variance_groups",
        "loss",
        "kl",
        "clip_fraction",
    }
    assert all(r == 1.0 for r in history["ratio"])  # one update per batch


def test_train_grpo_with_kl_reference_several_updates_and_evaluation():
    task = ArithmeticTask()
    model = _tiny(seed=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = rl.GRPOConfig(
        prompts_per_step=2,
        group_size=4,
        lr=1e-2,
        beta=0.1,
        updates_per_batch=2,
        max_new_tokens=4,
        aggregation="token",
    )
    history = rl.train_grpo(
        model,
        task.problems(16, seed=0),
        steps=3,
        config=config,
        eval_problems=task.problems(8, seed=0, split="test"),
        eval_every=2,
        progress=False,
        reward_fn=rl.make_reward_fn({"opens": 1.0}, {"opens": _opens_block}),
    )
    assert history.eval_steps == [0, 2, 3] and len(history.eval_accuracy) == 3
    assert 0 < history.train_seconds <= history.seconds  # evaluations excluded
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    # the second update of a batch sees a ratio that moved away from 1
    assert any(r != 1.0 for r in history["ratio"])
    with pytest.raises(ValueError, match="reference"):
        rl.grpo_step(
            model, torch.optim.SGD(model.parameters(), 0.1), task, task.problems(2), config
        )
    with pytest.raises(ValueError, match="group_size"):
        rl.GRPOConfig(group_size=1)
    for bad in (dict(clip_eps=0.0), dict(beta=-0.1), dict(off_policy_mask=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rl.GRPOConfig(**bad)


def test_train_grpo_with_deepseek_v32_options_masks_and_reports():
    task = ArithmeticTask()
    model = _tiny(seed=3)
    config = rl.GRPOConfig(
        prompts_per_step=2,
        group_size=4,
        lr=5e-2,
        beta=0.1,
        updates_per_batch=3,
        max_new_tokens=4,
        kl_bias_correction=True,
        off_policy_mask=0.0,
    )
    history = rl.train_grpo(
        model,
        task.problems(16, seed=0),
        steps=2,
        config=config,
        progress=False,
        reward_fn=rl.make_reward_fn({"opens": 1.0}, {"opens": _opens_block}),
    )
    fractions = history["masked_fraction"]
    assert len(fractions) == 2 and all(0.0 <= f <= 1.0 for f in fractions)


def test_grpo_runs_on_the_mini_deepseek_with_cached_sampling():
    from course_utils.config import DeepSeekConfig
    from course_utils.model import DeepSeekForCausalLM

    torch.manual_seed(0)
    model = DeepSeekForCausalLM(
        DeepSeekConfig(
            vocab_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=4,
            moe_intermediate_size=16,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    task = ArithmeticTask()
    prompts = task.encode_prompts(task.problems(3))
    s = rl.sample_groups(model, prompts, 4, 10, 1.0, 0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = rl.completion_logprobs(model, s.prompt_ids, s.completion_ids)
    assert torch.allclose(full[s.mask], s.logprobs[s.mask], atol=1e-5)
    config = rl.GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=6, beta=0.05)
    history = rl.train_grpo(model, task.problems(8), steps=2, config=config, progress=False)
    assert len(history) == 2 and all(math.isfinite(v) for v in history["loss"])


def _tiny_moe_policy(seed: int = 0):
    return tiny_moe_deepseek(seed, mtp=True)  # an MTP module: its MoE layer is skipped here


@pytest.mark.parametrize("keep", [False, True])
def test_keep_routing_in_grpo_updates(keep):
    """With keep_routing every update routes the sampled tokens through the experts chosen at
    sampling time (routing_changed == 0); without it a large
    learning rate moves the routers and later updates switch experts."""
    task = ArithmeticTask()
    model = _tiny_moe_policy()
    config = rl.GRPOConfig(
        prompts_per_step=4,
        group_size=4,
        lr=5e-2,
        updates_per_batch=4,
        max_new_tokens=6,
        keep_routing=keep,
        grad_clip=None,
    )
    history = rl.train_grpo(
        model,
        task.problems(16, seed=0),
        steps=3,
        config=config,
        progress=False,
        seed=0,
        reward_fn=rl.make_reward_fn({"opens": 1.0}, {"opens": _opens_block}),
    )
    changed = history["routing_changed"]
    if keep:
        assert changed == [0.0, 0.0, 0.0]
    else:
        assert max(changed) > 0.01, changed


def test_keep_routing_needs_an_moe_policy():
    config = rl.GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=3, keep_routing=True)
    with pytest.raises(ValueError, match="MoE"):
        rl.train_grpo(
            _tiny(seed=0), ArithmeticTask().problems(4), steps=1, config=config, progress=False
        )


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda problems, texts: torch.full((len(texts),), float("nan")), "non-finite"),
        (lambda problems, texts: torch.zeros(len(texts), 2), "shape"),
        (lambda problems, texts: torch.zeros(len(texts) - 1), "shape"),
        (lambda problems, texts: [0.0] * len(texts), "tensor"),
    ],
)
def test_a_reward_that_is_nan_or_the_wrong_shape_is_refused(bad, match):
    config = rl.GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=3)
    with pytest.raises(ValueError, match=match):
        rl.train_grpo(
            _tiny(seed=0),
            ArithmeticTask().problems(4),
            steps=1,
            config=config,
            reward_fn=bad,
            progress=False,
        )
    nan_verifier = rl.make_reward_fn({"nan": 1.0}, {"nan": lambda p, c: float("nan")})
    with pytest.raises(ValueError, match="reward 'nan'.*non-finite"):
        nan_verifier([P], ["065\n"])


# -- the course's GRPO checkpoint (notebook 22 -> 23) ----------------------------------------


def test_load_or_train_grpo_trains_saves_then_loads(tmp_path):
    from course_utils.pretrain import PretrainConfig

    pre = PretrainConfig(steps=2, batch_size=4, n_train_lines=64, eval_every=2, n_eval_problems=4)
    cfg = rl.GRPOConfig(prompts_per_step=2, group_size=2)
    trained = rl.load_or_train_grpo(pre, cfg, "cpu", steps=2, root=tmp_path, progress=False)
    path = rl.grpo_checkpoint_path(pre, cfg, 2, 0, tmp_path)
    spec = json.loads((path / "artifact.json").read_text())["spec"]
    assert spec["steps"] == 2 and spec["pretrain"] == pre.spec()
    assert spec["grpo"]["group_size"] == 2
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    loaded = rl.load_or_train_grpo(pre, cfg, "cpu", steps=2, root=tmp_path, progress=False)
    torch.testing.assert_close(loaded(ids), trained(ids), rtol=0, atol=1e-6)
    # other settings are another artifact, never the saved one
    assert rl.grpo_checkpoint_path(pre, cfg, 3, 0, tmp_path) != path


# -- DeepSeek-V3.2's changes to GRPO (paper section 3.1) -------------------------------------


def test_bias_corrected_kl_has_the_exact_kl_gradient_off_policy():
    """Tokens drawn from pi_old: the expectation of the ratio-weighted k3's gradient is the
    gradient of KL(pi_theta || pi_ref), computed exactly here by enumerating the vocabulary."""
    g = torch.Generator().manual_seed(0)
    vocab = 6
    theta = torch.randn(vocab, generator=g, requires_grad=True)
    theta_old = theta.detach() + 0.7 * torch.randn(vocab, generator=g)  # off-policy sampler
    theta_ref = torch.randn(vocab, generator=g)
    p_old = torch.softmax(theta_old, -1)

    def expected_grad(correct: bool) -> torch.Tensor:
        logp, logp_old, logp_ref = (
            torch.log_softmax(t, -1)[:, None] for t in (theta, theta_old, theta_ref)
        )
        total = sum(
            p_old[x]
            * grpo_loss(
                logp[x : x + 1],
                logp_old[x : x + 1],
                logp_ref[x : x + 1],
                torch.zeros(1),
                torch.ones(1, 1, dtype=torch.bool),
                beta=1.0,
                kl_bias_correction=correct,
            )[0]
            for x in range(vocab)
        )
        return torch.autograd.grad(total, theta)[0]

    exact = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=theta),
        torch.distributions.Categorical(logits=theta_ref),
    )
    want = torch.autograd.grad(exact, theta)[0]
    torch.testing.assert_close(expected_grad(True), want, rtol=1e-5, atol=1e-6)
    assert (expected_grad(False) - want).abs().max() > 1e-2  # the plain k3 is biased here


def _off_policy_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, t = 8, 5
    logp_old = -torch.rand(n, t, generator=g) * 2
    drift = torch.linspace(-0.3, 0.5, n)[:, None]  # rows the policy moved away from, and toward
    noise = 0.1 * torch.randn(n, t, generator=g)
    logp_new = (logp_old - drift + noise).clamp(max=0).requires_grad_()
    mask = torch.rand(n, t, generator=g) > 0.2
    mask[:, 0] = True
    adv = torch.randn(n, generator=g)
    return logp_new, logp_old, adv, mask


def test_off_policy_sequence_mask_equals_trl():
    from trl import GRPOTrainer

    logp_new, logp_old, adv, mask = _off_policy_batch()
    delta = 0.1
    keep = GRPOTrainer.get_off_policy_mask(adv[:, None], logp_new, logp_old, mask.float(), delta)
    assert 0 < keep.sum() < len(keep)  # the batch has completions on both sides
    loss, stats = grpo_loss(logp_new, logp_old, None, adv, mask, off_policy_mask=delta)
    assert stats["masked_fraction"] == pytest.approx(1 - keep.mean().item())
    # the surrogate of the dropped completions is gone; the rest is the usual GRPO loss
    ratio = torch.exp(logp_new - logp_old)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) * keep * mask
    want = -(surrogate.sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(loss, want)
    grad = torch.autograd.grad(loss, logp_new)[0]
    dropped = keep[:, 0] == 0
    unmasked = torch.autograd.grad(grpo_loss(logp_new, logp_old, None, adv, mask)[0], logp_new)[0]
    assert torch.all(grad[dropped] == 0) and unmasked[dropped].abs().sum() > 0
    torch.testing.assert_close(grad[~dropped], unmasked[~dropped])


def test_off_policy_mask_keeps_positive_advantages_and_on_policy_batches():
    logp_new, logp_old, adv, mask = _off_policy_batch(1)
    _, stats = grpo_loss(logp_new, logp_old, None, adv.abs(), mask, off_policy_mask=0.0)
    assert stats["masked_fraction"] == 0.0  # good answers are never dropped
    _, stats = grpo_loss(logp_new, logp_new.detach(), None, -adv.abs(), mask, off_policy_mask=0.0)
    assert stats["masked_fraction"] == 0.0  # on-policy: no drift, nothing dropped
    with pytest.raises(ValueError, match="off_policy_mask"):
        grpo_loss(logp_new, logp_old, None, adv, mask, off_policy_mask=-0.1)


class _OneProcess:
    """What TRL's loss asks of an `accelerate.Accelerator`, for one process."""

    sync_gradients = True
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _trl_grpo_loss(logp_new, logp_old, logp_ref, adv, mask, beta, eps, bias_correction, off_policy):
    """TRL's own `GRPOTrainer._compute_loss` (loss_type "grpo", per-token ratios), run on
    given log-probs: the model call is replaced by a function that returns them."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    n, t = logp_new.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp_new, torch.zeros(n, t), None),
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        off_policy_mask_threshold=off_policy,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None),
        loss_type="grpo",
        epsilon_low=eps,
        epsilon_high=eps,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=_OneProcess(),
    )
    inputs = dict(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1),
        completion_ids=torch.zeros(n, t, dtype=torch.long),
        completion_mask=mask.float(),
        advantages=adv,
        old_per_token_logps=logp_old,
        ref_per_token_logps=logp_ref,
    )
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("off_policy", [None, 0.1])
def test_grpo_loss_and_gradient_equal_trl(bias_correction, off_policy):
    logp_new, logp_old, adv, mask = _off_policy_batch(2)
    logp_ref = logp_old - 0.3 * torch.rand(
        logp_old.shape, generator=torch.Generator().manual_seed(3)
    )
    ours, _ = grpo_loss(
        logp_new,
        logp_old,
        logp_ref,
        adv,
        mask,
        clip_eps=0.2,
        beta=0.05,
        kl_bias_correction=bias_correction,
        off_policy_mask=off_policy,
    )
    # TRL leaves junk in masked positions alone; give it the same values we see there
    theirs = _trl_grpo_loss(
        logp_new, logp_old, logp_ref, adv, mask, 0.05, 0.2, bias_correction, off_policy
    )
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours, logp_new)
    (g_theirs,) = torch.autograd.grad(theirs, logp_new)
    torch.testing.assert_close(g_ours, g_theirs)


# -- DPO, against TRL's DPOTrainer loss ---------------------------------------------------------


def _trl_dpo_loss(token_logps, mask, ref_chosen, ref_rejected, beta):
    """TRL's own `DPOTrainer._compute_loss` (sigmoid loss, reverse KL) on given per-token
    log-probs: rows [chosen; rejected], the model call replaced by one that returns them."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    n, t = token_logps.shape
    zeros = torch.zeros(n, t + 1)
    out = SimpleNamespace(
        log_probs=token_logps.masked_fill(~mask, 0.0),
        entropy=zeros,
        mean_logits=zeros,
        is_top1=zeros.bool(),
        aux_loss=None,
    )

    class Accelerator(_OneProcess):
        device = torch.device("cpu")

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    completion = torch.cat([torch.zeros(n, 1), mask.float()], dim=1)  # prompt token, then mask
    inputs = dict(
        input_ids=torch.zeros(n, t + 1, dtype=torch.long),
        attention_mask=torch.ones(n, t + 1, dtype=torch.long),
        completion_mask=completion,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )
    model = lambda **kwargs: out  # noqa: E731
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def test_dpo_loss_and_gradient_equal_trl():
    g = torch.Generator().manual_seed(5)
    pairs, t = 6, 7
    token_logps = (-2 * torch.rand(2 * pairs, t, generator=g)).requires_grad_()
    mask = torch.rand(2 * pairs, t, generator=g) > 0.3
    mask[:, 0] = True
    ref = -2 * torch.rand(2 * pairs, t, generator=g)
    seq = rl.sequence_logprobs(token_logps, mask)
    ref_seq = rl.sequence_logprobs(ref, mask)
    ours, stats = rl.dpo_loss(seq[:pairs], seq[pairs:], ref_seq[:pairs], ref_seq[pairs:], beta=0.3)
    theirs = _trl_dpo_loss(token_logps, mask, ref_seq[:pairs], ref_seq[pairs:], beta=0.3)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(
        torch.autograd.grad(ours, token_logps)[0], torch.autograd.grad(theirs, token_logps)[0]
    )
    margin = 0.3 * ((seq[:pairs] - ref_seq[:pairs]) - (seq[pairs:] - ref_seq[pairs:]))
    assert stats["accuracy"] == pytest.approx((margin > 0).float().mean().item())
    assert 0 < stats["accuracy"] < 1  # both kinds of pairs are in the batch


def test_dpo_raises_the_chosen_over_the_rejected_and_checks_arguments():
    logp = torch.zeros(4, requires_grad=True)
    loss, _ = rl.dpo_loss(logp[:2], logp[2:], torch.zeros(2), torch.zeros(2))
    assert loss.item() == pytest.approx(math.log(2))  # equal rewards: -log sigmoid(0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.all(grad[:2] < 0) and torch.all(grad[2:] > 0)  # descent: chosen up, rejected down
    with pytest.raises(ValueError, match="beta"):
        rl.dpo_loss(logp[:2], logp[2:], torch.zeros(2), torch.zeros(2), beta=0.0)
    with pytest.raises(ValueError, match="one per pair"):
        rl.dpo_loss(logp[:2], logp[2:], torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="token_logprobs"):
        rl.sequence_logprobs(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
