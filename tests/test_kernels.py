"""course_utils.kernels: tiled attention == SDPA, online softmax == softmax, intensity numbers by
hand, memory measured == memory counted, machine measurements, Triton (CUDA only) and
torch.compile detection."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils import kernels as K
from course_utils.attention import causal_mask
from course_utils.layers import RMSNorm
from course_utils.mla import REAL_CONFIGS, MLAConfig

ROOT = Path(__file__).resolve().parents[1]


def _qkv(b, h, sq, sk, d, dv, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g)
    k = torch.randn(b, h, sk, d, generator=g)
    v = torch.randn(b, h, sk, dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _reference(q, k, v, causal):
    """PyTorch's SDPA; causal with fewer queries than keys via an explicit bottom-right mask."""
    if causal and q.shape[-2] != k.shape[-2]:
        mask = causal_mask(q.shape[-2], k.shape[-2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# -- online softmax and tiled attention -------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 70),
    block=st.integers(1, 80),
    spread=st.sampled_from([0.1, 1.0, 30.0]),
    masked=st.integers(0, 69),
    seed=st.integers(0, 10_000),
)
def test_online_softmax_equals_softmax(rows, cols, block, spread, masked, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * spread
    x[0, : min(masked, cols - 1)] = float("-inf")  # a masked prefix, never a whole row
    assert torch.allclose(K.online_softmax(x, block), torch.softmax(x, dim=-1), atol=1e-6)


def test_online_softmax_needs_rescaling_when_the_max_rises():
    # The max arrives in the last block: without rescaling the early sum would be far too big.
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    assert torch.allclose(K.online_softmax(x, 1), torch.softmax(x, -1), atol=1e-7)
    with pytest.raises(ValueError, match="block_size"):
        K.online_softmax(x, 0)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    sq=st.integers(1, 70),
    extra=st.integers(0, 30),
    d=st.sampled_from([4, 8, 16]),
    dv=st.sampled_from([4, 8, 12]),
    block_q=st.integers(1, 40),
    block_k=st.integers(1, 40),
    causal=st.booleans(),
    same_len=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_tiled_attention_equals_sdpa(
    b, h, sq, extra, d, dv, block_q, block_k, causal, same_len, seed
):
    sk = sq if same_len else sq + extra
    q, k, v = _qkv(b, h, sq, sk, d, dv, seed)
    got = K.tiled_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    assert got.shape == (b, h, sq, dv)
    assert torch.allclose(got, _reference(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_tiled_attention_lengths_not_multiples_of_the_blocks(causal):
    q, k, v = _qkv(2, 4, 203, 203, 32, 32, seed=1)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for bq, bk in [(64, 64), (50, 17), (256, 7), (1, 203)]:
        got = K.tiled_attention(q, k, v, causal=causal, block_q=bq, block_k=bk)
        assert (got - ref).abs().max().item() < 1e-5, (bq, bk)


def test_tiled_attention_large_scores_and_custom_scale():
    # Big logits: a softmax that did not subtract the running max would overflow to inf/nan.
    q, k, v = _qkv(1, 2, 50, 50, 8, 8, seed=2)
    got = K.tiled_attention(q * 40, k * 40, v, causal=True, block_q=16, block_k=16, scale=0.5)
    ref = F.scaled_dot_product_attention(q * 40, k * 40, v, is_causal=True, scale=0.5)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, atol=1e-5)


def test_tiled_attention_half_precision_accumulates_in_float32():
    q, k, v = _qkv(1, 2, 70, 70, 16, 16, seed=3, dtype=torch.bfloat16)
    got = K.tiled_attention(q, k, v, causal=True, block_q=16, block_k=16)
    assert got.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (got.float() - ref).abs().max().item() < 2e-2


def test_naive_attention_is_the_course_attention():
    q, k, v = _qkv(1, 2, 9, 12, 8, 8)
    assert torch.allclose(
        K.naive_attention(q, k, v, causal=True), _reference(q, k, v, True), atol=1e-6
    )


def test_attention_input_errors():
    q, k, v = _qkv(1, 2, 9, 6, 8, 8)
    with pytest.raises(ValueError, match="at least as many keys"):
        K.tiled_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="block_q"):
        K.tiled_attention(q, k, v, block_q=0)
    with pytest.raises(ValueError, match=r"\(batch, heads, seq, dim\)"):
        K.tiled_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="same head dim"):
        K.tiled_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="same number of keys"):
        K.tiled_attention(q, k, v[:, :, :3])


