"""``chargpt train`` against bad numbers, diverging runs, late signals and the small
defects of issue 9: the real command line, run in process where it can be (``main``) and
in a subprocess where a signal must arrive."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from tests.conftest import REPO, chargpt_env, run_process
from tests.training import (
    TINY,
    chargpt,
    files_of,
    strict_json_lines,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def good_run(small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A finished four-step run."""
    out = tmp_path / "good"
    code, _, err = chargpt(
        capsys, "train", "--data", str(small_text_file), "--out-dir", str(out), *TINY,
        "--max-iters=4",
    )  # fmt: skip
    assert code == 0, err
    return out


@pytest.mark.parametrize(
    ("args", "env", "config", "name"),
    [
        (["--learning-rate", "inf"], {}, None, "--learning-rate"),
        (["--learning-rate", "1e309"], {}, None, "--learning-rate"),
        ([], {"CHARGPT_LEARNING_RATE": "inf"}, None, "CHARGPT_LEARNING_RATE"),
        ([], {}, ("c.json", '{"learning_rate": 1e309}'), "learning_rate"),
        ([], {}, ("c.toml", "learning-rate = inf"), "learning_rate"),
        (["--min-lr", "nan"], {}, None, "--min-lr"),
        (["--weight-decay", "nan"], {}, None, "--weight-decay"),
        (["--weight-decay", "inf"], {}, None, "--weight-decay"),
        (["--grad-clip", "nan"], {}, None, "--grad-clip"),
        (["--seed", str(2**64)], {}, None, "--seed"),
        (["--seed", "-1"], {}, None, "--seed"),
        ([], {}, ("c.yaml", "max_iters: 2"), "unsupported extension"),
        ([], {}, ("c.toml", "max-iters = [2]"), "max_iters must be an integer, got a list"),
        ([], {}, ("c.json", '{"max_iters": 4.7}'), "max_iters must be an integer, got 4.7"),
        ([], {}, ("c.json", '{"max_iters": true}'), "max_iters must be an integer, got true"),
        ([], {}, ("c.json", '{"n_layer": null}'), "n_layer must be an integer, got null"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_bad_numbers_are_refused_in_one_line_and_nothing_is_written(
    args: list[str],
    env: dict[str, str],
    config: tuple[str, str] | None,
    name: str,
    small_text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if config is not None:
        (tmp_path / config[0]).write_text(config[1])
        args = [*args, "--config", str(tmp_path / config[0]), "--max-iters", "3"]
    out = tmp_path / "out"
    code, _, err = chargpt(
        capsys, "train", "--data", str(small_text_file), "--out-dir", str(out), *TINY,
        "--max-iters=2", *args,
    )  # fmt: skip
    assert code == 2, err
    assert err.startswith("Error: ") and len(err.splitlines()) == 1 and name in err, err
    assert not out.exists()


def test_a_non_finite_setting_on_resume_leaves_the_run_untouched(
    good_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files_of(good_run)
    for flag in ("--learning-rate", "--weight-decay"):
        code, _, err = chargpt(capsys, "train", "--out-dir", str(good_run), "--resume", flag, "inf")
        assert code == 2 and flag in err, err
    assert files_of(good_run) == before


def test_a_diverging_run_stops_says_so_and_keeps_the_good_checkpoint(
    good_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files_of(good_run)
    code, out, err = chargpt(
        capsys, "train", "--out-dir", str(good_run), "--resume", "--learning-rate", "1e6",
        "--warmup-iters", "0", "--max-iters", "40",
    )  # fmt: skip
    assert code == 4, err
    assert len(err.splitlines()) == 1 and ("non-finite" in err or "loss is nan" in err), err
    assert err.startswith("Error: the ") and "the checkpoint of step 4 is intact" in err, err
    assert "checkpoint:" not in out
    assert files_of(good_run) == before  # never replaced with non-finite weights
    assert [r["step"] for r in strict_json_lines(good_run / "log.jsonl")] == [2, 4]


def test_a_run_that_diverges_before_any_checkpoint_claims_none(
    small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = chargpt(
        capsys, "train", "--data", str(small_text_file), "--out-dir", str(out), *TINY,
        "--learning-rate", "1e6", "--warmup-iters", "0", "--max-iters", "40",
    )  # fmt: skip
    assert code == 4, err
    assert err == (
        "Error: the training loss became non-finite by step 2; nothing was saved: lower "
        "--learning-rate (or set --grad-clip) and train again\n"
    )
    assert "checkpoint:" not in stdout
    assert not out.exists() or not any(out.iterdir())


def test_a_bare_chargpt_prints_its_usage_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = chargpt(capsys)
    assert code == 0 and "Error" not in out + err
    assert out.startswith("Usage: chargpt") and "train" in out


def test_info_on_a_resume_state_says_it_is_not_a_weights_file(
    good_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = chargpt(capsys, "info", str(good_run / "resume.pt"))
    assert code == 2
    assert err == (
        f"Error: {good_run / 'resume.pt'} is not a weights file: it is a torch file "
        f"(resume.pt holds a run's resume state); chargpt info reads .safetensors checkpoints\n"
    )


def test_a_bad_flag_is_named_without_its_environment_variable(
    small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = chargpt(capsys, "train", "--data", str(small_text_file), "--batch-size", "0")
    assert code == 2 and "'--batch-size'" in err and "CHARGPT_BATCH_SIZE" not in err, err


def test_a_failed_command_leaves_no_empty_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = chargpt(
        capsys, "train", "--data", str(tmp_path / "missing.txt"), "--out-dir",
        str(tmp_path / "a" / "out"),
    )  # fmt: skip
    assert code == 2 and "does not exist" in err, err

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    code, _, err = chargpt(
        capsys, "train", "--data-dir", str(tmp_path / "b" / "data"), "--out-dir",
        str(tmp_path / "b" / "out"),
    )  # fmt: skip
    assert code == 2 and "cannot download Tiny Shakespeare" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_warmup_longer_than_the_run_is_pointed_out(
    small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = chargpt(
        capsys, "train", "--data", str(small_text_file), "--out-dir", str(tmp_path / "out"),
        *TINY, "--max-iters=4", "--warmup-iters=100",
    )  # fmt: skip
    assert code == 0, err
    assert (
        "note: warmup (100 steps) is longer than the run (4 steps): the learning rate peaks "
        "at 4.00e-05, not --learning-rate 1.00e-03" in out
    )


def signalled(when: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``chargpt ARGS`` with the signals of ``when`` (``tests/signal_at.py``)."""
    return run_process(
        [sys.executable, "-m", "tests.signal_at", when, *args],
        chargpt_env({"OMP_NUM_THREADS": "1"}), cwd=REPO,
    )  # fmt: skip


def test_a_signal_during_the_end_of_run_sample_ends_the_complete_run_with_exit_0(
    small_text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["train", "--data", str(small_text_file), "--out-dir", str(out), *TINY]
    result = signalled("sample:SIGTERM", *args, "--max-iters=4", "--sample-length=200")
    assert result.returncode == 0, result.stderr
    assert "SIGTERM: the run is complete (step 4); skipped the end-of-run sample" in result.stdout
    assert f"checkpoint: {out / 'model.safetensors'}" in result.stdout
    assert result.stderr == ""


def test_a_second_sigterm_during_shutdown_changes_nothing(
    small_text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["train", "--data", str(small_text_file), "--out-dir", str(out), *TINY]
    result = signalled("step:3:SIGTERM,shutdown:SIGTERM", *args, "--max-iters=6")
    assert result.returncode == 0, result.stderr
    assert "SIGTERM: stopped at step 3; continue with --resume" in result.stdout
    assert "SIGTERM: the state of step 3 is already saved" in result.stdout
    shutil.rmtree(out)
    result = signalled("shutdown:SIGINT", *args, "--max-iters=4")
    assert result.returncode == 0, result.stderr
    assert "SIGINT: the run is complete (step 4)" in result.stdout


def test_bad_input_to_a_run_is_one_family() -> None:
    """Whatever a run refuses before it writes anything is a BadInputError, which the
    command line shows as one ``Error:`` line, exit 2; ConfigError stays a ValueError, as
    the settings' checks raise it."""
    from chargpt.errors import BadInputError
    from trainer.config import ConfigError
    from trainer.corpus import DataError
    from trainer.errors import RunError, SetupError

    assert all(issubclass(e, BadInputError) for e in (ConfigError, DataError, SetupError))
    assert issubclass(ConfigError, ValueError) and not issubclass(RunError, BadInputError)
