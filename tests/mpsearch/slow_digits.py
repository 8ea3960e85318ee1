"""A test task: digits whose every evaluation pass sleeps, so a worker is almost always mid-trial.
Each forward on an evaluation batch touches $MPSEARCH_TEST_PIDS/<pid> (the scoring process)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from mpsearch.tasks import load_task

SLEEP_S = 0.05


class Slow(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.calib_batch:
            marks = os.environ.get("MPSEARCH_TEST_PIDS")
            if marks:
                (Path(marks) / str(os.getpid())).touch()
            time.sleep(SLEEP_S)
        return self.inner(x)


def build():
    task = load_task("digits")
    model = Slow(task.model).eval()
    model.calib_batch = task.calib_batches[0].shape[0]
    task.model = model
    task.name = "slow_digits"
    return task