# -- memory: counted == measured --------------------------------------------------------------


@pytest.mark.parametrize(
    "sq, bq, bk, dv, causal",
    [
        (300, 32, 48, 16, True),
        (300, 64, 64, 16, False),
        (130, 16, 8, 24, True),
        (40, 64, 64, 16, False),
    ],
)
def test_measured_intermediates_match_the_count(sq, bq, bk, dv, causal):
    q, k, v = _qkv(2, 3, sq, sq, 16, dv)
    counted = K.attention_memory(2, 3, sq, sq, 16, dv, block_q=bq, block_k=bk)
    out, naive = K.largest_intermediate_bytes(K.naive_attention, q, k, v, causal=causal)
    out_t, tiled = K.largest_intermediate_bytes(
        K.tiled_attention, q, k, v, causal=causal, block_q=bq, block_k=bk
    )
    assert naive == counted.score_matrix_bytes == 2 * 3 * sq * sq * 4
    assert tiled == counted.tile_bytes
    assert torch.allclose(out, out_t, atol=1e-5)


def test_attention_memory_by_hand():
    mem = K.attention_memory(1, 1, 1024, 1024, 64, block_q=64, block_k=128, dtype_bytes=2)
    assert mem.score_matrix_bytes == 1024 * 1024 * 2
    assert mem.tile_bytes == 64 * 128 * 2
    assert mem.ratio == 128
    with pytest.raises(ValueError, match="block_k"):
        K.attention_memory(1, 1, 8, 8, 4, block_k=0)


def test_largest_intermediate_skips_views_inplace_and_the_output():
    x = torch.randn(100)

    def fn(t):
        a = t * 2  # 400 bytes, new
        a.add_(1)  # in place: no new memory
        _ = a[:10]  # a view
        return torch.cat([a, a])  # the output, 800 bytes: not an intermediate

    out, largest = K.largest_intermediate_bytes(fn, x)
    assert largest == 400 and out.shape == (200,)


def test_cuda_peak_memory_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CUDA test below covers it")
    with pytest.raises(RuntimeError, match="largest_intermediate_bytes"):
        K.cuda_peak_memory_bytes(lambda: None)


# -- arithmetic intensity, by hand ------------------------------------------------------------


def test_gemm_and_add_intensity_by_hand():
    g = K.gemm_intensity(2, 3, 4, in_bytes=2)  # A 2x4, B 4x3, C 2x3
    assert (g.flops, g.bytes) == (2 * 2 * 3 * 4, 2 * (8 + 12) + 2 * 6)
    assert g.flops_per_byte == 48 / 52
    g32 = K.gemm_intensity(2, 3, 4, in_bytes=2, out_bytes=4)
    assert g32.bytes == 40 + 24
    a = K.elementwise_add_intensity(10, dtype_bytes=4)
    assert (a.flops, a.bytes) == (10, 120)
    with pytest.raises(ValueError, match="k must be >= 1"):
        K.gemm_intensity(2, 3, 0)


