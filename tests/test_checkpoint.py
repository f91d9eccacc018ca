import json
import multiprocessing
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

from chargpt.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from chargpt.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=5, block_size=8, n_embd=16, n_head=2, n_layer=2)


def make_info(step: int = 7) -> CheckpointInfo:
    return CheckpointInfo(
        config=CONFIG,
        vocab=("\n", " ", "a", "b", "é"),
        step=step,
        train_loss=1.25,
        val_loss=1.5,
        dataset_sha256="ab" * 32,
        run_name="test-run",
        training={"learning_rate": 0.001},
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, GPT]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, make_info())
    return path, model


def test_round_trip_is_bit_exact_and_self_describing(saved: tuple[Path, GPT]) -> None:
    path, model = saved
    loaded = load_checkpoint(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    info = loaded.info
    assert info.config == CONFIG
    assert info.vocab == ("\n", " ", "a", "b", "é")
    assert (info.step, info.train_loss, info.val_loss) == (7, 1.25, 1.5)
    assert info.dataset_sha256 == "ab" * 32 and info.run_name == "test-run"
    assert info.created and info.training == {"learning_rate": 0.001}
    assert loaded.tokenizer.decode([2, 4]) == "aé"
    assert not loaded.model.training


def test_metadata_is_readable_by_plain_safetensors(saved: tuple[Path, GPT]) -> None:
    path, _ = saved
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "chargpt-checkpoint/2"
    assert json.loads(meta["config"])["n_layer"] == 2


def test_truncated_file_is_refused(saved: tuple[Path, GPT]) -> None:
    path, _ = saved
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


def test_flipped_weight_byte_is_refused(saved: tuple[Path, GPT]) -> None:
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(path)


def test_edited_metadata_is_refused(saved: tuple[Path, GPT]) -> None:
    path, _ = saved
    data = path.read_bytes()
    edited = data.replace(b'"step":"7"', b'"step":"9"')
    assert edited != data
    path.write_bytes(edited)
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(path)


def test_foreign_and_incompatible_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a chargpt checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    # Metadata that promises a bigger model than the tensors hold.
    model = GPT(CONFIG)
    info = make_info()
    bigger = CheckpointInfo(**{**info.__dict__, "config": GPTConfig(5, 8, 16, 2, 3)})
    path = tmp_path / "mismatch.safetensors"
    save_checkpoint(path, model, bigger)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_write_failure_leaves_the_old_file_and_no_temporaries(
    saved: tuple[Path, GPT], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, model = saved
    before = path.read_bytes()

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("chargpt.checkpoint.os.replace", fail)
    with pytest.raises(OSError):
        save_checkpoint(path, model, make_info(step=8))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def _poll(
    path: str,
    polling: "multiprocessing.synchronize.Event",
    stop: "multiprocessing.synchronize.Event",
    reads: "multiprocessing.sharedctypes.Synchronized[int]",
    results: "multiprocessing.Queue[str]",
) -> None:
    ok = bad = 0
    polling.set()
    while not stop.is_set():
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            continue
        try:
            read_checkpoint(data)
            ok += 1
        except CheckpointError as exc:
            bad += 1
            results.put(f"bad: {exc}")
        reads.value = ok + bad
    results.put(f"ok {ok} bad {bad}")


def test_a_polling_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    """A separate process reads the path in a loop while it is republished: at least 200
    times, and until the reader has read it 20 times while the publishing went on."""
    path = tmp_path / "model.safetensors"
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_embd=64, n_head=2, n_layer=4))
    info = CheckpointInfo(**{**make_info().__dict__, "config": model.config})
    save_checkpoint(path, model, info)
    ctx = multiprocessing.get_context("spawn")
    polling, stop, reads, results = ctx.Event(), ctx.Event(), ctx.Value("i", 0), ctx.Queue()
    reader = ctx.Process(target=_poll, args=(str(path), polling, stop, reads, results))
    reader.start()
    try:
        # The reader is a fresh interpreter importing torch: on a busy machine that can
        # take longer than all the publishing below, so wait until it is polling.
        assert polling.wait(timeout=300), "the reader process never started polling"
        reads_before = reads.value
        step = 0
        while step < 200 or reads.value < reads_before + 20:
            assert reader.is_alive(), "the reader process died"
            with torch.no_grad():
                next(model.parameters()).add_(0.01)
            save_checkpoint(path, model, CheckpointInfo(**{**info.__dict__, "step": step}))
            step += 1
    finally:
        stop.set()
        reader.join(60)
    summary = results.get(timeout=60)
    assert summary.startswith("ok ") and summary.endswith(" bad 0"), summary
    assert int(summary.split()[1]) > 0


def test_concurrent_saves_from_threads_stay_consistent(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    model = GPT(CONFIG)
    threads = [
        threading.Thread(target=save_checkpoint, args=(path, model, make_info(step=s)))
        for s in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert load_checkpoint(path).info.step in range(8)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
