"""proto/ is the single source of the generated modules in chargpt/v1/."""

import sys
from pathlib import Path

from tests.conftest import REPO, run_process

GENERATED = ["language_model_pb2.py", "language_model_pb2.pyi", "language_model_pb2_grpc.py"]


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    generated = run_process(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO / "proto"),
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            str(REPO / "proto" / "chargpt" / "v1" / "language_model.proto"),
        ],
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    for name in GENERATED:
        fresh = (tmp_path / "chargpt" / "v1" / name).read_text()
        committed = (REPO / "chargpt" / "v1" / name).read_text()
        assert fresh == committed, (
            f"chargpt/v1/{name} is stale: regenerate with python -m grpc_tools.protoc "
            "-I proto --python_out=. --pyi_out=. --grpc_python_out=. "
            "proto/chargpt/v1/language_model.proto"
        )
