import hashlib
import http.server
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import trainer.corpus as corpus_module
from chargpt.model import GPT, GPTConfig
from chargpt.tokenizer import CharTokenizer
from tests.conftest import TINY_SHAKESPEARE, make_text
from trainer.batches import BatchSampler, EvalWindows, WindowReader
from trainer.corpus import (
    CACHE_MAGIC,
    CHUNK_BYTES,
    Corpus,
    DataError,
    check_splits,
    codepoints,
    decode_chunks,
    fetch_tiny_shakespeare,
    file_sha256,
    id_dtype,
    id_table,
    prepare_corpus,
    split_point,
)


def read_text(path: Path) -> tuple[str, str]:
    """The text of a (small) UTF-8 file, whole, and the sha256 of its bytes."""
    return "".join(decode_chunks(path)), file_sha256(path)


def corpus_from_text(text: str, sha256: str, block_size: int) -> Corpus:
    """A corpus held in memory, encoded in one go: what ``prepare_corpus`` and
    ``Corpus.open`` must give, a chunk at a time, from a file."""
    check_splits(len(text), block_size)
    tokenizer = CharTokenizer.from_text(text)
    ids = id_table(tokenizer.vocab, id_dtype(tokenizer.vocab_size))[codepoints(text)]
    n_train = split_point(len(ids))
    return Corpus(tokenizer, ids[:n_train], ids[n_train:], sha256)


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
    corpus = corpus_from_text(text, "sha", block_size=8)
    assert (len(corpus.train), len(corpus.val)) == (90, 10)
    with pytest.raises(DataError, match="block_size \\+ 1 = 11"):
        corpus_from_text(text, "sha", block_size=10)


def test_covering_windows_score_every_validation_character_once() -> None:
    data = np.arange(1, 104)  # 103 characters -> 102 targets
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
    data = np.arange(1000)
    a = EvalWindows.spread(data, block_size=8, n_targets=100)
    b = EvalWindows.spread(data, block_size=8, n_targets=100)
    assert a.num_targets == 100
    assert torch.equal(a.starts, b.starts)
    assert a.starts.min() == 0 and a.starts.max() == 1000 - 9


def test_batch_sampler_is_seeded_and_ranks_share_one_draw() -> None:
    data = np.arange(500)
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
    monkeypatch.setattr(
        corpus_module, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(content).hexdigest()
    )
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


# ---------------------------------------------------------------------------------------
# The corpus cache


def old_corpus(text: str) -> tuple[CharTokenizer, torch.Tensor, torch.Tensor]:
    """The in-memory construction the cache replaced (trainer/data.py before it): the
    oracle for the vocabulary, the split, the batches and the evaluation windows."""
    tokenizer = CharTokenizer.from_text(text)
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n_train = int(0.9 * len(data))
    return tokenizer, data[:n_train], data[n_train:]


