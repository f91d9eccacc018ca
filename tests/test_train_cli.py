"""The trainer's command line, run for real in subprocesses on small text."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from chargpt.checkpoint import load_checkpoint, read_checkpoint
from tests.conftest import REPO, chargpt_env, run_chargpt, run_process
from tests.threads_at_exit import AFTER_DESTROY, AT_EXIT, REPORT
from tests.training import DDP_ARGS, needs_torchrun, torchrun, train_args
from trainer.state import load_train_state


def test_train_checkpoint_sample_and_info(trained_run: Path, small_text_file: Path) -> None:
    files = sorted(p.name for p in trained_run.iterdir())
    assert files == ["latest.safetensors", "log.jsonl", "model.safetensors", "resume.pt"]
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    best = min(records, key=lambda r: r["val_loss"])
    loaded = load_checkpoint(trained_run / "model.safetensors")
    assert loaded.info.step == best["step"]
    assert loaded.info.val_loss == pytest.approx(best["val_loss"], abs=1e-6)
    assert loaded.info.config.n_layer == 2 and loaded.info.config.block_size == 16

    sample = run_chargpt(
        "sample", "--checkpoint", str(trained_run / "model.safetensors"),
        "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0",
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr
    assert len(sample.stdout) == 40  # the generated characters only, no prompt, no newline
    again = run_chargpt(
        "sample", "--checkpoint", str(trained_run / "model.safetensors"),
        "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "3",
    )  # fmt: skip
    assert again.returncode == 0 and len(again.stdout) == 40

    info = run_chargpt("info", str(trained_run / "model.safetensors"), "--json")
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["step"] == best["step"]
    assert described["architecture"]["n_embd"] == 32
    assert described["training"]["max_iters"] == 60


def test_end_of_run_prints_a_sample_and_the_checkpoint(
    small_text_file: Path, tmp_path: Path
) -> None:
    result = run_chargpt(
        *train_args(small_text_file, tmp_path / "out", "--max-iters", "10",
                    "--eval-interval", "5", "--sample-length", "50")
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "sample from the best model" in result.stdout
    assert f"checkpoint: {tmp_path / 'out' / 'model.safetensors'}" in result.stdout


def test_settings_precedence_flag_over_config_over_env(
    small_text_file: Path, tmp_path: Path
) -> None:
    config = tmp_path / "settings.toml"
    config.write_text('max-iters = 8\neval_interval = 4\nrun-name = "from-config"\n')
    env = {"CHARGPT_MAX_ITERS": "99", "CHARGPT_EVAL_INTERVAL": "99", "CHARGPT_N_EMBD": "16",
           "CHARGPT_RUN_NAME": "from-env", "CHARGPT_LEARNING_RATE": "0.002"}  # fmt: skip
    out = tmp_path / "out"
    result = run_chargpt(
        *train_args(small_text_file, out, "--config", str(config), "--run-name", "from-flag"),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    info = load_checkpoint(out / "model.safetensors").info
    assert info.run_name == "from-flag"  # flag beats config
    assert info.training["max_iters"] == 8  # config beats env
    assert info.training["eval_interval"] == 4
    assert info.training["learning_rate"] == 0.002  # env beats default
    # TINY_MODEL passes --n-embd 32 as a flag, which beats the env's 16.
    assert info.config.n_embd == 32


def bad_input_cases(small_text_file: Path, tmp_path: Path) -> list[tuple[str, list[str], str]]:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"hello \xff\xfe world" * 10)
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    unwritable = tmp_path / "file-not-dir"
    unwritable.write_text("")
    config = tmp_path / "bad.toml"
    config.write_text("batch-size = 0\n")
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"batch_size": 4, "bogus": 1}')
    d = str(small_text_file)
    return [
        ("empty", ["--data", str(empty)], "is empty"),
        ("not utf-8", ["--data", str(binary)], "not UTF-8"),
        ("too short", ["--data", str(short), "--block-size", "16"], "block_size + 1"),
        ("missing", ["--data", str(tmp_path / "nope.txt")], "does not exist"),
        ("heads", ["--data", d, "--n-embd", "30", "--n-head", "4"], "divisible"),
        ("batch", ["--data", d, "--batch-size", "0"], "--batch-size"),
        ("lr", ["--data", d, "--learning-rate", "0"], "--learning-rate"),
        ("lr negative", ["--data", d, "--learning-rate", "-1e-3"], "--learning-rate"),
        ("out dir", ["--data", d, "--out-dir", str(unwritable / "sub")], "not writable"),
        ("config value", ["--data", d, "--config", str(config)], "batch_size"),
        ("config key", ["--data", d, "--config", str(unknown)], "bogus"),
        ("env value", ["--data", d], "CHARGPT_BATCH_SIZE"),
        ("device", ["--data", d, "--device", "cuda:7"], "cuda"),
    ]


def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    small_text_file: Path, tmp_path: Path, trained_run: Path
) -> None:
    # An existing run whose files must survive every failed attempt below.
    out = tmp_path / "existing"
    shutil.copytree(trained_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for name, args, expected in bad_input_cases(small_text_file, tmp_path):
        base = ["train", "--out-dir", str(out), "--max-iters", "5", "--resume", *args]
        if name == "out dir":
            base = ["train", "--max-iters", "5", *args]
        env = {"CHARGPT_BATCH_SIZE": "-3"} if name == "env value" else None
        result = run_chargpt(*base, env=env)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith("Error: ") and expected in lines[0], (name, lines[0])
        assert "Traceback" not in result.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before


def test_architecture_options_come_from_flags_config_and_environment(
    small_text_file: Path, tmp_path: Path
) -> None:
    config = tmp_path / "settings.toml"
    config.write_text('norm = "rmsnorm"\nattention-window = 8\n')
    out = tmp_path / "out"
    result = run_chargpt(
        *train_args(small_text_file, out, "--max-iters", "4", "--eval-interval", "2",
                    "--config", str(config), "--position", "rope", "--qk-norm",
                    "--tie-embeddings", "--no-bias", "--logit-softcap", "15"),
        env={"CHARGPT_ACTIVATION": "relu2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = run_chargpt("info", str(out / "model.safetensors"), "--json")
    architecture = json.loads(info.stdout)["architecture"]
    assert {k: architecture[k] for k in (
        "position", "norm", "activation", "qk_norm", "tie_embeddings", "bias", "logit_softcap",
        "attention_window", "block_size",
    )} == {
        "position": "rope", "norm": "rmsnorm", "activation": "relu2", "qk_norm": True,
        "tie_embeddings": True, "bias": False, "logit_softcap": 15.0, "attention_window": 8,
        "block_size": 16,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--attention-window", "8"], "attention_window needs position rope"),
        (
            ["--position", "rope", "--attention-window", "17"],
            "attention_window (17) must not exceed block_size (16)",
        ),
        (["--logit-softcap", "-1"], "--logit-softcap"),
        (["--activation", "swish"], "--activation"),
        (
            ["--position", "rope", "--n-embd", "30", "--n-head", "2"],
            "position rope needs an even head size",
        ),
    ],
)
def test_bad_option_combinations_are_one_line_and_write_nothing(
    args: list[str], expected: str, small_text_file: Path, tmp_path: Path
) -> None:
    result = run_chargpt(*train_args(small_text_file, tmp_path / "out", *args))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_resume_refusals(small_text_file: Path, tmp_path: Path, trained_run: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cases = [
        (train_args(small_text_file, tmp_path / "empty-dir", "--resume"), "no run to resume"),
        (train_args(small_text_file, out, "--resume", "--n-layer", "3"), "another architecture"),
        (train_args(small_text_file, out, "--resume", "--position", "rope"), "position=learned"),
        (train_args(small_text_file, out), "already holds a run"),
    ]
    other_text = tmp_path / "other.txt"
    other_text.write_text(small_text_file.read_text()[::-1])
    cases.append((train_args(other_text, out, "--resume"), "sha256"))
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_run, damaged)
    (damaged / "resume.pt").write_bytes(b"not a torch file")
    cases.append((train_args(small_text_file, damaged, "--resume"), "cannot read resume state"))
    for args, expected in cases:
        result = run_chargpt(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path.read_bytes())[0]


def signalled_at_step(step: int, signame: str, rank: int = 0) -> list[str]:
    """The module (and its arguments) that runs ``chargpt`` and signals it right after
    optimizer step ``step`` (``tests/signal_at_step.py``)."""
    return ["tests.signal_at_step", str(step), signame, str(rank)]


def test_sigterm_saves_and_resume_ends_with_the_same_weights(
    small_text_file: Path, tmp_path: Path
) -> None:
    args = ["--max-iters", "300", "--eval-interval", "50", "--dropout", "0.1"]
    straight = run_chargpt(*train_args(small_text_file, tmp_path / "straight", *args))
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "stopped"
    command = [sys.executable, "-m", *signalled_at_step(77, "SIGTERM")]
    stopped = run_process(
        [*command, *train_args(small_text_file, out, *args)], chargpt_env(), cwd=REPO
    )
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGTERM: stopped at step" in stopped.stdout
    stopped_at = load_train_state(out / "resume.pt").step
    assert 50 <= stopped_at < 300  # it really was interrupted mid-run
    assert stopped_at == 77  # between two evaluations: the stop itself saved the state

    resumed = run_chargpt(*train_args(small_text_file, out, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped_at}" in resumed.stdout
    a, b = (
        tensors(tmp_path / "straight" / "latest.safetensors"),
        tensors(out / "latest.safetensors"),
    )
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert tensors(tmp_path / "straight" / "model.safetensors").keys() == a.keys()
    logs = [
        [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        for d in (tmp_path / "straight", out)
    ]
    assert [(r["step"], r["val_loss"]) for r in logs[0]] == [
        (r["step"], r["val_loss"]) for r in logs[1]
    ]


@dataclass(frozen=True)
class DdpRun:
    out: Path
    stderr: str


@pytest.fixture(scope="module")
def ddp_run(small_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> DdpRun:
    """A 30-step run of two CPU processes, each reporting its threads as it exits."""
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun("tests.threads_at_exit", *train_args(small_text_file, out, *DDP_ARGS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x2 ranks" in result.stdout
    return DdpRun(out, result.stderr)


@needs_torchrun
def test_torchrun_two_cpu_processes_write_one_checkpoint(ddp_run: DdpRun) -> None:
    out = ddp_run.out
    assert sorted(p.name for p in out.iterdir()) == [
        "latest.safetensors",
        "log.jsonl",
        "model.safetensors",
        "resume.pt",
    ]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [15, 30]  # one writer: no duplicated lines
    info = load_checkpoint(out / "model.safetensors").info
    assert info.training["world_size"] == 2
    assert records[-1]["tokens"] == 30 * 2 * 8 * 16  # steps x ranks x batch x block


@needs_torchrun
def test_no_gloo_thread_outlives_the_run(ddp_run: DdpRun) -> None:
    # A gloo thread still running while a rank's interpreter finalizes can abort it
    # (SIGABRT, "terminate called without an active exception"), and a group that DDP
    # releases after destroy_process_group can deadlock: the group's threads must end
    # with destroy_process_group.
    reports = {(int(rank), moment): names for rank, moment, names in REPORT.findall(ddp_run.stderr)}
    assert reports.keys() == {(r, m) for r in (0, 1) for m in (AFTER_DESTROY, AT_EXIT)}, reports
    assert not {k: names for k, names in reports.items() if "gloo" in names}


@needs_torchrun
def test_bad_input_found_by_rank_0_stops_every_rank_with_its_message(
    ddp_run: DdpRun, small_text_file: Path
) -> None:
    # Rank 0 alone checks the run directory; its refusal reaches the other rank, which
    # stops with the same line instead of waiting at a collective for a rank that left.
    before = {p.name: p.read_bytes() for p in ddp_run.out.iterdir()}
    result = torchrun("chargpt", *train_args(small_text_file, ddp_run.out, *DDP_ARGS))
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 2 and all("already holds a run" in line for line in errors), errors
    assert not [line for line in lines if line.startswith("[rank") and "Traceback" in line]
    assert {p.name: p.read_bytes() for p in ddp_run.out.iterdir()} == before


@needs_torchrun
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(
    ddp_run: DdpRun, small_text_file: Path, tmp_path: Path
) -> None:
    # Rank 1 alone gets SIGTERM after step 13; the ranks agree on stopping every 10 steps
    # (an all-reduce waits for the device, so not every step), so both stop after step 20.
    out = tmp_path / "stopped"
    stopped = torchrun(
        *signalled_at_step(13, "SIGTERM", rank=1),
        *train_args(small_text_file, out, *DDP_ARGS),
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "SIGTERM: stopped at step 20" in stopped.stdout
    assert load_train_state(out / "resume.pt").step == 20

    resumed = torchrun("chargpt", *train_args(small_text_file, out, *DDP_ARGS, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 20" in resumed.stdout
    a, b = tensors(ddp_run.out / "latest.safetensors"), tensors(out / "latest.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_text_without_newlines_trains_and_samples(tmp_path: Path) -> None:
    data = tmp_path / "one-line.txt"
    data.write_text("abcab cabba " * 300)  # the end-of-run sample starts from token 0, not "\n"
    result = run_chargpt(
        *train_args(data, tmp_path / "out", "--max-iters", "4", "--eval-interval", "2",
                    "--sample-length", "25")
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sample = result.stdout.split("--- sample from the best model ---\n")[1].split("\n---")[0]
    assert len(sample) == 25 and set(sample) <= set("abc ")
