"""Writing a run's checkpoint files (rank 0 writes; ``trainer/state.py`` has the files and
the ``TrainState``): ``model.safetensors`` on a new best validation loss, then, at each
save, ``resume.pt`` (the state, latest weights included: the checkpoint is complete when
it lands) and ``latest.safetensors``. Nothing non-finite is saved: each save scans the
weights once, before its first file.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from chargpt.checkpoint import CheckpointInfo, checkpoint_bytes
from trainer.config import NOT_RECORDED
from trainer.errors import diverged
from trainer.state import gather_rng_states, publish, save_train_state

if TYPE_CHECKING:
    from trainer.setup import Run


def save_latest(
    run: Run, train_loss: float | None, val_loss: float | None, weights_checked: bool = False
) -> None:
    """The checkpoint: the ``TrainState`` with the latest weights, whose landing makes it
    complete; then the same weights as ``latest.safetensors``. Every rank takes part (each
    one's random generator state is gathered); rank 0 writes. ``weights_checked``: this
    save already found the weights finite (it published ``model.safetensors``)."""
    torch_rng, cuda_rng = gather_rng_states(run.device, run.dist)
    if not run.dist.is_main:
        return
    if not weights_checked:
        require_finite_weights(run)
    state = run.state
    state.weights = run.model.state_dict()
    state.optimizers = run.optimizer.state_dict()
    state.batch_rng = run.sampler.generator.get_state()
    state.torch_rng, state.cuda_rng = torch_rng, cuda_rng
    try:
        save_train_state(run.files.resume, state)
    finally:
        state.weights, state.optimizers = {}, {}
    run.saved_step = state.step
    publish_weights(run, run.files.latest, train_loss, val_loss)
    run.report.published("latest")


def publish_weights(run: Run, path: Path, train_loss: float | None, val_loss: float | None) -> None:
    """The model as it is now, in the served format, at ``path`` (its weights found finite
    by ``require_finite_weights`` first)."""
    publish(path, checkpoint_bytes(run.model, checkpoint_info(run, train_loss, val_loss)))


def require_finite_weights(run: Run) -> None:
    """Raise DivergedError, before anything is written, if a weight is non-finite."""
    finite = torch.stack([torch.isfinite(p).all() for p in run.model.parameters()]).all()
    if not finite:
        raise diverged(f"the weights became non-finite by step {run.state.step}", run.saved_step)


def checkpoint_info(run: Run, train_loss: float | None, val_loss: float | None) -> CheckpointInfo:
    """The metadata of a checkpoint of the model as it is now: the settings in force, and
    those changed on resume."""
    training = {k: v for k, v in run.cfg.to_dict().items() if k not in NOT_RECORDED}
    if run.state.changes:
        training["changed_on_resume"] = run.state.changes
    return CheckpointInfo(
        config=run.model.config,
        vocab=run.corpus.tokenizer.vocab,
        step=run.state.step,
        train_loss=train_loss,
        val_loss=val_loss,
        dataset_sha256=run.corpus.sha256,
        run_name=run.state.run_name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        training={
            **training,
            "world_size": run.dist.world_size,
            "train_s": round(run.state.train_s, 3),  # seconds of training steps so far
        },
    )
