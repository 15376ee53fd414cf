"""GPU optimisation tricks, measured: rooflines, tiled attention, fused kernels (notebook 24).

The pieces, in the order notebook 24 builds them:

- :func:`measure_bandwidth` and :func:`measure_matmul_flops`: the two speeds of this machine,
  bytes moved per second and floating-point operations per second.
- :class:`Intensity` and the ``*_intensity`` helpers: FLOPs, bytes and FLOPs per byte
  (arithmetic intensity) of the course's own operations: naive and tiled attention, an MLA
  decode step (naive vs absorbed), a routed MoE expert, plain and FP8 GEMMs.
  :func:`attainable_flops`, :func:`ridge_point` and :func:`roofline_seconds` place them on a
  roofline.
- :func:`online_softmax` and :func:`tiled_attention`: attention computed tile by tile with a
  running max and a running sum (the idea behind FlashAttention), in plain PyTorch, so the
  (seq x seq) score matrix never exists. :func:`attention_memory` counts what that saves and
  :func:`largest_intermediate_bytes` (any device) / :func:`cuda_peak_memory_bytes` (CUDA)
  measure it; :func:`trace_new_tensors` lists every tensor eager code writes on the way.
- :class:`NormSwiGLUBlock`: RMSNorm + SwiGLU with a residual, the ``torch.compile`` fusion
  example.
- :func:`triton_available` and :func:`rmsnorm_triton`: a fused RMSNorm written in Triton, for
  CUDA GPUs. Importing this module never needs Triton; the functions say why they cannot run.
- :func:`torch_compile_available`: whether ``torch.compile`` works here (on the CPU it needs a
  C++ compiler), and why not.

Shapes: attention tensors are (batch, heads, seq, dim), as in
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import importlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .layers import RMSNorm, SwiGLU
from .mla import MLAConfig

__all__ = [
    "Availability",
    "AttentionMemory",
    "Intensity",
    "NewTensor",
    "NormSwiGLUBlock",
    "attainable_flops",
    "attention_intensity",
    "attention_memory",
    "cuda_peak_memory_bytes",
    "elementwise_add_intensity",
    "fp8_gemm_intensity",
    "gemm_intensity",
    "largest_intermediate_bytes",
    "measure_bandwidth",
    "measure_matmul_flops",
    "median_seconds",
    "mla_decode_intensity",
    "moe_expert_intensity",
    "naive_attention",
    "online_softmax",
    "ridge_point",
    "roofline_seconds",
    "rmsnorm_triton",
    "rmsnorm_triton_ptx",
    "tiled_attention",
    "tokens_per_expert",
    "torch_compile_available",
    "trace_new_tensors",
    "triton_available",
]


# -- timing and the two speeds of a machine ---------------------------------------------------


def _as_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        from .runtime import get_device

        return get_device()
    return torch.device(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(
    fn: Callable[[], Any],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = "cpu",
) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls.

    On a GPU, work is queued asynchronously: the device is synchronised before the clock starts
    and before it stops, so the time is the kernel's, not the launch's.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check_float_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")


def measure_matmul_flops(
    n: int = 1024,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = "cpu",
    repeats: int = 5,
) -> float:
    """FLOP/s of ``torch.mm`` on two (n, n) matrices: 2 n^3 FLOPs / median seconds.

    A large square matmul reuses every loaded number n times, so it runs near the machine's
    compute peak. The defaults take well under a second on a laptop CPU; on a big GPU use
    n = 8192 and a 16-bit dtype to approach the tensor-core peak. ``device=None`` means
    ``runtime.get_device()``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_float_dtype(dtype)
    device = _as_device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), repeats, warmup=1, device=device)
    return 2 * n**3 / seconds


