"""The README's "Without Docker" commands, run as a newcomer types them, in bash, in an
empty directory."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from tests.conftest import REPO, TINY_SHAKESPEARE, run_process, without_settings
from tests.server_process import free_port

# Lines the test does not run: it runs in the installed project, and inside pytest.
NOT_RUN = ("pip install ", "python -m pytest")


def readme_block(heading: str) -> list[str]:
    """The lines of the first sh code block under ``heading`` in the README."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(rf"^## {heading}\n.*?^```sh\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    assert block, f"no sh code block under '## {heading}'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_commands_without_docker_run_as_written(tmp_path: Path) -> None:
    lines = readme_block("Without Docker")
    # Through variables the README documents: the text (so no download) and a short run.
    ours = {"CHARGPT_DATA": str(TINY_SHAKESPEARE), "CHARGPT_MAX_ITERS": "20"}
    assert all(name in "\n".join(lines) for name in ours)
    script = [
        line
        for line in lines
        if not line.startswith(NOT_RUN)
        and not any(line.startswith(f"export {name}=") for name in ours)  # ours instead
    ]
    assert [line for line in script if line.startswith("chargpt ")], script
    port = free_port()
    env = without_settings()
    env.update(ours)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # chargpt
        # A port of its own, beside other servers on this machine.
        CHARGPT_HOST="127.0.0.1",
        CHARGPT_PORT=str(port),
        CHARGPT_SERVER=f"127.0.0.1:{port}",
        CHARGPT_METRICS_PORT="0",
    )
    # The backgrounded server too is stopped at the end, whatever happens (run_process).
    shell = run_process(["bash", "-euxo", "pipefail", "-c", "\n".join(script)], env, 900, tmp_path)
    output = shell.stdout
    assert shell.returncode == 0, (output[-4000:], shell.stderr[-4000:])  # stderr: bash's trace
    assert "checkpoint: out/model.safetensors" in output
    assert f"127.0.0.1:{port}: SERVING" in output
    assert "perplexity" in output
    assert (tmp_path / "data").is_dir() and not (tmp_path / "data" / "tinyshakespeare.txt").exists()
