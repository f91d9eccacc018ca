"""``chargpt`` under torchrun whose worker RANK kills itself (SIGKILL: no handler runs, no
state is saved, like a lost machine) right after optimizer step N, on the group's first
attempt only: the group torchrun restarts then runs to the end.

    python -m tests.kill_at_step N RANK chargpt-args...
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

import trainer.train
from chargpt.cli import main

step, rank, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
train_step = trainer.train.train_step
steps_done = 0
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def train_step_then_die(*args: Any) -> torch.Tensor:
    global steps_done
    loss = train_step(*args)
    steps_done += 1
    if first_attempt and steps_done == step and int(os.environ.get("RANK", "0")) == rank:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss


trainer.train.train_step = train_step_then_die
main(argv)
