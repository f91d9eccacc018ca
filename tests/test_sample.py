"""``chargpt sample``: several samples, a prompt from a file, the prompt echoed, and
checkpoints it must refuse; run for real in subprocesses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from chargpt.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import run_chargpt


def sample(checkpoint: Path, *args: str) -> str:
    result = run_chargpt("sample", "--checkpoint", str(checkpoint), "--max-new-tokens", "30", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refusal(checkpoint: Path, *args: str) -> str:
    """The one Error line of a refused ``chargpt sample``."""
    result = run_chargpt("sample", "--checkpoint", str(checkpoint), *args)
    assert result.returncode == 2, (args, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), (args, result.stderr)
    return lines[0]


def test_sample_i_uses_seed_plus_i(trained_run: Path) -> None:
    model = trained_run / "model.safetensors"
    singles = [sample(model, "--prompt", "ROMEO:", "--seed", str(seed)) for seed in (7, 8, 9)]
    assert all(len(s) == 30 for s in singles)  # the generated characters only, no newline
    several = sample(model, "--prompt", "ROMEO:", "--seed", "7", "--num-samples", "3")
    parts = re.split(r"^--- sample (\d) of 3, seed (\d+) ---\n", several, flags=re.MULTILINE)
    assert parts[0] == ""
    headers = [(parts[i], parts[i + 1]) for i in range(1, len(parts), 3)]
    assert headers == [("1", "7"), ("2", "8"), ("3", "9")]
    assert [parts[i] for i in range(3, len(parts), 3)] == [s + "\n" for s in singles]
    # Seeds wrap at 2**64, the server's seed being unsigned 64-bit.
    wrapped = sample(model, "--seed", str(2**64 - 1), "--num-samples", "2")
    assert "seed 18446744073709551615 ---" in wrapped and "seed 0 ---" in wrapped
    assert wrapped.endswith(sample(model, "--seed", "0") + "\n")


def test_a_prompt_file_and_the_echoed_prompt(trained_run: Path, tmp_path: Path) -> None:
    model = trained_run / "model.safetensors"
    prompt = "ROMEO:\nThe dog"
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    from_flag = sample(model, "--prompt", prompt, "--seed", "3")
    assert sample(model, "--prompt-file", str(path), "--seed", "3") == from_flag
    echoed = sample(model, "--prompt-file", str(path), "--seed", "3", "--echo-prompt")
    assert echoed == prompt + from_flag


def test_unusable_prompts_are_one_error_line(trained_run: Path, tmp_path: Path) -> None:
    model = trained_run / "model.safetensors"
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes(b"ROMEO: caf\xe9")  # Latin-1, not UTF-8
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("ROMEO: café €", encoding="utf-8")
    cases = [
        (["--prompt-file", str(not_utf8)], "is not UTF-8 text: byte 0xe9 at offset 10"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "cannot read prompt file"),
        (["--prompt-file", str(unknown)], "'é' at position 10; '€' at position 12"),
        (["--prompt", "x", "--prompt-file", str(unknown)], "--prompt or --prompt-file"),
        (["--seed", str(2**64)], "--seed"),
    ]
    for args, expected in cases:
        assert expected in refusal(model, *args), args


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(
    trained_run: Path, tmp_path: Path, value: float
) -> None:
    loaded = load_checkpoint(trained_run / "model.safetensors")
    with torch.no_grad():
        loaded.model.blocks[0].attn.qkv.weight[3, 5] = value  # type: ignore[index]
    broken = tmp_path / "model.safetensors"
    save_checkpoint(broken, loaded.model, loaded.info)
    line = refusal(broken, "--prompt", "ROMEO:")
    assert "NaN or infinite" in line and "blocks.0.attn.qkv.weight" in line
