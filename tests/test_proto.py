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


def test_every_model_option_is_reported_by_get_model_info() -> None:
    """GetModelInfo fills ModelOptions from the GPTConfig fields of the same names, so
    each GPTConfig field needs a field on ModelInfo or ModelOptions, of its name."""
    from dataclasses import fields

    from chargpt.model import GPTConfig
    from chargpt.v1 import language_model_pb2 as pb

    info = {f.name for f in pb.ModelInfo.DESCRIPTOR.fields}
    options = {f.name for f in pb.ModelOptions.DESCRIPTOR.fields}
    config = {f.name for f in fields(GPTConfig)}
    assert options <= config, options - config
    assert config <= info | options, config - info - options
