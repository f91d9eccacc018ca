import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import trainer.data as data_module
from trainer.data import (
    BatchSampler,
    Corpus,
    DataError,
    EvalWindows,
    fetch_tiny_shakespeare,
    read_text,
)


def test_read_text_returns_text_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("héllo\n".encode())
    text, sha = read_text(path)
    assert text == "héllo\n"
    assert sha == hashlib.sha256("héllo\n".encode()).hexdigest()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"abc\xff\xfedef", "not UTF-8 text: byte 0xff at offset 3")],
)
def test_unusable_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_text(path)
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="is a directory"):
        read_text(tmp_path)


def test_corpus_splits_ninety_ten_and_needs_a_block_per_split() -> None:
    text = "abcdefghij" * 10
    corpus = Corpus.from_text(text, "sha", block_size=8)
    assert (len(corpus.train), len(corpus.val)) == (90, 10)
    with pytest.raises(DataError, match="block_size \\+ 1 = 11"):
        Corpus.from_text(text, "sha", block_size=10)


def test_covering_windows_score_every_validation_character_once() -> None:
    data = torch.arange(1, 104)  # 103 characters -> 102 targets
    windows = EvalWindows.covering(data, block_size=8)
    assert windows.num_targets == 102
    targets = torch.cat([y.flatten() for _, y in windows.batches(batch_size=5)])
    assert sorted(targets.tolist()) == list(range(2, 104))
    for x, y in windows.batches(batch_size=5):
        assert torch.equal(y, x + 1)  # targets are the next character
    # Split across two ranks: the same targets, each once.
    shards = [windows.batches(4, rank, 2) for rank in (0, 1)]
    sharded = torch.cat([y.flatten() for shard in shards for _, y in shard])
    assert sorted(sharded.tolist()) == list(range(2, 104))


def test_spread_windows_are_a_fixed_sample_of_the_requested_size() -> None:
    data = torch.arange(1000)
    a = EvalWindows.spread(data, block_size=8, n_targets=100)
    b = EvalWindows.spread(data, block_size=8, n_targets=100)
    assert a.num_targets == 100
    assert torch.equal(a.starts, b.starts)
    assert a.starts.min() == 0 and a.starts.max() == 1000 - 9


def test_batch_sampler_is_seeded_and_ranks_share_one_draw() -> None:
    data = torch.arange(500)
    single = BatchSampler(data, 8, 4, seed=3, rank=0, world_size=1)
    x, y = single.next_batch()
    assert x.shape == (4, 8) and torch.equal(y, x + 1)
    again = BatchSampler(data, 8, 4, seed=3)
    assert torch.equal(again.next_batch()[0], x)
    ranks = [BatchSampler(data, 8, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    batches = [s.next_batch()[0] for s in ranks]
    assert not torch.equal(batches[0], batches[1])
    assert torch.equal(ranks[0].generator.get_state(), ranks[1].generator.get_state())


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_tiny_shakespeare_is_downloaded_once_and_verified(
    http_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, root = http_server
    content = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (root / "input.txt").write_bytes(content)
    data_dir = tmp_path / "data"
    # Wrong content: refused, nothing kept.
    with pytest.raises(DataError, match="not Tiny Shakespeare's"):
        fetch_tiny_shakespeare(data_dir, f"{url}/input.txt")
    assert not (data_dir / "tinyshakespeare.txt").exists()
    # Right content (as far as the checksum knows): kept, and not fetched again.
    monkeypatch.setattr(data_module, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(content).hexdigest())
    path = fetch_tiny_shakespeare(data_dir, f"{url}/input.txt")
    assert path.read_bytes() == content
    (root / "input.txt").unlink()
    assert fetch_tiny_shakespeare(data_dir, f"{url}/input.txt") == path


def test_offline_download_says_how_to_supply_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        fetch_tiny_shakespeare(tmp_path / "data", "http://127.0.0.1:9/input.txt")
    message = str(err.value)
    assert "cannot download" in message and "--data PATH" in message
    assert str(tmp_path / "data" / "tinyshakespeare.txt") in message
