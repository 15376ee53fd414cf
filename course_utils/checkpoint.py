"""Checkpoints: Hugging Face DeepSeek-V2/V3 directories in and out, and resumable training state.

:func:`load_hf_checkpoint` reads a directory with ``config.json`` and ``*.safetensors`` (one file,
or shards listed in ``model.safetensors.index.json``) as the Hub and transformers'
``save_pretrained`` write them, and returns a :class:`~course_utils.model.DeepSeekForCausalLM`.
:func:`save_hf_checkpoint` writes one that ``transformers.AutoModelForCausalLM.from_pretrained``
loads with the same logits.

Layouts met on the way (checked against transformers 5 in ``tests/test_checkpoint.py``):

- Routed experts: the Hub and ``save_pretrained`` store one tensor per expert
  (``mlp.experts.{e}.gate_proj.weight`` ...). transformers' in-memory model fuses them
  (``mlp.experts.gate_up_proj`` (E, 2*I, H), gate rows first, and ``mlp.experts.down_proj``
  (E, H, I)); a state dict in that form is split on load. We always write the per-expert form.
- RoPE: the rows of ``q_b_proj`` / ``q_proj`` and ``kv_a_proj_with_mqa`` that produce rotary dims
  are stored **interleaved** (pairs (x0, x1), (x2, x3), ...), which is what our MLA rotates with
  ``rope_interleave=True``: no permutation is needed. transformers' V3 permutes the activations
  at run time, never the weights; a V3 config with ``rope_interleave: false`` means half-split
  rows, and our MLA then rotates half-split too.
- Multi-token prediction: V3 stores its MTP modules as extra layers
  ``model.layers.{num_hidden_layers + k}.*``, each with its own copy of the embedding and the
  output head (``embed_tokens``, ``shared_head.head``). They load into ``model.mtp[k]`` (the
  copies are dropped: the modules share the main model's) and are written back the same way.
  ``num_nextn_predict_layers`` is set from the layers the file holds, not from config.json
  (transformers writes 1 in every V3 config even when it saves none). transformers itself
  does not run MTP layers.

:func:`save_training_state` / :func:`load_training_state` keep model, optimizer and every RNG
state (tensors in safetensors, scalars in JSON) so a resumed run continues bit-identically.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import DeepSeekConfig
from .model import DeepSeekForCausalLM
from .moe import split_fused_experts

__all__ = [
    "load_hf_checkpoint",
    "load_training_state",
    "read_safetensors_dir",
    "save_hf_checkpoint",
    "save_training_state",
]

_INDEX = "model.safetensors.index.json"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def read_safetensors_dir(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory: the shards named by
    ``model.safetensors.index.json`` when it exists, else every ``*.safetensors`` file.
    Raises ValueError when there is none or a name appears twice."""
    path = Path(path)
    index = path / _INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise ValueError(f"{index} names shard files that are not in {path}: {missing}")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in {path}")
    tensors: dict[str, Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if key in tensors:
                    raise ValueError(
                        f"tensor {key!r} appears in more than one shard (again in {name})"
                    )
                tensors[key] = f.get_tensor(key)
    if index.exists():
        stray = sorted(set(tensors) - set(weight_map))
        absent = sorted(set(weight_map) - set(tensors))
        if stray or absent:
            raise ValueError(
                f"{index} disagrees with its shards: listed but absent {absent[:5]}, "
                f"present but unlisted {stray[:5]}"
            )
    return tensors


def _layer_index(key: str) -> int | None:
    m = _LAYER_KEY.match(key)
    return int(m.group(1)) if m else None


_MTP_KEY = re.compile(r"^mtp\.(\d+)\.(.*)$")
#: Tensors a released V3 MTP layer stores although they equal the main model's.
_MTP_SHARED = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "shared_head.head.weight": "lm_head.weight",
}


