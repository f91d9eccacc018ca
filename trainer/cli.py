"""``chargpt train``: the options are ``TrainConfig``'s fields (``trainer/config.py``).

Exit codes: 0 a complete run, or one stopped by SIGTERM (continue it with --resume); 130
stopped by Ctrl-C (SIGINT); 2 bad input, nothing written; 3 a file of the run could not be
written (full disk, I/O error), the last checkpoint intact; 4 the loss became non-finite,
nothing non-finite saved.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from chargpt.errors import BadInputError
from chargpt.settings import InputError, LayeredCommand, build, config_option, options
from trainer.config import TrainConfig
from trainer.distributed import Distributed
from trainer.errors import RunError
from trainer.presets import read_preset
from trainer.resume import resume_config
from trainer.state import RunFiles
from trainer.train import TrainResult, run_training


class RunFailed(click.ClickException):
    """A RunError, shown as one ``Error:`` line with its own exit code."""

    def __init__(self, error: RunError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code


@click.command(cls=LayeredCommand, read_preset=read_preset)
@options(TrainConfig)
@config_option()
@click.pass_context
def train(ctx: click.Context, config: str | None, **settings: object) -> int:
    """Train the character-level GPT and publish its checkpoint.

    Every setting can come from a flag, a --config file, a CHARGPT_* environment
    variable or a --preset, in that order of precedence. --resume continues the run in
    --out-dir with its own settings; give only those to change; --auto-resume does so
    only when there is a checkpoint. Data-parallel: torchrun --nproc_per_node N
    --no-python chargpt train ...
    """
    try:
        if settings["resume"] or (settings["auto_resume"] and has_checkpoint(settings)):
            given = {
                name
                for name in settings
                if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
            }
            cfg = resume_config({**settings, "resume": True}, given)
        else:
            cfg = build(TrainConfig, settings)
        result = run_training(cfg)
    except BadInputError as exc:  # SetupError, DataError, ConfigError
        raise InputError(str(exc)) from None
    except RunError as exc:
        raise RunFailed(exc) from None
    if Distributed.from_env().is_main:
        report_end(result)
    return 130 if result.stopped_by == "SIGINT" else 0


def has_checkpoint(settings: dict[str, object]) -> bool:
    """Whether the --out-dir of ``settings`` holds a run's checkpoint to continue (every
    rank looks: the run directory is shared by all of them)."""
    return RunFiles(Path(str(settings["out_dir"]))).resume.exists()


def report_end(result: TrainResult) -> None:
    """The end-of-run sample and what the run published, or what a late signal did."""
    if result.stopped_by is not None:
        if result.late_signal:
            click.echo(f"{result.late_signal}: the state of step {result.step} is already saved")
        return
    if result.sample:
        click.echo("\n--- sample from the best model ---")
        click.echo(result.sample)
        click.echo("---")
    if result.late_signal:
        skipped = "; skipped the end-of-run sample" if result.sample_skipped else ""
        click.echo(f"{result.late_signal}: the run is complete (step {result.step}){skipped}")
    if result.exact_val_loss is not None:
        click.echo(f"validation loss over the whole split: {result.exact_val_loss:.4f}")
    if result.checkpoint is not None:
        click.echo(f"checkpoint: {result.checkpoint} (best val loss {result.best_val_loss:.4f})")
    else:
        click.echo("no checkpoint was published")
