"""FP8 the DeepSeek-V3 way: formats, block-scaled quantisation, FP8 GEMM, an FP8 linear layer.

DeepSeek-V3 (technical report, section 3.3) trains with FP8 matrix multiplications:

- one format everywhere, **e4m3** (4 exponent bits, 3 mantissa bits, largest value 448);
- **fine-grained scales**: activations get one scale per 1 x 128 tile (per token, per 128
  channels), weights one per 128 x 128 block, each ``scale = amax / 448`` so the tile's largest
  magnitude lands on the largest e4m3 value;
- **fp32 accumulation**: the products of each 128-wide slice of the inner dimension are summed,
  multiplied by the two scales and added into an fp32 accumulator.

Here the tile size is a parameter (``tile``, default 128) so the course's tiny models (widths of
64 to 128) can use e.g. 32. Shapes that are not multiples of the tile are **padded**: the edge
tiles are partial, their scale comes from the elements that exist (exactly as if the tensor had
been zero-padded), and scale tensors have ``ceil(size / tile)`` entries per axis, as in the
DeepSeek-V3 inference code. A tile of zeros gets scale 1 (any scale represents 0 exactly; 1
avoids a division by zero).

On a CPU torch can *cast* to ``float8_e4m3fn`` / ``float8_e5m2`` but its FP8 arithmetic is missing
or limited (no add or sum; recent releases multiply but round the result back to FP8), so the
GEMM here is simulated: FP8 values are upcast to fp32 (exactly: every FP8 value is an fp32 value)
and multiplied and accumulated in fp32. On CUDA GPUs of compute capability 8.9 or newer (Ada,
Hopper) :func:`fp8_gemm_scaled_mm` runs the same recipe with ``torch._scaled_mm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "E4M3",
    "E5M2",
    "FP8Format",
    "fp8_format",
    "cast_to_fp8",
    "block_scales",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_per_tensor",
    "dequantize_per_tensor",
    "quantize_tiles",
    "dequantize_tiles",
    "quantize_blocks",
    "dequantize_blocks",
    "quantize_dequantize",
    "relative_error",
    "fp8_gemm_blockwise",
    "fp8_gemm_scaled_mm",
    "scaled_mm_supported",
    "round_to_mantissa_bits",
    "limited_precision_matmul",
    "FP8Linear",
    "convert_linears_to_fp8",
]

E4M3 = torch.float8_e4m3fn  # DeepSeek-V3's format for every GEMM input
E5M2 = torch.float8_e5m2  # the wider-range, coarser format other recipes use for gradients
_FP8_DTYPES = (E4M3, E5M2)
_BACKENDS = ("auto", "simulated", "scaled_mm")


# -- formats ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FP8Format:
    """What an 8-bit float can hold, read off ``torch.finfo``.

    ``eps`` is the gap between 1 and the next larger value (2 ** -mantissa_bits): rounding to
    nearest makes a relative error of at most eps / 2 for any value in the normal range
    [smallest_normal, max]. Below smallest_normal the values are *subnormal*, evenly spaced by
    smallest_subnormal, so the error there is absolute (at most smallest_subnormal / 2).
    """

    name: str
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int
    max: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float

    @property
    def relative_precision(self) -> float:
        """Worst relative rounding error in the normal range: eps / 2."""
        return self.eps / 2


def _check_fp8_dtype(dtype: torch.dtype) -> None:
    if dtype not in _FP8_DTYPES:
        raise ValueError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype!r}")


def fp8_format(dtype: torch.dtype = E4M3) -> FP8Format:
    """The :class:`FP8Format` of ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``."""
    _check_fp8_dtype(dtype)
    info = torch.finfo(dtype)
    mantissa = round(-math.log2(info.eps))
    return FP8Format(
        name=str(dtype).removeprefix("torch."),
        dtype=dtype,
        exponent_bits=info.bits - 1 - mantissa,
        mantissa_bits=mantissa,
        max=float(info.max),
        smallest_normal=float(info.smallest_normal),
        smallest_subnormal=float(info.smallest_normal * info.eps),
        eps=float(info.eps),
    )


def cast_to_fp8(x: Tensor, dtype: torch.dtype = E4M3, saturate: bool = True) -> Tensor:
    """Round ``x`` to the nearest FP8 value of ``dtype``. Same shape, dtype ``dtype``.

    ``saturate=True`` first clamps to [-max, max], so anything too large becomes +-max (recent
    torch already saturates e4m3fn on its own, older releases gave NaN; e5m2 casts overflow to
    inf). ``saturate=False`` is torch's plain ``x.to(dtype)``, to study what the cast itself does.
    NaN stays NaN either way.
    """
    _check_fp8_dtype(dtype)
    if saturate:
        top = torch.finfo(dtype).max
        x = x.clamp(-top, top)
    return x.to(dtype)


# -- block-scaled quantisation ---------------------------------------------------------------


def _check_block(block: int | Sequence[int], name: str = "block") -> tuple[int, int]:
    if isinstance(block, bool):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {block!r}")
    if isinstance(block, int):
        block = (block, block)
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)
    ):
        raise ValueError(
            f"{name} must be a positive int or a pair (rows, cols) of positive ints, got {block!r}"
        )
    return int(block[0]), int(block[1])


def _check_tile(tile: int) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int (128 in DeepSeek-V3), got {tile!r}")
    return tile


def _check_matrix(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(x.shape)}")


def _check_float(x: Tensor, name: str) -> None:
    if not x.is_floating_point() or x.dtype in _FP8_DTYPES:
        raise ValueError(
            f"{name} must be a float16/bfloat16/float32/float64 tensor to quantise, got {x.dtype}"
        )


def _padded_blocks(x: Tensor, block: tuple[int, int]) -> Tensor:
    """x (R, C) -> zero-padded fp32 view (R'/br, br, C'/bc, bc) with R', C' multiples of block."""
    (rows, cols), (br, bc) = x.shape, block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = x.float()
    if nr * br != rows or nc * bc != cols:
        padded = F.pad(padded, (0, nc * bc - cols, 0, nr * br - rows))
    return padded.reshape(nr, br, nc, bc)


def _scales_from_amax(amax: Tensor, dtype: torch.dtype) -> Tensor:
    scale = amax / torch.finfo(dtype).max
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def block_scales(x: Tensor, block: int | Sequence[int], dtype: torch.dtype = E4M3) -> Tensor:
    """One scale per block of a matrix: amax(|block|) / max of ``dtype`` (1 for an all-zero block).

    x: (R, C); block: an int b (b x b blocks) or a pair (br, bc). Returns fp32
    (ceil(R / br), ceil(C / bc)); an edge block that sticks out takes the amax of the elements
    it has.
    """
    _check_matrix(x, "x")
    _check_float(x, "x")
    _check_fp8_dtype(dtype)
    block = _check_block(block)
    amax = _padded_blocks(x, block).abs().amax(dim=(1, 3))
    return _scales_from_amax(amax, dtype)


def quantize_blockwise(
    x: Tensor, block: int | Sequence[int], dtype: torch.dtype = E4M3
) -> tuple[Tensor, Tensor]:
    """Quantise a matrix with one scale per block.

    x: (R, C) float; block: an int b or a pair (br, bc). Returns ``(q, scales)``: q (R, C) of
    ``dtype`` holding round(x / scale) (clamped to +-max, so it never overflows), and scales fp32
    (ceil(R / br), ceil(C / bc)) from :func:`block_scales`. ``x ~= q * scale`` block by block.
    """
    _check_matrix(x, "x")
    _check_float(x, "x")
    _check_fp8_dtype(dtype)
    (rows, cols), (br, bc) = x.shape, _check_block(block)
    blocks = _padded_blocks(x, (br, bc))  # computed in fp32
    scales = _scales_from_amax(blocks.abs().amax(dim=(1, 3)), dtype)
    q = cast_to_fp8(blocks / scales[:, None, :, None], dtype)
    q = q.view(scales.shape[0] * br, scales.shape[1] * bc)
    return q[:rows, :cols].contiguous(), scales


def dequantize_blockwise(q: Tensor, scales: Tensor, block: int | Sequence[int]) -> Tensor:
    """Undo :func:`quantize_blockwise`: q (R, C) times each block's scale, as fp32 (R, C)."""
    _check_matrix(q, "q")
    (rows, cols), (br, bc) = q.shape, _check_block(block)
    want = (-(-rows // br), -(-cols // bc))
    if not isinstance(scales, Tensor) or tuple(scales.shape) != want:
        shape = tuple(scales.shape) if isinstance(scales, Tensor) else type(scales).__name__
        raise ValueError(
            f"scales has shape {shape}, but a {rows} x {cols} matrix in {br} x {bc} "
            f"blocks needs {want}"
        )
    blocks = _padded_blocks(q, (br, bc)) * scales.float()[:, None, :, None]
    return blocks.reshape(want[0] * br, want[1] * bc)[:rows, :cols]


def quantize_per_tensor(x: Tensor, dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """One scale for the whole tensor: ``(q, scale)`` with scale = amax / max (0-dim fp32).

    The classic recipe (and the one an outlier hurts most: its size sets the scale of all).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_float(x, "x")
    _check_fp8_dtype(dtype)
    x32 = x.float()
    amax = x32.abs().amax() if x32.numel() else x32.new_zeros(())
    scale = _scales_from_amax(amax, dtype)
    return cast_to_fp8(x32 / scale, dtype), scale


def dequantize_per_tensor(q: Tensor, scale: Tensor) -> Tensor:
    """q * scale as fp32, same shape as q."""
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one number, got shape {tuple(scale.shape)}")
    return q.float() * scale.float().reshape(())


def quantize_tiles(x: Tensor, tile: int = 128, dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """Activations, DeepSeek-V3 style: one scale per 1 x ``tile`` slice of the last axis.

    x: (..., K). Returns q (..., K) of ``dtype`` and scales fp32 (..., ceil(K / tile)): each
    token gets its own scale for every ``tile`` channels.
    """
    tile = _check_tile(tile)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with at least one axis (..., K)")
    lead, k = x.shape[:-1], x.shape[-1]
    q, scales = quantize_blockwise(x.reshape(-1, k), (1, tile), dtype)
    return q.view(*lead, k), scales.view(*lead, scales.shape[-1])


def dequantize_tiles(q: Tensor, scales: Tensor, tile: int = 128) -> Tensor:
    """Undo :func:`quantize_tiles`: q (..., K), scales (..., ceil(K / tile)) -> fp32 (..., K)."""
    tile = _check_tile(tile)
    lead, k = q.shape[:-1], q.shape[-1]
    if tuple(scales.shape[:-1]) != tuple(lead):
        raise ValueError(
            f"scales has shape {tuple(scales.shape)}; for q of shape "
            f"{tuple(q.shape)} it must be {(*lead, -(-k // tile))}"
        )
    flat = dequantize_blockwise(q.reshape(-1, k), scales.reshape(-1, scales.shape[-1]), (1, tile))
    return flat.view(*lead, k)


def quantize_blocks(
    w: Tensor, block: int = 128, dtype: torch.dtype = E4M3
) -> tuple[Tensor, Tensor]:
    """Weights, DeepSeek-V3 style: one scale per ``block`` x ``block`` block.

    w: (N, K) as nn.Linear stores it. Returns q (N, K) and scales fp32
    (ceil(N / block), ceil(K / block)).
    """
    return quantize_blockwise(w, _check_tile(block), dtype)


def dequantize_blocks(q: Tensor, scales: Tensor, block: int = 128) -> Tensor:
    """Undo :func:`quantize_blocks`: fp32 (N, K)."""
    return dequantize_blockwise(q, scales, _check_tile(block))


def quantize_dequantize(
    x: Tensor, scheme: str, tile: int = 128, dtype: torch.dtype = E4M3
) -> Tensor:
    """Round trip through FP8 ("fake quantisation"): fp32 tensor of x's shape.

    scheme: ``"tensor"`` (one scale), ``"tile"`` (1 x tile along the last axis) or ``"block"``
    (tile x tile; x must be 2-D).
    """
    if scheme == "tensor":
        return dequantize_per_tensor(*quantize_per_tensor(x, dtype))
    if scheme == "tile":
        return dequantize_tiles(*quantize_tiles(x, tile, dtype), tile)
    if scheme == "block":
        return dequantize_blocks(*quantize_blocks(x, tile, dtype), tile)
    raise ValueError(f"scheme must be 'tensor', 'tile' or 'block', got {scheme!r}")


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """||approx - exact|| / ||exact|| (Frobenius norms, computed in float64 on the CPU)."""
    exact64 = exact.detach().cpu().double()
    denominator = exact64.norm().item()
    if denominator == 0:
        raise ValueError("relative_error needs a non-zero exact tensor")
    return (approx.detach().cpu().double() - exact64).norm().item() / denominator


# -- FP8 GEMM --------------------------------------------------------------------------------


def _check_gemm_operands(
    a_q: Tensor, a_scales: Tensor, b_q: Tensor, b_scales: Tensor, tile: int
) -> tuple[int, int, int, int]:
    tile = _check_tile(tile)
    _check_matrix(a_q, "a_q")
    _check_matrix(b_q, "b_q")
    for name, t in (("a_q", a_q), ("b_q", b_q)):
        if t.dtype not in _FP8_DTYPES:
            raise ValueError(f"{name} must be an FP8 tensor (quantise it first), got {t.dtype}")
    (m, k), (n, k_b) = a_q.shape, b_q.shape
    if k != k_b:
        raise ValueError(
            f"inner dimensions differ: a_q is {m} x {k}, b_q is {n} x {k_b} "
            "(b is stored (N, K) like nn.Linear.weight)"
        )
    n_k = -(-k // tile)
    if tuple(a_scales.shape) != (m, n_k):
        raise ValueError(
            f"a_scales must be (M, ceil(K / tile)) = {(m, n_k)} for 1 x {tile} "
            f"tiles, got {tuple(a_scales.shape)}"
        )
    if tuple(b_scales.shape) != (-(-n // tile), n_k):
        raise ValueError(
            f"b_scales must be (ceil(N / tile), ceil(K / tile)) = "
            f"{(-(-n // tile), n_k)} for {tile} x {tile} blocks, got "
            f"{tuple(b_scales.shape)}"
        )
    return m, n, k, tile


def fp8_gemm_blockwise(
    a_q: Tensor, a_scales: Tensor, b_q: Tensor, b_scales: Tensor, tile: int = 128
) -> Tensor:
    """``a @ b.T`` from FP8 operands with fine-grained scales, accumulated in fp32 (simulated).

    a_q: (M, K) FP8 activations with a_scales (M, ceil(K / tile)) from :func:`quantize_tiles`;
    b_q: (N, K) FP8 weights with b_scales (ceil(N / tile), ceil(K / tile)) from
    :func:`quantize_blocks`. Returns fp32 (M, N).

    For every ``tile``-wide slice of K: multiply the raw FP8 values (upcast to fp32, where
    products of two FP8 numbers are exact), then scale the (M, N) partial result by a's row scale
    times b's block scale and add it into an fp32 accumulator, the way DeepSeek-V3 applies its
    scales on the CUDA cores (technical report, section 3.3.2).
    """
    m, n, k, tile = _check_gemm_operands(a_q, a_scales, b_q, b_scales, tile)
    out = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    for j, k0 in enumerate(range(0, k, tile)):
        partial = a_q[:, k0 : k0 + tile].float() @ b_q[:, k0 : k0 + tile].float().T
        b_col_scale = b_scales[:, j].float().repeat_interleave(tile)[:n]
        out += partial * (a_scales[:, j, None].float() * b_col_scale[None, :])
    return out


def scaled_mm_supported(device: torch.device | str) -> bool:
    """True on a CUDA device where torch has FP8 tensor-core GEMMs (compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm_scaled_mm(
    a_q: Tensor, a_scales: Tensor, b_q: Tensor, b_scales: Tensor, tile: int = 128
) -> Tensor:
    """:func:`fp8_gemm_blockwise` with each slice's FP8 product done by ``torch._scaled_mm``.

    Same arguments and result (fp32 (M, N)). Each ``tile``-wide slice of K is one FP8 GEMM on the
    tensor cores with unit scales and fp32 output; its result is scaled and accumulated in fp32,
    which is DeepSeek-V3's promotion every 128 elements. ``_scaled_mm`` wants K slices and N that
    are multiples of 16, so ``tile`` must be one and N and K are zero-padded. Runs on CUDA with
    compute capability >= 8.9 (see :func:`scaled_mm_supported`) and, in recent torch, on the CPU.
    """
    m, n, k, tile = _check_gemm_operands(a_q, a_scales, b_q, b_scales, tile)
    if tile % 16:
        raise ValueError(
            f"torch._scaled_mm needs K slices that are multiples of 16; tile={tile} "
            "is not (use 16, 32, ..., 128, or the simulated GEMM)"
        )
    if a_q.device.type == "cuda" and not scaled_mm_supported(a_q.device):
        raise RuntimeError(
            f"{a_q.device} has no FP8 GEMM (needs compute capability >= 8.9); "
            "use fp8_gemm_blockwise"
        )
    out = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    if m == 0 or n == 0 or k == 0:
        return out
    n_k, n_pad = -(-k // tile), -(-n // 16) * 16
    a_p = F.pad(a_q.view(torch.uint8), (0, n_k * tile - k)).view(a_q.dtype)
    b_p = F.pad(b_q.view(torch.uint8), (0, n_k * tile - k, 0, n_pad - n)).view(b_q.dtype)
    one = torch.ones((), dtype=torch.float32, device=a_q.device)
    for j in range(n_k):
        a_j = a_p[:, j * tile : (j + 1) * tile].contiguous()  # (M, tile), row-major
        b_j = b_p[:, j * tile : (j + 1) * tile].contiguous().t()  # (tile, N), column-major
        partial = torch._scaled_mm(a_j, b_j, scale_a=one, scale_b=one, out_dtype=torch.float32)
        if isinstance(partial, tuple):  # torch < 2.4 also returned amax
            partial = partial[0]
        b_col_scale = b_scales[:, j].float().repeat_interleave(tile)[:n]
        out += partial[:, :n] * (a_scales[:, j, None].float() * b_col_scale[None, :])
    return out


# -- accumulation precision (DeepSeek-V3 section 3.3.2) --------------------------------------


def round_to_mantissa_bits(x: Tensor, bits: int, mode: str = "truncate") -> Tensor:
    """Keep ``bits`` significant bits of each element of x (fp32 or fp64), same shape and dtype.

    mode ``"truncate"`` drops the rest (rounds toward zero); ``"nearest"`` rounds to nearest.
    A toy model of an accumulator narrower than fp32 (fp32 itself keeps 24).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be a positive int, got {bits!r}")
    if mode not in ("truncate", "nearest"):
        raise ValueError(f"mode must be 'truncate' or 'nearest', got {mode!r}")
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, |mantissa| in [0.5, 1)
    scaled = mantissa * 2.0**bits
    kept = torch.trunc(scaled) if mode == "truncate" else torch.round(scaled)
    return torch.ldexp(kept / 2.0**bits, exponent)


def limited_precision_matmul(
    a: Tensor,
    b: Tensor,
    accumulator_bits: int = 14,
    promote_every: int | None = None,
    mode: str = "truncate",
) -> Tensor:
    """``a @ b.T`` summed one product at a time in an accumulator of ``accumulator_bits``.

    a: (M, K), b: (N, K) -> fp64 (M, N). Products are exact (fp64); after every addition the
    running sum is rounded by :func:`round_to_mantissa_bits`. With ``promote_every = n`` the
    narrow accumulator is emptied every n products into a full-precision (fp64 here) total, the
    "promotion" DeepSeek-V3 does every 128 elements; ``None`` never promotes. A model for
    teaching, not a bit-exact description of any tensor core.
    """
    _check_matrix(a, "a")
    _check_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a is {tuple(a.shape)} and b is {tuple(b.shape)}: both must be (., K)")
    k = a.shape[1]
    if promote_every is not None and (
        isinstance(promote_every, bool) or not isinstance(promote_every, int) or promote_every < 1
    ):
        raise ValueError(f"promote_every must be a positive int or None, got {promote_every!r}")
    interval = promote_every or k
    a64, b64 = a.double(), b.double()
    total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    narrow = torch.zeros_like(total)
    for i in range(k):
        narrow = round_to_mantissa_bits(
            narrow + a64[:, i, None] * b64[None, :, i], accumulator_bits, mode
        )
        if (i + 1) % interval == 0 or i == k - 1:
            total += narrow
            narrow = torch.zeros_like(total)
    return total


# -- the FP8 linear layer --------------------------------------------------------------------


class _FP8LinearFunction(torch.autograd.Function):
    """y = Q(x) @ Q(W).T with a straight-through backward (Q treated as the identity).

    Forward quantises x per 1 x tile and W per tile x tile (e4m3) and keeps only the FP8 values
    and scales for backward. Backward: grad_x = grad_y @ Q(W), grad_W = grad_y.T @ Q(x), in fp32.
    """

    @staticmethod
    def forward(ctx, x2d: Tensor, weight: Tensor, tile: int, backend: str) -> Tensor:
        x_q, x_s = quantize_tiles(x2d, tile)
        w_q, w_s = quantize_blocks(weight, tile)
        if backend == "scaled_mm":
            y = fp8_gemm_scaled_mm(x_q, x_s, w_q, w_s, tile)
        else:  # simulated: equals fp8_gemm_blockwise up to the order of fp32 additions
            y = dequantize_tiles(x_q, x_s, tile) @ dequantize_blocks(w_q, w_s, tile).T
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.tile, ctx.x_dtype, ctx.w_dtype = tile, x2d.dtype, weight.dtype
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        g = grad_y.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ dequantize_blocks(w_q, w_s, ctx.tile)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.T @ dequantize_tiles(x_q, x_s, ctx.tile)).to(ctx.w_dtype)
        return grad_x, grad_w, None, None


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose matrix multiply runs on FP8 inputs, DeepSeek-V3 style.

    x: (..., in_features) -> (..., out_features). The parameters are the ordinary ``weight``
    (out_features, in_features) and optional ``bias``, kept in full precision (the "master
    weights"), so state_dict keys and optimizers are those of ``nn.Linear``. Each forward
    quantises x to e4m3 per 1 x ``tile`` tile and the weight per ``tile`` x ``tile`` block,
    multiplies with fp32 accumulation, then adds the bias in full precision. Backward is
    straight-through: gradients flow as if quantisation were the identity, through the
    quantised operands.

    backend: ``"simulated"`` (dequantise, fp32 matmul; any device), ``"scaled_mm"``
    (``torch._scaled_mm`` per K slice; CUDA with compute capability >= 8.9, tile a multiple of
    16) or ``"auto"`` (scaled_mm where :func:`scaled_mm_supported` and ``tile % 16 == 0``, else
    simulated). ``last_backend`` records which one the latest forward used.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        tile: int = 128,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.tile = _check_tile(tile)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend == "scaled_mm" and tile % 16:
            raise ValueError(f"backend='scaled_mm' needs tile to be a multiple of 16, got {tile}")
        self.backend = backend
        self.last_backend: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, tile: int = 128, backend: str = "auto") -> FP8Linear:
        """An FP8Linear that shares ``linear``'s weight and bias Parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            tile=tile,
            backend=backend,
            device="meta",
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def resolve_backend(self, device: torch.device) -> str:
        """The backend a forward on ``device`` uses."""
        if self.backend == "auto":
            return (
                "scaled_mm" if scaled_mm_supported(device) and self.tile % 16 == 0 else "simulated"
            )
        return self.backend

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be (..., {self.in_features}), got {tuple(x.shape)}")
        backend = self.resolve_backend(x.device)
        self.last_backend = backend
        lead = x.shape[:-1]
        y = _FP8LinearFunction.apply(
            x.reshape(-1, self.in_features), self.weight, self.tile, backend
        )
        y = y.view(*lead, self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tile={self.tile}, backend={self.backend!r}"


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def convert_linears_to_fp8(
    module: nn.Module, skip: Sequence[str] | None = None, tile: int = 128, backend: str = "auto"
) -> nn.Module:
    """Swap every ``nn.Linear`` inside ``module`` for an :class:`FP8Linear`, in place.

    The new layers share the old Parameters, so ``state_dict`` keys and values are unchanged and
    checkpoints load either way. ``skip`` lists module names to leave alone; an entry matches a
    qualified name (``layers.0.mlp.down_proj``) or its ending (``down_proj``, ``mlp.down_proj``)
    and must match at least one linear layer (a typo raises). ``None`` skips modules named
    ``lm_head``: DeepSeek-V3 keeps its output head in higher precision (technical report,
    section 3.3.1); ``()`` converts everything. Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    _check_tile(tile)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    linears = [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear) and name
    ]
    if skip is None:
        patterns: tuple[str, ...] = (
            ("lm_head",) if any(_matches(n, "lm_head") for n in linears) else ()
        )
    else:
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(
                f"skip must be a tuple of module names, e.g. ('lm_head',), got {skip!r}"
            )
        patterns = tuple(skip)
        for pattern in patterns:
            if not any(_matches(n, pattern) for n in linears):
                raise ValueError(
                    f"skip entry {pattern!r} matches no nn.Linear in the module; "
                    f"its linear layers are {linears}"
                )
    if isinstance(module, nn.Linear) and not isinstance(module, FP8Linear):
        raise ValueError("module is itself an nn.Linear: use FP8Linear.from_linear(module)")
    for name in linears:
        if any(_matches(name, p) for p in patterns):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), tile, backend))
    return module
