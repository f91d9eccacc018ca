"""``chargpt train``."""

from __future__ import annotations

import click

from chargpt.settings import InputError, LayeredCommand, config_option, option
from trainer.config import ConfigError, TrainConfig
from trainer.data import DataError
from trainer.train import Distributed, TrainError, run_training

DEFAULTS = TrainConfig()
POSITIVE_INT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)
POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE_FLOAT = click.FloatRange(min=0)


@click.command(cls=LayeredCommand)
@option(
    "--data",
    type=click.Path(dir_okay=False),
    default=None,
    help="UTF-8 text file to train on. Default: Tiny Shakespeare, downloaded once into "
    "--data-dir and checked by sha256.",
)
@option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=DEFAULTS.data_dir,
    help="Where Tiny Shakespeare is downloaded to when --data is not given.",
)
@option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default=DEFAULTS.out_dir,
    help="Run directory: model.safetensors (best by validation loss, the served file), "
    "latest.safetensors + resume.pt (for --resume), log.jsonl.",
)
@option(
    "--run-name",
    default="",
    help="Label stored in the checkpoint and metrics. Default: run-<UTC time>.",
)
@option(
    "--batch-size",
    type=POSITIVE_INT,
    default=DEFAULTS.batch_size,
    help="Sequences per optimizer step, per process.",
)
@option(
    "--block-size",
    type=POSITIVE_INT,
    default=DEFAULTS.block_size,
    help="Context length in characters.",
)
@option(
    "--max-iters",
    type=POSITIVE_INT,
    default=DEFAULTS.max_iters,
    help="Optimizer steps in the whole run.",
)
@option(
    "--learning-rate",
    type=POSITIVE_FLOAT,
    default=DEFAULTS.learning_rate,
    help="Peak learning rate (AdamW).",
)
@option(
    "--eval-interval",
    type=POSITIVE_INT,
    default=DEFAULTS.eval_interval,
    help="Evaluate both splits, log and checkpoint every this many steps.",
)
@option("--n-embd", type=POSITIVE_INT, default=DEFAULTS.n_embd, help="Embedding width.")
@option(
    "--n-head",
    type=POSITIVE_INT,
    default=DEFAULTS.n_head,
    help="Attention heads per layer (must divide --n-embd).",
)
@option("--n-layer", type=POSITIVE_INT, default=DEFAULTS.n_layer, help="Transformer blocks.")
@option(
    "--dropout",
    type=click.FloatRange(min=0, max=1, max_open=True),
    default=DEFAULTS.dropout,
    help="Dropout probability.",
)
@option(
    "--seed",
    type=int,
    default=DEFAULTS.seed,
    help="Seeds initialisation, batches, dropout and the final sample.",
)
@option(
    "--weight-decay",
    type=NON_NEGATIVE_FLOAT,
    default=DEFAULTS.weight_decay,
    help="AdamW weight decay, applied to weight matrices and embeddings only.",
)
@option(
    "--grad-clip",
    type=NON_NEGATIVE_FLOAT,
    default=DEFAULTS.grad_clip,
    help="Clip the global gradient norm to this value (0 = off).",
)
@option(
    "--lr-schedule",
    type=click.Choice(["cosine", "constant"]),
    default=DEFAULTS.lr_schedule,
    help="After linear warmup: cosine decay to --min-lr at --max-iters, or constant.",
)
@option(
    "--warmup-iters",
    type=NON_NEGATIVE_INT,
    default=DEFAULTS.warmup_iters,
    help="Steps of linear learning-rate warmup.",
)
@option(
    "--min-lr",
    type=NON_NEGATIVE_FLOAT,
    default=DEFAULTS.min_lr,
    help="Learning rate at the end of the cosine schedule.",
)
@option(
    "--eval-batch-size",
    type=POSITIVE_INT,
    default=DEFAULTS.eval_batch_size,
    help="Windows per forward pass during evaluation.",
)
@option(
    "--eval-tokens",
    type=NON_NEGATIVE_INT,
    default=DEFAULTS.eval_tokens,
    help="Characters scored per evaluation and split. 0 = the whole validation split "
    "(exact), and a fixed train sample of the same size.",
)
@option(
    "--device",
    default=DEFAULTS.device,
    help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.",
)
@option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default=DEFAULTS.precision,
    help="bf16 autocast or fp32. auto = bf16 on CUDA GPUs that support it, else fp32.",
)
@option(
    "--compile/--no-compile",
    default=DEFAULTS.compile,
    help="torch.compile the model (pays off on GPUs; slower on small CPUs).",
)
@option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=DEFAULTS.metrics_port,
    help="Serve Prometheus metrics on this port while training (0 = off).",
)
@option(
    "--sample-length",
    type=NON_NEGATIVE_INT,
    default=DEFAULTS.sample_length,
    help="Characters to sample from the best model at the end (0 = none).",
)
@option(
    "--resume",
    is_flag=True,
    default=False,
    help="Continue the run in --out-dir exactly where it stopped.",
)
@option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Start a new run in an --out-dir that already holds one, replacing it.",
)
@config_option()
def train(config: str | None, **settings: object) -> int:
    """Train the character-level GPT and publish its checkpoint.

    Every setting can come from a flag, a --config file or a CHARGPT_* environment
    variable, in that order of precedence. Data-parallel: torchrun --nproc_per_node N
    --no-python chargpt train ...
    """
    try:
        cfg = TrainConfig(**settings)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    try:
        result = run_training(cfg)
    except (TrainError, DataError) as exc:
        raise InputError(str(exc)) from None
    if not Distributed.from_env().is_main:
        return 0 if result.stopped_by != "SIGINT" else 130
    if result.stopped_by is None:
        if result.sample:
            click.echo("\n--- sample from the best model ---")
            click.echo(result.sample)
            click.echo("---")
        click.echo(f"checkpoint: {result.checkpoint} (best val loss {result.best_val_loss:.4f})")
    return 130 if result.stopped_by == "SIGINT" else 0
