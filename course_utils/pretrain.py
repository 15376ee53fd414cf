"""Pretraining the mini-DeepSeek on the arithmetic task (notebook 21), and the checkpoint that
notebooks 22-23 start from.

:class:`PretrainConfig` names one run (model preset, data mix, optimizer, budget).
:class:`Pretrainer` builds the task, the token stream (once), the model, AdamW and the
auxiliary-loss-free balancer, then trains step by step, recording the loss, the learning
rate, every MoE layer's expert load and, every ``eval_every`` steps, the greedy accuracy on
held-out problems. It saves and resumes its full state (model, optimizer, RNGs, history), so a
resumed run continues bit-identically.

:func:`load_or_pretrain` is what later notebooks call: it loads the checkpoint of a given
config from ``artifacts/`` (a Hugging Face directory), or trains and saves it when missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .arithmetic import ArithmeticTask, EvalResult, evaluate_accuracy
from .checkpoint import (
    load_hf_checkpoint,
    load_training_state,
    save_hf_checkpoint,
    save_training_state,
)
from .config import DeepSeekConfig
from .model import DeepSeekForCausalLM
from .moe import AuxLossFreeBalancer
from .train import _param_groups, language_model_loss, lr_schedule

__all__ = [
    "PretrainConfig",
    "Pretrainer",
    "artifacts_dir",
    "checkpoint_path",
    "course_config",
    "load_or_pretrain",
    "save_pretrained",
]


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run on the three-operand, two-digit arithmetic task.

    ``preset`` and ``overrides`` give the model (:meth:`DeepSeekConfig.preset`); ``dense=True``
    trains its :meth:`~DeepSeekConfig.dense_baseline` instead. ``steps`` batches of
    ``batch_size`` rows from ``n_train_lines`` lines, a ``worked_fraction`` of them with
    worked steps, laid out by :meth:`ArithmeticTask.lm_batches` with ``layout`` and
    ``prompt_loss`` (default: one padded line a row, loss on the completion only);
    AdamW(0.9, 0.95) with ``weight_decay``, peak ``lr``, warm-up then cosine decay; gradient
    clipping at 1.0; the V3 bias update after every step when the model has MoE layers and
    ``balance`` is on.
    """

    preset: str = "cpu"
    overrides: tuple[tuple[str, Any], ...] = ()
    dense: bool = False
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    n_train_lines: int = 20000
    worked_fraction: float = 0.3
    balance: bool = True
    seed: int = 0
    eval_every: int = 250
    n_eval_problems: int = 200
    layout: str = "lines"
    prompt_loss: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_train_lines", "eval_every", "n_eval_problems"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.worked_fraction <= 1.0:
            raise ValueError(f"worked_fraction must be in [0, 1], got {self.worked_fraction}")

    def model_config(self, vocab_size: int) -> DeepSeekConfig:
        config = DeepSeekConfig.preset(self.preset, vocab_size=vocab_size, **dict(self.overrides))
        return config.dense_baseline() if self.dense else config

    def key(self) -> str:
        """A short hash of every field: checkpoints of different runs never collide."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def course_config(**changes: Any) -> PretrainConfig:
    """The run notebook 21 trains and notebooks 22-23 start from, at the current
    :func:`~course_utils.runtime.scale`: the defaults of :class:`PretrainConfig` (the ``"cpu"``
    preset, minutes on a laptop CPU); a few-second version under ``COURSE_SMOKE``; the ``"gpu"``
    preset (about 14M parameters), twice the steps of twice the rows, at the GPU scale.
    ``changes`` replace fields (then the checkpoint is a different one)."""
    from . import runtime

    sizes = {
        "smoke": dict(steps=30, batch_size=16, n_train_lines=1000, eval_every=15,
                      n_eval_problems=16),
        "default": {},
        "gpu": dict(preset="gpu", steps=2000, batch_size=128, lr=1e-3, n_train_lines=50000),
    }
    return dataclasses.replace(PretrainConfig(**sizes[runtime.scale()]), **changes)


def artifacts_dir() -> Path:
    """Where trained models are kept: ``$COURSE_ARTIFACTS`` if set, else ``artifacts/`` in the
    course checkout (git-ignored), else ``./artifacts``."""
    env = os.environ.get("COURSE_ARTIFACTS", "").strip()
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    return repo / "artifacts" if (repo / "notebooks").is_dir() else Path.cwd() / "artifacts"


@dataclass
class History:
    """Per step: ``loss``, ``lr``, ``loads`` (one (n_moe_layers, E) share per step, as lists);
    per evaluation: ``eval_steps``, ``accuracy``, ``worked_fraction``."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    loads: list[list[list[float]]] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    worked_fraction: list[float] = field(default_factory=list)
    seconds: float = 0.0


