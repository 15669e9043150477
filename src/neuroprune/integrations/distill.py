"""Recovery by distillation: a fine-tuned dense teacher's outputs added to the student's loss while
it is pruned, as CoFi and nn_pruning do (`--distill-from MODEL_OR_RUN_DIR`, opt-in).

    loss = (1 - weight) * task_loss
           + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))     logits
           + hidden_weight * mean_l MSE(student_hidden_l, teacher_hidden_l)      optional

The T^2 factor keeps the soft-target gradients on the scale of the task loss's whatever T is
(Hinton et al. 2015). Regression heads (one output) use the MSE between the two predictions in place
of the KL. Token-level heads (seq2seq, causal LM) average the KL over the positions that have a
label (labels != -100), else over the attention mask. The hidden-state term needs the same number
of layers and the same width in both models (pruning never changes either).

The teacher is loaded once, in eval mode, without gradients, and moved to the student's device on
first use. A teacher that cannot teach this student is refused before training starts: another
vocabulary (size or tokens), another task head (a bare encoder, a generator for a classifier), or
another label set (number of labels or their names).

Works in a plain loop as well as in `NeuroPruneTrainer(distiller=...)`::

    distiller = Distiller.from_source("runs/dense", student, tokenizer, temperature=2.0, weight=0.5)
    out = student(**batch)
    loss, parts = distiller.combine(batch, out, out.loss)     # parts: distill_loss, hidden_loss
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroprune.errors import ConfigError, ModelError
from neuroprune.model.checkpoint import STRUCTURE_FILE
from neuroprune.model.packaged import resolve_model_path
from neuroprune.model.remote_code import stock_config
from neuroprune.run_folder import RunDir

# class-name endings that say which head a transformers model has ("BertModel": none)
_HEAD = re.compile(r"(For\w+|LMHeadModel|WithLMHead)$")


def head_of(class_name: str) -> str | None:
    """The task head in a transformers class name: `BertForSequenceClassification` ->
    `ForSequenceClassification`; None for a bare model (`BertModel`)."""
    found = _HEAD.search(class_name)
    return found.group(1) if found else None


def _width_and_depth(config: Any) -> tuple[int | None, int | None]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)


def check_teacher(
    teacher_config: Any,
    student: nn.Module,
    teacher_vocab: dict[str, int] | None = None,
    student_vocab: dict[str, int] | None = None,
    hidden_states: bool = False,
    source: str = "the teacher",
) -> None:
    """Raise `ConfigError` if a model with `teacher_config` cannot teach `student`: another
    vocabulary, task head or label set, or (with `hidden_states`) another depth or width.
    The tokenizers' vocabularies are compared too when both are given."""
    s_cfg = student.config
    t_vocab, s_vocab = getattr(teacher_config, "vocab_size", None), getattr(s_cfg, "vocab_size", None)
    if t_vocab != s_vocab:
        raise ConfigError(
            f"{source} has a vocabulary of {t_vocab} tokens, the student {s_vocab}: their logits and "
            "inputs do not correspond. Distil from a teacher with the student's tokenizer."
        )
    if teacher_vocab is not None and student_vocab is not None and teacher_vocab != student_vocab:
        differ = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))[:3]
        raise ConfigError(
            f"{source}'s tokenizer maps tokens to other ids than the student's (e.g. {differ}): "
            "distil from a teacher trained with the student's tokenizer."
        )
    student_head = head_of(type(student).__name__)
    teacher_heads = {head_of(a) for a in (getattr(teacher_config, "architectures", None) or [])}
    if student_head not in teacher_heads:
        found = ", ".join(getattr(teacher_config, "architectures", None) or ["none recorded"])
        raise ConfigError(
            f"{source} is not a model for the student's task: its architecture is {found}, the "
            f"student is a {type(student).__name__}. Distil from a model fine-tuned on this task "
            "(e.g. the model/ folder of a dense `neuroprune train` run)."
        )
    if student_head == "ForSequenceClassification":
        if teacher_config.num_labels != s_cfg.num_labels:
            raise ConfigError(
                f"{source} predicts {teacher_config.num_labels} labels, the student "
                f"{s_cfg.num_labels}: it was fine-tuned on another task."
            )
        t_labels = [str(teacher_config.id2label[i]) for i in range(teacher_config.num_labels)]
        s_labels = [str(s_cfg.id2label[i]) for i in range(s_cfg.num_labels)]
        if t_labels != s_labels:
            raise ConfigError(
                f"{source}'s labels are {t_labels}, the student's {s_labels}: it was fine-tuned on "
                "another task or label order, so its logits would teach the wrong classes."
            )
    if hidden_states and _width_and_depth(teacher_config) != _width_and_depth(s_cfg):
        (tw, td), (sw, sd) = _width_and_depth(teacher_config), _width_and_depth(s_cfg)
        raise ConfigError(
            f"hidden-state distillation pairs layer l of {source} ({td} layers, width {tw}) with "
            f"layer l of the student ({sd} layers, width {sw}): they must match. Use "
            "distill_hidden_weight=0 (logits only) with this teacher."
        )