def measure_bandwidth(
    n_bytes: int = 64 * 2**20,
    kind: str = "copy",
    device: torch.device | str | None = "cpu",
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Bytes per second moved by a large elementwise operation: bytes moved / median seconds.

    ``kind="copy"``: ``dst.copy_(src)`` reads and writes ``n_bytes`` each (2 x n_bytes moved).
    ``kind="add"``: ``torch.add(a, b, out=c)`` reads two and writes one (3 x n_bytes moved).
    Each tensor holds ``n_bytes`` (64 MiB by default, larger than CPU caches, so the memory
    itself is measured). ``device=None`` means ``runtime.get_device()``.
    """
    if kind not in ("copy", "add"):
        raise ValueError(f"kind must be 'copy' or 'add', got {kind!r}")
    _check_float_dtype(dtype)
    elem = torch.empty(0, dtype=dtype).element_size()
    if n_bytes < elem:
        raise ValueError(f"n_bytes must hold at least one {dtype} element, got {n_bytes}")
    device = _as_device(device)
    numel = n_bytes // elem
    a = torch.rand(numel, device=device).to(dtype)
    c = torch.empty_like(a)
    if kind == "copy":
        moved = 2 * numel * elem
        seconds = median_seconds(lambda: c.copy_(a), repeats, warmup=1, device=device)
    else:
        b = torch.rand(numel, device=device).to(dtype)
        moved = 3 * numel * elem
        seconds = median_seconds(lambda: torch.add(a, b, out=c), repeats, warmup=1, device=device)
    return moved / seconds


# -- arithmetic intensity ---------------------------------------------------------------------
#
# Counting convention for every helper below (stated once, used everywhere):
# - FLOPs: a multiply-add counts 2 (so a (m, k) @ (k, n) matmul is 2 m k n); only the matmuls
#   are counted; softmax, scaling, masking and activation functions are left out (they are
#   O(elements), small beside the matmuls, and would not move a point on a log-log roofline).
# - Bytes: the minimum traffic to and from the GPU's main memory (HBM): every input read once
#   and every output written once, at the stated bytes per element, as a kernel that keeps its
#   working tiles on chip would achieve. Intermediates count only where the algorithm being
#   described writes them to memory (the naive attention's score matrix, the naive MLA path's
#   expanded keys and values): that difference is the point of the comparison.


@dataclass(frozen=True)
class Intensity:
    """FLOPs and bytes of one operation, and their ratio (arithmetic intensity, FLOPs/byte)."""

    name: str
    flops: int
    bytes: int

    @property
    def flops_per_byte(self) -> float:
        return self.flops / self.bytes

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.flops:.3g} FLOPs, {self.bytes:.3g} bytes, "
            f"{self.flops_per_byte:.3g} FLOPs/byte"
        )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def elementwise_add_intensity(n: int, dtype_bytes: int = 4) -> Intensity:
    """c = a + b on n elements: n FLOPs; reads 2n and writes n elements."""
    _check_positive(n=n, dtype_bytes=dtype_bytes)
    return Intensity(f"add of {n:,} elements", n, 3 * n * dtype_bytes)


def gemm_intensity(
    m: int, n: int, k: int, in_bytes: int = 2, out_bytes: int | None = None, name: str | None = None
) -> Intensity:
    """C = A @ B with A (m, k) and B (k, n): 2 m n k FLOPs; reads A and B at ``in_bytes`` per
    element and writes C (m, n) at ``out_bytes`` (default ``in_bytes``)."""
    _check_positive(m=m, n=n, k=k, in_bytes=in_bytes)
    out_bytes = in_bytes if out_bytes is None else out_bytes
    _check_positive(out_bytes=out_bytes)
    traffic = in_bytes * (m * k + k * n) + out_bytes * m * n
    return Intensity(name or f"GEMM {m}x{k} @ {k}x{n}", 2 * m * n * k, traffic)


def fp8_gemm_intensity(m: int, n: int, k: int, out_bytes: int = 2, block: int = 128) -> Intensity:
    """An FP8 GEMM the DeepSeek-V3 way: activations A (m, k) and weights B (k, n) stored at 1
    byte per element, with one float32 scale per 1 x ``block`` activation tile and per
    ``block`` x ``block`` weight block; the output C (m, n) written at ``out_bytes`` (BF16: 2).

    FLOPs: 2 m n k (the per-block scale multiplications are not counted). Bytes: m k + k n
    (FP8) + 4 (m ceil(k/block) + ceil(k/block) ceil(n/block)) (scales) + out_bytes m n.
    """
    _check_positive(m=m, n=n, k=k, out_bytes=out_bytes, block=block)
    kb, nb = math.ceil(k / block), math.ceil(n / block)
    scales = 4 * (m * kb + kb * nb)
    traffic = (m * k + k * n) + scales + out_bytes * m * n
    return Intensity(f"FP8 GEMM {m}x{k} @ {k}x{n}", 2 * m * n * k, traffic)


def attention_intensity(
    seq_q: int,
    seq_k: int,
    head_dim: int,
    v_head_dim: int | None = None,
    dtype_bytes: int = 2,
    materialize_scores: bool = True,
) -> Intensity:
    """Attention of one head (no causal skipping): O = softmax(Q K^T * scale) V.

    FLOPs: 2 seq_q seq_k head_dim (Q K^T) + 2 seq_q seq_k v_head_dim (P V).
    Bytes: read Q (seq_q x head_dim), K (seq_k x head_dim), V (seq_k x v_head_dim), write O
    (seq_q x v_head_dim). With ``materialize_scores`` (naive attention, one kernel per step)
    also write the scores S, read them for the softmax, write the probabilities P and read them
    for P V: 4 seq_q seq_k more elements. Without it (tiled/flash attention) S and P stay on
    chip.
    """
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    _check_positive(
        seq_q=seq_q, seq_k=seq_k, head_dim=head_dim, v_head_dim=v_head_dim, dtype_bytes=dtype_bytes
    )
    flops = 2 * seq_q * seq_k * (head_dim + v_head_dim)
    elements = seq_q * head_dim + seq_k * (head_dim + v_head_dim) + seq_q * v_head_dim
    if materialize_scores:
        elements += 4 * seq_q * seq_k
    kind = "naive" if materialize_scores else "tiled"
    return Intensity(
        f"{kind} attention, {seq_q} queries x {seq_k} keys, one head", flops, elements * dtype_bytes
    )


def mla_decode_intensity(
    config: MLAConfig, context: int, batch: int = 1, absorbed: bool = True, dtype_bytes: int = 2
) -> Intensity:
    """One decode step of one MLA layer's attention core: ``batch`` sequences, one new query
    token each, attending to ``context`` cached tokens (latent ``c_kv`` + shared ``k_pe``).

    Counted: from the per-head query parts (q_nope, q_pe) to the per-head outputs before
    ``o_proj`` (the query projections and ``o_proj`` are the same in both paths). With h heads,
    r = kv_lora_rank, dn/dr/dv the nope/rope/value head dims, T = context, B = batch:

    - naive (the course's ``absorb=False``): expand the cached latents into per-head keys and
      values, ``kv_b_proj``: 2 B T r h (dn + dv) FLOPs, writing then reading K_nope and V
      (2 B T h (dn + dv) elements); then attention: 2 B h T (dn + dr + dv) FLOPs.
    - absorbed: fold W_uk into the query (2 B h dn r), scores against the latents and the
      shared rotary key (2 B h T (r + dr)), weighted sum of latents (2 B h T r), then W_uv
      (2 B h r dv); nothing per head is written.

    Both read the cache B T (r + dr), the ``kv_b_proj`` weights h (dn + dv) r, the queries
    B h (dn + dr), and write the outputs B h dv, at ``dtype_bytes`` per element.
    """
    _check_positive(context=context, batch=batch, dtype_bytes=dtype_bytes)
    c = config
    h, r, dn, dr, dv = (
        c.num_attention_heads,
        c.kv_lora_rank,
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim,
    )
    b, t = batch, context
    elements = b * t * (r + dr) + h * (dn + dv) * r + b * h * (dn + dr) + b * h * dv
    if absorbed:
        flops = 2 * b * h * (dn * r + t * (r + dr) + t * r + r * dv)
    else:
        flops = 2 * b * t * r * h * (dn + dv) + 2 * b * h * t * (dn + dr + dv)
        elements += 2 * b * t * h * (dn + dv)
    kind = "absorbed" if absorbed else "naive"
    return Intensity(
        f"MLA decode ({kind}), batch {batch}, context {context:,}", flops, elements * dtype_bytes
    )


def tokens_per_expert(n_tokens: int, n_routed_experts: int, num_experts_per_tok: int) -> float:
    """Average tokens one routed expert receives when ``n_tokens`` tokens each pick
    ``num_experts_per_tok`` of ``n_routed_experts``: n_tokens * k / E."""
    _check_positive(
        n_tokens=n_tokens,
        n_routed_experts=n_routed_experts,
        num_experts_per_tok=num_experts_per_tok,
    )
    return n_tokens * num_experts_per_tok / n_routed_experts


def moe_expert_intensity(
    tokens: int, hidden_size: int, moe_intermediate_size: int, dtype_bytes: int = 2
) -> Intensity:
    """One routed SwiGLU expert applied to ``tokens`` tokens (its three GEMMs, fused).

    FLOPs: 3 GEMMs of 2 tokens hidden_size moe_intermediate_size each. Bytes: the expert's
    weights (3 hidden_size moe_intermediate_size) read once, the tokens' inputs read and
    outputs written (2 tokens hidden_size); the (tokens x moe_intermediate_size) activations
    stay on chip. With few tokens per expert the weights dominate: intensity ~ 2 tokens /
    dtype_bytes, which is why MoE decoding is memory-bound unless experts see many tokens.
    """
    _check_positive(
        tokens=tokens,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        dtype_bytes=dtype_bytes,
    )
    flops = 3 * 2 * tokens * hidden_size * moe_intermediate_size
    elements = 3 * hidden_size * moe_intermediate_size + 2 * tokens * hidden_size
    return Intensity(f"MoE expert, {tokens} tokens", flops, elements * dtype_bytes)


def ridge_point(peak_flops: float, bandwidth: float) -> float:
    """The intensity (FLOPs/byte) where a roofline bends: peak FLOP/s / bytes per second.
    Operations below it are memory-bound, above it compute-bound."""
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError(f"peak_flops and bandwidth must be > 0, got {peak_flops}, {bandwidth}")
    return peak_flops / bandwidth


def roofline_seconds(op: Intensity, peak_flops: float, bandwidth: float) -> float:
    """The roofline's lower bound on an operation's time: max(FLOPs / peak, bytes / bandwidth).

    Intensity says which resource limits an operation; this says how long it takes at best.
    """
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError(f"peak_flops and bandwidth must be > 0, got {peak_flops}, {bandwidth}")
    return max(op.flops / peak_flops, op.bytes / bandwidth)


@overload
def attainable_flops(intensity: float, peak_flops: float, bandwidth: float) -> float: ...


@overload
def attainable_flops(
    intensity: np.ndarray, peak_flops: float, bandwidth: float
) -> float | np.ndarray: ...


def attainable_flops(
    intensity: float | np.ndarray, peak_flops: float, bandwidth: float
) -> float | np.ndarray:
    """The roofline: min(peak FLOP/s, intensity x bandwidth), elementwise for arrays."""
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError(f"peak_flops and bandwidth must be > 0, got {peak_flops}, {bandwidth}")
    result = np.minimum(peak_flops, np.asarray(intensity, dtype=float) * bandwidth)
    return float(result) if result.ndim == 0 else result


# -- online softmax and tiled attention -------------------------------------------------------


def online_softmax(x: Tensor, block_size: int) -> Tensor:
    """Softmax over the last dimension, reading it ``block_size`` entries at a time.

    One pass keeps, per row, the running max m and the running sum l of exp(x - m) over the
    blocks seen so far; when a block raises the max, the old sum is rescaled by
    exp(m_old - m_new). A second pass writes exp(x - m) / l. Computed in float32; returns x's
    dtype. Rows that are -inf everywhere give nan, as ``torch.softmax`` does.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    x32 = x.float()
    m = torch.full(x.shape[:-1] + (1,), float("-inf"), device=x.device)
    l = torch.zeros_like(m)
    for start in range(0, x.shape[-1], block_size):
        block = x32[..., start : start + block_size]
        m_new = torch.maximum(m, block.amax(dim=-1, keepdim=True))
        # A row whose entries so far are all -inf keeps m = -inf; shift by 0 there, not -inf.
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        l = l * torch.exp(m - shift) + torch.exp(block - shift).sum(dim=-1, keepdim=True)
        m = m_new
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return (torch.exp(x32 - shift) / l).to(x.dtype)


def _check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (batch, heads, seq, dim), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v need the same batch and heads, got {tuple(q.shape[:2])}, "
            f"{tuple(k.shape[:2])}, {tuple(v.shape[:2])}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k need the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v need the same number of keys, got {k.shape[-2]} and {v.shape[-2]}"
        )
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(
            f"causal attention needs at least as many keys as queries (the queries "
            f"are the last ones), got {q.shape[-2]} queries and {k.shape[-2]} keys"
        )


def naive_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None
) -> Tensor:
    """softmax(q k^T * scale) v with the whole (seq_q x seq_k) score matrix in memory.

    The course's from-scratch attention (``course_utils.attention``), named here as the
    baseline tiled attention is compared with. q (b, h, sq, d), k (b, h, sk, d),
    v (b, h, sk, dv) -> (b, h, sq, dv); causal is bottom-right aligned.
    """
    from .attention import scaled_dot_product_attention

    _check_attention_inputs(q, k, v, causal)
    return scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
) -> Tensor:
    """Attention computed tile by tile with an online softmax; the score matrix never exists.

    q (batch, heads, seq_q, d), k (batch, heads, seq_k, d), v (batch, heads, seq_k, dv)
    -> (batch, heads, seq_q, dv), equal to ``F.scaled_dot_product_attention``. ``scale``
    defaults to 1 / sqrt(d). With ``causal`` the queries are the last seq_q positions
    (bottom-right aligned, as the course's ``causal_mask``; for seq_q == seq_k the same as
    PyTorch's ``is_causal``), and key tiles entirely in a query tile's future are skipped.

    For each tile of ``block_q`` queries it walks the keys ``block_k`` at a time, keeping per
    query the running max m, the running sum l of exp(score - m) and the running output acc;
    a key tile that raises the max rescales l and acc by exp(m_old - m_new). Seq lengths need
    not be multiples of the blocks. Scores and sums are float32; the result has q's dtype.
    """
    _check_attention_inputs(q, k, v, causal)
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be >= 1, got {block_q}, {block_k}")
    b, h, sq, d = q.shape
    sk, dv = k.shape[-2], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    offset = sk - sq  # query i sits at position offset + i (causal only)
    out = torch.empty(b, h, sq, dv, device=q.device, dtype=q.dtype)
    for qs in range(0, sq, block_q):
        qe = min(qs + block_q, sq)
        q_tile = q[:, :, qs:qe]
        m = torch.full((b, h, qe - qs, 1), float("-inf"), device=q.device)
        l = torch.zeros((b, h, qe - qs, 1), device=q.device)
        acc = torch.zeros((b, h, qe - qs, dv), device=q.device)
        k_end = min(sk, offset + qe) if causal else sk  # later key tiles are all in the future
        for ks in range(0, k_end, block_k):
            ke = min(ks + block_k, k_end)
            s = (q_tile @ k[:, :, ks:ke].transpose(-1, -2)).float() * scale
            if causal and ke - 1 > offset + qs:  # this tile crosses the diagonal
                q_pos = torch.arange(offset + qs, offset + qe, device=q.device)
                future = torch.arange(ks, ke, device=q.device)[None, :] > q_pos[:, None]
                s = s.masked_fill(future, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - shift)
            alpha = torch.exp(m - shift)  # how much the old state shrinks under the new max
            l = alpha * l + p.sum(dim=-1, keepdim=True)
            acc = alpha * acc + (p.to(v.dtype) @ v[:, :, ks:ke]).float()
            m = m_new
        out[:, :, qs:qe] = (acc / l).to(q.dtype)
    return out


