"""Pictures: ``chargpt plot RUN_DIR`` draws a run's log.jsonl, ``bench.speedrun --plot``
draws the speedrun's runs; a missing matplotlib or a bad log is one ``Error:`` line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import speedrun
from chargpt.plot import read_log
from tests.training import chargpt, train_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECORD = {
    "step": 2, "train_loss": 3.85, "val_loss": 3.86, "best": True, "lr": 0.001,
    "tokens": 64, "tokens_per_s": 1726.5, "elapsed_s": 0.047, "train_s": 0.037,
    "time": "2026-12-03T09:47:39+00:00",
}  # fmt: skip
MISSING_MATPLOTLIB = "Error: chargpt plot needs matplotlib: pip install 'chargpt[plot]'\n"


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert matplotlib.image.imread(path).size > 0


def test_chargpt_plot_draws_a_trained_run(
    small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train_tiny(capsys, small_text_file, run, "--max-iters=6")  # evaluations at 2, 4 and 6

    code, out, err = chargpt(capsys, "plot", str(run))
    assert (code, out, err) == (0, f"{run / 'loss.png'}\n", "")
    assert_png(run / "loss.png")

    elsewhere = tmp_path / "curves.png"
    code, out, err = chargpt(capsys, "plot", str(run), "--output", str(elsewhere))
    assert (code, out, err) == (0, f"{elsewhere}\n", "")
    assert_png(elsewhere)


def test_the_log_reader_keeps_the_whole_split_loss_and_leaves_out_a_torn_line(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log.jsonl"
    last = {**RECORD, "step": 4, "val_loss": 3.7, "exact_val_loss": 3.75, "train_s": 0.05}
    log.write_text(f"{json.dumps(RECORD)}\n{json.dumps(last)}\n" + '{"step": 6, "tra')
    curve = read_log(log)
    assert curve.steps == (2, 4) and curve.val_loss == (3.86, 3.7)
    assert curve.exact_val_loss == 3.75
    assert curve.final_val() == ((0.037, 0.05), (3.86, 3.75))  # what the speedrun reports


def test_the_speedrun_plot_draws_every_run_and_the_medians(
    small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = {}
    for recipe, seeds in {"cpu-100s": (1, 2), "nanoGPT-cpu": (1,)}.items():
        results[recipe] = []
        for seed in seeds:
            out = tmp_path / f"{recipe}-{seed}"
            stdout = train_tiny(
                capsys, small_text_file, out, f"--seed={seed}", "--time-budget=0.3",
                "--eval-interval=4", "--eval-tokens=64",
            )  # fmt: skip
            result = speedrun.read_result(recipe, seed, out, 1.0, stdout)
            assert result.val_loss == result.curve.final_val()[1][-1]  # the table's number
            results[recipe].append(result)

    picture = tmp_path / "speedrun.png"
    assert speedrun.plot({"cpu-100s: 0.3 s of training": results}, picture) == picture
    assert_png(picture)
    # --baseline-seeds 0: the baseline has no runs, and the presets' are still drawn.
    no_baseline = tmp_path / "no-baseline.png"
    panels = {"cpu-100s: 0.3 s of training": {**results, "nanoGPT-cpu": []}}
    assert speedrun.plot(panels, no_baseline) == no_baseline
    assert_png(no_baseline)


def test_a_missing_matplotlib_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "log.jsonl").write_text(json.dumps(RECORD) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)

    assert chargpt(capsys, "plot", str(tmp_path)) == (1, "", MISSING_MATPLOTLIB)
    assert not (tmp_path / "loss.png").exists()

    # The speedrun says so before it trains anything.
    with pytest.raises(SystemExit) as exited:
        speedrun.main(["--plot", str(tmp_path / "speedrun.png")])
    assert exited.value.code == (
        "Error: bench.speedrun --plot needs matplotlib: pip install 'chargpt[plot]'"
    )
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file (a run directory holds log.jsonl)"),
        ("", "no evaluations logged yet"),
        ('{"step": 2, "train_lo', "no evaluations logged yet"),  # only a torn line
        (json.dumps(RECORD) + "\nnot json\n", "line 2: not JSON"),
        ("[1, 2]\n", "line 1: not an evaluation record"),
        (json.dumps({**RECORD, "val_loss": None}) + "\n", "line 1: no number 'val_loss'"),
    ],
)
def test_a_bad_log_is_one_error_line_naming_the_file(
    content: str | None, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    if content is not None:
        log.write_text(content)
    code, out, err = chargpt(capsys, "plot", str(tmp_path))
    separator = ", " if problem.startswith("line") else ": "
    assert (code, out, err) == (2, "", f"Error: {log}{separator}{problem}\n")
    assert not (tmp_path / "loss.png").exists()


def test_an_unwritable_output_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "log.jsonl").write_text(json.dumps(RECORD) + "\n")
    target = tmp_path / "no-such-directory" / "loss.png"
    code, out, err = chargpt(capsys, "plot", str(tmp_path), "--output", str(target))
    assert (code, out, err) == (2, "", f"Error: cannot write {target}: No such file or directory\n")