def teacher_folder(source: str | Path) -> Path:
    """The model folder `source` means: a run directory's model/, a model folder, or a packaged
    model's short name."""
    path = Path(resolve_model_path(str(source)))
    if not path.is_dir():
        raise ModelError(
            f"teacher {source} is not a folder; pass the --output-dir of a finished dense "
            "`neuroprune train` run or a fine-tuned model folder."
        )
    folder = RunDir(path).model_dir(plain_ok=True)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"teacher {source} holds no model (no config.json in {folder}); was its run finished?"
        )
    return folder


def _tokenizer_vocab(folder: Path) -> dict[str, int] | None:
    from neuroprune.model.checkpoint import load_tokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
    if not any((folder / n).exists() for n in names):
        return None  # a folder without a tokenizer: only the vocabulary size can be compared
    try:
        return load_tokenizer(folder).get_vocab()
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the teacher's tokenizer in {folder}: {err}") from None


def load_teacher(folder: Path) -> nn.Module:
    """The teacher model in `folder` (neuroprune-saved, pruned or compacted, or a plain
    transformers folder), frozen and in eval mode."""
    import transformers

    if (folder / STRUCTURE_FILE).exists():
        from neuroprune.model.index import load  # the public loader of neuroprune model folders

        model = load(folder)
    else:
        config = transformers.AutoConfig.from_pretrained(folder)
        classes = [getattr(transformers, a, None) for a in (config.architectures or [])]
        cls = next((c for c in classes if c is not None), None)
        if cls is None:
            raise ModelError(f"teacher {folder}: its config names no transformers class to load it with.")
        model = cls.from_pretrained(folder)
    model.eval()
    model.requires_grad_(False)
    return model


