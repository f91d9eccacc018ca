"""The training text: reading and checking it, Tiny Shakespeare's download, and the encoded
corpus cache that a run maps (``trainer/batches.py`` draws batches and evaluation windows
from it).

The text is never held in memory whole, so a corpus may be larger than memory.
``prepare_corpus`` reads the file in chunks, once to collect its characters and once to
encode them, into a cache file of token ids that ``Corpus.open`` maps (``numpy.memmap``,
like nanoGPT's ``prepare.py`` and ``train.bin``).

The cache lives in ``--data-dir``, beside the downloaded Tiny Shakespeare, named
``corpus-<the text's sha256, first 16 hex digits>.bin``. It depends on the text alone, so
every run on that text shares one copy (a second run, a sweep, a ``--resume``) instead of
encoding it again and keeping a copy in each run directory, which stays what the server
and ``--resume`` read. One file, published atomically (whole or absent), laid out as::

    ids       ``length`` token ids, little-endian ``dtype``: uint8, uint16 or uint32,
              the smallest that holds the vocabulary
    header    JSON: source_sha256, vocab, dtype, length, ids_sha256 (``CacheHeader``)
    8 bytes   the header's size, little-endian
    CACHE_MAGIC
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from chargpt.checkpoint import atomic_file, atomic_write
from chargpt.errors import BadInputError
from chargpt.tokenizer import CharTokenizer

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_FILENAME = "tinyshakespeare.txt"
TRAIN_FRACTION = 0.9
CHUNK_BYTES = 1 << 20  # read at a time
CACHE_MAGIC = b"chargpt-corpus-1"  # the cache format's name and version: its last bytes
ID_DTYPES = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"))


class DataError(BadInputError):
    """The training text is missing, unreadable or unusable."""


class CacheError(Exception):
    """A corpus cache file cannot be used (and is rebuilt): the message says why."""


# ---------------------------------------------------------------------------------------
# Reading the text


def read_chunks(path: Path, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of the data file ``path``, ``size`` at a time."""
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"data path {path} is a directory, not a text file") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from None
    with file:
        while True:
            try:
                chunk = file.read(size)
            except OSError as exc:
                raise DataError(f"cannot read data file {path}: {exc.strerror}") from None
            if not chunk:
                return
            yield chunk


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in read_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def decode_chunks(path: Path, chunks: Iterable[bytes] | None = None) -> Iterator[str]:
    """The text of the UTF-8 file ``path`` (from ``chunks`` of its bytes, if given), a piece
    at a time; a character split between two chunks comes whole in the later piece. An
    empty file, or bytes that are not UTF-8 (named by their offset), raise DataError."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of this chunk in the file
    for chunk in itertools.chain(read_chunks(path) if chunks is None else chunks, [b""]):
        pending = len(decoder.getstate()[0])  # bytes of a character begun in the last chunk
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:  # exc.object: the pending bytes, then the chunk
            raise DataError(
                f"data file {path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at "
                f"offset {offset - pending + exc.start} is invalid"
            ) from None
        offset += len(chunk)
        if text:
            yield text
    if offset == 0:
        raise DataError(f"data file {path} is empty")


@dataclass(frozen=True)
class TextScan:
    vocab: tuple[str, ...]  # sorted: CharTokenizer.from_text's order
    length: int  # in characters


def scan_text(path: Path) -> TextScan:
    """The characters of a UTF-8 file and its length, read once, a chunk at a time."""
    present = np.zeros(sys.maxunicode + 1, dtype=bool)  # by code point
    length = 0
    for text in decode_chunks(path):
        present[codepoints(text)] = True
        length += len(text)
    return TextScan(tuple(map(chr, np.flatnonzero(present))), length)


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return next(dtype for dtype in ID_DTYPES if vocab_size <= 1 << (8 * dtype.itemsize))


def id_table(vocab: Sequence[str], dtype: np.dtype) -> np.ndarray:
    """The token id of each character of ``vocab``, indexed by code point."""
    table = np.zeros(sys.maxunicode + 1, dtype=dtype)
    table[[ord(char) for char in vocab]] = np.arange(len(vocab))
    return table


# ---------------------------------------------------------------------------------------
# The corpus cache


@dataclass(frozen=True)
class CacheHeader:
    source_sha256: str  # of the text file's bytes
    vocab: str  # every character, in token id order
    dtype: str  # of the ids: uint8, uint16 or uint32
    length: int  # ids (the text's characters)
    ids_sha256: str  # of the ids' bytes

    @property
    def ids_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")

    @property
    def ids_bytes(self) -> int:
        return self.length * self.ids_dtype.itemsize


def prepare_corpus(
    source: Path, cache_dir: Path, block_size: int, log: Callable[[str], object] = print
) -> Path:
    """The cache of the text at ``source`` in ``cache_dir``: if one exists, checked whole
    (a damaged or foreign one is rebuilt), otherwise built. Text that cannot be trained on
    with ``block_size`` raises DataError before anything is written."""
    sha256 = file_sha256(source)
    cache = cache_dir / f"corpus-{sha256[:16]}.bin"
    if cache.exists():
        try:
            header = check_cache(cache, sha256)
        except CacheError as exc:
            log(f"corpus cache {cache} is unusable ({exc}): rebuilding it")
        else:
            check_splits(header.length, block_size)
            return cache
    log(f"encoding {source} into {cache}")
    started = time.monotonic()
    scan = scan_text(source)
    check_splits(scan.length, block_size)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with locked(cache_dir):  # one builder at a time, so what a killed one left is stale
            for stale in cache_dir.glob(f".{cache.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            write_cache(source, sha256, scan, cache)
    except OSError as exc:
        raise DataError(f"cannot write the corpus cache {cache}: {exc.strerror}") from None
    log(
        f"encoded {scan.length:,} characters, a vocabulary of {len(scan.vocab)} "
        f"({id_dtype(len(scan.vocab)).name} ids), in {time.monotonic() - started:.1f} s"
    )
    return cache


def write_cache(source: Path, sha256: str, scan: TextScan, cache: Path) -> None:
    """Encode the text at ``source``, whose characters ``scan`` found, into ``cache``."""
    dtype = id_dtype(len(scan.vocab))
    table = id_table(scan.vocab, dtype)
    source_digest, ids_digest = hashlib.sha256(), hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        for chunk in read_chunks(source):
            source_digest.update(chunk)
            yield chunk

    with atomic_file(cache) as out:
        for text in decode_chunks(source, chunks()):
            ids = table[codepoints(text)]
            ids_digest.update(ids)
            out.write(ids)
        if source_digest.hexdigest() != sha256:  # then the ids may be another text's
            raise DataError(f"data file {source} changed while it was being read; run again")
        header = CacheHeader(
            sha256, "".join(scan.vocab), dtype.name, scan.length, ids_digest.hexdigest()
        )
        encoded = json.dumps(asdict(header)).encode()
        out.write(encoded + len(encoded).to_bytes(8, "little") + CACHE_MAGIC)


def read_cache_header(file: BinaryIO) -> CacheHeader:
    """The header of an open cache file, checked against the file's size."""
    size = file.seek(0, os.SEEK_END)
    footer_size = 8 + len(CACHE_MAGIC)
    if size < footer_size:
        raise CacheError("it is too short to be a corpus cache")
    file.seek(size - footer_size)
    footer = file.read(footer_size)
    if footer[8:] != CACHE_MAGIC:
        raise CacheError("it does not end as this version's corpus caches do (cut short?)")
    header_size = int.from_bytes(footer[:8], "little")
    if header_size > size - footer_size:
        raise CacheError("its header runs past the start of the file")
    file.seek(size - footer_size - header_size)
    try:
        header = CacheHeader(**json.loads(file.read(header_size)))
        CharTokenizer(header.vocab)  # one of each character
        fits = (
            header.dtype == id_dtype(len(header.vocab)).name
            and type(header.length) is int
            and header.length > 0
            and header.ids_bytes == size - footer_size - header_size
        )
    except (ValueError, TypeError) as exc:
        raise CacheError(f"its header is unusable: {exc}") from None
    if not fits:
        raise CacheError("its header does not describe its ids")
    return header


