"""Credential files, read the same way by the server and its clients: PEM files and token
files. No gRPC or cryptography here, so the command-line clients start fast.

A token file holds one bearer token per line; blank lines and lines starting with ``#``
are ignored. Messages about a token file name the file and the line, never the token.
"""

from __future__ import annotations

from pathlib import Path

# Long enough that guessing is hopeless (``openssl rand -hex 32`` gives 64 characters).
MIN_TOKEN_CHARS = 16


class CredentialError(ValueError):
    """A credential file that cannot be used; the message names the file."""


def read_credential(path: str | Path, what: str) -> bytes:
    """The bytes of the file at ``path`` (``what`` names it in messages: "TLS key")."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def parse_tokens(data: bytes, path: str | Path) -> tuple[str, ...]:
    """The tokens of a token file's contents, in order; CredentialError if there are none
    or a line cannot be a token (printable ASCII, no spaces, ``MIN_TOKEN_CHARS`` or more:
    a gRPC metadata value after ``Bearer ``)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CredentialError(f"token file {path} is not ASCII text") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not all("!" <= c <= "~" for c in token):
            raise CredentialError(
                f"token file {path}, line {number}: a token is printable ASCII without spaces"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise CredentialError(
                f"token file {path}, line {number}: a token needs at least {MIN_TOKEN_CHARS} "
                "characters (make one with: openssl rand -hex 32)"
            )
        tokens.append(token)
    if not tokens:
        raise CredentialError(f"token file {path} holds no token")
    return tuple(tokens)


def read_tokens(path: str | Path) -> tuple[str, ...]:
    """The tokens in the token file at ``path``."""
    return parse_tokens(read_credential(path, "token file"), path)