@dataclass(frozen=True)
class AttentionMemory:
    """What naive and tiled attention hold in memory at once (bytes, whole batch x heads).

    ``score_matrix_bytes``: one (seq_q x seq_k) score matrix, which naive attention writes
    (and a same-sized probability matrix after the softmax). ``tile_bytes``: the largest
    tensor :func:`tiled_attention` creates, a (block_q x max(block_k, dv)) score or output tile.
    """

    score_matrix_bytes: int
    tile_bytes: int

    @property
    def ratio(self) -> float:
        return self.score_matrix_bytes / self.tile_bytes


def attention_memory(
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    v_head_dim: int | None = None,
    block_q: int = 64,
    block_k: int = 64,
    dtype_bytes: int = 4,
) -> AttentionMemory:
    """Bytes of the score matrix that tiled attention avoids vs the bytes of its largest tile.

    Counted for float32 scores by default (``dtype_bytes=4``), as both implementations here
    compute them: scores b h seq_q seq_k; tiles b h min(block_q, seq_q) x
    max(min(block_k, seq_k), v_head_dim) (a score tile, or an output accumulator tile).
    """
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    _check_positive(
        batch=batch,
        heads=heads,
        seq_q=seq_q,
        seq_k=seq_k,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        block_q=block_q,
        block_k=block_k,
        dtype_bytes=dtype_bytes,
    )
    rows = min(block_q, seq_q)
    cols = max(min(block_k, seq_k), v_head_dim)
    return AttentionMemory(
        batch * heads * seq_q * seq_k * dtype_bytes, batch * heads * rows * cols * dtype_bytes
    )