def check_cache(cache: Path, sha256: str) -> CacheHeader:
    """The header of the cache file ``cache``, once all of the file is checked: whole, of
    this format, made from the text whose sha256 is ``sha256``, and its ids those that its
    header's checksum was taken of. CacheError otherwise."""
    try:
        with open(cache, "rb") as file:
            header = read_cache_header(file)
            if header.source_sha256 != sha256:
                raise CacheError(f"it was made from another text, sha256 {header.source_sha256}")
            file.seek(0)
            digest = hashlib.sha256()
            left = header.ids_bytes
            while left:
                chunk = file.read(min(left, CHUNK_BYTES))
                if not chunk:
                    raise CacheError("it was cut short while being read")
                digest.update(chunk)
                left -= len(chunk)
    except OSError as exc:
        raise CacheError(f"cannot read it: {exc.strerror}") from None
    if digest.hexdigest() != header.ids_sha256:
        raise CacheError("its ids do not match their checksum")
    return header


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (flock; released if the process dies)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Tiny Shakespeare


def fetch_tiny_shakespeare(data_dir: str | Path, url: str = TINY_SHAKESPEARE_URL) -> Path:
    """Tiny Shakespeare in ``data_dir``, downloaded once and verified by sha256."""
    data_dir = Path(data_dir)
    target = data_dir / TINY_SHAKESPEARE_FILENAME
    if target.exists():
        if hashlib.sha256(target.read_bytes()).hexdigest() != TINY_SHAKESPEARE_SHA256:
            raise DataError(
                f"{target} exists but its sha256 is not Tiny Shakespeare's "
                f"({TINY_SHAKESPEARE_SHA256}); remove it or pass --data PATH"
            )
        return target
    how_to = (
        f"download it yourself from {TINY_SHAKESPEARE_URL} to {target}, "
        f"or pass --data PATH to any UTF-8 text file"
    )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory {data_dir}: {exc.strerror}") from None
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download Tiny Shakespeare from {url} ({reason}); {how_to}"
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise DataError(
            f"the file downloaded from {url} has sha256 {digest}, not Tiny "
            f"Shakespeare's {TINY_SHAKESPEARE_SHA256}; {how_to}"
        )
    atomic_write(target, raw)
    return target