def test_attention_intensity_by_hand():
    # 4 queries, 4 keys, head dim 2, 2 bytes: Q K^T is 2*4*4*2 = 64 FLOPs, P V another 64.
    tiled = K.attention_intensity(4, 4, 2, dtype_bytes=2, materialize_scores=False)
    naive = K.attention_intensity(4, 4, 2, dtype_bytes=2, materialize_scores=True)
    assert tiled.flops == naive.flops == 128
    assert tiled.bytes == (8 + 8 + 8 + 8) * 2  # Q, K, V, O
    assert naive.bytes == tiled.bytes + 4 * 16 * 2  # S written, read; P written, read
    # Long sequences: tiled intensity grows with length, naive saturates near d / (2 bytes).
    long_tiled = K.attention_intensity(8192, 8192, 128, materialize_scores=False)
    long_naive = K.attention_intensity(8192, 8192, 128, materialize_scores=True)
    assert long_tiled.flops_per_byte > 50 * long_naive.flops_per_byte
    assert abs(long_naive.flops_per_byte - 2 * 256 / (4 * 2)) / 64 < 0.05


def _tiny_mla():
    return MLAConfig(
        hidden_size=8,
        num_attention_heads=2,
        kv_lora_rank=4,
        qk_nope_head_dim=2,
        qk_rope_head_dim=2,
        v_head_dim=2,
    )


def test_mla_decode_intensity_by_hand():
    c = _tiny_mla()  # h=2, r=4, dn=dr=dv=2; context 3, batch 1, 1 byte per element
    absorbed = K.mla_decode_intensity(c, context=3, batch=1, absorbed=True, dtype_bytes=1)
    naive = K.mla_decode_intensity(c, context=3, batch=1, absorbed=False, dtype_bytes=1)
    # absorbed: W_uk into q 2*2*(2*4)=32; scores 2*2*3*(4+2)=72; latent sum 2*2*3*4=48;
    # W_uv 2*2*(4*2)=32
    assert absorbed.flops == 32 + 72 + 48 + 32
    # read: cache 3*(4+2)=18, kv_b weights 2*(2+2)*4=32, queries 2*(2+2)=8; write: out 2*2=4
    assert absorbed.bytes == 18 + 32 + 8 + 4
    # naive: kv_b_proj on 3 tokens 2*3*4*8=192; scores 2*2*3*(2+2)=48; P V 2*2*3*2=24
    assert naive.flops == 192 + 48 + 24
    assert naive.bytes == absorbed.bytes + 2 * 3 * 2 * (2 + 2)  # K_nope and V written + read


def test_mla_absorbed_intensity_approaches_its_limit_on_v3():
    # Over a long context the cache dominates the bytes; every cached latent serves all h heads:
    # intensity -> 2 h (2 r + dr) / ((r + dr) * bytes) = 241.8 FLOPs/byte for V3 in BF16.
    v3 = MLAConfig.from_hf(REAL_CONFIGS["DeepSeek-V3 (671B)"])
    limit = 2 * 128 * (2 * 512 + 64) / ((512 + 64) * 2)
    got = K.mla_decode_intensity(v3, context=10_000_000, batch=1).flops_per_byte
    assert abs(got - limit) / limit < 0.01
    naive = K.mla_decode_intensity(v3, context=4096, batch=1, absorbed=False)
    absorbed = K.mla_decode_intensity(v3, context=4096, batch=1, absorbed=True)
    assert absorbed.bytes < naive.bytes / 10 and absorbed.flops < naive.flops / 10


