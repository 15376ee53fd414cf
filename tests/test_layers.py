from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course_utils.layers import RMSNorm, SwiGLU


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16)
    ref = F.rms_norm(x, (16,), norm.weight, eps=1e-6)
    assert torch.allclose(norm(x), ref, atol=1e-6)
    with pytest.raises(ValueError, match="dim"):
        RMSNorm(0)


def test_swiglu_by_its_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(8, 20)
    x = torch.randn(2, 3, 8)
    g, u, d = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    ref = (F.silu(x @ g.T) * (x @ u.T)) @ d.T
    assert torch.allclose(ffn(x), ref, atol=1e-6)
