"""Multi-token prediction (DeepSeek-V3 technical report, section 2.2) and speculative decoding.

A model built with ``num_nextn_predict_layers = D > 0`` carries D :class:`~course_utils.model.
MTPLayer` modules in ``model.mtp``. During training, depth k predicts the token k + 1 steps
ahead of each position: at position i it combines the previous depth's hidden state at i with
the embedding of token ``x[i + k]`` and predicts ``x[i + k + 1]``. The sequences get one token
shorter per depth, because the last positions have no target that far ahead.

With the usual language-modelling batch ``x`` (batch, T) and ``y`` (batch, T), ``y[:, j] =
x[j + 1]``, depth k reads the embeddings of ``y[:, k - 1 : T - 1]`` and predicts
``y[:, k : T]``. The training loss is ``L_main + lambda / D * sum_k L_k`` (V3 used lambda = 0.3
for the first 10T training tokens and 0.1 after; section 4.2).

At inference the MTP modules can be dropped, or depth 1 can draft the token after next for
:func:`speculative_generate`: the main model then checks the draft in the same forward pass
that produces the next token, so an accepted draft yields two tokens for one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from .model import DeepSeekForCausalLM, MTPLayer
from .train import language_model_loss

__all__ = [
    "MTPOutput",
    "SpeculativeStats",
    "mtp_forward",
    "mtp_loss_fn",
    "mtp_parameter_count",
    "speculative_generate",
]


@dataclass
class MTPOutput:
    """logits: the main head's (batch, T, vocab); hidden: the trunk's final hidden state
    (batch, T, hidden), after the final norm;
    mtp_logits[k - 1]: depth k's (batch, T - k, vocab)."""

    logits: Tensor
    hidden: Tensor
    mtp_logits: list[Tensor] = field(default_factory=list)


def _check_mtp(model: DeepSeekForCausalLM) -> int:
    depth = len(getattr(model, "mtp", ()))
    if depth == 0:
        raise ValueError(
            "this model has no MTP modules; build it with a DeepSeekConfig whose "
            "num_nextn_predict_layers >= 1"
        )
    return depth


def mtp_parameter_count(model: DeepSeekForCausalLM) -> int:
    """Parameters that exist only for multi-token prediction (the embedding and output head
    are shared with the main model, so they are not counted here)."""
    return sum(p.numel() for p in model.mtp.parameters())


def _head(model: DeepSeekForCausalLM, hidden: Tensor) -> Tensor:
    """The shared output head on an MTP depth's (already normalised) hidden state."""
    return model.lm_head(hidden)


def mtp_forward(model: DeepSeekForCausalLM, input_ids: Tensor, targets: Tensor) -> MTPOutput:
    """Run the main model and every MTP depth on one training batch.

    input_ids, targets: (batch, T) with ``targets[:, j] = input_ids[:, j + 1]`` (the next
    tokens, as :func:`course_utils.train.language_model_loss` expects).
    """
    depth = _check_mtp(model)
    if input_ids.shape != targets.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and targets must both be (batch, T), got "
            f"{tuple(input_ids.shape)} and {tuple(targets.shape)}"
        )
    t = input_ids.shape[1]
    if t <= depth:
        raise ValueError(
            f"sequences of {t} tokens are too short for {depth} MTP depths; use "
            f"more than {depth} tokens"
        )
    logits, hidden = model.forward_with_hidden(input_ids)
    out = MTPOutput(logits, hidden)
    h = hidden
    for k, layer in enumerate(model.mtp, start=1):
        # the token k steps ahead of position i is input_ids[:, i + k] (equal to
        # targets[:, i + k - 1], which may be -100 where the loss is masked)
        embeds = model.model.embed_tokens(input_ids[:, k:t])
        h = layer(h[:, : t - k], embeds, absorb=model.absorb)
        out.mtp_logits.append(_head(model, h))
    return out


