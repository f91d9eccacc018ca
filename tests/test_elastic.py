"""Training that survives a lost worker: two torchrun agents on loopback meet at a c10d
rendezvous (as two machines, or two pods of the Indexed Job in deploy/k8s/train-multinode,
do); a worker killed mid-run (SIGKILL: nothing saved, like a machine lost) makes torchrun
restart the group under --max-restarts, and --auto-resume continues from the last
checkpoint, so the run ends with the weights and log of one never interrupted. And
--auto-resume itself: a fresh run when there is nothing to resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from chargpt.checkpoint import read_checkpoint
from tests.conftest import PROCESS_TAG, REPO, TINY_MODEL, kill_tagged, run_chargpt, without_settings
from tests.server_process import free_port

needs_torchrun = pytest.mark.skipif(
    shutil.which("torchrun") is None, reason="torchrun not installed"
)
RUN = ["--max-iters", "40", "--eval-interval", "10", "--device", "cpu"]
TIMING = ("tokens_per_s", "elapsed_s", "train_s", "eta_s", "time")  # differ from run to run


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out-dir", str(out), *TINY_MODEL, *RUN, *extra]


def agent_env() -> dict[str, str]:
    env = without_settings()
    # A restarted group must not read the addresses its previous attempt left in the
    # agents' shared store (docs/deployment.md); the manifests set the same.
    env.update(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONPATH=str(REPO))
    return env


def agent_command(module: list[str], port: int, index: int) -> list[str]:
    """Agent ``index`` of a job of two torchrun agents (one process each) on loopback that
    meet at the c10d rendezvous agent 0 hosts, as the Indexed Job's pods do."""
    return [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic-test",
        "--rdzv-conf", f"is_host={1 if index == 0 else 0}", "--max-restarts", "1",
        "--monitor-interval", "0.5", "-m", *module,
    ]  # fmt: skip


def run_together(commands: dict[str, list[str]], tmp: Path) -> dict[str, tuple[int, str]]:
    """Every command at once; each one's exit code and output. Past a generous deadline
    all are killed and the test fails with their output."""
    logs = {name: tmp / f"{name}.log" for name in commands}
    tag = uuid.uuid4().hex  # the agents' workers too: they run in sessions of their own
    procs = {}
    for name, command in commands.items():
        with logs[name].open("w") as log:
            procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env={**agent_env(), PROCESS_TAG: tag}, cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + 900
    try:
        for proc in procs.values():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_tagged(tag)
        for proc in procs.values():
            proc.wait()
        pytest.fail("\n".join(f"--- {n}:\n{logs[n].read_text()[-4000:]}" for n in commands))
    finally:
        kill_tagged(tag)
    return {name: (proc.returncode, logs[name].read_text()) for name, proc in procs.items()}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path.read_bytes())[0]


def log_records(out: Path) -> list[dict[str, object]]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@needs_torchrun
def test_a_worker_killed_mid_run_under_max_restarts_ends_bit_identical(
    small_text_file: Path, tmp_path: Path
) -> None:
    straight, out = tmp_path / "straight", tmp_path / "killed"
    # Rank 1 dies right after step 25 on the first attempt: the last checkpoint is step 20.
    killed = ["tests.kill_at_step", "25", "1", *train_args(small_text_file, out, "--auto-resume")]
    port = free_port()
    results = run_together(
        {
            "uninterrupted": ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "chargpt",
                              *train_args(small_text_file, straight)],
            "agent0": agent_command(killed, port, 0),
            "agent1": agent_command(killed, port, 1),
        },
        tmp_path,
    )  # fmt: skip
    output = "\n".join(
        f"--- {name} (exit {code}):\n{text[-4000:]}" for name, (code, text) in results.items()
    )
    assert [code for code, _ in results.values()] == [0, 0, 0], output
    agents = results["agent0"][1] + results["agent1"][1]
    assert "exitcode: -9" in agents, output  # the first attempt lost a worker to SIGKILL,
    assert agents.count("x2 ranks") == 2, output  # torchrun started the group again,
    assert "resuming at step 20" in agents, output  # which resumed from the checkpoint

    a, b = tensors(straight / "latest.safetensors"), tensors(out / "latest.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert tensors(straight / "model.safetensors").keys() == a.keys()
    for name, tensor in tensors(straight / "model.safetensors").items():
        assert torch.equal(tensor, tensors(out / "model.safetensors")[name]), name
    assert log_records(straight) == log_records(out)
    assert [r["step"] for r in log_records(out)] == [10, 20, 30, 40]


def test_auto_resume_starts_fresh_then_continues(small_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_chargpt(*train_args(small_text_file, out, "--auto-resume", "--max-iters", "20"))
    assert first.returncode == 0, first.stderr
    assert "resuming" not in first.stdout
    again = run_chargpt(*train_args(small_text_file, out, "--auto-resume"))  # now 40 steps
    assert again.returncode == 0, again.stderr
    assert "resuming at step 20" in again.stdout
    assert [r["step"] for r in log_records(out)] == [10, 20, 30, 40]


def test_auto_resume_refusals_are_one_line_and_touch_nothing(
    small_text_file: Path, tmp_path: Path
) -> None:
    orphan = tmp_path / "orphan"  # a model.safetensors whose run never completed a checkpoint
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"not ours to replace")
    cases = [
        (train_args(small_text_file, orphan, "--auto-resume"), "no checkpoint to continue"),
        (
            train_args(small_text_file, tmp_path / "new", "--auto-resume", "--overwrite"),
            "contradict",
        ),
    ]
    for args, expected in cases:
        result = run_chargpt(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("Error: ") and expected in lines[0], lines
    assert [p.name for p in orphan.iterdir()] == ["model.safetensors"]
    assert (orphan / "model.safetensors").read_bytes() == b"not ours to replace"
    assert not (tmp_path / "new").exists()
