"""Scripted "models" for the post-training tests: they follow the generation protocol
(``forward(input_ids, caches=None) -> logits``, ``new_caches``) and write a chosen completion."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from course_utils.data import ArithmeticProblem
from course_utils.tokenizer import CharTokenizer


class _History:
    """A "cache" that remembers every token seen, so the scripted model knows its prompt."""

    def __init__(self, batch: int) -> None:
        self.tokens = torch.zeros(batch, 0, dtype=torch.long)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


class ScriptedModel(nn.Module):
    """Reads the prompt ``a+b+c=`` and writes ``answer_fn(problem)`` one character a step.

    After the scripted text it keeps writing the end token. ``n_digits`` sets how prompts are
    parsed. The logit of the scripted token is ``confidence``, the others 0.
    """

    def __init__(
        self,
        answer_fn: Callable[[ArithmeticProblem], str],
        n_digits: int = 2,
        confidence: float = 20.0,
    ) -> None:
        super().__init__()
        self.answer_fn = answer_fn
        self.n_digits = n_digits
        self.confidence = confidence
        self.tokenizer = CharTokenizer()
        self.dummy = nn.Parameter(torch.zeros(()))  # so the model has a device

    def new_caches(self, batch_size: int, capacity: int) -> list[_History]:
        return [_History(batch_size)]

    def _next(self, row: list[int]) -> int:
        text = self.tokenizer.decode(row)
        prompt, eq, done = text.partition("=")
        if not eq:
            return self.tokenizer.stoi["0"]
        ops = tuple(int(x) for x in prompt.split("+"))
        script = self.answer_fn(ArithmeticProblem(ops, self.n_digits))
        return self.tokenizer.stoi[script[len(done)] if len(done) < len(script) else "\n"]

    def forward(self, input_ids: Tensor, caches: list | None = None) -> Tensor:
        if caches is not None:
            caches[0].tokens = torch.cat([caches[0].tokens, input_ids.cpu()], dim=1)
            full = caches[0].tokens
            t_new = input_ids.shape[1]
        else:
            full, t_new = input_ids.cpu(), input_ids.shape[1]
        b, t = full.shape
        logits = torch.zeros(b, t_new, self.tokenizer.vocab_size)
        for i, row in enumerate(full.tolist()):
            for j in range(t - t_new, t):
                logits[i, j - (t - t_new), self._next(row[: j + 1])] = self.confidence
        return logits.to(input_ids.device)


def oracle(worked: bool = False, **kw) -> ScriptedModel:
    """Always right, answering directly or with worked steps."""
    return ScriptedModel(lambda p: p.worked_answer if worked else p.direct_answer, **kw)


def wrong_model(**kw) -> ScriptedModel:
    """Always off by one."""
    return ScriptedModel(
        lambda p: (
            ArithmeticProblem((*p.operands[:-1], p.operands[-1] + 1), p.n_digits).direct_answer
        ),
        **kw,
    )


def tiny_moe_deepseek(
    seed: int = 0, num_hidden_layers: int = 2, first_k_dense_replace: int = 0, mtp: bool = False
) -> nn.Module:
    """A random mini-DeepSeek with MoE layers (8 experts, 2 per token), vocabulary 16, for the
    keep-routing tests; ``mtp`` adds a multi-token-prediction module (its MoE layer does not run
    in plain decoding)."""
    from course_utils.config import DeepSeekConfig
    from course_utils.model import DeepSeekForCausalLM

    torch.manual_seed(seed)
    return DeepSeekForCausalLM(
        DeepSeekConfig(
            vocab_size=16,
            hidden_size=32,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=2,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=32,
            first_k_dense_replace=first_k_dense_replace,
            max_position_embeddings=64,
            num_nextn_predict_layers=int(mtp),
        )
    )