def _tensors_in(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors_in(item)]
    return []


def _storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass(frozen=True)
class NewTensor:
    """One tensor a torch function created: the function's name, the shape, dtype and bytes."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bytes: int


class _NewTensorRecorder(TorchFunctionMode):
    """Records every tensor a torch function creates (not views or in-place results)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, NewTensor]] = []  # (storage pointer, what)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = {_storage_ptr(t) for t in _tensors_in((args, kwargs))}
        for t in _tensors_in(result):
            ptr = _storage_ptr(t)
            if ptr not in inputs:  # a view or an in-place result shares an input's storage
                name = getattr(func, "__name__", str(func))
                self.records.append(
                    (ptr, NewTensor(name, tuple(t.shape), t.dtype, t.numel() * t.element_size()))
                )
        return result


def trace_new_tensors(
    fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Any, list[NewTensor]]:
    """Run ``fn(*args, **kwargs)`` and list, in order, every tensor its torch calls create.

    Returns (result, records). Every torch function called inside is watched (through
    ``torch.overrides.TorchFunctionMode``), on any device; views and in-place results are not
    new memory and are skipped, and so are the returned tensors (the output must exist whatever
    the algorithm). Work done inside one fused torch function (e.g. PyTorch's own
    ``scaled_dot_product_attention``) is invisible: only what Python-level code creates shows.
    Each record is, in eager mode, one kernel writing a tensor to memory.
    """
    with _NewTensorRecorder() as recorder:
        result = fn(*args, **kwargs)
    returned = {_storage_ptr(t) for t in _tensors_in(result)}
    return result, [rec for ptr, rec in recorder.records if ptr not in returned]


