"""The mini-DeepSeek: training speed vs a dense baseline, cached vs uncached decoding, and MFU.

Models: ``DeepSeekConfig.preset("cpu", vocab_size=16)`` (1 dense + 2 MoE layers, 8 routed
experts top-2 + 1 shared) and its ``dense_baseline()`` (same layers, every FFN a SwiGLU of the
active expert width, 120), float32 on the CPU. Training: AdamW steps on batches of 128 x 48
tokens (32 x 48 with ``quick``), the two models' steps alternated so both see the same machine
load. Decoding: greedy, batch 1, 16-token prompt + 128 new tokens (32 with ``quick``). Last, the
pretraining step exactly as notebook 21 runs it, projected over its 1000 steps (the 4-minute
budget).

MFU (model FLOPs utilisation) = achieved training FLOP/s / the machine's measured fp32 matmul
rate (torch.mm of two n x n matrices, 2 n^3 FLOPs, n = 1024, same run), with training FLOPs per
token = 6 * N + 6 * L * H * (d_qk + d_v) * T: N the active parameters that multiply (all but
the input embedding, lm_head included, router included), and the attention products
(scores and weighted values, full T x T as the code computes them: forward 2 FLOPs per
multiply-add, backward twice the forward) for L layers, H heads, T = 48 tokens.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from course_utils.config import DeepSeekConfig
from course_utils.model import DeepSeekForCausalLM
from course_utils.train import make_optimizer

VOCAB = 16
SEQ = 48


def _matmul_gflops(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _flops_per_token(model: DeepSeekForCausalLM) -> float:
    c = model.config
    n_matmul = model.num_active_parameters(include_embeddings=False)
    if c.tie_word_embeddings:  # the tied head still multiplies
        n_matmul += c.vocab_size * c.hidden_size
    attention = (
        6
        * c.num_hidden_layers
        * c.num_attention_heads
        * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
        * SEQ
    )
    return 6 * n_matmul + attention


def _train_step_fn(model: DeepSeekForCausalLM, batch: int):
    optimizer = make_optimizer(model, lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        ids = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=gen)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _decode_seconds(model: DeepSeekForCausalLM, new_tokens: int, use_cache: bool) -> float:
    prompt = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    model.generate(prompt, new_tokens, use_cache=use_cache)
    return time.perf_counter() - start


def run(quick: bool) -> list[dict]:
    threads = torch.get_num_threads()
    batch = 32 if quick else 128
    steps = 3 if quick else 10
    new_tokens = 32 if quick else 128
    torch.manual_seed(0)
    moe_cfg = DeepSeekConfig.preset("cpu", vocab_size=VOCAB)
    models = {
        "mini-DeepSeek (MoE)": DeepSeekForCausalLM(moe_cfg).train(),
        "dense baseline": DeepSeekForCausalLM(moe_cfg.dense_baseline()).train(),
    }
    step_fns = {name: _train_step_fn(m, batch) for name, m in models.items()}
    for fn in step_fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name, fn in step_fns.items():  # alternate, so both see the same load
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    gflops = _matmul_gflops(1024, 5 if quick else 20)

    rows: list[dict] = [
        {
            "what": "torch threads",
            "value": threads,
            "unit": "",
            "note": "set with python -m benchmarks --threads N",
        }
    ]
    tok_s = {}
    for name, model in models.items():
        tok_s[name] = batch * SEQ / statistics.median(times[name])
        rows.append(
            {
                "what": f"training, {name}",
                "value": tok_s[name],
                "unit": "tok/s",
                "note": f"{model.num_parameters() / 1e3:.0f}K params, "
                f"{model.num_active_parameters() / 1e3:.0f}K active; "
                f"batch {batch}x{SEQ}",
            }
        )
    moe_name, dense_name = list(models)
    rows.append(
        {
            "what": "training speed ratio, MoE / dense (equal active params)",
            "value": tok_s[moe_name] / tok_s[dense_name],
            "unit": "x",
            "note": "1.0 would mean sparsity costs nothing",
        }
    )

    rows.append(
        {"what": "fp32 matmul rate, torch.mm 1024x1024", "value": gflops, "unit": "GFLOP/s"}
    )
    for name, model in models.items():
        achieved = _flops_per_token(model) * tok_s[name] / 1e9
        rows.append(
            {
                "what": f"MFU of training, {name}",
                "value": 100 * achieved / gflops,
                "unit": "%",
                "note": f"{achieved:.1f} GFLOP/s achieved",
            }
        )

    model = models[moe_name].eval()
    decode = {True: [], False: []}
    with torch.no_grad():
        _decode_seconds(model, 4, True)
        for _ in range(1 if quick else 3):
            for use_cache in (True, False):
                decode[use_cache].append(_decode_seconds(model, new_tokens, use_cache))
    cached = new_tokens / statistics.median(decode[True])
    uncached = new_tokens / statistics.median(decode[False])
    rows += [
        {
            "what": "decode, latent MLA cache",
            "value": cached,
            "unit": "tok/s",
            "note": f"batch 1, prompt 16, {new_tokens} new tokens",
        },
        {
            "what": "decode, no cache (re-run the whole sequence)",
            "value": uncached,
            "unit": "tok/s",
        },
        {"what": "decode speed-up from the cache", "value": cached / uncached, "unit": "x"},
    ]
    rows.append(_pretraining_row(quick))
    return rows


def _pretraining_row(quick: bool) -> dict:
    """The step notebook 21 runs (``course_config()``: MTP depth 1, one padded line a row, the
    bias update), timed over a few steps after a warm-up; projected over the whole budget,
    evaluations left out."""
    from course_utils.pretrain import Pretrainer, course_config

    config = course_config()
    run = Pretrainer(config)
    n = 3 if quick else 20
    run.train(2, progress=False)  # warm-up
    start = time.perf_counter()
    run.train(n, progress=False)
    seconds = (time.perf_counter() - start) / n
    return {
        "what": "pretraining step as notebook 21 runs it (MTP, padded lines)",
        "value": 1e3 * seconds,
        "unit": "ms/step",
        "note": f"batch {config.batch_size}; x {config.steps} steps = "
        f"{seconds * config.steps:.0f} s, evaluations left out",
    }