class Pretrainer:
    """A resumable pretraining run of :class:`PretrainConfig` on ``device``.

    Batches come from the global torch RNG (seeded here), which :meth:`save` stores with the
    model and optimizer state, so ``train(a); save(); ...; resume(); train(b)`` gives the same
    weights as ``train(a + b)``.
    """

    def __init__(self, config: PretrainConfig, device: torch.device | str | None = None):
        self.config = config
        self.device = torch.device(device or "cpu")
        self.task = ArithmeticTask()
        torch.manual_seed(config.seed)
        self.corpus = self.task.training_tokens(config.n_train_lines, seed=config.seed,
                                                worked_fraction=config.worked_fraction)
        self.model = DeepSeekForCausalLM(config.model_config(self.task.vocab_size)).to(self.device)
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, config.weight_decay),
                                           lr=config.lr, betas=(0.9, 0.95))
        self.balancer = (AuxLossFreeBalancer(self.model)
                         if config.balance and self.model.moe_layers() else None)
        # One padded line a row, completion tokens only: every answer is learned at the
        # positions it has when a prompt is answered. Measured at the default budget (mini
        # DeepSeek, 1000 x 64): with line-aligned windows instead, the model's worked steps were
        # right 2 % of the time and notebook 22's GRPO gained nothing (-0.5 points); with lines
        # they are right 25 % of the time while greedy decoding still answers directly (0.065),
        # and 150 GRPO steps lift greedy accuracy to 0.465, all in worked steps.
        self.get_batch = self.task.lm_batches(self.corpus, config.batch_size, device=self.device,
                                              layout=config.layout,
                                              prompt_loss=config.prompt_loss)
        self.eval_problems = self.task.problems(config.n_eval_problems, seed=config.seed + 1,
                                                split="test")
        self.history = History()
        self.step = 0

    def evaluate(self) -> EvalResult:
        """Greedy accuracy on the held-out problems (the model is left in training mode)."""
        result = evaluate_accuracy(self.model, self.eval_problems, task=self.task)
        self.model.train()
        return result

    def train(self, n_steps: int | None = None, progress: bool = True) -> History:
        """Run ``n_steps`` more steps (default: to the end of the budget)."""
        from tqdm.auto import tqdm

        c = self.config
        n_steps = c.steps - self.step if n_steps is None else n_steps
        if not 0 <= n_steps <= c.steps - self.step:
            raise ValueError(f"n_steps must be in [0, {c.steps - self.step}] (the budget left), "
                             f"got {n_steps}")
        model, h = self.model.train(), self.history
        start = time.perf_counter()
        bar = tqdm(range(n_steps), desc="pretraining", disable=not progress, mininterval=0.5)
        for _ in bar:
            lr = lr_schedule(self.step, c.steps, c.lr, c.warmup_frac)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = self.get_batch()
            loss = language_model_loss(model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
            loads = [(m.last_counts / m.last_counts.sum()).tolist() for m in model.moe_layers()]
            if self.balancer is not None:
                self.balancer.step()
            self.step += 1
            h.loss.append(loss.item())
            h.lr.append(lr)
            h.loads.append(loads)
            if self.step % c.eval_every == 0 or self.step == c.steps:
                result = self.evaluate()
                h.eval_steps.append(self.step)
                h.accuracy.append(result.accuracy)
                h.worked_fraction.append(result.worked_fraction)
                bar.set_postfix(loss=f"{h.loss[-1]:.3f}", acc=f"{result.accuracy:.2f}")
            elif self.step % 20 == 0:
                bar.set_postfix(loss=f"{h.loss[-1]:.3f}")
        h.seconds += time.perf_counter() - start
        model.eval()
        return h

    def loads_tensor(self) -> Tensor:
        """(steps, n_moe_layers, E) share of each layer's routed tokens per expert."""
        return torch.tensor(self.history.loads)

    # -- save and resume --------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Model, optimizer, RNG states, step, history and config, into directory ``path``."""
        extra = {"config": dataclasses.asdict(self.config),
                 "history": dataclasses.asdict(self.history)}
        return save_training_state(path, self.model, self.optimizer, self.step, extra)

    @classmethod
    def resume(cls, path: str | Path, device: torch.device | str | None = None) -> Pretrainer:
        """A Pretrainer continuing exactly where :meth:`save` left it."""
        meta = json.loads((Path(path) / "state.json").read_text())
        raw = meta["extra"]["config"]
        raw["overrides"] = tuple(tuple(kv) for kv in raw["overrides"])
        run = cls(PretrainConfig(**raw), device)
        state = load_training_state(path, run.model, run.optimizer)
        run.step = state["step"]
        run.history = History(**state["extra"]["history"])
        return run


def load_or_pretrain(config: PretrainConfig | None = None, device: torch.device | str | None = None,
                     root: str | Path | None = None, progress: bool = True
                     ) -> DeepSeekForCausalLM:
    """The pretrained mini-DeepSeek of ``config`` (default :func:`course_config`, notebook
    21's run): loaded from ``root/mini_deepseek-<key>/`` (``root`` defaults to
    :func:`artifacts_dir`) when a previous run saved it, else trained now (minutes on a CPU)
    and saved there as a Hugging Face checkpoint. Returned in eval mode on ``device``."""
    config = config or course_config()
    path = checkpoint_path(config, root)
    if (path / "config.json").exists():
        return load_hf_checkpoint(path, device=device)
    run = Pretrainer(config, device)
    run.train(progress=progress)
    save_pretrained(run.model, config, root)
    return run.model.eval()


def checkpoint_path(config: PretrainConfig, root: str | Path | None = None) -> Path:
    """Where :func:`load_or_pretrain` looks for the model of ``config``:
    ``root/mini_deepseek-<config.key()>`` (``root`` defaults to :func:`artifacts_dir`)."""
    return Path(root or artifacts_dir()) / f"mini_deepseek-{config.key()}"


def save_pretrained(model: DeepSeekForCausalLM, config: PretrainConfig,
                    root: str | Path | None = None) -> Path:
    """Save ``model``, trained by the run ``config``, where :func:`load_or_pretrain` will find
    it: a Hugging Face checkpoint plus ``pretrain_config.json`` in :func:`checkpoint_path`.
    Returns that directory."""
    path = save_hf_checkpoint(model, checkpoint_path(config, root))
    (path / "pretrain_config.json").write_text(
        json.dumps(dataclasses.asdict(config), indent=2, default=str) + "\n")
    return path
