"""``--resume``: what a resumed run takes from the run it continues, what it may change, and
how the loop's objects get their state back.

Like nanoGPT's ``init_from='resume'``, the run's own settings are the defaults: repeating
the flags is not required. A setting given explicitly (a flag, the config file or the
environment) either applies from the step the run resumes at, or, for ``RUN_FIELDS`` (the
architecture, what a step is made of, the seed), must equal the run's. Each change is
recorded in the state, and the settings in force in every checkpoint's metadata.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from chargpt.model import GPT
from chargpt.settings import build
from trainer.batches import BatchSampler
from trainer.config import ARCHITECTURE_FIELDS, NOT_RECORDED, RUN_FIELDS, TrainConfig
from trainer.corpus import Corpus
from trainer.distributed import Distributed
from trainer.errors import SetupError
from trainer.optim import Optimizers
from trainer.state import (
    RunFiles,
    StateError,
    TrainState,
    load_train_state,
    read_run_config,
    restore_rng_states,
)


def resume_config(values: Mapping[str, Any], given: Collection[str]) -> TrainConfig:
    """The settings to resume the run in ``values["out_dir"]`` with: the run's own, except
    those ``given`` explicitly. Raises SetupError when there is no run to resume or a
    given setting of ``RUN_FIELDS`` differs from the run's, InputError when the settings
    do not go together."""
    files = RunFiles(Path(values["out_dir"]))
    if not files.resume.exists():
        raise SetupError(
            f"--resume: no run to resume in {files.out_dir} ({files.resume} is missing)"
        )
    try:
        saved = read_run_config(files.resume)
    except StateError as exc:
        raise SetupError(f"--resume: {exc}") from None
    taken = {  # the run's own settings; where it is stays where it was found
        name: value
        for name, value in saved.items()
        if name in values and name not in given and name not in (*NOT_RECORDED, "out_dir")
    }
    cfg = build(TrainConfig, {**values, **taken})
    check_run_fields(saved, {name: getattr(cfg, name) for name in given if name in values}, files)
    return cfg


def check_run_fields(saved: Mapping[str, Any], values: Mapping[str, Any], files: RunFiles) -> None:
    """Raise SetupError naming every setting of ``RUN_FIELDS`` in ``values`` that differs
    from the run's ``saved`` settings (a run saved before a setting existed used its
    default)."""
    defaults = TrainConfig().to_dict()
    different = [
        name
        for name in RUN_FIELDS
        if name in values and saved.get(name, defaults[name]) != values[name]
    ]
    if not different:
        return
    what = (
        "another architecture" if set(different) <= set(ARCHITECTURE_FIELDS) else "other settings"
    )
    details = "; ".join(
        f"{name}={saved.get(name, defaults[name])} there, {values[name]} here" for name in different
    )
    raise SetupError(
        f"--resume: the run in {files.out_dir} has {what} ({details}); leave them "
        f"out to continue the run as it was, or train into another --out-dir"
    )


def load_resumable(
    files: RunFiles, cfg: TrainConfig, corpus: Corpus
) -> tuple[TrainState, TrainConfig]:
    """The state of the run in ``files`` if ``cfg`` and ``corpus`` can continue it, and
    ``cfg`` with the run's name when it gives none."""
    try:
        state = load_train_state(files.resume)
    except StateError as exc:
        raise SetupError(f"--resume: {exc}") from None
    check_run_fields(state.train_config, cfg.to_dict(), files)
    if state.dataset_sha256 != corpus.sha256:
        raise SetupError(
            f"--resume: the run in {files.out_dir} was trained on data with sha256 "
            f"{state.dataset_sha256}, but this data has {corpus.sha256}"
        )
    return state, replace(cfg, run_name=cfg.run_name or state.run_name)


def changed_settings(state: TrainState, cfg: TrainConfig) -> dict[str, list[Any]]:
    """The settings ``cfg`` changes from the run's, as ``{name: [before, now]}``."""
    defaults = TrainConfig().to_dict()
    return {
        name: [state.train_config.get(name, defaults[name]), value]
        for name, value in cfg.to_dict().items()
        if name not in NOT_RECORDED and state.train_config.get(name, defaults[name]) != value
    }


def restore(
    state: TrainState,
    cfg: TrainConfig,
    model: GPT,
    optimizer: Optimizers,
    sampler: BatchSampler,
    device: torch.device,
    dist: Distributed,
) -> dict[str, list[Any]]:
    """Give the model, optimizer, batch sampler and random generators their saved states,
    then apply ``cfg`` from here on; returns (and records) the settings it changes."""
    model.load_state_dict(state.weights)
    optimizer.load_state_dict(state.optimizers, cfg)
    sampler.generator.set_state(state.batch_rng)
    restore_rng_states(state, device, dist, cfg.seed)
    state.weights, state.optimizers = {}, {}  # they live in the model and optimizer now
    changes = changed_settings(state, cfg)
    if changes:
        state.changes.append({"step": state.step, "settings": changes})
    state.train_config = cfg.to_dict()
    return changes
