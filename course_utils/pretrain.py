"""Pretraining the mini-DeepSeek on the arithmetic task (notebook 21), and the checkpoint that
notebooks 22-23 start from.

:class:`PretrainConfig` names one run (model preset, multi-token prediction, data mix,
optimizer, budget). :class:`Pretrainer` builds the task, the token stream (once), the model and
the auxiliary-loss-free balancer, and runs the course's one training loop
(:class:`course_utils.train.Trainer`) with three hooks: the MTP loss, the bias update after each
step, and a recorder (loss, learning rate, every MoE layer's expert load, and every
``eval_every`` steps the greedy accuracy on held-out problems). It saves and resumes its full
state, so a resumed run continues bit-identically.

:func:`load_or_pretrain` is what later notebooks call: it loads the model of a given config
from ``artifacts/`` (:mod:`course_utils.artifacts`, keyed by the config and the code), or trains
and saves it when missing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from .arithmetic import ArithmeticTask, EvalResult, evaluate_accuracy
from .artifacts import artifact_path, load_or_build
from .checkpoint import load_hf_checkpoint, save_hf_checkpoint
from .config import DeepSeekConfig
from .model import DeepSeekForCausalLM
from .moe import AuxLossFreeBalancer
from .mtp import mtp_loss_fn
from .train import Trainer

__all__ = [
    "PretrainConfig",
    "Pretrainer",
    "checkpoint_path",
    "course_config",
    "load_or_pretrain",
    "save_pretrained",
]

#: The artifact kind of a pretrained mini-DeepSeek (:mod:`course_utils.artifacts`).
ARTIFACT_KIND = "mini_deepseek"


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run on the three-operand, two-digit arithmetic task.

    ``preset`` and ``overrides`` give the model (:meth:`DeepSeekConfig.preset`); ``dense=True``
    trains its :meth:`~DeepSeekConfig.dense_baseline` instead. ``mtp_depth`` multi-token
    prediction modules are trained with weight ``mtp_lambda`` (DeepSeek-V3: depth 1, lambda 0.3
    for most of its run; technical report, section 4.2); 0 trains none. ``steps`` batches of
    ``batch_size`` rows from ``n_train_lines`` lines, a ``worked_fraction`` of them with worked
    steps, laid out by :meth:`ArithmeticTask.lm_batches` with ``layout`` and ``prompt_loss``
    (default: one padded line a row, loss on the completion only); the course's
    :class:`~course_utils.train.Trainer` (AdamW(0.9, 0.95) with ``weight_decay``, peak ``lr``,
    warm-up then cosine decay, clipping at 1.0); the V3 bias update after every step when the
    model has MoE layers and ``balance`` is on. ``seed`` drives every random choice: the
    corpus, the initial weights, the batches and the held-out problems.
    """

    preset: str = "cpu"
    overrides: tuple[tuple[str, Any], ...] = ()
    dense: bool = False
    mtp_depth: int = 1
    mtp_lambda: float = 0.3
    steps: int = 1000
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    n_train_lines: int = 20000
    worked_fraction: float = 0.3
    balance: bool = True
    seed: int = 0
    eval_every: int = 500
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
        if not isinstance(self.mtp_depth, int) or self.mtp_depth < 0:
            raise ValueError(f"mtp_depth must be an int >= 0 (0: no MTP), got {self.mtp_depth!r}")
        if self.mtp_lambda < 0:
            raise ValueError(f"mtp_lambda must be >= 0, got {self.mtp_lambda}")
        if self.batch_size > self.n_train_lines:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the data "
                f"(n_train_lines={self.n_train_lines}); use more lines or a "
                "smaller batch"
            )

    def model_config(self, vocab_size: int) -> DeepSeekConfig:
        config = DeepSeekConfig.preset(
            self.preset,
            vocab_size=vocab_size,
            **{"num_nextn_predict_layers": self.mtp_depth, **dict(self.overrides)},
        )
        return config.dense_baseline() if self.dense else config

    def spec(self) -> dict[str, Any]:
        """Every field, JSON-able: what names this run's artifact."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def course_config(**changes: Any) -> PretrainConfig:
    """The run notebook 21 trains and notebooks 22-23 start from, at the current
    :func:`~course_utils.runtime.scale`: the defaults of :class:`PretrainConfig` (the ``"cpu"``
    preset, minutes on a laptop CPU); a few-second version under ``COURSE_SMOKE``; the ``"gpu"``
    preset (about 14M parameters), twice the steps of twice the rows, at the GPU scale.
    ``changes`` replace fields (then the checkpoint is a different one)."""
    from . import runtime

    sizes: dict[str, dict[str, Any]] = {
        "smoke": dict(
            steps=30, batch_size=16, n_train_lines=1000, eval_every=15, n_eval_problems=16
        ),
        "default": {},
        "gpu": dict(preset="gpu", steps=2000, batch_size=128, lr=1e-3, n_train_lines=50000),
    }
    return dataclasses.replace(PretrainConfig(**sizes[runtime.scale()]), **changes)


@dataclass
class History:
    """Per step: ``loss`` (the main next-token loss), ``lr``, ``mtp_loss`` (one float per MTP
    depth), ``loads`` (one (n_moe_layers, E) share per step, as lists); per evaluation:
    ``eval_steps``, ``accuracy``, ``worked_fraction``."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    mtp_loss: list[list[float]] = field(default_factory=list)
    loads: list[list[list[float]]] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    worked_fraction: list[float] = field(default_factory=list)
    seconds: float = 0.0


