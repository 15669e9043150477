"""ONNX export of a (compacted) encoder, checked against PyTorch in onnxruntime.

Uses torch's `torch.export`-based exporter (`dynamo=True`): the older TorchScript tracer bakes the
attention-mask code of transformers 5 into the graph for the example shape and gives wrong
outputs for every other shape. Compaction's gathered inputs and scattered outputs are plain
forward hooks and export as `Gather` / `ScatterElements`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neuroprune.errors import NeuroPruneError
from neuroprune.files import atomic_path
from neuroprune.model.architectures import is_encoder_decoder

INPUT_NAMES = ("input_ids", "attention_mask")


class _Wrapped(nn.Module):
    """`model(input_ids, attention_mask)` -> its main tensor (logits, else last hidden state)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


@dataclass
class ExportResult:
    path: Path
    output_name: str
    max_abs_diff: float | None  # onnxruntime vs PyTorch on the check inputs (None: not checked)


def example_inputs(model: nn.Module, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (with some padding in the last row) for export and checking."""
    vocab = int(getattr(model.config, "vocab_size", 100))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1 and length > 2:
        mask[-1, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = 18,
    check: bool = True,
    atol: float = 1e-4,
    check_batch: int = 3,
    check_length: int = 19,
) -> ExportResult:
    """Write `model` (an encoder) to `path` as ONNX with dynamic batch and sequence axes.

    With `check`, run the file in onnxruntime on inputs of another shape than the export example
    and raise `NeuroPruneError` if any output differs from PyTorch's by more than `atol`.
    """
    if is_encoder_decoder(getattr(model, "config", None)):
        raise NeuroPruneError(
            "ONNX export supports encoder models (BERT, RoBERTa, DistilBERT, MPNet ...); this is an "
            "encoder-decoder. Export its encoder, or use the PyTorch model."
        )
    model = model.eval()
    wrapped = _Wrapped(model).eval()
    probe = example_inputs(model, 2, 8, seed=1)
    with torch.no_grad():
        output_name = "logits" if getattr(model(**probe), "logits", None) is not None else "last_hidden_state"
    target = Path(path)
    dims = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    try:
        with torch.no_grad(), atomic_path(target) as tmp, _quiet_exporter():
            program = torch.onnx.export(
                wrapped, tuple(probe[k] for k in INPUT_NAMES), dynamo=True, opset_version=opset,
                input_names=list(INPUT_NAMES), output_names=[output_name],
                dynamic_shapes={k: dims for k in INPUT_NAMES}, verbose=False,
            )
            program.save(str(tmp))
    except Exception as err:  # the exporter raises many types; name the model and the cause
        raise NeuroPruneError(
            f"ONNX export of {type(model).__name__} failed: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    diff = None
    if check:
        diff = check_onnx(model, target, check_batch, check_length)
        if diff > atol:
            raise NeuroPruneError(
                f"the ONNX file {target} disagrees with PyTorch by {diff:.2e} (> {atol:.0e}); do not use it."
            )
    return ExportResult(target, output_name, diff)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what torch's ONNX exporter prints about itself, not about the model: a line per
    torchvision operator it cannot register when torchvision is absent (we export no vision
    operator) and a `LeafSpec` FutureWarning from its own pytree use. Errors still raise."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def check_onnx(model: nn.Module, path: str | Path, batch: int, length: int) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's outputs."""
    import onnxruntime

    inputs = example_inputs(model, batch, length)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        theirs = _Wrapped(model)(**inputs).numpy()
    if ours.shape != theirs.shape:
        raise NeuroPruneError(f"the ONNX output has shape {ours.shape}, PyTorch's {theirs.shape}.")
    return float(abs(ours - theirs).max())
