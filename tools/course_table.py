"""Render the course table of README.md from the notebooks present and notebooks/timings.json.

Usage: python tools/course_table.py   (rewrites the table between the markers in README.md)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from course_utils.runtime import colab_badge_url  # noqa: E402

BEGIN, END = "<!-- course-table:begin -->", "<!-- course-table:end -->"

ROWS = [  # (file stem, title, builds, verified against)
    (
        "00_course_overview",
        "Course overview",
        "an LLM as a next-token probability engine (count model), what makes DeepSeek special, environment check",
        "probabilities vs hand counts",
    ),
    (
        "01_journey_of_a_token",
        "Journey of a token",
        "byte-level BPE from scratch, embeddings, logits, softmax, greedy/temperature/top-k/top-p sampling",
        "BPE round trip; library tokenizer; torch.softmax",
    ),
    (
        "02_attention_the_idea",
        "Attention, the idea",
        "attention with no trainable weights, every number by hand",
        "hand computation; SDPA",
    ),
    ("03_self_attention", "Self-attention", "W_q, W_k, W_v; why 1/sqrt(d), measured", "SDPA"),
    (
        "04_causal_attention",
        "Causal attention",
        "mask, dropout, no peeking",
        "SDPA is_causal; future tokens leave the past unchanged",
    ),
    (
        "05_multi_head_attention_visually",
        "Multi-head attention, visually",
        "a tiny trained model's heads as heatmaps; layer/head picker",
        "weights sum to 1; plotting path == fast path",
    ),
    (
        "06_multi_head_attention_in_code",
        "Multi-head attention in code",
        "from a loop over heads to batched reshapes",
        "stacked single heads; nn.MultiheadAttention",
    ),
    (
        "07_kv_cache",
        "KV cache",
        "incremental decoding with a preallocated cache; time and memory",
        "cached == uncached; bytes == formula",
    ),
    (
        "08_multi_query_attention",
        "Multi-query attention",
        "one K/V head for all query heads",
        "cache bytes per token; by-hand MQA",
    ),
    (
        "09_grouped_query_attention",
        "Grouped-query attention",
        "MHA/GQA/MQA as one family; quality vs cache bytes",
        "groups=heads is MHA, groups=1 is MQA",
    ),
    (
        "10_mla_from_first_principles",
        "MLA from first principles",
        "low-rank latent KV; cache table for DeepSeek-V2/V3 configs",
        "formula vs measured bytes",
    ),
    (
        "11_mla_in_code",
        "MLA in code",
        "MLA module, latent cache, weight absorption",
        "absorbed == naive; cache bytes",
    ),
    (
        "12_integer_and_binary_positions",
        "Integer and binary positions",
        "why raw positions fail",
        "—",
    ),
    (
        "13_sinusoidal_positions",
        "Sinusoidal positions",
        "the 2017 encoding and its properties",
        "relative-offset property",
    ),
    (
        "14_rope",
        "Rotary positions (RoPE)",
        "rotating query/key pairs; interleaved vs half-split",
        "scores depend only on the offset",
    ),
    (
        "15_mla_with_rope",
        "MLA + RoPE the DeepSeek way",
        "decoupled RoPE, one shared rotary key, YaRN",
        "transformers DeepseekV3 attention",
    ),
    (
        "16_mixture_of_experts_the_idea",
        "Mixture of experts, the idea",
        "dense vs sparse FFN, top-k router",
        "router by hand; sparse loop == dense gate-matrix reference",
    ),
    (
        "17_deepseek_moe_hands_on",
        "DeepSeekMoE hands-on",
        "fine-grained + shared experts, V2/V3 routers, group-limited routing, fast dispatch",
        "transformers DeepseekV2/V3 MoE",
    ),
    (
        "18_balancing_the_experts",
        "Balancing the experts",
        "routing collapse, auxiliary losses at three weights, V3 auxiliary-loss-free bias: balance vs answer accuracy",
        "expert loads and biases over training; 3 seeds per arm; claims over seeds 0-4",
    ),
    (
        "19_multi_token_prediction",
        "Multi-token prediction",
        "V3's MTP modules and loss; with vs without MTP over 3 seeds; speculative decoding",
        "depth-k alignment; transformers' MTP path (tests); speculative == greedy decoding; claims over seeds 0-4",
    ),
    (
        "20_fp8_quantization",
        "FP8 quantization",
        "e4m3/e5m2, tile and block scaling, FP8 GEMM",
        "error vs fp32; torch float8 dtypes",
    ),
    (
        "21_mini_deepseek",
        "Mini-DeepSeek",
        "the whole model with MTP, pretraining until its worked steps are right, checkpoints, HF interop",
        "transformers DeepseekV3ForCausalLM; claims over seeds 0-4",
    ),
    (
        "22_grpo",
        "GRPO",
        "rule-based rewards, group advantages, R1-Zero style run; clip and KL acting; V3.2's GRPO changes and keep routing; reward hacking; PPO (critic, GAE) and DPO side by side",
        "each term by hand == `rl` (TRL parity in tests); keep routing changes no expert; claims over seeds 0-4",
    ),
    (
        "23_distillation",
        "Distillation",
        "five students, one budget: scratch, SFT on ground truth, SFT on teacher samples (R1-distill), logit distillation, student GRPO; LoRA vs full fine-tuning",
        "KL == F.kl_div; LoRA == PEFT (tests); arms over 3 student seeds, notebook seeds 0-4",
    ),
    (
        "24_gpu_optimization_tricks",
        "GPU optimization tricks",
        "roofline, tiled attention with online softmax, fused kernels",
        "tiled attention == SDPA",
    ),
]


def render() -> str:
    timings_path = ROOT / "notebooks" / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    cpu, gpu = timings.get("cpu", {}), timings.get("cuda", {})
    lines = [
        "| # | notebook | builds | verified against | CPU time | GPU time |",
        "|---|---|---|---|---|---|",
    ]
    for stem, title, builds, verified in ROWS:
        path = f"notebooks/{stem}.ipynb"
        if (ROOT / path).exists():
            badge = (
                f"[![Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                f"({colab_badge_url(path)})"
            )
            name = f"[{title}]({path}) {badge}"
        else:
            name = f"{title} *(planned)*"
        t_cpu = f"{cpu[stem]:.0f} s" if stem in cpu else "—"
        t_gpu = f"{gpu[stem]:.0f} s" if stem in gpu else "—"
        lines.append(f"| {stem[:2]} | {name} | {builds} | {verified} | {t_cpu} | {t_gpu} |")
    machines = timings.get("machines", {})
    note = "; ".join(f"{k.upper()}: {v}" for k, v in sorted(machines.items()))
    lines.append("")
    lines.append(
        "Times: one execution of the notebook by `make execute`, at the default scale on "
        "the CPU and at the GPU scale on CUDA"
        + (f" ({note})" if note else "")
        + "; 22 and 23 start from the checkpoints that 21 and 22 saved in `artifacts/` "
        "(each retrains what is missing, in minutes)."
    )
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + render() + "\n" + text[end:])


if __name__ == "__main__":
    main()
