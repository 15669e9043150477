"""What every benchmark records beside its numbers (machine, versions, load) and how it writes
them (atomically: a benchmark killed halfway never leaves half a JSON behind)."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import neuroprune
from neuroprune.files import write_text as write_atomic  # noqa: F401 (the benchmarks' writer)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "neuroprune": neuroprune.__version__,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load() -> dict[str, Any]:
    """Machine load (1/5/15-minute averages): the machine is shared, so say how busy it was."""
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "time": time.strftime("%H:%M:%S")}


def summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2],
            "min_s": min(times), "n": len(times)}
