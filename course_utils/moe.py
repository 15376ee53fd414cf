"""Mixture of experts the DeepSeek way: experts, routers, dispatch and load balancing.

The pieces, in the order notebooks 16-18 build them:

- :class:`TopKRouter`: the plain softmax top-k router of Switch/GShard style (optional noise).
- :class:`DeepSeekV2Router`: softmax over all routed experts, greedy or group-limited top-k
  (a group's score is its best expert's score), weights times ``routed_scaling_factor``.
- :class:`DeepSeekV3Router`: sigmoid scores; a correction bias that is used **only to choose**
  experts; group score = sum of the group's top-2 biased scores; unselected groups masked to
  -inf; top-k; weights from the unbiased scores, renormalised over the k chosen when
  ``norm_topk_prob``, times ``routed_scaling_factor``.
- :class:`DeepSeekMoE`: shared experts always on plus fine-grained routed experts, with a
  vectorised dispatch (sort by expert, one matmul per expert over its contiguous slice of
  tokens, ``index_add_`` back; the only Python loop is over experts, never over tokens) and a
  readable per-token reference dispatch for teaching.
- Balancing: Switch's auxiliary loss, DeepSeek-V2's expert-, device- and communication-level
  losses, DeepSeek-V3's sequence-wise loss, and the auxiliary-loss-free bias update
  (:class:`AuxLossFreeBalancer`), plus per-expert load statistics.
- Keep routing (DeepSeek-V3.2, for RL): :func:`recorded_routing` and :func:`replay_routing`
  make a later forward use the experts an earlier one chose; :func:`routing_changed` measures
  how many choices differ.

Names follow the Hugging Face DeepSeek configs and checkpoints: the router is ``gate`` with
``gate.weight`` (E, hidden) and, for V3, the float32 buffer ``gate.e_score_correction_bias``;
routed experts are ``experts.{e}.{gate,up,down}_proj.weight`` as in the Hub checkpoints;
shared experts are one SwiGLU ``shared_experts`` of width ``moe_intermediate_size *
n_shared_experts``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import SwiGLU

__all__ = [
    "AuxLossFreeBalancer",
    "DeepSeekMoE",
    "DeepSeekV2Router",
    "DeepSeekV3Router",
    "LoadStats",
    "MoEConfig",
    "Routing",
    "TopKRouter",
    "communication_balance_loss",
    "total_and_active_parameters",
    "device_balance_loss",
    "dispatch_reference",
    "dispatch_vectorized",
    "expert_balance_loss",
    "expert_counts",
    "load_fused_experts",
    "split_fused_experts",
    "load_statistics",
    "make_router",
    "normalized_affinities",
    "sequence_balance_loss",
    "switch_aux_loss",
    "update_correction_bias",
]

_V2_METHODS = ("greedy", "group_limited_greedy")
_V3_METHODS = ("noaux_tc",)


@dataclass
class MoEConfig:
    """The MoE fields of a DeepSeek config, with Hugging Face key names.

    ``scoring_func`` "softmax" means the DeepSeek-V2 router (``topk_method`` "greedy" or
    "group_limited_greedy"); "sigmoid" means the DeepSeek-V3 router (``topk_method`` "noaux_tc").
    ``n_group`` / ``topk_group``: experts split into ``n_group`` equal groups, each token may use
    only ``topk_group`` of them (1 / 1 means no group limit). ``bias_update_speed`` is the step
    gamma of the auxiliary-loss-free bias update (0.001 in DeepSeek-V3); ``aux_loss_alpha`` and
    ``seq_aux`` mirror the released configs' balance-loss settings.
    """

    hidden_size: int = 64
    moe_intermediate_size: int = 32
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    bias_update_speed: float = 0.001
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True

    def __post_init__(self) -> None:
        # Hub configs write null for "no groups".
        if self.n_group is None:
            self.n_group = 1
        if self.topk_group is None:
            self.topk_group = self.n_group
        validate_moe_config(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> MoEConfig:
        """Build from a dict of HF config keys, ignoring keys that are not MoE fields.

        transformers' ``DeepseekV2Config`` has ``topk_method`` but no ``scoring_func``: when the
        dict names a V2 ``topk_method`` and no ``scoring_func``, softmax (V2) is implied.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in {**dict(d), **overrides}.items() if k in names}
        if "scoring_func" not in kwargs and kwargs.get("topk_method") in _V2_METHODS:
            kwargs["scoring_func"] = "softmax"
        return cls(**kwargs)

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group


