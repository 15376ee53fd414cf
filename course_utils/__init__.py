"""DeepSeek from Scratch: the canonical, tested code behind the course notebooks.

Each module owns one idea; notebooks build a piece step by step, assert that it equals the
version here, and later notebooks import this one.
"""

from . import arithmetic as arithmetic  # notebooks 19, 21-23
from . import (
    attention,
    cache,
    data,
    decoder,
    exercises,
    generation,
    layers,
    mla,
    ngram,
    positional,
    runtime,
    sampling,
    tokenizer,
    train,
)
from . import fp8 as fp8  # notebook 20
from . import kernels as kernels  # notebook 24
from . import moe as moe  # notebooks 16-18
from .attention import MultiHeadAttention, scaled_dot_product_attention
from .cache import KVCache
from .checkpoint import load_hf_checkpoint, save_hf_checkpoint  # notebook 21
from .config import DeepSeekConfig
from .data import (
    ArithmeticProblem,
    check_completion,
    make_arithmetic_corpus,
    make_story_corpus,
    parse_final_answer,
    sample_arithmetic_problems,
)
from .decoder import DecoderConfig, TinyDecoder
from .generation import generate
from .layers import RMSNorm, SwiGLU
from .mla import LatentCache, MLAConfig, MultiHeadLatentAttention  # noqa: F401  notebooks 10-15
from .model import DeepSeekForCausalLM
from .ngram import CountLanguageModel
from .runtime import get_device, seed_everything
from .sampling import sample_next_token, top_k_filter, top_p_filter
from .tokenizer import ByteBPETokenizer, CharTokenizer

__version__ = "0.1.0"

__all__ = [
    "ArithmeticProblem",
    "mla",
    "moe",
    "positional",
    "DecoderConfig",
    "DeepSeekConfig",
    "DeepSeekForCausalLM",
    "KVCache",
    "MultiHeadAttention",
    "RMSNorm",
    "SwiGLU",
    "TinyDecoder",
    "attention",
    "cache",
    "decoder",
    "generate",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
    "generation",
    "layers",
    "scaled_dot_product_attention",
    "train",
    "ByteBPETokenizer",
    "CharTokenizer",
    "CountLanguageModel",
    "check_completion",
    "data",
    "exercises",
    "get_device",
    "make_arithmetic_corpus",
    "make_story_corpus",
    "ngram",
    "parse_final_answer",
    "runtime",
    "sample_arithmetic_problems",
    "sample_next_token",
    "sampling",
    "seed_everything",
    "tokenizer",
    "top_k_filter",
    "top_p_filter",
]
