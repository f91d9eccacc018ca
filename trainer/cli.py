"""``chargpt train``: the options are ``TrainConfig``'s fields (``trainer/config.py``)."""

from __future__ import annotations

import click

from chargpt.settings import InputError, LayeredCommand, build, config_option, options
from trainer.config import TrainConfig
from trainer.data import DataError
from trainer.distributed import Distributed
from trainer.train import TrainError, run_training


@click.command(cls=LayeredCommand)
@options(TrainConfig)
@config_option()
def train(config: str | None, **settings: object) -> int:
    """Train the character-level GPT and publish its checkpoint.

    Every setting can come from a flag, a --config file or a CHARGPT_* environment
    variable, in that order of precedence. Data-parallel: torchrun --nproc_per_node N
    --no-python chargpt train ...
    """
    cfg = build(TrainConfig, settings)
    try:
        result = run_training(cfg)
    except (TrainError, DataError) as exc:
        raise InputError(str(exc)) from None
    if result.stopped_by is None and Distributed.from_env().is_main:
        if result.sample:
            click.echo("\n--- sample from the best model ---")
            click.echo(result.sample)
            click.echo("---")
        click.echo(f"checkpoint: {result.checkpoint} (best val loss {result.best_val_loss:.4f})")
    return 130 if result.stopped_by == "SIGINT" else 0