def validate_moe_config(c: MoEConfig) -> None:
    """Raise ValueError naming the bad field and the fix; called by MoEConfig itself."""
    if c.hidden_size < 1 or c.moe_intermediate_size < 1:
        raise ValueError(
            f"hidden_size and moe_intermediate_size must be >= 1, got "
            f"{c.hidden_size}, {c.moe_intermediate_size}"
        )
    if c.n_routed_experts < 1:
        raise ValueError(f"n_routed_experts must be >= 1, got {c.n_routed_experts}")
    if c.n_shared_experts < 0:
        raise ValueError(f"n_shared_experts must be >= 0, got {c.n_shared_experts}")
    if not 1 <= c.num_experts_per_tok <= c.n_routed_experts:
        raise ValueError(
            f"num_experts_per_tok={c.num_experts_per_tok} must be between 1 and "
            f"n_routed_experts={c.n_routed_experts}: a token cannot use more experts than exist"
        )
    if c.n_group < 1 or c.n_routed_experts % c.n_group:
        raise ValueError(
            f"n_group={c.n_group} must divide n_routed_experts={c.n_routed_experts} so every "
            "group has the same number of experts; pick a divisor"
        )
    if not 1 <= c.topk_group <= c.n_group:
        raise ValueError(f"topk_group={c.topk_group} must be between 1 and n_group={c.n_group}")
    if c.num_experts_per_tok > c.topk_group * c.experts_per_group:
        raise ValueError(
            f"num_experts_per_tok={c.num_experts_per_tok} is more than the "
            f"{c.topk_group * c.experts_per_group} experts in topk_group={c.topk_group} groups of "
            f"{c.experts_per_group}; raise topk_group or lower num_experts_per_tok"
        )
    if c.scoring_func == "softmax":
        if c.topk_method not in _V2_METHODS:
            raise ValueError(
                f"scoring_func='softmax' (DeepSeek-V2) takes topk_method in "
                f"{_V2_METHODS}, got {c.topk_method!r}"
            )
    elif c.scoring_func == "sigmoid":
        if c.topk_method not in _V3_METHODS:
            raise ValueError(
                f"scoring_func='sigmoid' (DeepSeek-V3) takes topk_method "
                f"'noaux_tc', got {c.topk_method!r}"
            )
        if c.n_group > 1 and c.experts_per_group < 2:
            raise ValueError(
                f"the V3 group score sums each group's top-2 experts, so groups need at least 2 "
                f"experts; n_routed_experts={c.n_routed_experts} / n_group={c.n_group} gives "
                f"{c.experts_per_group}; lower n_group"
            )
    else:
        raise ValueError(
            f"scoring_func must be 'softmax' (V2) or 'sigmoid' (V3), got {c.scoring_func!r}"
        )
    if c.bias_update_speed < 0:
        raise ValueError(f"bias_update_speed must be >= 0, got {c.bias_update_speed}")


# -- routing ------------------------------------------------------------------------------


@dataclass
class Routing:
    """One routing decision for T tokens (T = batch * seq, flattened).

    indices: (T, k) int64 chosen experts; weights: (T, k) float32 gate weights applied to their
    outputs; scores: (T, E) float32 affinities (softmax probabilities or sigmoid scores, before
    any bias); logits: (T, E) float32 router logits.
    """

    indices: Tensor
    weights: Tensor
    scores: Tensor
    logits: Tensor

    @property
    def n_experts(self) -> int:
        return self.scores.shape[-1]


def _router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """x: (..., H) -> (T, E) float32 logits (routers score in float32, as DeepSeek does)."""
    return F.linear(x.reshape(-1, x.shape[-1]).float(), weight.float())