def mtp_loss_fn(
    lam: float = 0.3, record: list[list[float]] | None = None
) -> Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A ``compute_loss`` for :func:`course_utils.train.train_language_model`:
    ``(model, x, y) -> (main LM loss, main + lam / D * sum of the D depth losses)``.

    ``record``, when given, receives each step's list of depth losses (floats).
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")

    def compute(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # the trainer passes the model it trains, a DeepSeekForCausalLM with MTP modules
        out = mtp_forward(cast(DeepSeekForCausalLM, model), x, y)
        main = language_model_loss(out.logits, y)
        depth_losses = [
            language_model_loss(logits, y[:, k:])
            for k, logits in enumerate(out.mtp_logits, start=1)
        ]
        if record is not None:
            record.append([d.item() for d in depth_losses])
        return main, main + lam / len(depth_losses) * sum(depth_losses)

    return compute


@dataclass
class SpeculativeStats:
    """What one :func:`speculative_generate` call measured.

    forwards: main-model forward passes, prefill included (plain greedy decoding of n tokens
    takes n); drafts / accepted: MTP guesses proposed / confirmed by the main model.
    """

    new_tokens: int = 0
    forwards: int = 0
    drafts: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafts if self.drafts else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forwards if self.forwards else float("nan")


@torch.no_grad()
def speculative_generate(
    model: DeepSeekForCausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> tuple[Tensor, SpeculativeStats]:
    """Greedy decoding of one sequence (1, t) with MTP depth 1 as the draft model.

    Each step feeds the pending token and the MTP draft of the token after it to the main
    model in one cached forward pass. If the main model's greedy choice after the pending
    token equals the draft, both are kept and the forward also yields the next pending
    token; if not, the draft is rolled back out of the cache. The output is exactly what
    greedy :func:`~course_utils.generation.generate` returns (up to floating-point ties);
    only the number of forward passes changes. Returns (ids (1, t + new), stats).
    """
    _check_mtp(model)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative_generate decodes one sequence: input_ids must be (1, t), "
            f"got {tuple(input_ids.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    mtp = cast(MTPLayer, model.mtp[0])  # model.mtp is a ModuleList of MTPLayer
    embed = model.model.embed_tokens
    prompt_len = input_ids.shape[1]
    capacity = prompt_len + max_new_tokens + 1
    caches = model.new_caches(1, capacity)
    mtp_cache = mtp.self_attn.new_cache(1, capacity)
    stats = SpeculativeStats()

    logits, hidden = model.forward_with_hidden(input_ids, caches)
    stats.forwards += 1
    tokens = input_ids[0].tolist()
    pending = int(logits[0, -1].argmax())
    out = [pending]
    # MTP positions 0 .. t-1: hidden state i with the embedding of the token after it.
    mtp_tokens = torch.tensor([tokens[1:] + [pending]], device=input_ids.device)

    def draft(h: Tensor, next_ids: Tensor) -> int:
        m = mtp(h, embed(next_ids), mtp_cache, absorb=model.absorb)
        return int(_head(model, m[:, -1:])[0, -1].argmax())

    guess = draft(hidden, mtp_tokens)
    while len(out) < max_new_tokens and not (eos_token_id is not None and out[-1] == eos_token_id):
        step = torch.tensor([[pending, guess]], device=input_ids.device)
        logits, hidden = model.forward_with_hidden(step, caches)
        stats.forwards += 1
        stats.drafts += 1
        choice = logits[0].argmax(dim=-1).tolist()
        if choice[0] == guess:
            stats.accepted += 1
            pending = choice[1]
            new = [guess, pending]
            mtp_ids = torch.tensor([[guess, pending]], device=input_ids.device)
            guess = draft(hidden, mtp_ids)
        else:
            for cache in caches:
                cache.truncate(cache.length - 1)
            pending = choice[0]
            new = [pending]
            guess = draft(hidden[:, :1], torch.tensor([[pending]], device=input_ids.device))
        for token in new:
            if len(out) < max_new_tokens and not (
                eos_token_id is not None and out[-1] == eos_token_id
            ):
                out.append(token)
    stats.new_tokens = len(out)
    model.train(was_training)
    ids = torch.tensor([tokens + out], device=input_ids.device)
    return ids, stats