# ---------------------------------------------------------------------------------------
# The corpus and its splits


def split_point(length: int) -> int:
    """Where the validation split starts in text of ``length`` characters."""
    return int(TRAIN_FRACTION * length)


def check_splits(length: int, block_size: int) -> None:
    """Text of ``length`` characters must leave a window of ``block_size`` + 1 in each
    split."""
    n_train = split_point(length)
    n_val = length - n_train
    if min(n_train, n_val) < block_size + 1:
        raise DataError(
            f"data has {length} characters: {n_train} train / {n_val} validation after the "
            f"90/10 split, but each split needs at least block_size + 1 = {block_size + 1}; "
            f"use a longer text or a smaller --block-size"
        )


@dataclass(frozen=True)
class Corpus:
    """The token ids of the text, split 90% train / 10% validation (by character count)."""

    tokenizer: CharTokenizer
    train: np.ndarray
    val: np.ndarray
    sha256: str

    @classmethod
    def open(cls, cache: Path, block_size: int) -> Corpus:
        """The corpus in the cache file ``cache`` (``prepare_corpus``'s), memory-mapped."""
        try:
            with open(cache, "rb") as file:
                header = read_cache_header(file)
        except (OSError, CacheError) as exc:
            raise DataError(f"cannot use the corpus cache {cache}: {exc}") from None
        check_splits(header.length, block_size)
        n_train, dtype = split_point(header.length), header.ids_dtype
        train = np.memmap(cache, dtype, "r", offset=0, shape=(n_train,))
        val = np.memmap(
            cache, dtype, "r", offset=n_train * dtype.itemsize, shape=(header.length - n_train,)
        )
        return cls(CharTokenizer(header.vocab), train, val, header.source_sha256)