def _group_mask(group_scores: Tensor, topk_group: int, experts_per_group: int) -> Tensor:
    """group_scores: (T, G) -> bool (T, E) mask, True for experts in the topk_group best groups."""
    best = group_scores.topk(topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return keep.repeat_interleave(experts_per_group, dim=1)


class TopKRouter(nn.Module):
    """The plain router of the MoE intro: softmax(x W^T), keep the top k, renormalise.

    x: (..., H) -> Routing with weights = softmax over the k chosen logits (they sum to 1).
    ``noise_std`` > 0 adds Gaussian noise to the logits in training mode only (noisy top-k
    gating), which spreads early choices over experts.
    """

    def __init__(self, hidden_size: int, n_experts: int, top_k: int, noise_std: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.top_k, self.noise_std = top_k, noise_std
        self.weight = nn.Parameter(torch.randn(n_experts, hidden_size) * hidden_size**-0.5)

    def forward(self, x: Tensor) -> Routing:
        logits = _router_logits(x, self.weight)
        noisy = logits
        if self.training and self.noise_std > 0:
            noisy = logits + self.noise_std * torch.randn_like(logits)
        top_logits, indices = noisy.topk(self.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
        return Routing(indices, weights, logits.softmax(dim=-1), logits)


def _checked_indices(indices: Tensor, n_tokens: int, c: MoEConfig) -> Tensor:
    """Forced expert choices (keep routing): (T, k) integers in [0, E)."""
    if indices.shape != (n_tokens, c.num_experts_per_tok):
        raise ValueError(
            f"forced routing indices must be (tokens, k) = ({n_tokens}, "
            f"{c.num_experts_per_tok}), got {tuple(indices.shape)}; record them "
            "from a forward over the same sequences (moe.recorded_routing)"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= c.n_routed_experts):
        raise ValueError(f"forced routing indices must lie in [0, {c.n_routed_experts})")
    return indices.long()


class DeepSeekV2Router(nn.Module):
    """DeepSeek-V2's router: softmax over all routed experts, then top-k.

    ``topk_method="greedy"``: top-k over all experts. ``"group_limited_greedy"``: experts form
    ``n_group`` groups (one per device in the paper), a group's score is its best expert's
    score, only the ``topk_group`` best groups stay eligible, then top-k among their experts.
    weights = chosen probabilities (renormalised over the k when ``norm_topk_prob``) times
    ``routed_scaling_factor``. x: (..., H) -> Routing.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        if config.scoring_func != "softmax":
            raise ValueError("DeepSeekV2Router needs scoring_func='softmax'")
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=config.hidden_size**-0.5)

    def forward(self, x: Tensor, indices: Tensor | None = None) -> Routing:
        """``indices`` (T, k): use these experts instead of choosing (keep routing); the
        weights are still this router's probabilities of them, so it keeps its gradient."""
        c = self.config
        logits = _router_logits(x, self.weight)
        scores = logits.softmax(dim=-1)
        if indices is not None:
            indices = _checked_indices(indices, scores.shape[0], c)
            weights = scores.gather(1, indices)
        else:
            choice = scores
            if c.topk_method == "group_limited_greedy":
                group_scores = scores.view(-1, c.n_group, c.experts_per_group).amax(dim=-1)
                keep = _group_mask(group_scores, c.topk_group, c.experts_per_group)
                choice = scores.masked_fill(~keep, float("-inf"))
            weights, indices = choice.topk(c.num_experts_per_tok, dim=-1)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(indices, weights * c.routed_scaling_factor, scores, logits)


class DeepSeekV3Router(nn.Module):
    """DeepSeek-V3's router: sigmoid scores, a bias that only chooses, group-limited top-k.

    1. scores = sigmoid(x W^T), (T, E), float32.
    2. biased = scores + e_score_correction_bias (the buffer the balancer moves).
    3. group score = sum of the top-2 biased scores in each of the ``n_group`` groups; keep the
       ``topk_group`` best groups, mask the other groups' experts to -inf.
    4. indices = top-k of the masked biased scores.
    5. weights = the **unbiased** scores of those experts, divided by their sum when
       ``norm_topk_prob``, times ``routed_scaling_factor``.
    x: (..., H) -> Routing.
    """

    e_score_correction_bias: Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, config: MoEConfig):
        super().__init__()
        if config.scoring_func != "sigmoid":
            raise ValueError("DeepSeekV3Router needs scoring_func='sigmoid'")
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=config.hidden_size**-0.5)
        # float32 whatever the model dtype: updates of 0.001 vanish in bfloat16.
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32)
        )

    def forward(self, x: Tensor, indices: Tensor | None = None) -> Routing:
        """``indices`` (T, k): use these experts instead of steps 2-4 (keep routing); the
        weights are still step 5's scores of them, so the router keeps its gradient."""
        c = self.config
        logits = _router_logits(x, self.weight)
        scores = logits.sigmoid()
        if indices is not None:
            indices = _checked_indices(indices, scores.shape[0], c)
        else:
            biased = scores + self.e_score_correction_bias.float()
            if c.n_group > 1:
                grouped = biased.view(-1, c.n_group, c.experts_per_group)
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
                keep = _group_mask(group_scores, c.topk_group, c.experts_per_group)
                biased = biased.masked_fill(~keep, float("-inf"))
            indices = biased.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(indices, weights * c.routed_scaling_factor, scores, logits)