def test_moe_fp8_roofline_by_hand():
    e = K.moe_expert_intensity(tokens=2, hidden_size=3, moe_intermediate_size=5, dtype_bytes=2)
    assert e.flops == 3 * 2 * 2 * 3 * 5
    assert e.bytes == (3 * 3 * 5 + 2 * 2 * 3) * 2
    assert K.tokens_per_expert(4096, 256, 8) == 128
    f = K.fp8_gemm_intensity(2, 256, 130, out_bytes=2, block=128)  # k in 2 blocks, n in 2
    assert f.flops == 2 * 2 * 256 * 130
    assert f.bytes == (2 * 130 + 130 * 256) + 4 * (2 * 2 + 2 * 2) + 2 * 2 * 256
    bf16 = K.gemm_intensity(4096, 4096, 4096, in_bytes=2)
    fp8 = K.fp8_gemm_intensity(4096, 4096, 4096)
    # bf16 moves 2+2+2 bytes per (input, input, output) element, FP8 1+1+2 (+ scales): ~1.5x
    assert 1.45 < fp8.flops_per_byte / bf16.flops_per_byte < 1.5
    assert K.ridge_point(100.0, 10.0) == 10.0
    assert K.attainable_flops(5.0, 100.0, 10.0) == 50.0
    assert K.attainable_flops(20.0, 100.0, 10.0) == 100.0
    assert np.array_equal(
        K.attainable_flops(np.array([1.0, 10.0, 30.0]), 100.0, 10.0), np.array([10.0, 100.0, 100.0])
    )
    with pytest.raises(ValueError, match="bandwidth"):
        K.ridge_point(1.0, 0.0)
    op = K.Intensity("toy", flops=1000, bytes=50)  # 20 FLOPs/byte
    assert K.roofline_seconds(op, 100.0, 10.0) == 10.0  # compute-bound: 1000 / 100
    assert K.roofline_seconds(op, 1000.0, 10.0) == 5.0  # memory-bound: 50 / 10


# -- measuring this machine ----------------------------------------------------------------------


def test_measurements_are_positive_and_finite():
    flops = K.measure_matmul_flops(n=256, repeats=2)
    copy = K.measure_bandwidth(n_bytes=4 * 2**20, repeats=2)
    add = K.measure_bandwidth(n_bytes=4 * 2**20, kind="add", repeats=2)
    for value in (flops, copy, add):
        assert math.isfinite(value) and value > 0
    assert 1e6 < flops < 1e16 and 1e6 < copy < 1e14  # FLOP/s and bytes/s, not seconds


def test_measurement_errors():
    with pytest.raises(ValueError, match="kind"):
        K.measure_bandwidth(kind="scale")
    with pytest.raises(ValueError, match="n must be"):
        K.measure_matmul_flops(n=0)
    with pytest.raises(ValueError, match="floating-point"):
        K.measure_matmul_flops(n=4, dtype=torch.int32)
    with pytest.raises(ValueError, match="repeats"):
        K.median_seconds(lambda: None, repeats=0)


def test_median_seconds_is_the_median_of_the_timed_calls(monkeypatch):
    # a fake clock (no timing assert on a busy machine): call i takes durations[i] seconds
    durations = iter([100.0, 3.0, 1.0, 2.0])  # the first call is the warm-up, never timed
    now = [0.0]
    calls = []

    def fn():
        calls.append(1)
        now[0] += next(durations)

    monkeypatch.setattr(K.time, "perf_counter", lambda: now[0])
    assert K.median_seconds(fn, repeats=3, warmup=1) == 2.0
    assert len(calls) == 4


# -- Triton: CUDA only ------------------------------------------------------------------------


def test_triton_unavailable_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    avail = K.triton_available("cpu")
    assert not avail and avail.reason
    assert ("cannot be imported" in avail.reason) or ("CUDA" in avail.reason)
    with pytest.raises(RuntimeError, match="rmsnorm_triton cannot run"):
        K.rmsnorm_triton(torch.randn(2, 8), torch.ones(8))


def test_module_imports_without_triton():
    # A None entry in sys.modules makes `import triton` fail as if it were not installed.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from course_utils import kernels\n"
        "a = kernels.triton_available('cpu')\n"
        "assert not a and 'cannot be imported' in a.reason, a\n"
        "print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def _rmsnorm_cases(device):
    cases = [((3, 5, 16), torch.float32), ((7, 1000), torch.float32), ((4, 33), torch.float16)]
    if device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 8:
        cases.append(((50, 64), torch.bfloat16))
    return cases


