"""FP8 formats, block-scaled quantisation, the FP8 GEMM, FP8Linear and convert_linears_to_fp8.

References are independent of course_utils.fp8: the 256 bit patterns of each format, scales
computed block by block in Python loops, fp64 matmuls, and a straight-through fake-quantised
linear built from ``detach``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from course_utils import fp8
from course_utils.decoder import DecoderConfig, TinyDecoder
from course_utils.fp8 import E4M3, E5M2, FP8Linear, convert_linears_to_fp8


def _cpu_scaled_mm_missing() -> str | None:
    """Why torch._scaled_mm cannot run an FP8 product on this CPU, or None when it can. Probed
    here, on a 16 x 16 product, so the tests below skip only for that reason and never because
    the code under test raised."""
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    a = torch.eye(16).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as err:
        return f"torch._scaled_mm does not run on this CPU ({err})"
    return None


CPU_SCALED_MM_MISSING = _cpu_scaled_mm_missing()

E4M3_MAX = 448.0


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every value of an FP8 format, from its 256 bit patterns (NaN and inf removed)."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return values[torch.isfinite(values)]


def _scales_by_loops(x: torch.Tensor, br: int, bc: int, top: float = E4M3_MAX) -> torch.Tensor:
    rows, cols = x.shape
    out = torch.empty((rows + br - 1) // br, (cols + bc - 1) // bc)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            amax = x[i * br : (i + 1) * br, j * bc : (j + 1) * bc].abs().max().item()
            out[i, j] = amax / top if amax > 0 else 1.0
    return out


def _round_trip_bound(x: torch.Tensor, scale_per_element: torch.Tensor) -> torch.Tensor:
    """Largest error rounding to e4m3 may make: eps/2 relative in the normal range, half a
    subnormal step (times the scale) below it; a hair of slack for the fp32 division."""
    f = fp8.fp8_format(E4M3)
    bound = torch.maximum(f.eps / 2 * x.abs(), f.smallest_subnormal / 2 * scale_per_element)
    return bound * (1 + 1e-5) + 1e-30


# -- formats and casting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, e, m, top, normal, sub",
    [
        (E4M3, 4, 3, 448.0, 2.0**-6, 2.0**-9),
        (E5M2, 5, 2, 57344.0, 2.0**-14, 2.0**-16),
    ],
)
def test_formats_match_the_bit_patterns(dtype, e, m, top, normal, sub):
    f = fp8.fp8_format(dtype)
    assert (f.exponent_bits, f.mantissa_bits) == (e, m)
    assert (f.max, f.smallest_normal, f.smallest_subnormal) == (top, normal, sub)
    values = _all_values(dtype)
    positive = values[values > 0]
    assert positive.max().item() == f.max
    assert positive.min().item() == f.smallest_subnormal
    assert f.eps == 2.0**-m == positive[positive > 1].min().item() - 1.0
    # subnormals: below smallest_normal, evenly spaced by smallest_subnormal
    subnormals = positive[positive < f.smallest_normal].sort().values
    assert torch.allclose(subnormals.diff(), torch.full_like(subnormals.diff(), sub))


def test_cast_saturates_or_overflows_as_documented():
    big = torch.tensor([1e6, -1e6, 500.0, float("inf")])
    assert fp8.cast_to_fp8(big, E4M3).float().tolist() == [448.0, -448.0, 448.0, 448.0]
    assert fp8.cast_to_fp8(big, E5M2).float().tolist() == [57344.0, -57344.0, 512.0, 57344.0]
    plain = fp8.cast_to_fp8(torch.tensor([1e6, 6.2e4]), E5M2, saturate=False).float()
    assert torch.isinf(plain).all()  # e5m2 has an inf, and torch's cast goes there
    assert torch.isnan(fp8.cast_to_fp8(torch.tensor([float("nan")]), E4M3).float()).all()
    # below half the smallest subnormal everything flushes to zero
    tiny = torch.tensor([2.0**-11, 2.0**-9])
    assert fp8.cast_to_fp8(tiny, E4M3).float().tolist() == [0.0, 2.0**-9]


def test_cast_rounds_to_the_nearest_representable_value():
    values = _all_values(E4M3).unique()
    x = torch.linspace(-440, 440, 2001)
    got = fp8.cast_to_fp8(x, E4M3).float()
    nearest_dist = (x[:, None] - values[None, :]).abs().min(1).values
    assert torch.equal((got - x).abs(), nearest_dist)


# -- block scales and round trips ------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, block",
    [((256, 384), (128, 128)), ((130, 200), (128, 128)), ((7, 100), (1, 32)), ((64, 64), (32, 16))],
)
def test_block_scales_are_amax_over_448(shape, block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[1])
    x[: block[0], : block[1]] = 0.0  # one all-zero block
    want = _scales_by_loops(x, *block)
    assert want[0, 0] == 1.0
    assert torch.allclose(fp8.block_scales(x, block), want, rtol=1e-6, atol=0)
    q, scales = fp8.quantize_blockwise(x, block)
    assert torch.equal(scales, fp8.block_scales(x, block))
    assert q.dtype == E4M3 and q.shape == x.shape


@pytest.mark.parametrize(
    "shape, block", [((256, 384), (128, 128)), ((130, 200), (128, 128)), ((50, 70), (1, 32))]
)
def test_round_trip_error_is_within_half_an_e4m3_step(shape, block):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 4, shape[0])[:, None]
    q, scales = fp8.quantize_blockwise(x, block)
    back = fp8.dequantize_blockwise(q, scales, block)
    scale_el = (
        _scales_by_loops(x, *block)
        .repeat_interleave(block[0], 0)
        .repeat_interleave(block[1], 1)[: shape[0], : shape[1]]
    )
    assert ((back - x).abs() <= _round_trip_bound(x, scale_el)).all()
    # each block's largest magnitude lands exactly on +-448
    per_block = _scales_by_loops(q.float(), *block, top=1.0)
    assert torch.equal(per_block, torch.full_like(per_block, E4M3_MAX))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 90),
    tile=st.sampled_from([1, 8, 32, 128]),
    log_scale=st.floats(-20, 20),
    seed=st.integers(0, 2**16),
)
def test_tile_round_trip_property(rows, cols, tile, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64).float() * 2.0**log_scale
    q, scales = fp8.quantize_tiles(x, tile)
    assert scales.shape == (rows, -(-cols // tile))
    assert q.float().abs().max() <= E4M3_MAX
    back = fp8.dequantize_tiles(q, scales, tile)
    scale_el = _scales_by_loops(x, 1, tile).repeat_interleave(tile, 1)[:, :cols]
    assert ((back - x).abs() <= _round_trip_bound(x, scale_el)).all()


def test_tiles_work_on_any_leading_shape_and_match_per_row_blocks():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 100, generator=g)
    q, scales = fp8.quantize_tiles(x, 32)
    assert scales.shape == (2, 3, 4)
    q2, s2 = fp8.quantize_blockwise(x.reshape(6, 100), (1, 32))
    assert torch.equal(q.reshape(6, 100).view(torch.uint8), q2.view(torch.uint8))
    assert torch.equal(scales.reshape(6, 4), s2)
    assert torch.allclose(scales[1, 2, 3], x[1, 2, 96:].abs().max() / E4M3_MAX)


def test_partial_edge_blocks_equal_zero_padding():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(130, 200, generator=g)
    q, scales = fp8.quantize_blocks(w, 128)
    padded = F.pad(w, (0, 56, 0, 126))
    q_pad, s_pad = fp8.quantize_blocks(padded, 128)
    assert torch.equal(scales, s_pad)
    assert torch.equal(q.view(torch.uint8), q_pad[:130, :200].view(torch.uint8))


def test_zero_tensors_get_scale_one_and_come_back_as_zero():
    z = torch.zeros(5, 40)
    q, scales = fp8.quantize_tiles(z, 16)
    assert torch.equal(scales, torch.ones(5, 3))
    assert torch.equal(fp8.dequantize_tiles(q, scales, 16), z)
    q, scale = fp8.quantize_per_tensor(z)
    assert scale.item() == 1.0 and torch.equal(fp8.dequantize_per_tensor(q, scale), z)


def test_per_tensor_scale_is_global_amax_over_448():
    x = torch.tensor([[0.5, -3.0], [2.0, 1.0]])
    q, scale = fp8.quantize_per_tensor(x)
    assert scale.item() == pytest.approx(3.0 / E4M3_MAX)
    assert q.float()[0, 1].item() == -E4M3_MAX
    for scheme in ("tensor", "tile", "block"):
        back = fp8.quantize_dequantize(x, scheme, tile=2)
        assert torch.allclose(back, x, rtol=1 / 16)


# -- GEMM -------------------------------------------------------------------------------------


def _quantised_operands(m=48, n=80, k=300, tile=32, seed=4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.logspace(-1, 1, k)
    b = torch.randn(n, k, generator=g)
    return (a, b, *fp8.quantize_tiles(a, tile), *fp8.quantize_blocks(b, tile))


@pytest.mark.parametrize("tile", [16, 32, 128])
def test_blockwise_gemm_equals_dequantise_then_matmul(tile):
    a, b, a_q, a_s, b_q, b_s = _quantised_operands(tile=tile)
    got = fp8.fp8_gemm_blockwise(a_q, a_s, b_q, b_s, tile)
    want = (
        fp8.dequantize_tiles(a_q, a_s, tile).double()
        @ fp8.dequantize_blocks(b_q, b_s, tile).double().T
    )
    assert got.dtype == torch.float32
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6
    # and it is close to the exact product: FP8 costs a few percent, not more
    assert fp8.relative_error(got, a.double() @ b.double().T) < 0.06


@pytest.mark.skipif(CPU_SCALED_MM_MISSING is not None, reason=str(CPU_SCALED_MM_MISSING))
def test_scaled_mm_gemm_matches_the_simulation_where_torch_runs_it():
    a, b, a_q, a_s, b_q, b_s = _quantised_operands(n=70, k=200, tile=32)
    got = fp8.fp8_gemm_scaled_mm(a_q, a_s, b_q, b_s, 32)
    want = fp8.fp8_gemm_blockwise(a_q, a_s, b_q, b_s, 32)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.fp8_gemm_scaled_mm(*fp8.quantize_tiles(a, 24), *fp8.quantize_blocks(b, 24), 24)


def test_block_scaling_beats_per_tensor_on_a_matrix_with_outliers():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(256, 512, generator=g)
    b = torch.randn(256, 512, generator=g) * 0.05
    a[3, 17], a[200, 300] = 1e6, -1e6  # two activation outliers
    exact = a.double() @ b.double().T
    rows = torch.ones(256, dtype=torch.bool)
    rows[[3, 200]] = False  # judge the tokens the outliers do not belong to
    t_a, t_b = fp8.quantize_per_tensor(a), fp8.quantize_per_tensor(b)
    per_tensor = fp8.dequantize_per_tensor(*t_a) @ fp8.dequantize_per_tensor(*t_b).T
    blockwise = fp8.fp8_gemm_blockwise(*fp8.quantize_tiles(a, 128), *fp8.quantize_blocks(b, 128))
    err_tensor = fp8.relative_error(per_tensor[rows], exact[rows])
    err_block = fp8.relative_error(blockwise[rows], exact[rows])
    assert err_block < 0.06
    assert err_tensor > 5 * err_block


def test_gemm_rejects_bad_operands():
    a, b, a_q, a_s, b_q, b_s = _quantised_operands(tile=32)
    with pytest.raises(ValueError, match="FP8 tensor"):
        fp8.fp8_gemm_blockwise(a, a_s, b_q, b_s, 32)
    with pytest.raises(ValueError, match="a_scales"):
        fp8.fp8_gemm_blockwise(a_q, a_s[:, :-1], b_q, b_s, 32)
    with pytest.raises(ValueError, match="b_scales"):
        fp8.fp8_gemm_blockwise(a_q, a_s, b_q, b_s.T, 32)
    with pytest.raises(ValueError, match="inner dimensions"):
        fp8.fp8_gemm_blockwise(a_q, a_s, b_q[:, :100], b_s, 32)


# -- accumulation precision ------------------------------------------------------------------


def test_round_to_mantissa_bits_known_values():
    x = torch.tensor([3.75, -3.75, 1.0 + 2.0**-20, 0.0])
    assert fp8.round_to_mantissa_bits(x, 2).tolist() == [3.0, -3.0, 1.0, 0.0]
    assert fp8.round_to_mantissa_bits(x, 2, "nearest").tolist() == [4.0, -4.0, 1.0, 0.0]
    y = torch.randn(100, dtype=torch.float64)
    assert torch.equal(fp8.round_to_mantissa_bits(y, 53), y)


def test_promotion_interval_shrinks_the_accumulation_error():
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(8, 2048, generator=g), torch.rand(8, 2048, generator=g)
    exact = a.double() @ b.double().T
    wide = fp8.limited_precision_matmul(a, b, accumulator_bits=40)
    assert fp8.relative_error(wide, exact) < 1e-9
    never = fp8.limited_precision_matmul(a, b, accumulator_bits=14)
    every_128 = fp8.limited_precision_matmul(a, b, accumulator_bits=14, promote_every=128)
    assert torch.equal(never, fp8.limited_precision_matmul(a, b, 14, promote_every=2048))
    err_never, err_128 = fp8.relative_error(never, exact), fp8.relative_error(every_128, exact)
    assert err_never > 0.01  # the narrow accumulator swallows the small additions
    assert err_128 < err_never / 5


# -- FP8Linear ---------------------------------------------------------------------------------


def _fake_quant_linear(x, weight, bias, tile):
    """Straight-through reference: forward through Q, backward as if Q were the identity."""
    xq = fp8.quantize_dequantize(x.detach(), "tile", tile)
    wq = fp8.quantize_dequantize(weight.detach(), "block", tile)
    y = F.linear(x + (xq - x).detach(), weight + (wq - weight).detach())
    return y + bias if bias is not None else y


@pytest.mark.parametrize(
    "in_f, out_f, tile, bias", [(64, 48, 32, True), (100, 17, 32, False), (256, 128, 128, True)]
)
def test_fp8_linear_forward_and_straight_through_gradients(in_f, out_f, tile, bias):
    torch.manual_seed(7)
    layer = FP8Linear(in_f, out_f, bias=bias, tile=tile)
    ref = nn.Linear(in_f, out_f, bias=bias)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, in_f, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    assert layer.last_backend == "simulated"
    assert fp8.relative_error(y.detach(), ref(x).detach()) < 0.06
    want = _fake_quant_linear(x_ref, ref.weight, ref.bias, tile)
    assert torch.allclose(y, want, atol=1e-6, rtol=1e-5)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(layer.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-5)
    if bias:
        assert torch.allclose(layer.bias.grad, ref.bias.grad, atol=1e-5)
    # and the gradient is close to the fp32 layer's, not something else
    ref.zero_grad()
    (ref(x_ref.detach()) * upstream).sum().backward()
    assert fp8.relative_error(layer.weight.grad, ref.weight.grad) < 0.06


@pytest.mark.skipif(CPU_SCALED_MM_MISSING is not None, reason=str(CPU_SCALED_MM_MISSING))
def test_fp8_linear_scaled_mm_backend_matches_simulated():
    torch.manual_seed(8)
    layer = FP8Linear(96, 40, tile=32, backend="scaled_mm")
    sim = FP8Linear.from_linear(layer, tile=32, backend="simulated")
    x = torch.randn(6, 96)
    y = layer(x)
    assert layer.last_backend == "scaled_mm"
    assert torch.allclose(y, sim(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not fp8.scaled_mm_supported("cuda"), reason="needs a CUDA GPU of compute capability >= 8.9"
)
def test_scaled_mm_on_an_fp8_gpu():
    a, b, a_q, a_s, b_q, b_s = _quantised_operands(n=70, k=200, tile=32)
    got = fp8.fp8_gemm_scaled_mm(*(t.cuda() for t in (a_q, a_s, b_q, b_s)), 32).cpu()
    want = fp8.fp8_gemm_blockwise(a_q, a_s, b_q, b_s, 32)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    layer = FP8Linear(200, 70, tile=32).cuda()
    x = a.cuda().requires_grad_(True)
    y = layer(x)
    assert layer.last_backend == "scaled_mm"
    sim = FP8Linear.from_linear(layer, tile=32, backend="simulated")
    assert torch.allclose(y, sim(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert layer(torch.zeros(0, 200, device="cuda")).shape == (0, 70)


def test_fp8_linear_trains():
    torch.manual_seed(9)
    target = nn.Linear(32, 8)
    layer = FP8Linear(32, 8, tile=16)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    x = torch.randn(256, 32)
    y = target(x).detach()
    losses = []
    for _ in range(150):
        loss = F.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.02 * losses[0]


def test_fp8_linear_from_linear_shares_parameters_and_handles_empty_input():
    lin = nn.Linear(20, 10)
    new = FP8Linear.from_linear(lin, tile=8)
    assert new.weight is lin.weight and new.bias is lin.bias
    assert new(torch.zeros(0, 20)).shape == (0, 10)
    assert "tile=8" in repr(new)


# -- convert_linears_to_fp8 ------------------------------------------------------------------


def _decoder():
    torch.manual_seed(10)
    return TinyDecoder(
        DecoderConfig(vocab_size=17, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    )


def test_convert_keeps_state_dict_and_outputs_close():
    model = _decoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 17, (2, 24))
    with torch.no_grad():
        want = model(ids)
    convert_linears_to_fp8(model, tile=32)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8_names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, FP8Linear)
    with torch.no_grad():
        got = model(ids)
    assert 0 < fp8.relative_error(got, want) < 0.05
    fresh = _decoder()
    convert_linears_to_fp8(fresh, skip=())
    assert isinstance(fresh.lm_head, FP8Linear)
    fresh.load_state_dict(before)  # checkpoints load into the converted model
    assert torch.equal(fresh.lm_head.weight, before["lm_head.weight"])


def test_convert_skip_patterns_and_training_step():
    model = _decoder()
    convert_linears_to_fp8(
        model, skip=("lm_head", "down_proj", "layers.0.self_attn.q_proj"), tile=32
    )
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds["layers.1.mlp.down_proj"] == "Linear"
    assert kinds["layers.0.self_attn.q_proj"] == "Linear"
    assert kinds["layers.1.self_attn.q_proj"] == "FP8Linear"
    ids = torch.randint(0, 17, (2, 16))
    loss = F.cross_entropy(model(ids).reshape(-1, 17), ids.reshape(-1))
    loss.backward()
    grad = model.layers[1].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_convert_works_on_mla_and_deepseek_moe():
    from course_utils.mla import MLAConfig, MultiHeadLatentAttention
    from course_utils.moe import DeepSeekMoE, MoEConfig

    torch.manual_seed(11)
    block = nn.ModuleDict(
        {
            "attn": MultiHeadLatentAttention(
                MLAConfig(
                    hidden_size=64,
                    num_attention_heads=4,
                    kv_lora_rank=32,
                    qk_nope_head_dim=16,
                    qk_rope_head_dim=8,
                    v_head_dim=16,
                    q_lora_rank=48,
                )
            ),
            "moe": DeepSeekMoE(
                MoEConfig(
                    hidden_size=64,
                    moe_intermediate_size=32,
                    n_routed_experts=8,
                    num_experts_per_tok=2,
                    n_shared_experts=1,
                    n_group=2,
                    topk_group=1,
                )
            ),
        }
    )
    x = torch.randn(2, 10, 64)
    with torch.no_grad():  # the MoE gets the same input both times, so the same routing
        want_attn, want_moe = block["attn"](x), block["moe"](x)
    keys = list(block.state_dict())
    convert_linears_to_fp8(block, tile=16)
    assert list(block.state_dict()) == keys
    n_fp8 = sum(isinstance(m, FP8Linear) for m in block.modules())
    assert n_fp8 == 5 + 3 * 9  # MLA's q_a, q_b, kv_a, kv_b, o; 8 routed + 1 shared SwiGLU
    with torch.no_grad():
        got_attn, got_moe = block["attn"](x), block["moe"](x)
    # FP8 is really on (errors of a few percent), and no worse than chained FP8 GEMMs explain:
    # MLA runs two in a row on each path (q_a -> q_b, kv_a -> kv_b), then o_proj (6 % measured)
    assert 0.01 < fp8.relative_error(got_attn, want_attn) < 0.1
    assert 0.01 < fp8.relative_error(got_moe, want_moe) < 0.1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fp8.quantize_tiles(torch.randn(4, 8), 0), "tile"),
        (lambda: fp8.quantize_tiles(torch.randn(4, 8), 2.5), "tile"),
        (lambda: fp8.quantize_blockwise(torch.randn(4, 8), (0, 4)), "block"),
        (lambda: fp8.quantize_blockwise(torch.randn(4, 8, 2), 2), "2-D"),
        (lambda: fp8.quantize_blocks(torch.arange(8).view(2, 4), 2), "float"),
        (lambda: fp8.quantize_per_tensor(torch.randn(3), torch.float16), "float8"),
        (lambda: fp8.fp8_format(torch.bfloat16), "float8"),
        (
            lambda: fp8.dequantize_blocks(
                *fp8.quantize_blocks(torch.randn(8, 8), 4)[:1], torch.ones(3, 3), 4
            ),
            "scales",
        ),
        (lambda: fp8.quantize_dequantize(torch.randn(4, 4), "row"), "scheme"),
        (lambda: FP8Linear(8, 8, backend="fast"), "backend"),
        (lambda: FP8Linear(8, 8, tile=8, backend="scaled_mm"), "multiple of 16"),
        (lambda: FP8Linear(8, 4)(torch.randn(2, 5)), r"\(\.\.\., 8\)"),
        (lambda: convert_linears_to_fp8(_decoder(), skip="lm_head"), "tuple"),
        (lambda: convert_linears_to_fp8(_decoder(), skip=("lm_haed",)), "matches no"),
        (lambda: convert_linears_to_fp8(nn.Linear(4, 4)), "from_linear"),
        (lambda: fp8.round_to_mantissa_bits(torch.ones(2), 0), "bits"),
        (
            lambda: fp8.limited_precision_matmul(torch.ones(2, 3), torch.ones(2, 3), 14, 0),
            "promote_every",
        ),
    ],
)
def test_bad_arguments_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