def largest_intermediate_bytes(
    fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)``; return (result, bytes of the largest tensor it created
    along the way), as :func:`trace_new_tensors` sees them (0 if none)."""
    result, records = trace_new_tensors(fn, *args, **kwargs)
    return result, max((rec.bytes for rec in records), default=0)


def cuda_peak_memory_bytes(
    fn: Callable[..., Any], *args: Any, device: torch.device | str | None = None, **kwargs: Any
) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` on a CUDA device; return (result, peak bytes allocated
    beyond what was allocated before the call), from ``torch.cuda.max_memory_allocated``.

    CUDA only: on another device it raises ``RuntimeError`` (use
    :func:`largest_intermediate_bytes`, which works everywhere).
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "cuda_peak_memory_bytes needs a CUDA device and torch sees none; "
            "use largest_intermediate_bytes, which works on any device"
        )
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(
            f"cuda_peak_memory_bytes measures CUDA memory, got device {device}; "
            "use largest_intermediate_bytes on other devices"
        )
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


# -- what can run here: Triton and torch.compile ----------------------------------------------


@dataclass(frozen=True)
class Availability:
    """Whether a feature can run here, and why (or why not). Truthy when it can."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available

    def __str__(self) -> str:
        return ("available: " if self.available else "unavailable: ") + self.reason


