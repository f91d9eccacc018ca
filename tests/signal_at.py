"""``chargpt`` that sends itself signals at chosen moments.

    python -m tests.signal_at WHEN[,WHEN...] chargpt-args...

WHEN is ``step:N:SIGNAL`` (right after optimizer step N), ``sample:SIGNAL`` (as the
end-of-run sample starts) or ``shutdown:SIGNAL`` (as the run closes its metrics and log,
once the loop has ended). The moments are hooks in the trainer, so the signal arrives
there however busy the machine is.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

import trainer.report
import trainer.train
from chargpt.cli import main

moments = dict(when.rsplit(":", 1) for when in sys.argv[1].split(","))
argv = sys.argv[2:]
train_step = trainer.train.train_step
reference_generate = trainer.train.reference_generate
close = trainer.report.Report.close
steps_done = 0


def send(moment: str) -> None:
    if moment in moments:
        os.kill(os.getpid(), getattr(signal, moments[moment]))


def train_step_then_signal(*args: Any, **kwargs: Any) -> torch.Tensor:
    global steps_done
    loss = train_step(*args, **kwargs)
    steps_done += 1
    send(f"step:{steps_done}")
    return loss


def signal_then_generate(*args: Any, **kwargs: Any) -> list[int]:
    send("sample")
    return reference_generate(*args, **kwargs)


def signal_then_close(self: trainer.report.Report) -> None:
    send("shutdown")
    close(self)


trainer.train.train_step = train_step_then_signal
trainer.train.reference_generate = signal_then_generate  # type: ignore[assignment]
trainer.report.Report.close = signal_then_close  # type: ignore[method-assign]
main(argv)
