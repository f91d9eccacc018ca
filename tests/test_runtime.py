import os
from pathlib import Path

import pytest
import torch

from chargpt.runtime import cpu_allowance, resolve_device


def test_cpu_allowance_follows_the_cgroup_quota(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert cpu_allowance(quota) == cpus
    quota.write_text("50000 100000\n")  # docker run --cpus 0.5
    assert cpu_allowance(quota) == 1
    quota.write_text(f"{100000 * (cpus + 8)} 100000\n")  # a quota above the cores
    assert cpu_allowance(quota) == cpus
    assert cpu_allowance(tmp_path / "missing") == cpus


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    for bad in ("tpu", "gpu0", "cuda:99"):
        if bad.startswith("cuda") and torch.cuda.device_count() > 99:
            continue
        with pytest.raises(ValueError):
            resolve_device(bad)