def make_router(config: MoEConfig) -> DeepSeekV2Router | DeepSeekV3Router:
    """The DeepSeek router ``config.scoring_func`` names: softmax -> V2, sigmoid -> V3."""
    if config.scoring_func == "softmax":
        return DeepSeekV2Router(config)
    return DeepSeekV3Router(config)


# -- dispatch -----------------------------------------------------------------------------


def dispatch_reference(
    x: Tensor, experts: Iterable[nn.Module], indices: Tensor, weights: Tensor
) -> Tensor:
    """The readable dispatch: for each token, for each of its k experts, add weight * expert(x).

    x: (T, H); indices, weights: (T, k) -> (T, H). One Python step per (token, choice): slow, and
    exactly what the vectorised version must equal.
    """
    experts = list(experts)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            out[t] += (weights[t, j] * experts[e](x[t : t + 1])[0].float()).to(x.dtype)
    return out


def dispatch_vectorized(
    x: Tensor, experts: Iterable[nn.Module], indices: Tensor, weights: Tensor
) -> Tensor:
    """Sort the T*k (token, expert) pairs by expert, run each expert once on its contiguous slice,
    scale by the gate weights, and ``index_add_`` the results back to their tokens.

    x: (T, H); indices, weights: (T, k) -> (T, H). The Python loop is over the E experts (one
    matmul each), never over tokens.
    """
    experts = list(experts)
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)  # pair positions grouped by expert
    token_of = order // k  # which token each sorted pair came from
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    gathered = x.index_select(0, token_of)  # (T*k, H), expert 0's tokens first
    pieces = [experts[e](chunk) for e, chunk in enumerate(gathered.split(counts)) if counts[e]]
    expert_out = torch.cat(pieces) if pieces else gathered
    expert_out = (expert_out.float() * weights.reshape(-1)[order, None].float()).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, expert_out)


_DISPATCH = {"vectorized": dispatch_vectorized, "reference": dispatch_reference}