def _mtp_from_hub(
    tensors: dict[str, Tensor], num_hidden_layers: int
) -> tuple[dict[str, Tensor], int]:
    """Rename V3's MTP layers ``model.layers.{L + k}.*`` to our ``mtp.{k}.*``; drop their copies
    of the shared embedding and head. Returns the tensors and the MTP depth found."""
    out, depths = {}, set()
    for key, value in tensors.items():
        i = _layer_index(key)
        if i is None or i < num_hidden_layers:
            out[key] = value
            continue
        k, rest = i - num_hidden_layers, key.split(".", 3)[3]
        depths.add(k)
        if rest not in _MTP_SHARED:
            out[f"mtp.{k}.{rest}"] = value
    if depths and depths != set(range(len(depths))):
        raise ValueError(
            f"MTP layers must be numbered {num_hidden_layers} .. without gaps, "
            f"found offsets {sorted(depths)}"
        )
    return out, len(depths)


def _mtp_to_hub(state: dict[str, Tensor], num_hidden_layers: int) -> dict[str, Tensor]:
    """Our ``mtp.{k}.*`` as the release stores it: ``model.layers.{L + k}.*``, with the layer's
    own copies of the embedding and the output head."""
    out = {}
    for key, value in state.items():
        m = _MTP_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        layer = f"model.layers.{num_hidden_layers + int(m.group(1))}."
        out[layer + m.group(2)] = value
        for own, shared in _MTP_SHARED.items():
            source = state.get(shared, state["model.embed_tokens.weight"])
            out.setdefault(layer + own, source.clone())
    return out


def load_hf_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> DeepSeekForCausalLM:
    """Load a Hugging Face DeepSeek-V2 or -V3 checkpoint directory into the course model.

    ``path`` holds ``config.json`` and ``*.safetensors`` (single file or sharded with
    ``model.safetensors.index.json``). Per-expert (Hub) and fused (transformers in-memory)
    expert tensors are both understood. ``dtype`` defaults to torch's default dtype (float32),
    not the file's, so CPU runs stay in float32; the V3 correction bias and RoPE frequencies stay
    float32 whatever ``dtype`` is. ``device`` defaults to the CPU.

    Raises ValueError naming the tensor when one the model needs is missing, one is left over,
    or a shape differs (expected vs found), and for FP8 (``weight_scale_inv``) checkpoints.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    config = DeepSeekConfig.from_hf(json.loads(config_file.read_text()))
    tensors = split_fused_experts(read_safetensors_dir(path))
    scaled = sorted(k for k in tensors if k.endswith("weight_scale_inv"))
    if scaled:
        raise ValueError(
            f"{scaled[0]} and {len(scaled) - 1} more are FP8 block scales: this is "
            "a quantized checkpoint; dequantize it to bf16/fp32 first"
        )
    # RoPE tables are recomputed from the config; some older files carry them.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    tensors, config.num_nextn_predict_layers = _mtp_from_hub(tensors, config.num_hidden_layers)
    with torch.device(device or "cpu"):
        model = DeepSeekForCausalLM(config)
    if dtype is not None:
        model.to(dtype)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some writers keep the tied copy
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks {len(missing)} tensor(s) the config needs, "
            f"first {missing[0]!r} of shape {tuple(expected[missing[0]].shape)}; "
            f"all missing: {missing[:8]}"
        )
    if unexpected:
        raise ValueError(
            f"checkpoint {path} has {len(unexpected)} tensor(s) this config does "
            f"not use, first {unexpected[0]!r} of shape "
            f"{tuple(tensors[unexpected[0]].shape)}; all: {unexpected[:8]}"
        )
    for key, want in expected.items():
        if tuple(tensors[key].shape) != tuple(want.shape):
            raise ValueError(
                f"tensor {key!r}: the config expects shape {tuple(want.shape)}, "
                f"the checkpoint has {tuple(tensors[key].shape)}"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])  # copies into the model's own storage, casting dtype
    return model.eval()


def save_hf_checkpoint(
    model: DeepSeekForCausalLM, path: str | Path, max_shard_bytes: int | None = None
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory; returns the path.

    Writes ``config.json`` (:meth:`DeepSeekConfig.to_hf` plus the weights' dtype),
    ``generation_config.json`` (the config's bos/eos/pad ids) and the weights in safetensors
    with Hub names and per-expert tensors: ``model.safetensors``, or shards of at most
    ``max_shard_bytes`` each plus ``model.safetensors.index.json``. A tied ``lm_head`` is not
    written (it is the embedding). transformers' ``AutoModelForCausalLM.from_pretrained(path)``
    loads it; note that transformers' DeepseekV2 ignores ``norm_topk_prob`` (a warning says so
    when that matters).
    """
    config = model.config
    if (
        config.model_type == "deepseek_v2"
        and config.norm_topk_prob
        and config.num_moe_layers
        and config.num_experts_per_tok > 1
    ):
        warnings.warn(
            "transformers' DeepseekV2 router never renormalises the top-k weights, so "
            "with norm_topk_prob=True it will compute different outputs from this "
            "checkpoint (DeepSeek's own V2 code does renormalise)",
            stacklevel=2,
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    state = _mtp_to_hub(state, config.num_hidden_layers)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf = config.to_hf()
    hf["torch_dtype"] = dtype
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    generation = {
        k: getattr(config, k)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(config, k) is not None
    }
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for old in list(path.glob("*.safetensors")) + [path / _INDEX]:
        old.unlink(missing_ok=True)  # a previous save's shards would mix in on load
    if max_shard_bytes is None:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1 or None, got {max_shard_bytes}")
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / _INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return path


# -- training state ---------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as JSON-able values."""
    # The global generator is a legacy MT19937 RandomState, whose get_state() (legacy=True by
    # default) is this tuple; numpy's stubs type the default call as the dict form.
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch_cpu": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]]
        )