def _import_triton() -> tuple[Any, Any]:
    """(triton, triton.language); raises ImportError (with the cause) when Triton is absent."""
    triton = importlib.import_module("triton")
    return triton, importlib.import_module("triton.language")


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


def triton_available(device: torch.device | str | None = None) -> Availability:
    """Can :func:`rmsnorm_triton` run on ``device`` (default: CUDA if present, else CPU)?

    Triton compiles kernels for GPUs. It needs the ``triton`` package (shipped with PyTorch's
    CUDA builds on Linux, absent from CPU builds) and a CUDA device of compute capability 7.0
    or more. With ``TRITON_INTERPRET=1`` set before the first kernel launch, Triton's
    interpreter runs kernels on CPU tensors instead (slowly; for testing).
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    try:
        triton, _ = _import_triton()
    except Exception as err:  # ImportError, or a broken install that fails on import
        return Availability(
            False,
            f"the triton package cannot be imported ({type(err).__name__}"
            f": {err}); PyTorch's CPU builds do not ship it",
        )
    version = getattr(triton, "__version__", "?")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return Availability(False, "torch sees no CUDA device")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            return Availability(
                False, f"compute capability {major}.{minor} is below the 7.0 Triton needs"
            )
        name = torch.cuda.get_device_name(device)
        return Availability(
            True, f"Triton {version} on {name} (compute capability {major}.{minor})"
        )
    if device.type == "cpu" and _triton_interpreting():
        return Availability(True, f"Triton {version} interpreter (TRITON_INTERPRET=1) on the CPU")
    return Availability(
        False,
        f"Triton kernels run on CUDA GPUs and this device is {device} "
        "(set TRITON_INTERPRET=1 to run Triton's interpreter on the CPU)",
    )


_TRITON_KERNELS: dict[bool, Any] = {}


def _rmsnorm_kernel() -> Any:
    """The Triton RMSNorm kernel, defined on first use (Triton reads TRITON_INTERPRET then)."""
    interpreting = _triton_interpreting()
    if interpreting in _TRITON_KERNELS:
        return _TRITON_KERNELS[interpreting]
    triton, tl = _import_triton()

    # Triton reads the annotation ``tl.constexpr`` to compile BLOCK in; to mypy ``tl`` is a
    # variable (the triton.language module imported at run time), not a type.
    def rmsnorm_forward(
        x_ptr,
        w_ptr,
        y_ptr,
        n_cols,
        x_row_stride,
        y_row_stride,
        eps,
        BLOCK: tl.constexpr,  # type: ignore[name-defined]
    ):
        # One program normalises one row: load it once, reduce, scale, store. In PyTorch the
        # same RMSNorm is ~5 kernels, each reading and writing the whole tensor.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        mean_square = tl.sum(x * x, axis=0) / n_cols
        normed = x * (1.0 / tl.sqrt(mean_square + eps))
        # As course_utils.layers.RMSNorm: round to x's dtype, then multiply by the weight.
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(
            y_ptr + row * y_row_stride + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask
        )

    kernel = triton.jit(rmsnorm_forward)
    _TRITON_KERNELS[interpreting] = kernel
    return kernel


_MAX_TRITON_ROW = 65536


def _launch_rmsnorm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Any]:
    availability = triton_available(x.device)
    if not availability:
        raise RuntimeError(
            f"rmsnorm_triton cannot run: {availability.reason}. "
            "Use course_utils.layers.RMSNorm instead"
        )
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(
            f"weight must have shape ({n},) to match x's last dimension, got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} and weight on {weight.device}; move them together")
    if n > _MAX_TRITON_ROW:
        raise ValueError(
            f"rows of more than {_MAX_TRITON_ROW} elements do not fit one Triton block, got {n}"
        )
    triton, _ = _import_triton()
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(rows.shape, device=x.device, dtype=out_dtype)
    block = triton.next_power_of_2(n)
    compiled = _rmsnorm_kernel()[(rows.shape[0],)](
        rows,
        weight.contiguous(),
        y,
        n,
        rows.stride(0),
        y.stride(0),
        eps,
        BLOCK=block,
        num_warps=4 if block <= 2048 else 8,
    )
    return y.view(x.shape), compiled


def rmsnorm_triton(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm as one fused Triton kernel: x / sqrt(mean(x^2) + eps) * weight, row by row.

    x: (..., dim), weight: (dim,) -> (..., dim) in ``torch.promote_types(x.dtype,
    weight.dtype)``, equal to ``course_utils.layers.RMSNorm`` with that weight and eps. Needs
    :func:`triton_available` for x's device; otherwise raises ``RuntimeError`` saying why (it
    never falls back silently).
    """
    return _launch_rmsnorm(x, weight, eps)[0]