def expert_counts(indices: Tensor, n_experts: int) -> Tensor:
    """indices: (..., k) -> (E,) float32 number of (token, choice) pairs sent to each expert."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).float()


# -- the layer ----------------------------------------------------------------------------


class DeepSeekMoE(nn.Module):
    """Shared experts (always on, unweighted) plus fine-grained routed experts.

    forward(x: (B, S, H)) -> (B, S, H) = shared_experts(x) + sum_k weight_k * expert_k(x).
    After each forward, ``last_routing`` holds the Routing (indices (B*S, k) ...) and
    ``last_counts`` the (E,) tokens per expert; in training mode ``load_since_update``
    accumulates counts until :class:`AuxLossFreeBalancer` consumes them.
    ``dispatch``: "vectorized" (default) or "reference" (the per-token loop, for teaching).
    """

    load_since_update: Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, config: MoEConfig, dispatch: str = "vectorized"):
        super().__init__()
        if dispatch not in _DISPATCH:
            raise ValueError(f"dispatch must be one of {tuple(_DISPATCH)}, got {dispatch!r}")
        self.config, self.dispatch = config, dispatch
        h, i = config.hidden_size, config.moe_intermediate_size
        self.gate = make_router(config)
        self.experts = nn.ModuleList(SwiGLU(h, i) for _ in range(config.n_routed_experts))
        self.shared_experts = (
            SwiGLU(h, i * config.n_shared_experts) if config.n_shared_experts else None
        )
        self.register_buffer(
            "load_since_update",
            torch.zeros(config.n_routed_experts, dtype=torch.float32),
            persistent=False,
        )
        self.last_routing: Routing | None = None
        self.last_counts: Tensor | None = None
        # keep routing (DeepSeek-V3.2): (T, k) experts to use instead of choosing; see
        # :func:`replay_routing`
        self.forced_indices: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles leave out the last forward's routing: after a training forward its
        # tensors belong to the autograd graph, which deepcopy refuses to copy (GRPO copies the
        # policy into its frozen reference right after training steps).
        state = self.__dict__.copy()
        state["last_routing"] = state["last_counts"] = state["forced_indices"] = None
        return state

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"x must be (batch, seq, {self.config.hidden_size}), got {tuple(x.shape)}"
            )
        flat = x.reshape(-1, x.shape[-1])
        routing = (
            self.gate(flat)
            if self.forced_indices is None
            else self.gate(flat, indices=self.forced_indices.to(flat.device))
        )
        routed = _DISPATCH[self.dispatch](flat, self.experts, routing.indices, routing.weights)
        counts = expert_counts(routing.indices, self.config.n_routed_experts)
        self.last_routing, self.last_counts = routing, counts
        if self.training:
            self.load_since_update += counts
        out = routed.view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


# -- keep routing (DeepSeek-V3.2) -----------------------------------------------------------


def moe_modules(model: nn.Module) -> list[DeepSeekMoE]:
    """Every :class:`DeepSeekMoE` inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, DeepSeekMoE)]


def forget_routing(model: nn.Module) -> None:
    """Clear every MoE layer's recorded routing, so that :func:`recorded_routing` after the
    next forward returns only the layers that forward used."""
    for m in moe_modules(model):
        m.last_routing = m.last_counts = None


def recorded_routing(model: nn.Module) -> dict[str, Tensor]:
    """The experts each MoE layer of ``model`` chose in its last forward, by module name: a
    (T, k) int64 tensor per layer (T = batch * seq), detached. Layers that have not run (a
    multi-token-prediction module during plain decoding) are left out. Pass it to
    :func:`replay_routing`."""
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, DeepSeekMoE)]
    if not named:
        raise ValueError("model has no DeepSeekMoE layer; keep routing needs an MoE model")
    out = {
        name: m.last_routing.indices.detach().clone()
        for name, m in named
        if m.last_routing is not None
    }
    if not out:
        raise ValueError("run a forward pass first: no MoE layer has a routing recorded")
    return out


@contextmanager
def replay_routing(model: nn.Module, indices: Mapping[str, Tensor]) -> Iterator[None]:
    """Keep routing (DeepSeek-V3.2 report, arXiv 2512.02556, the GRPO part of its
    reinforcement-learning section): inside the block, every MoE layer named in ``indices``
    (from :func:`recorded_routing`: module name -> (T, k) experts) uses those experts instead
    of choosing its own. The gate weights are still the router's current
    scores of those experts, so the router keeps learning. Forwards inside must cover the same
    T tokens as the recorded one."""
    layers = dict((name, m) for name, m in model.named_modules() if isinstance(m, DeepSeekMoE))
    unknown = sorted(set(indices) - set(layers))
    if unknown:
        raise ValueError(f"indices names MoE layers that model does not have: {unknown}")
    try:
        for name, idx in indices.items():
            layers[name].forced_indices = idx
        yield
    finally:
        for m in layers.values():
            m.forced_indices = None