def old_batches(
    data: torch.Tensor, block_size: int, batch_size: int, seed: int, rank: int, world_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The old BatchSampler: torch indexing into the int64 tensor."""
    generator = torch.Generator().manual_seed(seed)
    window = torch.arange(block_size + 1)
    while True:
        starts = torch.randint(
            len(data) - block_size, (batch_size * world_size,), generator=generator
        )
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        w = data[mine[:, None] + window]
        yield w[:, :-1], w[:, 1:]


def old_eval_batches(
    data: torch.Tensor, block_size: int, batch_size: int, n_targets: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The old EvalWindows.covering (n_targets None) or .spread, then .batches()."""
    if n_targets is None:
        n_targets = len(data) - 1
        n_full = n_targets // block_size
        starts, tail_start = torch.arange(n_full) * block_size, n_full * block_size
    else:
        n_targets = min(n_targets, len(data) - 1)
        n_full = n_targets // block_size
        starts = torch.linspace(0, len(data) - block_size - 1, n_full).long()
        tail_start = 0
    tail_length = n_targets - n_full * block_size
    window = torch.arange(block_size + 1)
    out = []
    for i in range(0, len(starts), batch_size):
        w = data[starts[i : i + batch_size, None] + window]
        out.append((w[:, :-1], w[:, 1:]))
    if tail_length:
        w = data[tail_start : tail_start + tail_length + 1][None]
        out.append((w[:, :-1], w[:, 1:]))
    return out


def assert_same_batches(
    ours: object, theirs: list[tuple[torch.Tensor, torch.Tensor]] | Iterator
) -> None:
    pairs = list(zip(ours, theirs, strict=False))  # type: ignore[call-overload]
    assert pairs
    for (x, y), (old_x, old_y) in pairs:
        assert x.dtype == torch.int64 and torch.equal(x, old_x) and torch.equal(y, old_y)


def test_tiny_shakespeare_from_the_cache_is_what_it_was_in_memory(tmp_path: Path) -> None:
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    tokenizer, train, val = old_corpus(text)
    cache = prepare_corpus(TINY_SHAKESPEARE, tmp_path, block_size=32, log=lambda _: None)
    corpus = Corpus.open(cache, block_size=32)
    assert cache.name == "corpus-86c4e6aa9db7c042.bin"
    assert corpus.sha256 == corpus_module.TINY_SHAKESPEARE_SHA256
    assert corpus.tokenizer.vocab == tokenizer.vocab and len(tokenizer.vocab) == 65
    assert corpus.train.dtype == np.uint8 and isinstance(corpus.train, np.memmap)
    assert torch.equal(torch.from_numpy(corpus.train.astype(np.int64)), train)
    assert torch.equal(torch.from_numpy(corpus.val.astype(np.int64)), val)

    for rank, world_size in ((0, 1), (1, 2)):
        sampler = BatchSampler(corpus.train, 32, 16, seed=1337, rank=rank, world_size=world_size)
        old = old_batches(train, 32, 16, 1337, rank, world_size)
        assert_same_batches((sampler.next_batch() for _ in range(20)), old)

    covering = EvalWindows.covering(corpus.val, 32)
    assert_same_batches(covering.batches(64), old_eval_batches(val, 32, 64))
    spread = EvalWindows.spread(corpus.train, 32, covering.num_targets)
    assert_same_batches(spread.batches(64), old_eval_batches(train, 32, 64, len(val) - 1))

    # And so the same losses: a small model scores the same windows, bit for bit.
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_embd=16, n_head=2, n_layer=1))
    small = EvalWindows.spread(corpus.val, 32, 2000)

    def loss(batches: object) -> float:
        with torch.inference_mode():
            return sum(
                F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum").item()
                for x, y in batches  # type: ignore[attr-defined]
            )

    assert loss(small.batches(64)) == loss(old_eval_batches(val, 32, 64, 2000))


