"""KV cache and attention variants: decode time per token, cached vs uncached, and MHA/GQA/MQA.

Model: TinyDecoder, width 256, 4 layers, 8 heads of 32, float32, batch 1 (cache) or 8 (variants).
"""

from __future__ import annotations

import statistics
import time

import torch

from course_utils.decoder import DecoderConfig, TinyDecoder


def _model(n_kv_heads: int = 8) -> TinyDecoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=512,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=1100,
    )
    return TinyDecoder(cfg).eval()


@torch.no_grad()
def _decode_step_seconds(model, context: int, use_cache: bool, steps: int, batch: int = 1):
    ids = torch.randint(0, 512, (batch, context))
    times = []
    caches = model.new_caches(batch, context + steps + 2) if use_cache else None
    if use_cache:
        model(ids, caches=caches)  # prefill
    token = ids[:, -1:]
    for step in range(steps + 2):  # the first two steps warm up and are not timed
        start = time.perf_counter()
        if use_cache:
            logits = model(token, caches=caches)
        else:
            logits = model(ids)
        if step >= 2:
            times.append(time.perf_counter() - start)
        token = logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, token], dim=1)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    rows = []
    steps = 3 if quick else 10
    model = _model()
    for context in (256, 1024):
        cached = _decode_step_seconds(model, context, True, steps)
        full = _decode_step_seconds(model, context, False, steps)
        rows += [
            {
                "what": f"decode ms/token, context {context}, KV cache",
                "value": cached * 1e3,
                "unit": "ms",
            },
            {
                "what": f"decode ms/token, context {context}, no cache",
                "value": full * 1e3,
                "unit": "ms",
            },
            {
                "what": f"cache speedup at context {context}",
                "value": full / cached,
                "unit": "x",
                "note": "no-cache time / cache time",
            },
        ]
    batch, context = 8, 1024
    base = None
    for name, kv in (("MHA", 8), ("GQA", 2), ("MQA", 1)):
        m = _model(kv)
        sec = _decode_step_seconds(m, context, True, steps, batch=batch)
        tps = batch / sec
        cache_bytes = m.new_caches(1, 1)[0].bytes_per_token * len(m.layers)
        base = base or (tps, cache_bytes)
        rows += [
            {
                "what": f"{name} ({kv} KV heads) decode tokens/s, batch 8, context 1024",
                "value": tps,
                "unit": "tok/s",
            },
            {"what": f"{name} tokens/s relative to MHA", "value": tps / base[0], "unit": "x"},
            {
                "what": f"{name} cache bytes/token (all layers, fp32)",
                "value": cache_bytes,
                "unit": "B",
                "note": f"{base[1] / cache_bytes:.0f}x smaller than MHA",
            },
        ]
    return rows