def _check_rmsnorm_triton(device):
    torch.manual_seed(0)
    for shape, dtype in _rmsnorm_cases(device):
        norm = RMSNorm(shape[-1], eps=1e-5).to(device)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1]))
        x = (torch.randn(shape) * 3).to(device=device, dtype=dtype)
        got, want = K.rmsnorm_triton(x, norm.weight, norm.eps), norm(x)
        assert got.dtype == want.dtype and got.shape == want.shape
        # The normed value is rounded to x's dtype before the weight: allow one ulp of it.
        tol = max(torch.finfo(dtype).eps, 2e-6)
        assert torch.allclose(got, want, rtol=tol, atol=1e-6), (shape, dtype)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA only: Triton compiles kernels for NVIDIA GPUs and torch sees none",
)
def test_rmsnorm_triton_matches_course_rmsnorm_on_cuda():
    avail = K.triton_available("cuda")
    if not avail:
        pytest.skip(f"Triton unavailable: {avail.reason}")
    _check_rmsnorm_triton(torch.device("cuda"))
    x = torch.randn(4, 64, device="cuda")
    ptx = K.rmsnorm_triton_ptx(x, torch.ones(64, device="cuda"))
    assert ".entry" in ptx and ".version" in ptx  # PTX: a kernel entry, an ISA version
    with pytest.raises(ValueError, match="weight must have shape"):
        K.rmsnorm_triton(x, torch.ones(63, device="cuda"))


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA only: torch.cuda.max_memory_allocated needs a CUDA device",
)
def test_cuda_peak_memory_tiled_below_naive():
    q, k, v = (t.cuda() for t in _qkv(1, 4, 2048, 2048, 64, 64))
    _, naive = K.cuda_peak_memory_bytes(K.naive_attention, q, k, v, causal=True)
    _, tiled = K.cuda_peak_memory_bytes(K.tiled_attention, q, k, v, causal=True)
    assert naive >= 4 * 2048 * 2048 * 4  # at least one float32 score matrix
    assert tiled < naive / 4


def test_rmsnorm_triton_in_the_interpreter():
    """Triton's CPU interpreter runs the real kernel, where the triton package is installed."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the CUDA test runs the compiled kernel instead")
    try:
        import triton  # noqa: F401
    except Exception as err:
        pytest.skip(
            f"triton is not installed here ({type(err).__name__}), so its CPU "
            "interpreter cannot run; the CUDA test covers the kernel on a GPU"
        )
    code = (
        "import torch\n"
        "from tests.test_kernels import _check_rmsnorm_triton\n"
        "_check_rmsnorm_triton(torch.device('cpu'))\n"
        "print('ok')"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path),
        "TRITON_INTERPRET": "1",
    }
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


# -- torch.compile detection ------------------------------------------------------------------


def test_torch_compile_failure_is_reported_not_raised(monkeypatch):
    def broken(fn, *args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(K, "_COMPILE_CHECKS", {})
    monkeypatch.setattr(torch, "compile", broken)
    avail = K.torch_compile_available("cpu")
    assert not avail
    assert (
        "RuntimeError: no C++ compiler found" in avail.reason and "more detail" not in avail.reason
    )
    assert str(avail).startswith("unavailable: ")


def test_norm_swiglu_block_by_its_formula():
    torch.manual_seed(0)
    block = K.NormSwiGLUBlock(8, 20, eps=1e-6)
    x = torch.randn(3, 8)
    h = F.rms_norm(x, (8,), block.norm.weight, eps=1e-6)
    ref = x + block.mlp.down_proj(F.silu(block.mlp.gate_proj(h)) * block.mlp.up_proj(h))
    assert torch.allclose(block(x), ref, atol=1e-6)


def test_trace_new_tensors_lists_the_eager_rmsnorm_steps():
    norm = RMSNorm(64)
    x = torch.randn(32, 64)
    out, records = K.trace_new_tensors(norm, x)
    assert torch.equal(out, norm(x))
    full = [r for r in records if r.shape == (32, 64)]
    # x.pow(2) and x * rsqrt(...) each write a full-size tensor before the weight multiply
    # that makes the output: two full round trips to memory a fused kernel does not make.
    assert [r.op for r in full] == ["pow", "mul"]
    assert all(r.bytes == 32 * 64 * 4 and r.dtype == torch.float32 for r in full)