def routing_changed(
    before: Mapping[str, Tensor], after: Mapping[str, Tensor], token_mask: Tensor | None = None
) -> float:
    """Fraction of (layer, token) pairs whose *set* of k experts differs between two routings
    (module name -> (T, k), as :func:`recorded_routing` returns; both must name the same
    layers). ``token_mask`` (T,) bool: count only those tokens."""
    if set(before) != set(after):
        raise ValueError(
            f"the routings cover different layers: {sorted(before)} vs {sorted(after)}"
        )
    changed = total = 0
    for name, a in before.items():
        b = after[name]
        if a.shape != b.shape:
            raise ValueError(
                f"routing shapes differ in {name}: {tuple(a.shape)} vs {tuple(b.shape)}"
            )
        differs = (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)
        if token_mask is not None:
            differs = differs[token_mask.reshape(-1).to(differs.device)]
        changed += int(differs.sum())
        total += differs.numel()
    return changed / max(total, 1)


def split_fused_experts(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rewrite transformers 5's fused expert tensors into the Hub's per-expert names.

    ``{p}.experts.gate_up_proj`` (E, 2*I, H) -> ``{p}.experts.{e}.gate_proj.weight`` (first I
    rows) and ``.up_proj.weight`` (last I rows); ``{p}.experts.down_proj`` (E, H, I) ->
    ``{p}.experts.{e}.down_proj.weight`` (``{p}`` may be empty: a single layer's state).
    Other tensors pass through unchanged. The one owner of the fused layout:
    :func:`load_fused_experts` and ``checkpoint.load_hf_checkpoint`` both read through it.
    """
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key == "experts.gate_up_proj" or key.endswith(".experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            if value.dim() != 3 or value.shape[1] % 2:
                raise ValueError(
                    f"{key} must be (experts, 2 * moe_intermediate_size, hidden), "
                    f"found {tuple(value.shape)}"
                )
            for e, w in enumerate(value):
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif key == "experts.down_proj" or key.endswith(".experts.down_proj"):
            prefix = key[: -len("down_proj")]
            if value.dim() != 3:
                raise ValueError(
                    f"{key} must be (experts, hidden, moe_intermediate_size), "
                    f"found {tuple(value.shape)}"
                )
            for e, w in enumerate(value):
                out[f"{prefix}{e}.down_proj.weight"] = w
        else:
            out[key] = value
    return out


def load_fused_experts(moe: DeepSeekMoE, state: Mapping[str, Tensor]) -> None:
    """Copy a transformers 5.x DeepseekV2/V3 MoE state dict into ``moe``.

    In memory transformers fuses the routed experts: ``experts.gate_up_proj`` (E, 2*I, H) holding
    gate rows then up rows, and ``experts.down_proj`` (E, H, I). We keep one SwiGLU per expert,
    as the Hub checkpoints do. ``gate.weight``, ``gate.e_score_correction_bias`` (V3) and
    ``shared_experts.*`` map by name.
    """
    c = moe.config
    gate_up = state["experts.gate_up_proj"]
    want_gu = (c.n_routed_experts, 2 * c.moe_intermediate_size, c.hidden_size)
    if tuple(gate_up.shape) != want_gu:
        raise ValueError(
            f"experts.gate_up_proj has shape {tuple(gate_up.shape)}, this config expects {want_gu}"
        )
    per_expert = split_fused_experts(state)
    with torch.no_grad():
        for e, expert in enumerate(moe.experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(expert, name).weight.copy_(per_expert[f"experts.{e}.{name}.weight"])
        moe.gate.weight.copy_(state["gate.weight"])
        if "gate.e_score_correction_bias" in state:
            if not isinstance(moe.gate, DeepSeekV3Router):
                raise ValueError(
                    "state has gate.e_score_correction_bias but this layer's router "
                    "is not the V3 one; use scoring_func='sigmoid'"
                )
            moe.gate.e_score_correction_bias.copy_(state["gate.e_score_correction_bias"])
        if moe.shared_experts is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(moe.shared_experts, name).weight.copy_(
                    state[f"shared_experts.{name}.weight"]
                )


def total_and_active_parameters(moe: DeepSeekMoE) -> tuple[int, int]:
    """(total, active per token) parameters of a DeepSeekMoE layer, router included."""
    c = moe.config
    per_expert = sum(p.numel() for p in moe.experts[0].parameters())
    shared = sum(p.numel() for p in moe.shared_experts.parameters()) if moe.shared_experts else 0
    router = moe.gate.weight.numel()
    total = router + shared + per_expert * c.n_routed_experts
    return total, router + shared + per_expert * c.num_experts_per_tok


# -- load statistics ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoadStats:
    """Per-expert load of one batch: counts (E,), fraction (E,) summing to 1, and
    ``max_over_mean`` (1.0 is perfectly balanced, E/k means one expert takes everything a token
    could give; DeepSeek-V3 calls its max-violation metric MaxVio = max_over_mean - 1)."""

    counts: Tensor
    fraction: Tensor
    max_over_mean: float
    min_over_mean: float


def load_statistics(indices: Tensor, n_experts: int) -> LoadStats:
    """indices: (..., k) chosen experts -> LoadStats over all tokens."""
    counts = expert_counts(indices, n_experts)
    mean = counts.mean()
    return LoadStats(
        counts, counts / counts.sum(), float(counts.max() / mean), float(counts.min() / mean)
    )


# -- auxiliary balance losses -------------------------------------------------------------


def normalized_affinities(scores: Tensor) -> Tensor:
    """Affinities divided by their sum over experts (softmax rows are unchanged; V3's sigmoid
    scores become a distribution, as its sequence-wise loss prescribes)."""
    return scores / scores.sum(dim=-1, keepdim=True)


def _load_fraction(indices: Tensor, n_experts: int) -> Tensor:
    """f_i = E / (k T) * #tokens choosing i: 1.0 for every expert under perfect balance."""
    k = indices.shape[-1]
    n_tokens = indices.numel() // k
    return expert_counts(indices, n_experts) * n_experts / (k * n_tokens)


def expert_balance_loss(scores: Tensor, indices: Tensor) -> Tensor:
    """DeepSeek-V2's expert-level balance loss (section 2.2.5), without its alpha_1.

    sum_i f_i P_i, f_i = E/(kT) * #tokens choosing i (no gradient), P_i = mean affinity of i.
    scores: (T, E) affinities summing to 1 per token (softmax, or normalized_affinities);
    indices: (T, k). Equals 1.0 under perfect balance; gradients flow through P only.
    """
    scores = scores.reshape(-1, scores.shape[-1])
    f = _load_fraction(indices.reshape(scores.shape[0], -1), scores.shape[-1])
    return (f * scores.float().mean(dim=0)).sum()


def switch_aux_loss(scores: Tensor, indices: Tensor) -> Tensor:
    """The Switch Transformer's load-balancing loss, without its alpha: E * sum_i f_i P_i with
    f_i the fraction of routed pairs that went to expert i. Same quantity as
    :func:`expert_balance_loss` (V2 kept Switch's loss and wrote the E into f)."""
    return expert_balance_loss(scores, indices)


def _group_sums(x: Tensor, n_groups: int) -> Tensor:
    if x.shape[-1] % n_groups:
        raise ValueError(f"n_devices={n_groups} must divide the {x.shape[-1]} experts")
    return x.view(*x.shape[:-1], n_groups, x.shape[-1] // n_groups).sum(dim=-1)


def device_balance_loss(scores: Tensor, indices: Tensor, n_devices: int) -> Tensor:
    """DeepSeek-V2's device-level balance loss (without alpha_2); experts are split into
    ``n_devices`` contiguous groups. f'_d = mean of f_i over d's experts, P'_d = sum of P_i."""
    scores = scores.reshape(-1, scores.shape[-1])
    n_experts = scores.shape[-1]
    f = _load_fraction(indices.reshape(scores.shape[0], -1), n_experts)
    f_dev = _group_sums(f, n_devices) * n_devices / n_experts
    p_dev = _group_sums(scores.float().mean(dim=0), n_devices)
    return (f_dev * p_dev).sum()


def communication_balance_loss(
    scores: Tensor, indices: Tensor, n_devices: int, max_devices: int
) -> Tensor:
    """DeepSeek-V2's communication balance loss (without alpha_3).

    f''_d = D / (M T) * #tokens sending anything to device d, with M = ``max_devices`` (the
    topk_group of group-limited routing); P''_d = sum of P_i over d's experts.
    """
    scores = scores.reshape(-1, scores.shape[-1])
    n_tokens, n_experts = scores.shape
    if n_experts % n_devices:
        raise ValueError(f"n_devices={n_devices} must divide the {n_experts} experts")
    device_of = indices.reshape(n_tokens, -1) // (n_experts // n_devices)
    sent = torch.zeros(n_tokens, n_devices, device=scores.device)
    sent.scatter_(1, device_of, 1.0)
    f = sent.sum(dim=0) * n_devices / (max_devices * n_tokens)
    p = _group_sums(scores.float().mean(dim=0), n_devices)
    return (f * p).sum()


def sequence_balance_loss(scores: Tensor, indices: Tensor) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (section 2.1.2), without alpha.

    scores: (B, S, E) raw affinities (sigmoid scores); indices: (B, S, k). Within each sequence,
    P_i = mean over its tokens of the normalized affinity, f_i = E/(kS) * #its tokens choosing
    i; the loss is sum_i f_i P_i, averaged over the B sequences. 1.0 when every sequence is
    balanced.
    """
    if scores.dim() != 3 or indices.dim() != 3:
        raise ValueError(
            "sequence_balance_loss needs scores (B, S, E) and indices (B, S, k); "
            "reshape the flat Routing tensors with the batch shape"
        )
    b, s, n_experts = scores.shape
    k = indices.shape[-1]
    counts = torch.zeros(b, n_experts, device=scores.device)
    counts.scatter_add_(1, indices.reshape(b, -1), torch.ones(b, s * k, device=scores.device))
    f = counts * n_experts / (k * s)
    p = normalized_affinities(scores.float()).mean(dim=1)
    return (f * p).sum(dim=-1).mean()


# -- auxiliary-loss-free balancing --------------------------------------------------------


@torch.no_grad()
def update_correction_bias(bias: Tensor, counts: Tensor, gamma: float) -> Tensor:
    """DeepSeek-V3's bias rule, in place: b_i += gamma * sign(mean_load - load_i).

    Overloaded experts (above the mean) get a lower bias and are chosen less; underloaded ones
    get a higher bias. Runs outside autograd; ``bias`` must be float32. Returns ``bias``.
    """
    if bias.dtype != torch.float32:
        raise ValueError(
            f"the correction bias must be float32 (small steps vanish in lower "
            f"precision), got {bias.dtype}"
        )
    counts = counts.float().to(bias.device)
    bias += gamma * torch.sign(counts.mean() - counts)
    return bias


class AuxLossFreeBalancer:
    """Call ``step()`` after each optimizer step: every V3-routed DeepSeekMoE in ``model`` moves
    its ``gate.e_score_correction_bias`` by ``gamma`` toward balance, using the loads counted
    since the previous call, then clears them. ``gamma=None`` uses each layer's
    ``config.bias_update_speed``."""

    def __init__(self, model: nn.Module, gamma: float | None = None):
        self.layers = [
            m
            for m in model.modules()
            if isinstance(m, DeepSeekMoE) and isinstance(m.gate, DeepSeekV3Router)
        ]
        if not self.layers:
            raise ValueError(
                "the model has no DeepSeekMoE layer with the V3 (sigmoid) router; "
                "the bias update needs scoring_func='sigmoid'"
            )
        if gamma is not None and gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def step(self) -> None:
        for layer in self.layers:
            gamma = layer.config.bias_update_speed if self.gamma is None else self.gamma
            if layer.load_since_update.sum() > 0:
                # __init__ kept only the layers whose gate is a DeepSeekV3Router
                gate = cast(DeepSeekV3Router, layer.gate)
                update_correction_bias(gate.e_score_correction_bias, layer.load_since_update, gamma)
            layer.load_since_update.zero_()