@pytest.mark.parametrize(
    ("first_code_point", "vocab_size", "dtype"),
    [(0, 256, np.uint8), (0, 257, np.uint16), (0x100, 65536, np.uint16), (0x100, 65537, np.uint32)],
)
def test_the_cache_holds_the_smallest_type_for_the_vocabulary(
    tmp_path: Path, first_code_point: int, vocab_size: int, dtype: type
) -> None:
    surrogates = range(0xD800, 0xE000)  # not characters: UTF-8 cannot hold them
    chars = [chr(c) for c in range(first_code_point, 0x110000) if c not in surrogates]
    text = "".join(chars[:vocab_size]) * 10  # every character in both splits
    source = tmp_path / "text.txt"
    source.write_text(text, encoding="utf-8")
    corpus = Corpus.open(prepare_corpus(source, tmp_path, 8, log=lambda _: None), 8)
    assert corpus.train.dtype == dtype
    assert corpus.tokenizer.vocab == tuple(sorted(set(text)))
    expected = corpus_from_text(text, "", 8)
    assert np.array_equal(corpus.train, expected.train)
    assert np.array_equal(corpus.val, expected.val)
    assert corpus.tokenizer.decode(corpus.val[:5].tolist()) == text[len(corpus.train) :][:5]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.text(max_size=8),
            st.binary(max_size=4),  # mostly not UTF-8
            st.sampled_from([b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x99\x82", b"\xc3"]),
        ),
        max_size=12,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=8),
)
def test_decoding_in_chunks_agrees_with_decoding_whole(
    pieces: list[str | bytes], cuts: list[int]
) -> None:
    raw = b"".join(p.encode() if isinstance(p, str) else p for p in pieces)
    bounds = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    chunks = [raw[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    path = Path("t.txt")
    try:
        expected = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is invalid"
        with pytest.raises(DataError, match=message):
            list(decode_chunks(path, chunks))
        return
    if not raw:
        with pytest.raises(DataError, match="is empty"):
            list(decode_chunks(path, chunks))
        return
    assert "".join(decode_chunks(path, chunks)) == expected


def test_a_character_split_between_reads_and_a_bad_byte_far_in(tmp_path: Path) -> None:
    source = tmp_path / "text.txt"
    head = b"a" * (CHUNK_BYTES - 1) + "€".encode()  # the euro sign straddles the first read
    source.write_bytes(head + b"bc" * 100)
    cache = prepare_corpus(source, tmp_path / "data", 8, log=lambda _: None)
    corpus = Corpus.open(cache, 8)
    assert corpus.tokenizer.vocab == ("a", "b", "c", "€")
    ids = np.concatenate([corpus.train, corpus.val]).tolist()
    assert corpus.tokenizer.decode(ids) == source.read_text(encoding="utf-8")

    bad = tmp_path / "bad.txt"
    bad.write_bytes(head + b"ok\xff")
    with pytest.raises(DataError, match=f"byte 0xff at offset {len(head) + 2} is invalid"):
        prepare_corpus(bad, tmp_path / "bad-data", 8)
    assert not (tmp_path / "bad-data").exists()


def test_unusable_text_writes_nothing(tmp_path: Path) -> None:
    cases = {"empty": (b"", "is empty"), "short": (b"x" * 100, "block_size \\+ 1 = 17")}
    for name, (content, message) in cases.items():
        source = tmp_path / f"{name}.txt"
        source.write_bytes(content)
        with pytest.raises(DataError, match=message):
            prepare_corpus(source, tmp_path / "data", block_size=16)
    assert not (tmp_path / "data").exists()


def test_a_second_run_reuses_the_cache(tmp_path: Path, small_text_file: Path) -> None:
    lines: list[str] = []
    cache = prepare_corpus(small_text_file, tmp_path, 16, log=lines.append)
    assert any(line.startswith("encoding") for line in lines)
    before = cache.stat()
    lines.clear()
    assert prepare_corpus(small_text_file, tmp_path, 16, log=lines.append) == cache
    assert lines == []
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name]


def damage(cache: Path, other_cache: Path) -> dict[str, bytes]:
    """Ways a cache file can be wrong: the bytes to put in its place."""
    whole = cache.read_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 3] ^= 0x01  # one bit of one token id
    header_at = whole.rindex(b'{"source_sha256"')
    edited = bytearray(whole)
    edited[header_at : header_at + 40] = whole[header_at : header_at + 40].replace(b'"', b"'", 2)
    return {
        "empty": b"",
        "truncated": whole[: len(whole) // 2],
        "tail cut": whole[:-1],
        "bit flip": bytes(flipped),
        "garbage": os.urandom(len(whole)),
        "another version": whole[: -len(CACHE_MAGIC)] + b"chargpt-corpus-0",
        "header not JSON": bytes(edited),
        "another text": other_cache.read_bytes(),
        "no ids": whole[whole.rindex(b'{"source_sha256"') :],
    }


def test_a_damaged_or_foreign_cache_is_rebuilt(tmp_path: Path, small_text_file: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text(make_text(5000, seed=1))
    other_cache = prepare_corpus(other, tmp_path / "other", 16, log=lambda _: None)
    cache = prepare_corpus(small_text_file, tmp_path / "data", 16, log=lambda _: None)
    good = cache.read_bytes()
    for name, content in damage(cache, other_cache).items():
        cache.write_bytes(content)
        lines: list[str] = []
        assert prepare_corpus(small_text_file, tmp_path / "data", 16, log=lines.append) == cache
        assert "is unusable" in lines[0] and "rebuilding it" in lines[0], name
        assert cache.read_bytes() == good, name
    cache.unlink()
    cache.mkdir()  # not even a file: cannot be replaced, and says so
    with pytest.raises(DataError, match="cannot write the corpus cache"):
        prepare_corpus(small_text_file, tmp_path / "data", 16, log=lambda _: None)


def test_the_cache_is_published_whole_and_leftovers_are_removed(
    tmp_path: Path, small_text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    name = f"corpus-{corpus_module.file_sha256(small_text_file)[:16]}.bin"
    stale = data_dir / f".{name}.abc123.tmp"  # what a build killed by SIGKILL leaves
    stale.write_bytes(b"partial")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(corpus_module.os, "fsync", fail)
    with pytest.raises(DataError, match=r"cannot write the corpus cache .*No space left"):
        prepare_corpus(small_text_file, data_dir, 16, log=lambda _: None)
    assert list(data_dir.iterdir()) == []  # the leftover removed, the failed one too
    monkeypatch.undo()
    cache = prepare_corpus(small_text_file, data_dir, 16, log=lambda _: None)
    assert [p.name for p in data_dir.iterdir()] == [name] and cache.name == name


def test_a_text_that_changes_while_it_is_encoded_is_not_cached(
    tmp_path: Path, small_text_file: Path
) -> None:
    scan = corpus_module.scan_text(small_text_file)
    cache = tmp_path / "corpus.bin"
    with pytest.raises(DataError, match="changed while it was being read"):
        corpus_module.write_cache(small_text_file, "0" * 64, scan, cache)
    assert list(tmp_path.iterdir()) == []


def test_spread_windows_stay_inside_a_corpus_of_a_billion_characters() -> None:
    # float32 steps by 64 near 1e9: the last start, 999_999_976, rounded up to 1e9.
    data = np.broadcast_to(np.uint8(0), (1_000_000_009,))  # the length is all that counts
    windows = EvalWindows.spread(data, block_size=32, n_targets=4096)
    assert windows.starts.max() <= len(data) - 33
    x, y = next(iter(windows.batches(batch_size=64)))
    assert x.shape == y.shape == (64, 32)


def test_a_large_corpus_is_read_through_a_map_made_anew(
    tmp_path: Path, small_text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A map keeps resident every page it touched: a whole run through one map of a large
    # corpus would hold all of it. Every REMAP_AFTER windows the reader maps it afresh.
    corpus = Corpus.open(prepare_corpus(small_text_file, tmp_path, 8, log=lambda _: None), 8)
    expected = corpus_from_text(small_text_file.read_text(), "", 8).train
    index = torch.arange(100)[:, None] + torch.arange(9)  # 100 windows
    for keep_bytes, remapped in ((1 << 30, False), (0, True)):
        monkeypatch.setattr(WindowReader, "KEEP_BYTES", keep_bytes)
        reader = WindowReader(corpus.train)
        first = reader.gather(index[:60])
        map_before = reader._map
        assert isinstance(map_before, np.memmap) and map_before is not corpus.train
        second = reader.gather(index[60:])  # within REMAP_AFTER (64) windows: the same map
        third = reader.gather(index[:10])  # past it: a new map if the corpus is large
        assert (reader._map is not map_before) == remapped
        assert torch.equal(
            torch.cat([first, second]), torch.from_numpy(expected[index.numpy()].astype(np.int64))
        )
        assert torch.equal(third, first[:10])