def _split_optimizer_state(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors by flat name, the JSON-able rest with tensor slots
    replaced by their flat names)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for pid, slots in sd["state"].items():
        entry = {}
        for slot, value in slots.items():
            if isinstance(value, Tensor):
                name = f"optimizer.state.{pid}.{slot}"
                tensors[name] = value.detach().to("cpu").contiguous()
                entry[slot] = {"tensor": name}
            else:
                entry[slot] = value
        state_json[str(pid)] = entry
    return tensors, {"state": state_json, "param_groups": sd["param_groups"]}


def save_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save everything a run needs to continue exactly where it stopped, into directory
    ``path``: ``state.safetensors`` (model parameters and buffers, optimizer moments) and
    ``state.json`` (step, optimizer hyper-parameters, Python/NumPy/torch RNG states and
    ``extra``, which must be JSON-serialisable, e.g. a data-loader position or loss history).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"model.{k}": v.detach().to("cpu").contiguous()
        for k, v in _all_model_tensors(model).items()
    }
    opt_tensors, opt_json = _split_optimizer_state(optimizer)
    tensors.update(opt_tensors)
    save_file(tensors, str(path / "state.safetensors"), metadata={"format": "pt"})
    meta = {
        "step": int(step),
        "optimizer": opt_json,
        "rng": _rng_state(),
        "extra": dict(extra or {}),
    }
    (path / "state.json").write_text(json.dumps(meta) + "\n")
    return path


def _all_model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and *all* buffers (non-persistent ones too, e.g. the MoE load counters that
    the bias update reads), tied parameters once."""
    out: dict[str, Tensor] = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    return out


def load_training_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into ``model`` and ``optimizer`` (built
    the same way, on any device) and reset every RNG. Returns ``{"step": ..., "extra": ...}``.
    """
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    with safe_open(str(path / "state.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    targets = _all_model_tensors(model)
    names = {k.removeprefix("model.") for k in stored if k.startswith("model.")}
    if names != set(targets):
        raise ValueError(
            f"the saved model tensors do not match this model: missing "
            f"{sorted(set(targets) - names)[:5]}, "
            f"extra {sorted(names - set(targets))[:5]}"
        )
    with torch.no_grad():
        for name, target in targets.items():
            value = stored[f"model.{name}"]
            if value.shape != target.shape:
                raise ValueError(
                    f"tensor {name!r}: this model has shape {tuple(target.shape)}, "
                    f"the saved state {tuple(value.shape)}"
                )
            target.copy_(value)
    opt = meta["optimizer"]
    state = {}
    for pid, slots in opt["state"].items():
        state[int(pid)] = {
            slot: stored[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
            for slot, v in slots.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    _set_rng_state(meta["rng"])
    return {"step": meta["step"], "extra": meta["extra"]}