class Pretrainer:
    """A resumable pretraining run of :class:`PretrainConfig` on ``device``.

    Batches come from the global torch RNG (seeded here), which :meth:`save` stores with the
    model and optimizer state, so ``train(a); save(); ...; resume(); train(b)`` gives the same
    weights as ``train(a + b)`` on the CPU.
    """

    def __init__(self, config: PretrainConfig, device: torch.device | str | None = None):
        self.config = config
        self.device = torch.device(device or "cpu")
        self.task = ArithmeticTask()
        torch.manual_seed(config.seed)
        self.corpus = self.task.training_tokens(
            config.n_train_lines, seed=config.seed, worked_fraction=config.worked_fraction
        )
        self.model = DeepSeekForCausalLM(config.model_config(self.task.vocab_size)).to(self.device)
        self.balancer = (
            AuxLossFreeBalancer(self.model) if config.balance and self.model.moe_layers() else None
        )
        # One padded line a row, completion tokens only: every answer is learned at the
        # positions it has when a prompt is answered (see ArithmeticTask.lm_batches).
        get_batch = self.task.lm_batches(
            self.corpus,
            config.batch_size,
            device=self.device,
            layout=config.layout,
            prompt_loss=config.prompt_loss,
        )
        self.eval_problems = self.task.problems(
            config.n_eval_problems, seed=config.seed + 1, split="test"
        )
        self.history = History()
        hooks: dict[str, Any] = {"after_step": self._after_step}
        if config.mtp_depth:
            hooks["compute_loss"] = mtp_loss_fn(config.mtp_lambda, record=self.history.mtp_loss)
        self.trainer = Trainer(
            self.model,
            get_batch,
            config.steps,
            lr=config.lr,
            weight_decay=config.weight_decay,
            warmup_frac=config.warmup_frac,
            hooks=hooks,
            desc="pretraining",
        )
        self._progress: Any = None

    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    def evaluate(self) -> EvalResult:
        """Greedy accuracy on the held-out problems (the model is left in training mode)."""
        result = evaluate_accuracy(self.model, self.eval_problems, task=self.task)
        self.model.train()
        return result

    def _after_step(self, model: torch.nn.Module, step: int, loss: float) -> None:
        h, c = self.history, self.config
        h.loss.append(loss)
        h.lr.append(self.trainer.optimizer.param_groups[0]["lr"])
        # the step's forward has just set every MoE layer's last_counts
        counts = [cast(Tensor, m.last_counts) for m in self.model.moe_layers()]
        h.loads.append([(c / c.sum()).tolist() for c in counts])
        if self.balancer is not None:
            self.balancer.step()
        done = step + 1
        if done % c.eval_every == 0 or done == c.steps:
            result = self.evaluate()
            h.eval_steps.append(done)
            h.accuracy.append(result.accuracy)
            h.worked_fraction.append(result.worked_fraction)

    def train(self, n_steps: int | None = None, progress: bool = True) -> History:
        """Run ``n_steps`` more steps (default: to the end of the budget)."""
        result = self.trainer.train(n_steps, progress=progress)
        self.history.seconds = result.seconds
        return self.history

    def loads_tensor(self) -> Tensor:
        """(steps, n_moe_layers, E) share of each layer's routed tokens per expert."""
        return torch.tensor(self.history.loads)

    # -- save and resume --------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Model, optimizer, RNG states, step, history and config, into directory ``path``."""
        return self.trainer.save(
            path, {"config": self.config.spec(), "history": dataclasses.asdict(self.history)}
        )

    @classmethod
    def resume(cls, path: str | Path, device: torch.device | str | None = None) -> Pretrainer:
        """A Pretrainer continuing exactly where :meth:`save` left it."""
        meta = json.loads((Path(path) / "state.json").read_text())
        raw = dict(meta["extra"]["caller"]["config"])
        raw["overrides"] = tuple(tuple(kv) for kv in raw["overrides"])
        run = cls(PretrainConfig(**raw), device)
        saved = run.trainer.resume(path)["history"]
        for name, value in saved.items():  # in place: the MTP hook records into these lists
            if isinstance(value, list):
                getattr(run.history, name).extend(value)
        run.history.seconds = saved["seconds"]
        return run


def checkpoint_path(config: PretrainConfig, root: str | Path | None = None) -> Path:
    """Where :func:`load_or_pretrain` keeps the model of ``config``: the artifact directory
    named by the config and the current code (:func:`course_utils.artifacts.artifact_path`)."""
    return artifact_path(ARTIFACT_KIND, config.spec(), root)


def save_pretrained(
    model: DeepSeekForCausalLM, config: PretrainConfig, root: str | Path | None = None
) -> Path:
    """Save ``model``, trained by the run ``config``, where :func:`load_or_pretrain` will find
    it (a Hugging Face checkpoint in :func:`checkpoint_path`). An intact artifact of the same
    run and code that is already there is kept. Returns that directory."""
    return load_or_build(
        ARTIFACT_KIND,
        config.spec(),
        build=lambda path: save_hf_checkpoint(model, path),
        load=lambda path: path,
        root=root,
    )


def load_or_pretrain(
    config: PretrainConfig | None = None,
    device: torch.device | str | None = None,
    root: str | Path | None = None,
    progress: bool = True,
) -> DeepSeekForCausalLM:
    """The pretrained mini-DeepSeek of ``config`` (default :func:`course_config`, notebook
    21's run): loaded from its artifact (:func:`checkpoint_path`) when this code saved it
    before, else trained now (minutes on a CPU) and saved there. Returned in eval mode on
    ``device``."""
    config = config or course_config()

    def build(path: Path) -> None:
        run = Pretrainer(config, device)
        run.train(progress=progress)
        save_hf_checkpoint(run.model, path)

    return load_or_build(
        ARTIFACT_KIND,
        config.spec(),
        build,
        lambda path: load_hf_checkpoint(path, device=device).eval(),
        root,
    )
