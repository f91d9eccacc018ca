"""Who may call the server, against the real ``chargpt serve`` process: TLS, mutual TLS,
bearer tokens and their rotation, refusals at start-up, the image's health check with
TLS on, and the compose example. Every certificate is made here, for this run."""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chargpt.checkpoint import atomic_write
from chargpt.v1 import language_model_pb2 as pb
from client.api import ClientTLS
from tests.certificates import CertificateAuthority, Identity
from tests.conftest import REPO, run_chargpt, run_process, without_settings
from tests.container_files import healthcheck_command, interpolate
from tests.server_process import ServerProcess, wait_until


@dataclass(frozen=True)
class PKI:
    ca: CertificateAuthority
    server: Identity
    client: Identity
    other_ca: CertificateAuthority  # a stranger: nothing it signed is trusted
    rogue: Identity  # a client certificate from the stranger

    def client_tls(self, identity: Identity | None = None) -> ClientTLS:
        if identity is None:
            return ClientTLS.from_files(str(self.ca.cert))
        return ClientTLS.from_files(str(self.ca.cert), str(identity.cert), str(identity.key))

    def serve_tls(self, mutual: bool = False) -> list[str]:
        args = ["--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key)]
        return args + (["--tls-client-ca", str(self.ca.cert)] if mutual else [])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    other = CertificateAuthority(directory, "stranger CA")
    return PKI(
        ca, ca.issue("server"), ca.issue("client", client=True),
        other, other.issue("rogue client", client=True),
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secure") / "model.safetensors"
    shutil.copy(trained_run / "model.safetensors", path)
    return path


def new_token() -> str:
    return secrets.token_hex(16)


def unauthenticated(call: Callable[[], Any]) -> grpc.RpcError:
    """The error of a call that the server refused for want of a good token."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert dict(err.value.trailing_metadata())["chargpt-reason"] == "unauthenticated"
    return err.value


def unavailable(call: Callable[[], Any]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()


def list_services(channel: grpc.Channel) -> set[str]:
    """The services server reflection lists."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]))
    return {s.name for r in responses for s in r.list_services_response.service}


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    return {**without_settings(), **extra}


# ---- TLS ---------------------------------------------------------------------------------


def test_tls_serves_and_a_plain_text_client_is_refused(checkpoint: Path, pki: PKI) -> None:
    with ServerProcess(checkpoint, *pki.serve_tls(), tls=pki.client_tls()) as server:
        text, _ = server.client.generate_text("ROMEO:", max_new_tokens=10)
        assert len(text) == 10
        assert server.client.model_info().block_size > 0
        assert "(TLS, certificate valid until" in server.log
        with server.connect(tls=None) as plain:
            unavailable(plain.health)
            unavailable(lambda: plain.score("ROMEO"))

        # The command-line clients: TLS from a flag or the environment, and one line that
        # says what to fix when the connection fails.
        ca = ["--tls-ca", str(pki.ca.cert)]
        generated = run_chargpt(
            "generate", "ROMEO:", "--server", server.target, *ca, "--max-new-tokens", "5"
        )
        assert generated.returncode == 0 and len(generated.stdout) == 5, generated.stderr
        from_env = run_chargpt(
            "health", "--server", server.target, env={"CHARGPT_TLS_CA": str(pki.ca.cert)}
        )
        assert from_env.returncode == 0 and "SERVING" in from_env.stdout, from_env.stderr
        plain = run_chargpt("score", "ROMEO", "--server", server.target, "--timeout", "20")
        assert plain.returncode == 1
        assert plain.stderr.startswith(f"Error: cannot reach a chargpt server at {server.target}")
        assert plain.stderr.rstrip().endswith(
            "if it serves TLS, give --tls-ca (the CA that signed its certificate)"
        )
        assert len(plain.stderr.splitlines()) == 1, plain.stderr
        stranger = run_chargpt(
            "health", "--server", server.target, "--tls-ca", str(pki.other_ca.cert)
        )
        assert stranger.returncode == 1
        assert "not signed by a CA this client trusts: give --tls-ca" in stranger.stderr
        renamed = run_chargpt(
            "health", "--server", server.target, *ca, "--tls-server-name", "elsewhere.example"
        )
        assert renamed.returncode == 1
        assert "not for this host name" in renamed.stderr and "--tls-server-name" in renamed.stderr
        assert "neither TLS nor tokens" not in server.log  # loopback: nothing to warn about


def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(
    checkpoint: Path, pki: PKI
) -> None:
    identity = pki.client_tls(pki.client)
    with ServerProcess(checkpoint, *pki.serve_tls(mutual=True), tls=identity) as server:
        assert "(mutual TLS, certificate valid until" in server.log
        text, _ = server.client.generate_text("ROMEO:", max_new_tokens=5)
        assert len(text) == 5
        for refused in (pki.client_tls(), pki.client_tls(pki.rogue)):
            with server.connect(tls=refused) as client:
                unavailable(client.health)
                unavailable(lambda c=client: c.generate_text("ROMEO:", max_new_tokens=5))

        ca = ["--server", server.target, "--tls-ca", str(pki.ca.cert)]
        anonymous = run_chargpt("health", *ca)
        assert anonymous.returncode == 1
        assert "if it requires client certificates (mutual TLS), give --tls-cert and --tls-key" in (
            anonymous.stderr
        )
        rogue = run_chargpt(
            "score",
            "ROMEO",
            *ca,
            "--tls-cert",
            str(pki.rogue.cert),
            "--tls-key",
            str(pki.rogue.key),
        )
        assert rogue.returncode == 1 and "may not accept this client certificate" in rogue.stderr
        member = run_chargpt(
            "score", "ROMEO", *ca,
            env={"CHARGPT_CLIENT_CERT": str(pki.client.cert), "CHARGPT_CLIENT_KEY": str(pki.client.key)},
        )  # fmt: skip
        assert member.returncode == 0 and "bits/char" in member.stdout, member.stderr


def test_image_health_check_works_with_tls_on(checkpoint: Path, pki: PKI, tmp_path: Path) -> None:
    """The Dockerfile's HEALTHCHECK runs inside the server's container with the server's
    environment: setting the clients' variables there beside the server's is enough, even
    with mutual TLS and tokens on (CHARGPT_TLS_CERT is the server's own certificate, and
    the client does not mistake it for its identity)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(new_token() + "\n")
    container_env = {
        "CHARGPT_TLS_CERT": str(pki.server.cert),
        "CHARGPT_TLS_KEY": str(pki.server.key),
        "CHARGPT_TLS_CLIENT_CA": str(pki.ca.cert),
        "CHARGPT_AUTH_TOKEN_FILE": str(tokens),
        "CHARGPT_TLS_CA": str(pki.ca.cert),
        "CHARGPT_CLIENT_CERT": str(pki.client.cert),
        "CHARGPT_CLIENT_KEY": str(pki.client.key),
    }
    with ServerProcess(checkpoint, env=container_env, tls=pki.client_tls(pki.client)) as server:
        assert "(mutual TLS, certificate valid until" in server.log
        check = run_process(healthcheck_command(server.target), clean_env(container_env))
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.strip() == f"{server.target}: SERVING"


# ---- tokens ------------------------------------------------------------------------------


def test_tokens_guard_every_call_but_the_health_check(
    checkpoint: Path, pki: PKI, tmp_path: Path
) -> None:
    alice, bob, wrong = new_token(), new_token(), new_token()
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# the team's tokens\n{alice}\n\n  {bob}  \n")
    with ServerProcess(checkpoint, "--auth-token-file", str(token_file), token=alice) as server:
        assert "accepting 2 tokens from" in server.log
        assert len(server.client.generate_text("ROMEO:", max_new_tokens=5)[0]) == 5
        with server.connect(token=bob) as client:
            assert client.score("ROMEO").scored_characters == 5

        errors = []
        for token in (None, wrong):
            with server.connect(token=token) as client:
                assert client.health() == "SERVING"
                assert client.health("chargpt.v1.LanguageModel") == "SERVING"
                errors += [
                    unauthenticated(lambda c=client: list(c.generate("ROMEO:", max_new_tokens=5))),
                    unauthenticated(lambda c=client: c.score("ROMEO")),
                    unauthenticated(client.model_info),
                ]
                # Reflection follows the service's rule.
                errors.append(unauthenticated(lambda c=client: list_services(c.channel)))
        with server.connect(token=None) as client:
            basic = (("authorization", f"Basic {alice}"),)
            errors.append(
                unauthenticated(
                    lambda: client.stub.Score(pb.ScoreRequest(text="R"), metadata=basic)
                )
            )
        assert [e.details() for e in errors[:4]] == [
            "missing bearer token: send 'authorization: Bearer <token>' metadata"
        ] * 4
        assert {e.details() for e in errors[4:8]} == {"bearer token not accepted"}
        assert errors[8].details() == "the authorization metadata is not one 'Bearer <token>'"
        assert server.metric("chargpt_rejected_requests_total", reason="unauthenticated") == 9
        assert (
            server.metric("chargpt_requests_total", method="Generate", code="UNAUTHENTICATED") == 2
        )
        assert server.metric("chargpt_requests_total", method="Score", code="UNAUTHENTICATED") == 3

        assert "chargpt.v1.LanguageModel" in list_services(server.client.channel)

        # Revoked: bob leaves the file; the server stops accepting him without a restart.
        atomic_write(token_file, f"{alice}\n".encode())
        wait_until(lambda: server.metric("chargpt_token_file_reloads_total", outcome="loaded") == 1)
        with server.connect(token=bob) as client:
            errors.append(unauthenticated(lambda c=client: c.score("ROMEO")))
        assert server.client.score("ROMEO").scored_characters == 5

        # The command-line clients say what to fix, in one line.
        target = ["--server", server.target]
        refused = run_chargpt("generate", "ROMEO:", *target, env={"CHARGPT_TOKEN": wrong})
        assert refused.returncode == 1
        assert refused.stderr.splitlines() == [
            f"Error: server {server.target} refused the call: bearer token not accepted. Give "
            "a token it accepts with --token-file PATH or the CHARGPT_TOKEN environment variable"
        ]
        missing = run_chargpt("score", "ROMEO", *target)
        assert missing.returncode == 1 and "missing bearer token" in missing.stderr
        from_file = run_chargpt("score", "ROMEO", *target, "--token-file", str(token_file))
        assert from_file.returncode == 0, from_file.stderr
        from_env = run_chargpt("generate", "ROMEO:", *target, env={"CHARGPT_TOKEN": alice})
        assert from_env.returncode == 0, from_env.stderr
        assert run_chargpt("health", *target).returncode == 0
        tls_to_plain = run_chargpt("health", *target, "--tls-ca", str(pki.ca.cert))
        assert tls_to_plain.returncode == 1
        assert "does not speak TLS on this port" in tls_to_plain.stderr

        log = server.log
    assert "refused /chargpt.v1.LanguageModel/Score from ipv4:127.0.0.1:" in log
    assert "refused /grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in log
    said = [
        log,
        refused.stderr,
        missing.stderr,
        *(f"{e.details()} {e.debug_error_string()}" for e in errors),
    ]
    for token in (alice, bob, wrong):
        assert not any(token in text for text in said)


def test_a_rotated_token_file_takes_effect_without_failing_a_running_stream(
    checkpoint: Path, tmp_path: Path
) -> None:
    old, new = new_token(), new_token()
    token_file = tmp_path / "tokens"
    token_file.write_text(old + "\n")
    limits = ("--max-new-tokens", "100000")
    with ServerProcess(
        checkpoint, "--auth-token-file", str(token_file), *limits, token=old
    ) as server:
        stream = server.client.generate("ROMEO:", max_new_tokens=100_000)
        assert next(stream).text

        atomic_write(token_file, f"{new}\n".encode())
        wait_until(lambda: server.metric("chargpt_token_file_reloads_total", outcome="loaded") == 1)
        unauthenticated(lambda: server.client.score("ROMEO"))  # new calls need the new token
        assert all(next(stream).text for _ in range(20))  # the running call carries on
        with server.connect(token=new) as client:
            assert client.score("ROMEO").scored_characters == 5

            # A new version that holds no token is refused; the tokens before it stay.
            atomic_write(token_file, b"# tokens go here\n")
            wait_until(
                lambda: server.metric("chargpt_token_file_reloads_total", outcome="refused") == 1
            )
            assert client.score("ROMEO").scored_characters == 5
            assert all(next(stream).text for _ in range(5))
        stream.cancel()
        log = server.log
    assert "refused the new token file: token file" in log and "holds no token" in log
    assert "keeping 1 token" in log
    assert old not in log and new not in log


# ---- safe defaults and refusals at start-up ------------------------------------------------


def test_listening_beyond_loopback_without_tls_or_tokens_warns(checkpoint: Path) -> None:
    with ServerProcess(checkpoint, "--host", "0.0.0.0", "--metrics-host", "127.0.0.1") as server:
        assert server.client.health() == "SERVING"
        log = server.log
    warnings = [line for line in log.splitlines() if "neither TLS nor tokens" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], log
    assert "Give --tls-cert/--tls-key and --auth-token-file, or --host 127.0.0.1" in warnings[0]
    assert f"metrics 127.0.0.1:{server.metrics_port}" in log


def refusal(case: str, pki: PKI, tmp_path: Path) -> tuple[list[str], str]:
    """The ``chargpt serve`` arguments of a refused start, and the one line it prints."""
    server, client = pki.server, pki.client
    if case == "missing certificate":
        absent = tmp_path / "absent.crt"
        return (["--tls-cert", str(absent), "--tls-key", str(server.key)],
                f"cannot read TLS certificate {absent}: No such file or directory")  # fmt: skip
    if case == "key of another certificate":
        return (["--tls-cert", str(server.cert), "--tls-key", str(client.key)],
                f"TLS key {client.key} does not belong to the certificate in {server.cert}")  # fmt: skip
    if case == "expired certificate":
        yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        expired = pki.ca.issue("expired server", not_valid_after=yesterday)
        return (["--tls-cert", str(expired.cert), "--tls-key", str(expired.key)],
                f"TLS certificate {expired.cert} expired on {yesterday:%Y-%m-%d %H:%M} UTC "
                "(CN=expired server)")  # fmt: skip
    if case == "client CA that is no certificate":
        return ([*pki.serve_tls(), "--tls-client-ca", str(server.key)],
                f"TLS client CA {server.key} holds no PEM certificate")  # fmt: skip
    if case == "certificate without key":
        return (["--tls-cert", str(server.cert)],
                "tls_cert and tls_key go together: give both or neither")  # fmt: skip
    if case == "empty token file":
        empty = tmp_path / "tokens"
        empty.write_text("# none yet\n\n")
        return ["--auth-token-file", str(empty)], f"token file {empty} holds no token"
    assert case == "token file that is a directory"
    return (["--auth-token-file", str(tmp_path)],
            f"Invalid value for '--auth-token-file': File '{tmp_path}' is a directory.")  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "missing certificate", "key of another certificate", "expired certificate",
        "client CA that is no certificate", "certificate without key", "empty token file",
        "token file that is a directory",
    ],
)  # fmt: skip
def test_unusable_credentials_stop_the_server_with_one_line(
    case: str, pki: PKI, tmp_path: Path
) -> None:
    args, message = refusal(case, pki, tmp_path)
    result = run_chargpt("serve", "--checkpoint", str(tmp_path / "model.safetensors"), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"Error: {message}"]


# ---- the compose example ---------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="deploy/make-secrets.sh uses openssl")
def test_compose_secure_example(checkpoint: Path, tmp_path: Path) -> None:
    """docker-compose.secure.yml over docker-compose.yml, with what deploy/make-secrets.sh
    makes, run as local processes: secrets reach the server only as mounted files, the
    server serves TLS and tokens, and the image's health check passes with the container's
    environment."""
    made = run_process([REPO / "deploy" / "make-secrets.sh", tmp_path / "secrets"])
    assert made.returncode == 0, made.stderr
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["server"]
    secure = yaml.safe_load((REPO / "docker-compose.secure.yml").read_text())
    server = secure["services"]["server"]

    # Compose mounts each secret read-only at /run/secrets/<name>; here, where the script
    # put the file that ./secrets/... names.
    mounts = {}
    for name in server["secrets"]:
        source = Path(secure["secrets"][name]["file"])
        assert source.parts[:2] == (".", "secrets") or source.parts[0] == "secrets", source
        mounts[f"/run/secrets/{name}"] = tmp_path / "secrets" / source.name
        assert mounts[f"/run/secrets/{name}"].exists()
    for key, value in server["environment"].items():  # paths to secrets, never a secret
        assert value in mounts, f"{key}={value} is not a mounted secret"
    environment = {**base["environment"], **server["environment"]}
    env = {k: str(mounts.get(v, interpolate(str(v)))) for k, v in environment.items()}

    ca = ClientTLS.from_files(env["CHARGPT_TLS_CA"])
    token = (tmp_path / "secrets" / "tokens").read_text().strip()
    assert all(token not in value for value in env.values())
    # ServerProcess's flags (loopback, free ports, this checkpoint) beat the environment.
    with ServerProcess(checkpoint, env=env, tls=ca, token=token) as running:
        assert "(TLS, certificate valid until" in running.log
        assert "accepting 1 token from" in running.log
        check = run_process(healthcheck_command(running.target), clean_env(env))
        assert check.returncode == 0, check.stdout + check.stderr
        in_container = run_chargpt(
            "generate", "ROMEO:", "--server", running.target, "--max-new-tokens", "5",
            "--token-file", env["CHARGPT_AUTH_TOKEN_FILE"], env=env,
        )  # fmt: skip
        assert in_container.returncode == 0 and len(in_container.stdout) == 5, in_container.stderr
        with running.connect(token=None) as anonymous:
            unauthenticated(lambda: anonymous.score("ROMEO"))
