"""A real `neuroprune train` run killed with SIGKILL after a given optimiser step, in a subprocess
(so nothing of it survives in the test process): the crash that `--resume` must recover from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

DRIVER = """
import json, os, signal, sys
from transformers import TrainerCallback
from neuroprune.training.settings import TrainSettings
from neuroprune.training.train import train_run

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

train_run(TrainSettings(**json.loads(sys.argv[1])), callbacks=[Kill()], quiet=True)
"""


def train_and_kill(settings: dict[str, Any], output_dir: Path, step: int) -> None:
    """Train with `settings` into `output_dir` and SIGKILL the process after optimiser `step`."""
    arguments = json.dumps({**settings, "output_dir": str(output_dir)})
    proc = subprocess.run([sys.executable, "-c", DRIVER, arguments, str(step)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (output_dir / "model").exists()
