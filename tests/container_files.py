"""The container files read as data: the Dockerfile's instructions, the compose services,
and the commands they run, pointed at this environment (for test_containers and
test_security)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def dockerfile_instruction(name: str) -> str:
    """The (continuation-joined) argument of the last ``name`` instruction."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(.*)$", text, flags=re.MULTILINE)
    assert found, name
    return found[-1]


def entrypoint() -> list[str]:
    argv = json.loads(dockerfile_instruction("ENTRYPOINT"))
    assert argv == ["chargpt"]
    return [str(BIN / argv[0])]  # the same console script, from this environment


def compose_service(name: str) -> dict[str, Any]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return compose["services"][name]


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the environment."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def healthcheck_command(target: str) -> list[str]:
    """The Dockerfile's HEALTHCHECK command, pointed at ``target`` instead of :50051."""
    spec = dockerfile_instruction("HEALTHCHECK")
    argv = json.loads(spec[spec.index("CMD") + 3 :].strip())
    assert "127.0.0.1:50051" in argv
    return entrypoint() + [target if a == "127.0.0.1:50051" else a for a in argv[1:]]
