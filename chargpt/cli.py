"""The ``chargpt`` command: a click group whose subcommands live with their programs
(``trainer.cli``, ``server.cli``, ``client.cli``) and load on first use."""

from __future__ import annotations

import importlib
import json
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from chargpt.settings import SEED_LIMIT, InputError, sampling_options

if TYPE_CHECKING:
    import torch

SUBCOMMANDS = {
    "train": "trainer.cli:train",
    "serve": "server.cli:serve",
    "generate": "client.cli:generate",
    "score": "client.cli:score",
    "health": "client.cli:health",
    "sample": "chargpt.cli:sample",
    "info": "chargpt.cli:info",
    "plot": "chargpt.cli:plot",
}


class LazyGroup(click.Group):
    """Imports a subcommand's module only when that subcommand runs (or --help lists it)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr = SUBCOMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


def calm_openmp() -> None:
    """Bound how long torch's OpenMP threads spin at a barrier before they sleep
    (GOMP_SPINCOUNT=10000), unless the user chose (OMP_WAIT_POLICY or GOMP_SPINCOUNT).
    Must run before torch is imported (libgomp reads it when it loads).

    libgomp's default spins for up to 300,000 iterations: on a small machine shared with
    other busy threads (the server's gRPC loop, its clients, a test suite) the thread a
    spinner waits for may not run until the spinner's time slice ends, so a parallel region
    can cost a time slice (under load, a batch-64 forward took 486 ms instead of 59 ms).
    Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a wake-up per region instead, which
    on the idle 2-core machine cut the trainer from 22.5k to 12.9k tokens/s and one
    server stream from 568 to 211 characters/s. 10,000 spins keep the idle speed (22.1k
    tokens/s) and bound the loss under load. The test suite, which never measures time,
    sets PASSIVE for itself.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "10000"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chargpt")
def cli() -> None:
    """A character-level GPT: train it, sample it offline, serve it over gRPC."""


@click.command()
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(dir_okay=False),
    help="A model.safetensors written by chargpt train.",
)
@click.option(
    "--prompt",
    help="Text to continue. Default: empty, which starts from vocabulary entry 0 (a "
    "newline for Tiny Shakespeare), as the trainer's end-of-run sample does.",
)
@click.option(
    "--prompt-file",
    type=click.Path(dir_okay=False),
    help="Continue the text of this UTF-8 file (all of it, a final newline included) "
    "instead of --prompt.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=0),
    default=500,
    show_default=True,
    help="Characters to generate.",
)
@sampling_options(
    on_server=False,
    seed_help="Random seed (default: random). Sample i, counting from 0, uses seed + i.",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Samples to generate from the same prompt. With more than one, each starts on a "
    "line of its own: '--- sample I of N, seed S ---'.",
)
@click.option(
    "--echo-prompt",
    is_flag=True,
    help="Print the prompt before its continuation (default: the generated characters "
    "only, as the server returns them).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
def sample(
    checkpoint: str,
    prompt: str | None,
    prompt_file: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    num_samples: int,
    echo_prompt: bool,
    device: str,
) -> None:
    """Generate offline from a checkpoint; prints only the generated characters.

    Uses the reference generation (crop to block_size, full forward per character), so
    its output is what the server must reproduce: sample i (from 0) equals a server
    request seeded seed + i (modulo 2**64), and sample 0 is what one sample with that seed
    prints.
    """
    from chargpt.checkpoint import CheckpointError, load_checkpoint
    from chargpt.model import reference_generate
    from chargpt.runtime import resolve_device
    from chargpt.sampling import SamplingParams
    from chargpt.tokenizer import UnknownCharactersError, prompt_ids

    if prompt is not None and prompt_file is not None:
        raise InputError("give --prompt or --prompt-file, not both")
    text = read_prompt_file(prompt_file) if prompt_file is not None else prompt or ""
    try:
        loaded = load_checkpoint(checkpoint, resolve_device(device))
        params = SamplingParams(temperature, top_k, top_p)
    except (CheckpointError, ValueError) as exc:
        raise InputError(f"{exc}") from None
    not_finite = non_finite_tensors(loaded.model)
    if not_finite:
        raise InputError(
            f"{checkpoint}: the weights hold NaN or infinite values (in "
            f"{', '.join(not_finite[:3])}{', ...' if len(not_finite) > 3 else ''}); "
            f"nothing can be sampled from them"
        )
    try:
        ids = prompt_ids(loaded.tokenizer, text)
    except UnknownCharactersError as exc:
        source = f"prompt file {prompt_file}" if prompt_file is not None else "prompt"
        raise InputError(f"{source}: {exc}") from None
    seed = seed if seed is not None else random.getrandbits(63)
    for i in range(num_samples):
        sample_seed = (seed + i) % SEED_LIMIT
        if num_samples > 1:
            click.echo(f"--- sample {i + 1} of {num_samples}, seed {sample_seed} ---")
        new = reference_generate(loaded.model, ids, max_new_tokens, params, sample_seed)
        shown = (text if echo_prompt else "") + loaded.tokenizer.decode(new)
        click.echo(shown, nl=num_samples > 1 or sys.stdout.isatty())


def read_prompt_file(path: str) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read prompt file {path}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"prompt file {path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start} is invalid"
        ) from None


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """The names of the weights that hold a NaN or an infinity."""
    import torch

    return [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info(path: str, as_json: bool) -> None:
    """Print what a checkpoint holds (and verify it)."""
    from chargpt.checkpoint import CheckpointError, load_checkpoint

    if _is_zip(path):
        raise InputError(
            f"{path} is not a weights file: it is a torch file (resume.pt holds a run's "
            f"resume state); chargpt info reads .safetensors checkpoints"
        )
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    meta = loaded.info
    summary = {
        "path": path,
        "file_sha256": loaded.file_sha256,
        "parameters": loaded.model.num_parameters(),
        "architecture": meta.config.to_dict(),
        "step": meta.step,
        "train_loss": meta.train_loss,
        "val_loss": meta.val_loss,
        "vocab": "".join(meta.vocab),
        "dataset_sha256": meta.dataset_sha256,
        "run_name": meta.run_name,
        "created": meta.created,
        "training": meta.training,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    for key, value in summary.items():
        if key == "vocab":
            value = json.dumps(value, ensure_ascii=False)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:>15}: {value}")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="The picture to write; its extension says the format (.png, .svg, .pdf). "
    "Default: RUN_DIR/loss.png.",
)
def plot(run_dir: str, output: str | None) -> None:
    """Draw a run's train and validation loss against steps (training seconds along the
    top) from RUN_DIR/log.jsonl; prints the path written. Needs matplotlib
    (pip install 'chargpt[plot]'). A run still training can be drawn."""
    from chargpt.plot import MatplotlibMissingError, PlotError, plot_run, read_log

    directory = Path(run_dir)
    try:
        curve = read_log(directory / "log.jsonl")
        target = Path(output) if output else directory / "loss.png"
        written = plot_run(curve, target, title=directory.resolve().name)
    except MatplotlibMissingError as exc:
        raise click.ClickException(str(exc)) from None  # exit 1: the environment, not input
    except PlotError as exc:
        raise InputError(str(exc)) from None
    click.echo(str(written))


def _is_zip(path: str) -> bool:
    """Whether ``path`` is a zip archive, as ``torch.save`` writes them."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False  # load_checkpoint says why


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors (exit 2 for bad input), the command's exit code otherwise;
    a bare ``chargpt`` prints its usage and exits 0."""
    calm_openmp()
    try:
        code = cli.main(args=argv, prog_name="chargpt", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.format_message())
        sys.exit(0)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