def rmsnorm_triton_ptx(x: Tensor, weight: Tensor, eps: float = 1e-6) -> str:
    """The PTX (NVIDIA's virtual GPU assembly) Triton generated for :func:`rmsnorm_triton` on
    these inputs' dtypes. CUDA only: the interpreter compiles nothing and raises here."""
    _, compiled = _launch_rmsnorm(x, weight, eps)
    asm = getattr(compiled, "asm", None)
    if not asm or "ptx" not in asm:
        raise RuntimeError(
            "this Triton launch produced no PTX (the interpreter compiles "
            "nothing); run on a CUDA device"
        )
    return asm["ptx"]


class NormSwiGLUBlock(nn.Module):
    """x + SwiGLU(RMSNorm(x)): the feed-forward half of a transformer block, the fusion example.

    x: (..., hidden_size) -> (..., hidden_size). Eager PyTorch runs the norm's and the
    activation's elementwise steps as separate kernels, each a round trip to memory;
    ``torch.compile`` fuses them (the matmuls stay matmuls).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.mlp = SwiGLU(hidden_size, intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


_COMPILE_CHECKS: dict[str, Availability] = {}


def torch_compile_available(device: torch.device | str | None = "cpu") -> Availability:
    """Does ``torch.compile`` work on ``device``? Tries a tiny function once per device type.

    On the CPU, the default backend (Inductor) writes C++ and needs a C++ compiler; on CUDA it
    writes Triton kernels and needs Triton. Anything that goes wrong (no compiler, unsupported
    Python or platform) comes back as the reason, never as an exception.
    """
    device = _as_device(device)
    if device.type in _COMPILE_CHECKS:
        return _COMPILE_CHECKS[device.type]

    def probe(x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x) * x + 1.0

    try:
        x = torch.linspace(-2, 2, 8, device=device)
        got = torch.compile(probe)(x)
        if not torch.allclose(got, probe(x), atol=1e-6):
            raise RuntimeError("the compiled probe computed a different result")
        result = Availability(
            True, f"torch.compile works on {device.type} (torch {torch.__version__})"
        )
    except Exception as err:  # report why, never crash the caller
        first_line = str(err).strip().split("\n")[0][:300]
        result = Availability(
            False, f"torch.compile failed on {device.type}: {type(err).__name__}: {first_line}"
        )
    _COMPILE_CHECKS[device.type] = result
    return result
