"""The checkpoint: the contract between the trainer and the server.

The served file is one ``safetensors`` file: float32 weights plus string metadata that
makes it self-describing (architecture, vocabulary, step, losses, dataset sha256, creation
time, run name). ``content_sha256`` in the metadata covers every other metadata field and
all tensor bytes, so a truncated, corrupted or edited file is refused on load.

Files are published atomically: written to a temporary name in the same directory,
flushed and fsynced, then ``os.replace``d over the final name, so a reader never sees a
partial file.

Resume state (optimizer moments, RNG states, step) is the trainer's own business and
lives apart from the served file (``trainer/state.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch

from chargpt.model import GPT, GPTConfig
from chargpt.tokenizer import CharTokenizer

FORMAT = "chargpt-checkpoint/2"
# Version 1 (chargpt 0.1): the lecture's model only, its feed-forward stored as ``nn.Sequential``
# entries. Its files still load; their tensors are renamed on the way in.
FORMAT_V1 = "chargpt-checkpoint/1"
_V1_RENAMES = ((".ffwd.net.0.", ".ffwd.fc."), (".ffwd.net.2.", ".ffwd.proj."))


class CheckpointError(Exception):
    """A checkpoint file is missing, corrupt, tampered with or incompatible."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself."""

    config: GPTConfig
    vocab: tuple[str, ...]
    step: int
    train_loss: float | None
    val_loss: float | None
    dataset_sha256: str
    run_name: str
    created: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    content_sha256: str = ""

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "vocab": json.dumps(list(self.vocab), ensure_ascii=False),
            "step": str(self.step),
            "train_loss": json.dumps(self.train_loss),
            "val_loss": json.dumps(self.val_loss),
            "dataset_sha256": self.dataset_sha256,
            "run_name": self.run_name,
            "created": self.created,
            "training": json.dumps(self.training, sort_keys=True),
        }
        if self.content_sha256:
            meta["content_sha256"] = self.content_sha256
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> CheckpointInfo:
        if meta.get("format") not in (FORMAT, FORMAT_V1):
            raise CheckpointError(
                f"unsupported checkpoint format {meta.get('format')!r}; expected {FORMAT!r}"
            )
        try:
            config = GPTConfig.from_dict(json.loads(meta["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint describes a model this version cannot build: {exc}"
            ) from exc
        try:
            return cls(
                config=config,
                vocab=tuple(json.loads(meta["vocab"])),
                step=int(meta["step"]),
                train_loss=json.loads(meta["train_loss"]),
                val_loss=json.loads(meta["val_loss"]),
                dataset_sha256=meta["dataset_sha256"],
                run_name=meta["run_name"],
                created=meta["created"],
                training=json.loads(meta["training"]),
                content_sha256=meta.get("content_sha256", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint metadata is incomplete or malformed: {exc}") from exc


@dataclass(frozen=True)
class LoadedModel:
    model: GPT
    tokenizer: CharTokenizer
    info: CheckpointInfo
    file_sha256: str


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], before: Callable[[str], None] | None = None
) -> Iterator[BinaryIO]:
    """A file to write ``path``'s content into: when the block ends it is flushed to disk and
    renamed over ``path``, so readers see the old file or the new one, never a mix; if the
    block raises, the temporary file is removed and ``path`` is untouched.

    ``before(step)``, when given, is called before each step: ``create`` (a temporary file
    beside ``path``), ``write``, ``sync`` (fsync), ``rename`` (over ``path``) and
    ``sync-dir``. The trainer names its save points this way; its tests crash the process
    or fill the disk there.
    """
    step = before or _no_step
    path = Path(path)
    step("create")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            step("write")
            yield f
            f.flush()
            step("sync")
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        step("rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    step("sync-dir")
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(
    path: str | os.PathLike[str], data: bytes, before: Callable[[str], None] | None = None
) -> None:
    """Write ``data`` to ``path`` through ``atomic_file`` (same guarantees, same steps)."""
    with atomic_file(path, before) as f:
        f.write(data)


def _no_step(step: str) -> None:
    pass


def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The parsed JSON header and the tensor payload of a safetensors byte string."""
    if len(data) < 8:
        raise CheckpointError("file is too short to be a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise CheckpointError("safetensors header runs past the end of the file (truncated?)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as exc:
        raise CheckpointError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object")
    return header, data[8 + header_len :]


def _content_digest(header: dict[str, Any], payload: bytes) -> str:
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != "content_sha256"}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(json.dumps(tensors, sort_keys=True).encode())
    h.update(payload)
    return h.hexdigest()


def checkpoint_bytes(model: GPT, info: CheckpointInfo) -> bytes:
    """Serialize the model's weights (as float32) with ``info`` and its content digest."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    unsigned = replace(info, content_sha256="")
    data = safetensors.torch.save(tensors, metadata=unsigned.to_metadata())
    digest = _content_digest(*_split_safetensors(data))
    signed = replace(info, content_sha256=digest)
    return safetensors.torch.save(tensors, metadata=signed.to_metadata())


def save_checkpoint(
    path: str | os.PathLike[str], model: GPT, info: CheckpointInfo
) -> CheckpointInfo:
    """Publish ``model`` atomically at ``path``; returns the info as written."""
    if not info.created:
        info = replace(info, created=datetime.now(UTC).isoformat(timespec="seconds"))
    data = checkpoint_bytes(model, info)
    atomic_write(path, data)
    header, _ = _split_safetensors(data)
    return CheckpointInfo.from_metadata(header["__metadata__"])


def read_checkpoint(data: bytes) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Verify checkpoint bytes and return their tensors and info; raises CheckpointError."""
    header, payload = _split_safetensors(data)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise CheckpointError("file has no chargpt metadata (not a chargpt checkpoint)")
    info = CheckpointInfo.from_metadata(meta)
    if info.content_sha256 != _content_digest(header, payload):
        raise CheckpointError("content digest mismatch: the file is corrupt or was modified")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot decode tensors: {exc}") from exc
    if meta.get("format") == FORMAT_V1:
        tensors = {_v1_name(name): tensor for name, tensor in tensors.items()}
    if len(info.vocab) != info.config.vocab_size:
        raise CheckpointError(
            f"vocabulary has {len(info.vocab)} characters but the model expects "
            f"{info.config.vocab_size}"
        )
    return tensors, info


def _v1_name(name: str) -> str:
    for old, new in _V1_RENAMES:
        name = name.replace(old, new)
    return name


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Rebuild the model described by the checkpoint at ``path`` (in eval mode)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    try:
        tensors, info = read_checkpoint(data)
        model = GPT(info.config)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"weights do not fit the described model: {exc}") from exc
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, CharTokenizer(info.vocab), info, hashlib.sha256(data).hexdigest())
