"""The trainer's resume state: ``trainer/state.py``."""

from pathlib import Path

import pytest
import torch

from chargpt.model import GPT, GPTConfig
from trainer.state import StateError, TrainState, load_train_state, save_train_state

CONFIG = GPTConfig(vocab_size=5, block_size=8, n_embd=16, n_head=2, n_layer=2)


def test_resume_state_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = GPT(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    state = TrainState(
        run_name="x",
        dataset_sha256="ab" * 32,
        train_config={"n_layer": 2},
        step=3,
        optimizers={"adamw": optimizer.state_dict()},
        torch_rng=[torch.get_rng_state()],
    )
    save_train_state(tmp_path / "resume.pt", state)
    loaded = load_train_state(tmp_path / "resume.pt")
    assert loaded.step == 3 and loaded.run_name == "x"
    assert loaded.best_val_loss == float("inf")
    assert torch.equal(loaded.torch_rng[0], state.torch_rng[0])
    restored = torch.optim.AdamW(model.parameters())
    restored.load_state_dict(loaded.optimizers["adamw"])
    (tmp_path / "resume.pt").write_bytes(b"garbage")
    with pytest.raises(StateError, match="cannot read resume state"):
        load_train_state(tmp_path / "resume.pt")


def test_a_foreign_torch_file_is_not_a_resume_state(tmp_path: Path) -> None:
    torch.save({"step": 3}, tmp_path / "other.pt")
    with pytest.raises(StateError, match="not a chargpt resume file"):
        load_train_state(tmp_path / "other.pt")
    with pytest.raises(StateError, match="no resume state"):
        load_train_state(tmp_path / "missing.pt")
