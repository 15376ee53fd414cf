"""GPU tricks on this machine: attention three ways, the machine's two speeds, fusion.

- Attention, causal, batch 1, 8 heads of 64, float32: the course's naive attention (whole
  score matrix in memory), PyTorch's fused ``scaled_dot_product_attention``, and
  ``kernels.tiled_attention`` (online softmax in Python, blocks of 64), timed alternately in
  one run at a few lengths, with ratios, and the largest intermediate tensor of naive vs tiled
  (measured, not computed).
- Memory bandwidth (copy and add of 64 MiB tensors) and the matmul rate (float32).
- ``torch.compile`` vs eager on RMSNorm alone and on RMSNorm + SwiGLU, where compile works;
  otherwise one row saying it is unavailable and why.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from course_utils import kernels
from course_utils.layers import RMSNorm

HEADS, HEAD_DIM, BLOCK = 8, 64, 64


def _attention_rows(quick: bool) -> list[dict]:
    rows = []
    lengths = (256, 512) if quick else (256, 512, 1024, 2048)
    repeats = 3 if quick else 7
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))
        impls = {
            "naive": lambda q=q, k=k, v=v: kernels.naive_attention(q, k, v, causal=True),
            "SDPA": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "tiled": lambda q=q, k=k, v=v: kernels.tiled_attention(
                q, k, v, causal=True, block_q=BLOCK, block_k=BLOCK
            ),
        }
        ref = impls["SDPA"]()
        assert torch.allclose(impls["tiled"](), ref, atol=1e-5)
        assert torch.allclose(impls["naive"](), ref, atol=1e-5)
        times = {name: [] for name in impls}
        for _ in range(repeats):  # alternate, so drift on a shared machine hits all three
            for name, fn in impls.items():
                times[name].append(kernels.median_seconds(fn, repeats=1, warmup=0))
        ms = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
        for name in impls:
            rows.append(
                {
                    "what": f"attention {name}, {n} tokens",
                    "value": ms[name],
                    "unit": "ms",
                    "note": f"median of {repeats}, causal, {HEADS}x{HEAD_DIM}",
                }
            )
        rows.append(
            {
                "what": f"attention tiled / SDPA time, {n} tokens",
                "value": ms["tiled"] / ms["SDPA"],
                "unit": "x",
                "note": "Python loop over tiles vs one fused kernel",
            }
        )
        rows.append(
            {
                "what": f"attention naive / SDPA time, {n} tokens",
                "value": ms["naive"] / ms["SDPA"],
                "unit": "x",
            }
        )
        _, naive_bytes = kernels.largest_intermediate_bytes(impls["naive"])
        _, tiled_bytes = kernels.largest_intermediate_bytes(impls["tiled"])
        rows.append(
            {
                "what": f"largest intermediate, naive, {n} tokens",
                "value": naive_bytes / 2**20,
                "unit": "MiB",
                "note": "measured",
            }
        )
        rows.append(
            {
                "what": f"largest intermediate, tiled, {n} tokens",
                "value": tiled_bytes / 2**20,
                "unit": "MiB",
                "note": "measured",
            }
        )
    return rows


def _machine_rows(quick: bool) -> list[dict]:
    repeats = 3 if quick else 7
    copy = kernels.measure_bandwidth(kind="copy", repeats=repeats)
    add = kernels.measure_bandwidth(kind="add", repeats=repeats)
    n = 512 if quick else 1024
    flops = kernels.measure_matmul_flops(n=n, repeats=repeats)
    return [
        {"what": "memory bandwidth, copy 64 MiB", "value": copy / 1e9, "unit": "GB/s"},
        {"what": "memory bandwidth, add 64 MiB", "value": add / 1e9, "unit": "GB/s"},
        {"what": f"matmul rate, {n}x{n} float32", "value": flops / 1e9, "unit": "GFLOP/s"},
        {
            "what": "ridge point (matmul rate / copy bandwidth)",
            "value": kernels.ridge_point(flops, copy),
            "unit": "FLOPs/byte",
        },
    ]


def _compile_rows(quick: bool) -> list[dict]:
    available = kernels.torch_compile_available("cpu")
    if not available:
        return [
            {
                "what": "torch.compile vs eager",
                "value": math.nan,
                "unit": "",
                "note": str(available),
            }
        ]
    rows = []
    repeats = 3 if quick else 10
    torch.manual_seed(0)
    cases = {
        "RMSNorm": (
            RMSNorm(1024),
            torch.randn(2048 if quick else 8192, 1024),
            "memory-bound chain, fully fused",
        ),
        "RMSNorm+SwiGLU": (
            kernels.NormSwiGLUBlock(256, 512),
            torch.randn(1024 if quick else 4096, 256),
            "elementwise steps fused; the 3 matmuls unchanged",
        ),
    }
    with torch.no_grad():
        for name, (module, x, note) in cases.items():
            compiled = torch.compile(module)
            assert torch.allclose(compiled(x), module(x), atol=1e-5)
            eager_s, compiled_s = [], []
            for _ in range(repeats):
                eager_s.append(kernels.median_seconds(lambda m=module, x=x: m(x), 1, 0))
                compiled_s.append(kernels.median_seconds(lambda m=compiled, x=x: m(x), 1, 0))
            e, c = sorted(eager_s)[repeats // 2], sorted(compiled_s)[repeats // 2]
            shape = "x".join(map(str, x.shape))
            rows.append({"what": f"{name} eager, {shape}", "value": e * 1e3, "unit": "ms"})
            rows.append({"what": f"{name} compiled, {shape}", "value": c * 1e3, "unit": "ms"})
            rows.append(
                {
                    "what": f"{name} speed-up from torch.compile",
                    "value": e / c,
                    "unit": "x",
                    "note": note,
                }
            )
    return rows


def run(quick: bool) -> list[dict]:
    return _attention_rows(quick) + _machine_rows(quick) + _compile_rows(quick)
