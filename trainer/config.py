"""Everything a training run can be told, with the lecture's defaults.

Each field is declared once: its default, help text and range become the ``chargpt train``
option (``chargpt.settings``) and are checked again when a config is built in Python. The
architecture's fields are ``GPTConfig``'s, declared there (``setting_from``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import click

from chargpt.declare import check_settings, setting, setting_from
from chargpt.errors import BadInputError
from chargpt.model import GPTConfig
from trainer.presets import PRESETS

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")

# The settings that are GPTConfig fields (its vocab_size comes from the data), and of those
# the ones that shape the weights: a resumed run may change its dropout, not these.
MODEL_FIELDS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")
ARCHITECTURE_FIELDS = tuple(name for name in MODEL_FIELDS if name != "dropout")
# What --resume takes from the run and refuses to change: the weights' shape, what a step
# is made of (its batches, drawn from the seeded generator), the seed, and the optimizer
# (whose saved state only it can load).
RUN_FIELDS = (*ARCHITECTURE_FIELDS, "batch_size", "grad_accum_steps", "seed", "optimizer")
# Every other setting a resumed run may change, and the change applies from the step it
# resumes at: the schedule and the optimizer's settings (set on its parameter groups),
# dropout, evaluation, the length of the run, its name, where and how it runs. Not
# settings of the run at all: whether to resume or overwrite.
NOT_RECORDED = ("resume", "auto_resume", "overwrite")


class ConfigError(BadInputError, ValueError):
    """A setting is out of range or contradicts another (a ValueError: ``build`` turns it
    into the command line's one ``Error:`` line)."""


@dataclass(frozen=True)
class TrainConfig:
    """What a training run can be told; the defaults train the lecture's model its way."""

    preset: str = setting(
        "lecture",
        "Named recipe whose settings replace the defaults (flags, --config and CHARGPT_* "
        "still override them): " + ", ".join(PRESETS) + " (trainer/recipes/*.toml).",
        choices=PRESETS,
    )
    # Data and outputs.
    data: str | None = setting(
        None,
        "UTF-8 text file to train on. Default: Tiny Shakespeare, downloaded once into "
        "--data-dir and checked by sha256.",
        type=click.Path(dir_okay=False),
    )
    data_dir: str = setting(
        "data",
        "Where Tiny Shakespeare is downloaded to when --data is not given, and where the "
        "encoded cache of the text is kept (corpus-<sha256>.bin, reused by every run on "
        "the same text).",
        type=click.Path(file_okay=False),
    )
    out_dir: str = setting(
        "out",
        "Run directory: model.safetensors (best by validation loss, the served file), "
        "latest.safetensors + resume.pt (for --resume), log.jsonl.",
        type=click.Path(file_okay=False),
    )
    run_name: str = setting(
        "", "Label stored in the checkpoint and metrics. Default: run-<UTC time>."
    )
    # The lecture's hyperparameters.
    batch_size: int = setting(
        16, "Sequences per micro-batch, per process (see --grad-accum-steps).", minimum=1
    )
    block_size: int = setting_from(GPTConfig, "block_size")
    max_iters: int = setting(
        5000, "Optimizer steps in the whole run (unless --time-budget is set).", minimum=1
    )
    learning_rate: float = setting(1e-3, "Peak learning rate of AdamW.", above=0)
    eval_interval: int = setting(
        100, "Evaluate both splits, log and checkpoint every this many steps.", minimum=1
    )
    n_embd: int = setting_from(GPTConfig, "n_embd")
    n_head: int = setting_from(GPTConfig, "n_head")
    n_layer: int = setting_from(GPTConfig, "n_layer")
    dropout: float = setting_from(GPTConfig, "dropout")
    # Architecture options beyond the lecture's model (chargpt.model.GPTConfig).
    position: str = setting_from(GPTConfig, "position")
    norm: str = setting_from(GPTConfig, "norm")
    activation: str = setting_from(GPTConfig, "activation")
    qk_norm: bool = setting_from(GPTConfig, "qk_norm")
    tie_embeddings: bool = setting_from(GPTConfig, "tie_embeddings")
    bias: bool = setting_from(GPTConfig, "bias")
    logit_softcap: float = setting_from(GPTConfig, "logit_softcap")
    attention_window: int = setting_from(GPTConfig, "attention_window")
    bigram_embedding: bool = setting_from(GPTConfig, "bigram_embedding")
    # Optimisation.
    grad_accum_steps: int = setting(
        1,
        "Micro-batches of --batch-size per optimizer step, their gradients accumulated: "
        "N micro-batches of B train like one batch of N*B in the memory of B.",
        minimum=1,
    )
    seed: int = setting(
        1337,
        "Seeds initialisation, batches, dropout and the final sample.",
        minimum=0,
        maximum=2**64 - 1,
    )
    weight_decay: float = setting(
        0.01, "AdamW weight decay, applied to weight matrices and embeddings only.", minimum=0
    )
    grad_clip: float = setting(
        1.0, "Clip the global gradient norm to this value (0 = off).", minimum=0
    )
    lr_schedule: str = setting(
        "cosine",
        "After linear warmup: cosine decay to --min-lr at the end of the run, wsd "
        "(warmup-stable-decay: the peak until the last --decay-fraction of the run, then "
        "linear decay to --min-lr), or constant.",
        choices=SCHEDULES,
    )
    decay_fraction: float = setting(
        0.3, "With --lr-schedule wsd: the fraction of the run spent decaying.", above=0, maximum=1
    )
    warmup_iters: int = setting(
        100,
        "Steps of linear learning-rate warmup (steps, also under --time-budget: the "
        "optimizer's statistics need steps, not seconds).",
        minimum=0,
    )
    min_lr: float = setting(
        1e-4, "Learning rate at the end of the cosine or wsd schedule.", minimum=0
    )
    optimizer: str = setting(
        "adamw",
        "adamw for every parameter, or muon: Muon for the blocks' weight matrices, AdamW "
        "(--learning-rate) for embeddings, head, norms and biases.",
        choices=OPTIMIZERS,
    )
    muon_learning_rate: float = setting(
        0.02, "Peak learning rate of Muon (with --optimizer muon); same schedule.", above=0
    )
    muon_weight_decay: float = setting(
        0.0,
        "Muon's decoupled weight decay (with --optimizer muon): each step multiplies the "
        "blocks' matrices by 1 - lr * this.",
        minimum=0,
    )
    muon_ns_steps: int = setting(
        5,
        "Newton-Schulz iterations in each Muon step (with --optimizer muon): fewer cost "
        "less and orthogonalise less exactly.",
        minimum=1,
    )
    time_budget: float = setting(
        0.0,
        "Train for this many seconds of training steps instead of --max-iters steps (0 = "
        "off). The schedule follows the fraction of the budget spent; evaluation time is "
        "not counted.",
        minimum=0,
    )
    # Evaluation.
    eval_batch_size: int = setting(64, "Windows per forward pass during evaluation.", minimum=1)
    eval_tokens: int = setting(
        0,
        "Characters scored per evaluation and split. 0 = the whole validation split "
        "(exact), and a fixed train sample of the same size.",
        minimum=0,
    )
    # Execution.
    device: str = setting("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
    precision: str = setting(
        "auto",
        "bf16 autocast or fp32. auto = bf16 on CUDA GPUs that support it, else fp32.",
        choices=("auto", "fp32", "bf16"),
    )
    compile: bool = setting(
        False,
        "torch.compile the model (pays off on GPUs; slower on small CPUs).",
        negatable=True,
    )
    metrics_port: int = setting(
        0,
        "Serve Prometheus metrics on this port while training (0 = off).",
        minimum=0,
        maximum=65535,
    )
    sample_length: int = setting(
        300, "Characters to sample from the best model at the end (0 = none).", minimum=0
    )
    resume: bool = setting(False, "Continue the run in --out-dir exactly where it stopped.")
    auto_resume: bool = setting(
        False,
        "--resume if --out-dir holds a checkpoint (resume.pt), else start a new run: for "
        "jobs that are restarted (torchrun --max-restarts, a Kubernetes Job), which then "
        "continue by themselves.",
    )
    overwrite: bool = setting(
        False, "Start a new run in an --out-dir that already holds one, replacing it."
    )

    def __post_init__(self) -> None:
        try:
            check_settings(self)
            self.model_config(vocab_size=1)  # the model's own checks, before any data is read
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.min_lr > self.learning_rate:
            raise ConfigError(
                f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})"
            )
        if self.overwrite and (self.resume or self.auto_resume):
            which = "auto_resume" if self.auto_resume else "resume"
            raise ConfigError(f"{which} and overwrite contradict each other; pick one")

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The architecture these settings describe, for a vocabulary of ``vocab_size``."""
        return GPTConfig(
            vocab_size=vocab_size, **{name: getattr(self, name) for name in MODEL_FIELDS}
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def budgeted(self) -> bool:
        """Whether the run is as long as --time-budget rather than --max-iters."""
        return self.time_budget > 0

    def run_progress(self, step: int, train_s: float) -> float:
        """The fraction of the run done after ``step`` steps and ``train_s`` seconds of
        training: of the budget's seconds, or of the steps after warmup."""
        if self.budgeted:
            return min(1.0, train_s / self.time_budget)
        return min(1.0, (step - self.warmup_iters) / max(1, self.max_iters - self.warmup_iters))

    def warnings(self) -> list[str]:
        """Settings that are allowed but probably not meant."""
        if self.budgeted or self.warmup_iters <= self.max_iters:
            return []
        peak = self.learning_rate_at(self.max_iters - 1, 0.0)
        return [
            f"warmup ({self.warmup_iters} steps) is longer than the run ({self.max_iters} "
            f"steps): the learning rate peaks at {peak:.2e}, not --learning-rate "
            f"{self.learning_rate:.2e}; pass --warmup-iters to change it"
        ]

    def learning_rate_at(self, step: int, progress: float) -> float:
        """AdamW's learning rate for optimizer step ``step`` (0-based) with ``progress``
        of the run done (``run_progress``): linear warmup over the first ``warmup_iters``
        steps, then cosine decay to ``min_lr`` at the end of the run, or the peak until
        the last ``decay_fraction`` and a linear decay to ``min_lr`` (wsd), or constant.
        Muon's follows the same curve, scaled to its own peak."""
        if step < self.warmup_iters:
            return self.learning_rate * (step + 1) / self.warmup_iters
        if self.lr_schedule == "constant":
            return self.learning_rate
        if self.lr_schedule == "wsd":
            left = (1.0 - progress) / self.decay_fraction  # 1 when the decay starts
            return self.min_lr + min(1.0, left) * (self.learning_rate - self.min_lr)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (
            self.learning_rate - self.min_lr
        )
