"""Speculative decoding with the MTP draft on a trained trunk: time per output token with and
without the draft, the draft's own cost included.

A mini-DeepSeek (``DeepSeekConfig.preset("cpu")`` with one MTP depth) is first trained here the
way notebook 19 trains it: the arithmetic task with every answer in column steps, one problem a
row, the answer's loss plus 0.3 x the MTP loss, 600 steps of 32 problems (``--quick``: 60), so
the trunk answers and the draft has something to guess. Then, one prompt at a time (batch 1, as
speculative decoding runs), greedy ``generate`` with the KV cache and ``speculative_generate``
decode the same held-out prompts. Their outputs are checked equal, then each is timed: the
speculative decoder's time includes one MTP-module forward per verify pass, and its Python
bookkeeping.
"""

from __future__ import annotations

import torch

from course_utils.arithmetic import ArithmeticTask, evaluate_accuracy
from course_utils.config import DeepSeekConfig
from course_utils.kernels import median_seconds
from course_utils.model import DeepSeekForCausalLM
from course_utils.mtp import SpeculativeStats, mtp_loss_fn, speculative_generate
from course_utils.train import train_language_model


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    task = ArithmeticTask()
    steps, n_prompts, repeats = (60, 8, 2) if quick else (600, 20, 5)
    model = DeepSeekForCausalLM(
        DeepSeekConfig.preset("cpu", vocab_size=task.vocab_size, num_nextn_predict_layers=1)
    )
    corpus = task.training_tokens(20000, seed=0, worked_fraction=1.0)
    batches = task.lm_batches(
        corpus, 32, prompt_loss=False, generator=torch.Generator().manual_seed(1)
    )
    train_language_model(model, batches, steps, compute_loss=mtp_loss_fn(0.3), progress=False)
    model.eval()
    problems = task.problems(n_prompts, seed=11, split="test")
    prompts = task.encode_prompts(problems)
    max_new = task.default_max_new_tokens
    eos = task.eos_token_id
    stats: list[SpeculativeStats] = []

    def greedy_all() -> list[torch.Tensor]:
        return [model.generate(p[None], max_new, eos_token_id=eos) for p in prompts]

    def speculative_all() -> list[torch.Tensor]:
        stats.clear()
        out = []
        for p in prompts:
            ids, s = speculative_generate(model, p[None], max_new, eos_token_id=eos)
            out.append(ids)
            stats.append(s)
        return out

    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(greedy_all(), speculative_all(), strict=True))
        if not same:
            raise AssertionError("speculative decoding must return greedy decoding's tokens")
        t_greedy = median_seconds(greedy_all, repeats)
        t_spec = median_seconds(speculative_all, repeats)
    new = sum(s.new_tokens for s in stats)
    forwards = sum(s.forwards for s in stats)
    accepted, drafts = sum(s.accepted for s in stats), sum(s.drafts for s in stats)
    accuracy = evaluate_accuracy(model, problems, task=task).accuracy
    threads = torch.get_num_threads()
    return [
        {
            "what": f"trunk: greedy accuracy after {steps} steps",
            "value": accuracy,
            "unit": "fraction",
            "note": f"{n_prompts} held-out prompts, batch 1, threads={threads}",
        },
        {"what": "MTP draft acceptance", "value": accepted / max(drafts, 1), "unit": "fraction"},
        {
            "what": "tokens per main-model forward (speculative)",
            "value": new / forwards,
            "unit": "tok/fwd",
            "note": "greedy decoding: 1",
        },
        {"what": "greedy decoding, KV cache", "value": 1e3 * t_greedy / new, "unit": "ms/token"},
        {
            "what": "speculative decoding, draft included",
            "value": 1e3 * t_spec / new,
            "unit": "ms/token",
        },
        {
            "what": "speed-up of speculative over greedy",
            "value": t_greedy / t_spec,
            "unit": "x",
            "note": "below 1: the draft and the loop cost more than the passes saved",
        },
    ]
