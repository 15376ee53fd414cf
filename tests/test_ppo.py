from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils import ppo, rl
from course_utils.arithmetic import ArithmeticTask
from course_utils.decoder import DecoderConfig, TinyDecoder

torch.set_num_threads(1)


def _tiny(seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder(
        DecoderConfig(
            16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    ).eval()


def _gae_by_definition(rewards, values, length, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, written out for one completion of `length`."""
    v = list(values[:length]) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    return [
        sum((gamma * lam) ** l * deltas[t + l] for l in range(length - t)) for t in range(length)
    ]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_equals_its_definition(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    n, t = 4, 7
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t) < lengths[:, None]
    rewards = torch.randn(n, t, generator=g, dtype=torch.float64)
    values = torch.randn(n, t, generator=g, dtype=torch.float64)
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for i in range(n):
        want = _gae_by_definition(
            rewards[i].tolist(), values[i].tolist(), int(lengths[i]), gamma, lam
        )
        torch.testing.assert_close(
            adv[i, : lengths[i]].double(),
            torch.tensor(want, dtype=torch.float64),
            atol=1e-5,
            rtol=1e-5,
        )
        assert (adv[i, lengths[i] :] == 0).all() and (ret[i, lengths[i] :] == 0).all()
    torch.testing.assert_close(ret[mask], (adv + values.float())[mask])


def test_gae_limits_and_padding():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    scores = torch.tensor([1.0, 0.0])
    rewards = ppo.terminal_rewards(scores, mask)
    assert rewards.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    values = torch.tensor([[0.2, 0.5, 0.7, 9.0], [0.1, 0.3, 9.0, 9.0]])
    adv, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lam = 1: Monte-Carlo return (the final score) minus V_t; values past the end ignored
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.5, 0.3, 0], [-0.1, -0.3, 0, 0]]))
    td, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.0)  # lam = 0: one-step TD error
    torch.testing.assert_close(td, torch.tensor([[0.3, 0.2, 0.3, 0], [0.2, -0.3, 0, 0]]))
    with pytest.raises(ValueError, match="gamma and lam"):
        ppo.gae(rewards, values, mask, gamma=1.5)
    with pytest.raises(ValueError, match="no tokens"):
        ppo.terminal_rewards(scores, torch.zeros(2, 3, dtype=torch.bool))


def test_value_loss_clips_like_ppo():
    mask = torch.tensor([[True, True, False]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 2.0, 0.0]], requires_grad=True)
    loss = ppo.value_loss(values, old, returns, mask, clip=0.2)
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: max((2-1)^2, (0.2-1)^2) = 1.0
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 1.0) / 2))
    loss.backward()
    assert values.grad[0, 0] == 0  # the clipped branch won: no gradient through V there
    assert values.grad[0, 1] != 0 and values.grad[0, 2] == 0
    plain = ppo.value_loss(values, old, returns, mask, clip=None)
    torch.testing.assert_close(plain, torch.tensor(0.5 * (0.25 + 1.0) / 2))


def test_value_model_starts_at_zero_and_reads_the_policy_hidden_states():
    policy = _tiny()
    critic = ppo.ValueModel(policy)
    ids = torch.randint(0, 16, (3, 9))
    assert torch.equal(critic(ids), torch.zeros(3, 9))
    with torch.no_grad():
        critic.head.weight.normal_()
        critic.head.bias.fill_(0.5)
        hidden = policy.forward_with_hidden(ids)[1]
        torch.testing.assert_close(critic(ids), hidden @ critic.head.weight[0] + 0.5)
    # a copy: training the critic leaves the policy alone, and no LM head is kept
    assert all(p is not q for p, q in zip(critic.parameters(), policy.parameters(), strict=False))
    assert (
        sum(p.numel() for p in critic.parameters())
        < sum(p.numel() for p in policy.parameters()) + 33
    )
    with pytest.raises(ValueError, match="forward_with_hidden"):
        ppo.ValueModel(torch.nn.Linear(2, 2))


def test_ppo_step_token_values_align_with_logprobs():
    policy = _tiny()
    critic = ppo.ValueModel(policy)
    with torch.no_grad():
        critic.head.weight.normal_()
    prompt, completion = torch.randint(0, 16, (2, 4)), torch.randint(0, 16, (2, 3))
    v = ppo.token_values(critic, prompt, completion)
    full = critic(torch.cat([prompt, completion], 1))
    torch.testing.assert_close(v, full[:, 3:6])  # the state before each completion token


def _opens_block(problem, completion):
    return float(completion.startswith("<"))


def test_ppo_raises_the_rewarded_behaviour_and_the_critic_learns():
    task = ArithmeticTask()
    model = _tiny(seed=1)
    config = ppo.PPOConfig(prompts_per_step=32, lr=3e-2, critic_lr=3e-2, max_new_tokens=2)
    history, critic, opts = ppo.train_ppo(
        model,
        task.problems(64, seed=0),
        steps=25,
        config=config,
        progress=False,
        reward_fn=rl.make_reward_fn({"opens": 1.0}, {"opens": _opens_block}),
    )
    reward = history["reward"]
    assert sum(reward[-5:]) / 5 > 0.8 > sum(reward[:3]) / 3 + 0.3, reward
    assert history["explained_variance"][-1] > history["explained_variance"][0]
    mem = ppo.memory_footprint({"policy": model, "critic": critic}, list(opts.values()))
    params = sum(p.numel() * 4 for p in model.parameters())
    assert mem["critic"] > 0.9 * params - 16 * 32 * 4  # a whole second trunk
    trained = sum(p.numel() for p in model.parameters()) + sum(
        p.numel() for p in critic.parameters()
    )
    assert mem["optimizer state"] >= 2 * 4 * trained  # AdamW: two moments per parameter
    assert mem["total"] == mem["policy"] + mem["critic"] + mem["optimizer state"]


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"prompts_per_step": 0}, "prompts_per_step"),
        ({"clip_eps": 0.0}, "clip_eps"),
        ({"value_clip": -1.0}, "value_clip"),
        ({"lam": 1.5}, "gamma and lam"),
        ({"beta": -0.1}, "beta"),
        ({"critic_lr": 0.0}, "critic_lr"),
    ],
)
def test_ppo_config_refuses_nonsense(bad, word):
    with pytest.raises(ValueError, match=word):
        ppo.PPOConfig(**bad)


def test_ppo_refuses_a_nan_reward():
    config = ppo.PPOConfig(prompts_per_step=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="non-finite"):
        ppo.train_ppo(
            _tiny(),
            ArithmeticTask().problems(4),
            1,
            config,
            progress=False,
            reward_fn=lambda ps, cs: torch.full((len(cs),), float("nan")),
        )
