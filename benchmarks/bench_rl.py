"""GRPO on the arithmetic task: steps per second, and sampled tokens per second with and without
the KV cache.

Policy: the course's mini-DeepSeek (``DeepSeekConfig.preset("cpu")``: MLA, 1 dense + 2 MoE
layers, character vocabulary of 16), untrained, so every completion runs to max_new_tokens (34):
the worst case for a step.
One GRPO step = 16 prompts x 8 samples (128 completions), rewards, group advantages, one full
forward + backward of the clipped loss, one AdamW update (beta = 0: no reference forward).
One PPO step (notebook 22, section 8) = 128 prompts x 1 sample, the critic's values, the
policy's old log-probs, GAE, then one update of the policy and one of the critic.
"""

from __future__ import annotations

import torch

from course_utils.arithmetic import ArithmeticTask
from course_utils.config import DeepSeekConfig
from course_utils.generation import generate
from course_utils.kernels import median_seconds
from course_utils.model import DeepSeekForCausalLM
from course_utils.ppo import PPOConfig, ValueModel, ppo_step
from course_utils.rl import GRPOConfig, grpo_step, sample_groups
from course_utils.train import make_optimizer


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    repeats = 2 if quick else 7
    task = ArithmeticTask()
    model = DeepSeekForCausalLM(DeepSeekConfig.preset("cpu", vocab_size=task.vocab_size)).eval()
    config = GRPOConfig(prompts_per_step=16, group_size=8, lr=1e-4)
    problems = task.problems(16, seed=0)
    prompts = task.encode_prompts(problems)
    rows = config.prompts_per_step * config.group_size
    max_new = task.default_max_new_tokens
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()

    t_sample = median_seconds(
        lambda: sample_groups(model, prompts, config.group_size, max_new, 1.0, None, g), repeats
    )
    repeated = prompts.repeat_interleave(config.group_size, 0)
    t_nocache = median_seconds(
        lambda: generate(model, repeated, max_new, temperature=1.0, use_cache=False, generator=g),
        max(1, repeats // 2),
    )
    optimizer = make_optimizer(model, config.lr, config.weight_decay, betas=(0.9, 0.99))
    t_step = median_seconds(
        lambda: grpo_step(model, optimizer, task, problems, config, generator=g), repeats
    )
    critic = ValueModel(model)
    ppo_config = PPOConfig(prompts_per_step=rows, lr=1e-4)
    ppo_problems = task.problems(rows, seed=1)
    critic_opt = make_optimizer(critic, ppo_config.critic_lr, 0.0, betas=(0.9, 0.99))
    t_ppo = median_seconds(
        lambda: ppo_step(
            model, critic, optimizer, critic_opt, task, ppo_problems, ppo_config, generator=g
        ),
        repeats,
    )
    tokens = rows * max_new
    n_params = model.num_parameters()
    return [
        {
            "what": f"GRPO step (16 prompts x 8 samples, mini-DeepSeek {n_params / 1e3:.0f}K)",
            "value": 1 / t_step,
            "unit": "steps/s",
            "note": f"{t_step * 1e3:.0f} ms/step, threads={threads}",
        },
        {
            "what": "sampled tokens, KV cache",
            "value": tokens / t_sample,
            "unit": "tok/s",
            "note": f"{rows} rows x {max_new} tokens",
        },
        {
            "what": "sampled tokens, no cache (re-run the prefix)",
            "value": tokens / t_nocache,
            "unit": "tok/s",
        },
        {"what": "sampling speed-up from the KV cache", "value": t_nocache / t_sample, "unit": "x"},
        {
            "what": "share of a GRPO step spent sampling",
            "value": t_sample / t_step,
            "unit": "fraction",
            "note": "the rest: rewards, forward + backward, update",
        },
        {
            "what": "notebook 22's GRPO run (80 steps), projected",
            "value": 80 * t_step,
            "unit": "s",
            "note": f"worst case (every completion {max_new} tokens), threads={threads}",
        },
        {
            "what": "PPO step / GRPO step, same 128 samples",
            "value": t_ppo / t_step,
            "unit": "x",
            "note": "PPO adds the critic's forward and backward and an old-log-prob forward",
        },
    ]
