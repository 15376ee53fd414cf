"""FP8: simulated block-scaled GEMM vs an fp32 matmul on the CPU, and the errors FP8 makes.

On a CPU there are no FP8 matrix units: the simulation upcasts FP8 values to fp32 and loops over
128-wide slices of K, so it is *slower* than a plain fp32 matmul. The point of the simulation
is accuracy (the error rows), not speed. Where a CUDA GPU of compute capability >= 8.9 is
present, extra rows time ``torch._scaled_mm`` against a bf16 matmul of the same shape.
Shapes: activations (M, K) = (512, 1024), weights (N, K) = (1024, 1024), tile 128, float32.
"""

from __future__ import annotations

import torch

from course_utils import fp8
from course_utils.kernels import median_seconds

_M, _N, _K, _TILE = 512, 1024, 1024, 128


def _error_rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(_M, _K, generator=g)
    w = torch.randn(_N, _K, generator=g) * 0.02
    rows = [
        {
            "what": f"round-trip relative error, Gaussian activations, {scheme} scaling",
            "value": fp8.relative_error(fp8.quantize_dequantize(a, scheme, _TILE), a),
            "unit": "",
            "note": "e4m3, Frobenius norm",
        }
        for scheme in ("tensor", "tile")
    ]
    exact = a.double() @ w.double().T
    block = fp8.fp8_gemm_blockwise(
        *fp8.quantize_tiles(a, _TILE), *fp8.quantize_blocks(w, _TILE), _TILE
    )
    rows.append(
        {
            "what": "GEMM relative error, 1x128 tiles x 128x128 blocks, fp32 accumulate",
            "value": fp8.relative_error(block, exact),
            "unit": "",
            "note": "vs fp64",
        }
    )
    outlier = a.clone()
    outlier[7, 100], outlier[300, 900] = 1e6, -1e6
    keep = torch.ones(_M, dtype=torch.bool)
    keep[[7, 300]] = False
    exact = outlier.double() @ w.double().T
    per_tensor = (
        fp8.dequantize_per_tensor(*fp8.quantize_per_tensor(outlier))
        @ fp8.dequantize_per_tensor(*fp8.quantize_per_tensor(w)).T
    )
    block = fp8.fp8_gemm_blockwise(
        *fp8.quantize_tiles(outlier, _TILE), *fp8.quantize_blocks(w, _TILE), _TILE
    )
    e_tensor = fp8.relative_error(per_tensor[keep], exact[keep])
    e_block = fp8.relative_error(block[keep], exact[keep])
    note = "two 1e6 outliers; error on the other 510 tokens' outputs"
    rows += [
        {
            "what": "GEMM relative error with outliers, per-tensor scaling",
            "value": e_tensor,
            "unit": "",
            "note": note,
        },
        {
            "what": "GEMM relative error with outliers, tile/block scaling",
            "value": e_block,
            "unit": "",
            "note": note,
        },
        {
            "what": "error ratio with outliers, per-tensor / tile-block",
            "value": e_tensor / e_block,
            "unit": "x",
        },
    ]
    return rows


def _cuda_rows(repeats: int) -> list[dict]:
    device = torch.device("cuda")
    size = 4096
    a = torch.randn(size, size, device=device)
    w = torch.randn(size, size, device=device) * 0.02
    a_bf, w_bf = a.bfloat16(), w.bfloat16()
    a_q, a_s = fp8.quantize_tiles(a, _TILE)
    w_q, w_s = fp8.quantize_blocks(w, _TILE)
    one = torch.ones((), device=device)
    w_col = w_q.t()  # column-major view of the (K, N) operand

    def scaled_mm():
        out = torch._scaled_mm(a_q, w_col, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return out[0] if isinstance(out, tuple) else out

    t_bf16 = median_seconds(lambda: a_bf @ w_bf.T, repeats, device=device)
    t_fp8 = median_seconds(scaled_mm, repeats, device=device)
    t_block = median_seconds(
        lambda: fp8.fp8_gemm_scaled_mm(a_q, a_s, w_q, w_s, _TILE),
        max(1, repeats // 3),
        device=device,
    )
    flops = 2 * size**3
    name = torch.cuda.get_device_name(device)
    return [
        {
            "what": f"bf16 matmul {size}^3",
            "value": flops / t_bf16 / 1e12,
            "unit": "TFLOP/s",
            "note": name,
        },
        {
            "what": f"torch._scaled_mm e4m3, one scale per tensor, {size}^3",
            "value": flops / t_fp8 / 1e12,
            "unit": "TFLOP/s",
        },
        {"what": "speed-up, _scaled_mm / bf16", "value": t_bf16 / t_fp8, "unit": "x"},
        {
            "what": "fp8_gemm_scaled_mm (one _scaled_mm per 128-slice of K, fp32 scaling)",
            "value": flops / t_block / 1e12,
            "unit": "TFLOP/s",
            "note": "32 launches + fp32 adds: shows the recipe, not a fused kernel",
        },
    ]


@torch.no_grad()
def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    repeats = 3 if quick else 10
    a, w = torch.randn(_M, _K), torch.randn(_N, _K) * 0.02
    a_q, a_s = fp8.quantize_tiles(a, _TILE)
    w_q, w_s = fp8.quantize_blocks(w, _TILE)
    t_fp32 = median_seconds(lambda: a @ w.T, repeats)
    t_gemm = median_seconds(lambda: fp8.fp8_gemm_blockwise(a_q, a_s, w_q, w_s, _TILE), repeats)
    t_quant = median_seconds(
        lambda: (fp8.quantize_tiles(a, _TILE), fp8.quantize_blocks(w, _TILE)), repeats
    )
    linear = torch.nn.Linear(_K, _N, bias=False)
    fp8_linear = fp8.FP8Linear.from_linear(linear, tile=_TILE, backend="simulated")
    t_lin = median_seconds(lambda: linear(a), repeats)
    t_fp8_lin = median_seconds(lambda: fp8_linear(a), repeats)
    flops = 2 * _M * _N * _K
    rows = [
        {
            "what": f"fp32 matmul ({_M}x{_K}) @ ({_K}x{_N})",
            "value": flops / t_fp32 / 1e9,
            "unit": "GFLOP/s",
        },
        {
            "what": "simulated FP8 GEMM, 1x128 x 128x128 scales (operands pre-quantised)",
            "value": flops / t_gemm / 1e9,
            "unit": "GFLOP/s",
            "note": "upcast + fp32 per K slice",
        },
        {
            "what": "time ratio, simulated FP8 GEMM / fp32 matmul",
            "value": t_gemm / t_fp32,
            "unit": "x",
            "note": "slower on CPU: the simulation is for accuracy, not speed",
        },
        {
            "what": "quantise activations (tiles) + weights (blocks)",
            "value": t_quant * 1e3,
            "unit": "ms",
        },
        {
            "what": "time ratio, FP8Linear (simulated) / nn.Linear forward",
            "value": t_fp8_lin / t_lin,
            "unit": "x",
            "note": "includes quantising both operands",
        },
    ]
    rows += _error_rows()
    if fp8.scaled_mm_supported("cuda"):
        rows += _cuda_rows(repeats)
    else:
        rows.append(
            {
                "what": "CUDA _scaled_mm vs bf16",
                "value": float("nan"),
                "unit": "",
                "note": "skipped: no CUDA GPU with compute capability >= 8.9",
            }
        )
    return rows
