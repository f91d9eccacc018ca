"""Token authentication in process: token files, constant-time matching, the bearer
header, rotation, and the interceptor's decisions (with fake handlers and contexts);
the safe-default settings and the warning about them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from chargpt.credentials import CredentialError, parse_tokens, read_tokens
from server.app import exposure_warning, is_loopback
from server.auth import TokenAuthInterceptor, TokenFile, TokenSet, bearer_token
from server.config import ServerConfig
from server.metrics import ServerMetrics

ALICE = "alice-0123456789abcdef"
BOB = "bob-0123456789abcdef-bob"


def sample(metrics: ServerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---- token files -----------------------------------------------------------------------


def test_a_token_file_holds_one_token_a_line_with_blank_lines_and_comments_ignored() -> None:
    text = f"# production\n{ALICE}\n\n   {BOB}\t\n  # retired: nothing\n"
    assert parse_tokens(text.encode(), "tokens") == (ALICE, BOB)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "token file tokens holds no token"),
        (b"# only a comment\n\n", "token file tokens holds no token"),
        (b"# ok\nshort-secret\n", "token file tokens, line 2: a token needs at least 16 characters"),
        (b"two words are not one token\n", "token file tokens, line 1: a token is printable ASCII without spaces"),
        ("s\u00e9cret-0123456789abcdef\n".encode(), "token file tokens is not ASCII text"),
    ],
)  # fmt: skip
def test_a_bad_token_file_is_refused_without_showing_its_contents(
    content: bytes, problem: str
) -> None:
    with pytest.raises(CredentialError) as err:
        parse_tokens(content, "tokens")
    assert str(err.value).startswith(problem)
    for line in content.decode(errors="replace").splitlines():
        if line.strip() and not line.startswith("#"):
            assert line.strip() not in str(err.value)


def test_an_unreadable_token_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        CredentialError, match=f"cannot read token file {tmp_path / 'absent'}: No such file"
    ):
        read_tokens(tmp_path / "absent")


def test_a_token_set_accepts_exactly_its_tokens() -> None:
    tokens = TokenSet([ALICE, BOB])
    assert tokens.accepts(ALICE) and tokens.accepts(BOB)
    for other in ("", ALICE[:-1], ALICE + "x", ALICE.upper(), f"{ALICE}\n"):
        assert not tokens.accepts(other)
    assert str(tokens) == "2 tokens" and str(TokenSet([ALICE])) == "1 token"


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([("authorization", f"Bearer {ALICE}")], ALICE),
        ([("x-other", "1"), ("authorization", f"bearer {ALICE}")], ALICE),  # the scheme is case-blind
        ([("authorization", f"Bearer   {ALICE}  ")], ALICE),
        ([], None),
        (None, None),
        ([("authorization", f"Basic {ALICE}")], None),
        ([("authorization", "Bearer ")], None),
        ([("authorization", ALICE)], None),
        ([("authorization", f"Bearer {ALICE}"), ("authorization", f"Bearer {BOB}")], None),
    ],
)  # fmt: skip
def test_the_bearer_token_of_a_call(metadata: Any, token: str | None) -> None:
    found, problem = bearer_token(metadata)
    assert found == token
    assert bool(problem) == (token is None)
    assert ALICE not in problem and BOB not in problem


def test_a_token_file_rotates_and_an_unusable_version_keeps_the_tokens_before_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE}\n{BOB}\n")
    metrics = ServerMetrics()
    tokens = TokenFile(path, metrics)
    assert tokens.accepts(ALICE) and tokens.accepts(BOB)
    assert not tokens.check_once()  # unchanged

    replacement = tmp_path / "tokens.new"
    replacement.write_text(f"{ALICE}\n")
    replacement.replace(path)  # Bob is revoked
    assert tokens.check_once()
    assert tokens.accepts(ALICE) and not tokens.accepts(BOB)

    for unusable in ("", "# rotated soon\n", "too short\n"):
        path.write_text(unusable)
        assert not tokens.check_once()
        assert tokens.accepts(ALICE)
    path.unlink()
    assert not tokens.check_once()
    assert tokens.accepts(ALICE)
    path.write_text(f"{BOB}\n")
    assert tokens.check_once()
    assert tokens.accepts(BOB) and not tokens.accepts(ALICE)
    assert sample(metrics, "chargpt_token_file_reloads_total", outcome="loaded") == 2
    assert sample(metrics, "chargpt_token_file_reloads_total", outcome="refused") == 4


# ---- the interceptor -------------------------------------------------------------------


async def behaviour(request: Any, context: Any) -> str:
    return "the real handler ran"


HANDLERS = {
    "unary-unary": grpc.unary_unary_rpc_method_handler(behaviour),
    "unary-stream": grpc.unary_stream_rpc_method_handler(behaviour),
    "stream-unary": grpc.stream_unary_rpc_method_handler(behaviour),
    "stream-stream": grpc.stream_stream_rpc_method_handler(behaviour),
}


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: list[tuple[str, str]]) -> None:
        self.method = method
        self.invocation_metadata = metadata


class AbortedError(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str, Any] | None = None

    def peer(self) -> str:
        return "ipv4:192.0.2.7:5555"

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.aborted = (code, details, trailing_metadata)
        raise AbortedError


def intercept(
    interceptor: TokenAuthInterceptor, method: str, handler: Any, metadata: list[tuple[str, str]]
) -> Any:
    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        assert details.method == method
        return handler

    return asyncio.run(interceptor.intercept_service(continuation, Details(method, metadata)))


def behaviour_of(handler: Any) -> Callable[..., Awaitable[Any]]:
    return next(
        getattr(handler, kind)
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        if getattr(handler, kind) is not None
    )


@pytest.mark.parametrize("kind", list(HANDLERS))
def test_the_interceptor_passes_good_tokens_and_refuses_others_with_a_handler_of_the_same_kind(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = ServerMetrics()
    interceptor = TokenAuthInterceptor(TokenSet([ALICE, BOB]), metrics)
    handler = HANDLERS[kind]
    method = "/chargpt.v1.LanguageModel/Generate"
    for token in (ALICE, BOB):
        assert (
            intercept(interceptor, method, handler, [("authorization", f"Bearer {token}")])
            is handler
        )

    wrong = "mallory-0123456789abcdef"
    for metadata, problem in (
        ([], "missing bearer token: send 'authorization: Bearer <token>' metadata"),
        ([("authorization", f"Bearer {wrong}")], "bearer token not accepted"),
    ):
        refusal = intercept(interceptor, method, handler, metadata)
        assert refusal is not handler
        assert (refusal.request_streaming, refusal.response_streaming) == (
            handler.request_streaming, handler.response_streaming,
        )  # fmt: skip
        assert refusal.request_deserializer is None  # the request is never parsed
        context = FakeContext()
        with pytest.raises(AbortedError):
            asyncio.run(behaviour_of(refusal)(b"request bytes", context))
        assert context.aborted == (
            grpc.StatusCode.UNAUTHENTICATED,
            problem,
            (("chargpt-reason", "unauthenticated"),),
        )
    assert sample(metrics, "chargpt_rejected_requests_total", reason="unauthenticated") == 2
    assert sample(metrics, "chargpt_requests_total", method="Generate", code="UNAUTHENTICATED") == 2
    assert f"refused {method} from ipv4:192.0.2.7:5555: bearer token not accepted" in caplog.text
    assert wrong not in caplog.text and ALICE not in caplog.text


def test_the_health_service_is_open_and_unknown_methods_stay_unknown() -> None:
    interceptor = TokenAuthInterceptor(TokenSet([ALICE]), ServerMetrics())
    handler = HANDLERS["unary-unary"]
    assert intercept(interceptor, "/grpc.health.v1.Health/Check", handler, []) is handler
    assert intercept(interceptor, "/grpc.health.v1.Health/Watch", handler, []) is handler
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert intercept(interceptor, reflection, handler, []) is not handler
    assert intercept(interceptor, "/chargpt.v1.LanguageModel/Nothing", None, []) is None


# ---- safe defaults ---------------------------------------------------------------------


def test_the_server_listens_on_loopback_unless_told_otherwise() -> None:
    config = ServerConfig(checkpoint="model.safetensors")
    assert config.host == "127.0.0.1" and config.metrics_bind == "127.0.0.1"
    assert ServerConfig(checkpoint="m", host="0.0.0.0").metrics_bind == "0.0.0.0"
    assert (
        ServerConfig(checkpoint="m", host="0.0.0.0", metrics_host="127.0.0.1").metrics_bind
        == "127.0.0.1"
    )


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"tls_cert": "c"}, "tls_cert and tls_key go together"),
        ({"tls_key": "k"}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca"}, "tls_client_ca needs tls_cert and tls_key"),
    ],
)
def test_tls_settings_that_do_not_go_together(settings: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ServerConfig(checkpoint="m", **settings)  # type: ignore[arg-type]


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "chargpt.example.com", ""):
        assert not is_loopback(host), host


def test_one_warning_when_the_server_is_reachable_without_tls_or_tokens() -> None:
    assert exposure_warning("127.0.0.1", tls=False, tokens=False) is None
    assert exposure_warning("0.0.0.0", tls=True, tokens=True) is None
    assert exposure_warning("0.0.0.0", tls=True, tokens=False) is None
    unprotected = exposure_warning("0.0.0.0", tls=False, tokens=False)
    assert unprotected is not None and "neither TLS nor tokens" in unprotected
    clear_text = exposure_warning("10.0.0.5", tls=False, tokens=True)
    assert clear_text is not None and "bearer tokens cross the network in clear text" in clear_text
