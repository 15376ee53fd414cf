"""MLA: decode time per token, naive vs absorbed, and cache bytes per token vs MHA/GQA/MQA.

One layer at DeepSeek-V3's per-head shape (latent 512, rotary 64, nope/value heads of 128) with
16 heads and width 2048, float32 on the CPU. Decoding one token after 1024 cached tokens: the
naive path expands every cached latent into per-head keys and values at every step; the absorbed
path attends over the latents directly. Both are timed alternately in the same run.
"""

from __future__ import annotations

import statistics
import time

import torch

from course_utils.cache import KVCache
from course_utils.mla import MLAConfig, MultiHeadLatentAttention

CONTEXT = 1024
HEADS = 16
HEAD_DIM = 128


def run(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    config = MLAConfig(
        hidden_size=2048,
        num_attention_heads=HEADS,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=HEAD_DIM,
        qk_rope_head_dim=64,
        v_head_dim=HEAD_DIM,
    )
    mla = MultiHeadLatentAttention(config).eval()
    x = torch.randn(1, CONTEXT + 1, config.hidden_size)
    cache = mla.new_cache(1, CONTEXT + 1)
    repeats = 3 if quick else 15
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        mla(x[:, :CONTEXT], cache)
        outs = {}
        for i in range(repeats + 1):  # the first round warms up and is not counted
            for absorb in (False, True):
                cache.length = CONTEXT  # decode the same token after the same 1024 tokens
                start = time.perf_counter()
                outs[absorb] = mla(x[:, CONTEXT:], cache, absorb=absorb)
                if i:
                    times[absorb].append(time.perf_counter() - start)
    assert torch.allclose(outs[True], outs[False], rtol=1e-4, atol=1e-5)
    naive, absorbed = statistics.median(times[False]), statistics.median(times[True])
    rows = [
        {
            "what": f"decode ms/token, naive, {CONTEXT} ctx",
            "value": naive * 1e3,
            "unit": "ms",
            "note": f"median of {repeats}",
        },
        {
            "what": f"decode ms/token, absorbed, {CONTEXT} ctx",
            "value": absorbed * 1e3,
            "unit": "ms",
            "note": f"median of {repeats}",
        },
        {"what": "decode speed-up, absorbed vs naive", "value": naive / absorbed, "unit": "x"},
    ]
    mla_bytes = cache.bytes_per_token
    rows.append(
        {
            "what": "cache bytes/token/layer, MLA",
            "value": mla_bytes,
            "unit": "B",
            "note": "latent 512 + rotary key 64, float32",
        }
    )
    for name, kv_heads in (("MHA", HEADS), ("GQA-4", 4), ("MQA", 1)):
        kv = KVCache(1, 1, kv_heads, HEAD_DIM, dtype=cache.c_kv.dtype)
        rows.append(
            {
                "what": f"cache bytes/token/layer, {name}",
                "value": kv.bytes_per_token,
                "unit": "B",
                "note": f"{kv_heads} KV heads of {HEAD_DIM}",
            }
        )
        rows.append(
            {
                "what": f"cache ratio {name} / MLA",
                "value": kv.bytes_per_token / mla_bytes,
                "unit": "x",
            }
        )
    return rows