class Distiller:
    """The teacher and the distillation terms (module docstring). `weight` in [0, 1] moves the
    loss from the task's labels to the teacher's soft targets; `temperature` > 0 softens both
    distributions; `hidden_weight` >= 0 adds the hidden-state MSE (0: off)."""

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, weight: float = 0.5,
                 hidden_weight: float = 0.0) -> None:
        check_distill_values(temperature, weight, hidden_weight)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.weight, self.hidden_weight = temperature, weight, hidden_weight

    @classmethod
    def from_source(cls, source: str | Path, student: nn.Module, tokenizer: Any = None,
                    temperature: float = 2.0, weight: float = 0.5, hidden_weight: float = 0.0) -> Distiller:
        """Load the teacher named by `source` (run directory, model folder or packaged name) and
        check it against `student` (and its `tokenizer`, when given) before any weight is read."""
        check_distill_values(temperature, weight, hidden_weight)
        folder = teacher_folder(source)
        config = stock_config(folder)  # a compacted teacher's folder holds remote code
        student_vocab = tokenizer.get_vocab() if tokenizer is not None else None
        check_teacher(config, student, _tokenizer_vocab(folder) if student_vocab else None,
                      student_vocab, hidden_weight > 0, source=f"teacher {source}")
        return cls(load_teacher(folder), temperature, weight, hidden_weight)

    # --- the loss --------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_outputs(self, inputs: dict[str, Any]) -> Any:
        device = next(t for t in inputs.values() if isinstance(t, torch.Tensor)).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        self.teacher.eval()
        extra = {"output_hidden_states": True} if self.hidden_weight else {}
        return self.teacher(**{**inputs, **extra})

    def logits_loss(self, student: torch.Tensor, teacher: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """T^2 * KL(teacher || student) at temperature T, averaged over examples (or over the
        positions in `mask` for token-level logits); MSE for a single output (regression)."""
        teacher = teacher.to(student.dtype)
        if student.shape[-1] == 1:
            return F.mse_loss(student.squeeze(-1), teacher.squeeze(-1))
        t = self.temperature
        per_position = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                                reduction="none", log_target=True).sum(-1)
        return t * t * _masked_mean(per_position, mask)

    def hidden_loss(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over layers of the MSE between paired hidden states (over the positions in `mask`)."""
        if len(student) != len(teacher):
            raise ConfigError(f"the student returned {len(student)} hidden states, the teacher "
                              f"{len(teacher)}: hidden-state distillation needs the same depth.")
        losses = [_masked_mean(((s - t.to(s.dtype)) ** 2).mean(-1), mask) for s, t in zip(student, teacher)]
        return torch.stack(losses).mean()

    def combine(self, inputs: dict[str, Any], student_outputs: Any, task_loss: torch.Tensor,
                scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """The distilled loss from the student's outputs on `inputs` (with its task loss), and
        the terms for the logs. `scale` multiplies the distillation terms only (the Trainer's
        gradient-accumulation normalisation when the task loss already has it)."""
        teacher_out = self.teacher_outputs(inputs)
        logits = student_outputs["logits"]
        mask = _position_mask(inputs, logits)
        kd = self.logits_loss(logits, teacher_out["logits"], mask)
        loss = (1 - self.weight) * task_loss + self.weight * scale * kd
        parts = {"distill_loss": float(kd.detach())}
        if self.hidden_weight:
            s_hidden, t_hidden = _hidden_states(student_outputs), _hidden_states(teacher_out)
            hidden_mask = _position_mask(inputs, s_hidden[0], prefer_labels=False)
            hid = self.hidden_loss(s_hidden, t_hidden, hidden_mask)
            loss = loss + self.hidden_weight * scale * hid
            parts["hidden_loss"] = float(hid.detach())
        return loss, parts


def check_distill_values(temperature: float, weight: float, hidden_weight: float) -> None:
    """Raise `ConfigError` naming an out-of-range distillation setting."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"distill_temperature={temperature!r} must be > 0 (e.g. 2.0).")
    if not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
        raise ConfigError(
            f"distill_weight={weight!r} must be in [0, 1]: the share of the loss taken by the teacher."
        )
    if not (isinstance(hidden_weight, (int, float)) and math.isfinite(hidden_weight) and hidden_weight >= 0):
        raise ConfigError(f"distill_hidden_weight={hidden_weight!r} must be >= 0 (0: logits only).")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or mask.shape != values.shape:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _position_mask(inputs: dict[str, Any], tensor: torch.Tensor, prefer_labels: bool = True
                   ) -> torch.Tensor | None:
    """Which positions of token-level outputs count: labelled ones, else the attention mask."""
    if tensor.dim() < 3:
        return None  # one prediction per example
    labels = inputs.get("labels")
    if prefer_labels and isinstance(labels, torch.Tensor) and labels.shape == tensor.shape[:2]:
        return labels != -100
    attention = inputs.get("attention_mask")
    if isinstance(attention, torch.Tensor) and attention.shape == tensor.shape[:2]:
        return attention.bool()
    return None


def _hidden_states(outputs: Any) -> tuple[torch.Tensor, ...]:
    hidden = outputs.get("hidden_states")
    if hidden is None:  # encoder-decoder models
        hidden = tuple(outputs.get("encoder_hidden_states") or ()) + tuple(
            outputs.get("decoder_hidden_states") or ())
    if not hidden:
        raise ConfigError("the model returned no hidden states; hidden-state distillation needs "
                          "a model that accepts output_hidden_states=True.")
    return tuple(hidden)
