"""``chargpt`` that sends itself a signal right after optimizer step N.

    python -m tests.signal_at_step N SIGNAL RANK chargpt-args...

The trainer is interrupted at a known step, however busy the machine is: a test that
signalled it from outside could lose the race against the end of a short run. Under
``torchrun`` only rank RANK signals itself.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

import trainer.train
from chargpt.cli import main

step, signame, rank, argv = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
train_step = trainer.train.train_step
steps_done = 0


def train_step_then_signal(*args: Any) -> torch.Tensor:
    global steps_done
    loss = train_step(*args)
    steps_done += 1
    if steps_done == step and int(os.environ.get("RANK", "0")) == rank:
        os.kill(os.getpid(), getattr(signal, signame))
    return loss


trainer.train.train_step = train_step_then_signal
main(argv)
