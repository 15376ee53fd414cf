"""LoRA: low-rank adapters for parameter-efficient fine-tuning (notebook 23).

Hu et al. 2021 ("LoRA: Low-Rank Adaptation of Large Language Models") freeze a pretrained
weight W (out, in) and learn a low-rank update beside it:

    y = x W^T + (alpha / r) * x A^T B^T,     A: (r, in), B: (out, r), r << min(in, out)

B starts at zero, so the adapted model starts exactly as the pretrained one; A starts random so
the gradient reaching B is not zero. Only A and B train: r * (in + out) parameters instead of
in * out. After training, ``W + (alpha / r) B A`` is one matrix again (:func:`merge_lora`), so
inference costs nothing extra.

:func:`apply_lora` wraps chosen ``nn.Linear`` layers of any model by name: the attention
projections of MLA (``q_proj`` or ``q_a_proj``/``q_b_proj``, ``kv_a_proj_with_mqa``,
``kv_b_proj``, ``o_proj``) and the expert projections of an MoE (``gate_proj``, ``up_proj``,
``down_proj`` inside ``experts``), for example.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LoRALinear",
    "apply_lora",
    "merge_lora",
    "lora_parameters",
    "trainable_parameters",
    "count_parameters",
]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update. x (..., in) -> (..., out).

    ``lora_A`` (r, in) is initialised like ``nn.Linear`` weights (Kaiming-uniform, as in the
    LoRA authors' code); ``lora_B`` (out, r) is zeros; the update is scaled by ``alpha / r``
    (``alpha`` None: equal to r, a scale of 1). ``dropout`` applies to the adapter's input
    only. ``weight`` is the effective (merged) matrix, so code that reads
    ``module.weight`` (MLA's absorbed attention does) sees the adapted weights.
    """

    def __init__(
        self, base: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"rank r must be a positive int, got {r!r}")
        if r > min(base.in_features, base.out_features):
            raise ValueError(
                f"rank r={r} is larger than the layer ({base.out_features} x "
                f"{base.in_features}): a low-rank update needs r <= "
                f"{min(base.in_features, base.out_features)}"
            )
        if alpha is not None and alpha <= 0:
            raise ValueError(f"alpha must be > 0 (or None for alpha = r), got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = self.alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        """The effective weight (out, in): W + (alpha / r) B A."""
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is W + (alpha / r) B A (frozen, like W was)."""
        base = self.base
        out = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        out.weight.copy_(self.weight)
        if base.bias is not None:
            out.bias.copy_(base.bias)
        out.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}"
        )


Target = Sequence[str] | str | Callable[[str, nn.Module], bool]


def _matcher(target: Target) -> Callable[[str, nn.Module], bool]:
    if callable(target):
        return target
    names = (target,) if isinstance(target, str) else tuple(target)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"target must be layer names (e.g. ('q_proj', 'o_proj')) or a "
            f"predicate (name, module) -> bool, got {target!r}"
        )

    def match(name: str, module: nn.Module) -> bool:
        # a target matches the whole name or a dotted suffix: "o_proj" matches
        # "layers.0.self_attn.o_proj", "experts.3.up_proj" only that expert's up_proj; a target
        # with * or ? is a glob over the whole name: "*.experts.*_proj" (routed experts only)
        return any(
            fnmatch.fnmatchcase(name, n)
            if any(c in n for c in "*?[")
            else name == n or name.endswith("." + n)
            for n in names
        )

    return match


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(
    model: nn.Module,
    target: Target,
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    freeze_rest: bool = True,
) -> list[str]:
    """Replace the matching ``nn.Linear`` layers of ``model`` by :class:`LoRALinear`, in place.

    ``target``: layer names matched against the end of each module's dotted name (``"o_proj"``
    matches every layer's ``o_proj``; ``"experts.0.gate_proj"`` only expert 0's), glob
    patterns over the whole name (``"*.experts.*"``: the routed experts, not the shared one),
    or a predicate ``(name, module) -> bool``. Only ``nn.Linear`` modules are considered.
    ``freeze_rest`` (default) sets ``requires_grad=False`` on every other parameter, so an
    optimizer over the parameters that require grad trains the adapters alone. Returns the
    replaced modules' names; raises ``ValueError`` when nothing matches.
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"rank r must be a positive int, got {r!r}")
    match = _matcher(target)
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in wrapped
    ]
    chosen = [(name, m) for name, m in linears if match(name, m)]
    if not chosen:
        available = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
        raise ValueError(
            f"no nn.Linear in the model matches target {target!r}; the model's "
            f"linear layers are named {available}"
        )
    too_small = [name for name, m in chosen if r > min(m.in_features, m.out_features)]
    if too_small:
        raise ValueError(
            f"rank r={r} is larger than layer(s) {too_small}; use r <= the "
            "smaller of each layer's in and out features"
        )
    if freeze_rest:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, linear in chosen:
        _set_submodule(model, name, LoRALinear(linear, r, alpha, dropout))
    return [name for name, _ in chosen]


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every :class:`LoRALinear` of ``model`` into a plain ``nn.Linear`` with weight
    W + (alpha / r) B A, in place, and return their names. The merged layers are frozen, like
    the base weights they replace; ``model.requires_grad_(True)`` makes everything trainable
    again."""
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if isinstance(model, LoRALinear):
        raise ValueError(
            "merge a model that contains LoRALinear layers; for a single layer call layer.merged()"
        )
    for name in names:
        layer = cast(LoRALinear, model.get_submodule(name))  # names lists LoRALinear layers
        _set_submodule(model, name, layer.merged())
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices, in module order."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (what an optimizer would train)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, trainable or not."""
    return sum(p.numel() for p in model.parameters())
