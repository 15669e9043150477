"""The settings of a training run: every `neuroprune train` flag, checked, and what may change
when a run is resumed. Saved as a run folder's run_config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from neuroprune.config import MethodConfig
from neuroprune.errors import ConfigError
from neuroprune.integrations.distill import check_distill_values
from neuroprune.methods import check_method, method_config
from neuroprune.methods.steering import SparsityTarget
from neuroprune.training.tasks import KINDS

# Settings that may differ when resuming (they do not change what is computed).
RESUME_MAY_CHANGE = {"resume", "overwrite", "report_to", "logging_steps", "eval_batch_size", "output_dir"}


@dataclass
class TrainSettings:
    """Everything a run depends on; each field is a `neuroprune train` flag (``--max-length``
    for ``max_length``) and a key of the config file."""

    model: str = "minilm"
    output_dir: str = "runs/neuroprune"
    dataset: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    task: str | None = None  # classification / regression / seq2seq / causal_lm; None: from the data
    task_name: str | None = None  # GLUE name (metric convention) or translation / summarization
    text_fields: list[str] | None = None
    label_field: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    source_prefix: str = ""
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    epochs: float = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    seed: int = 42
    alpha: float = 1e-4
    beta: float = 1e-4
    theta: float = 0.15
    eps: float = 1e-4
    merge: str = "output"
    prune_heads: bool = True
    prune_every_steps: int = 0
    output_penalty: bool = False  # also penalise W^O (not in the paper; helps high targets)
    # where the model's blocks are (docs/architectures.md): layouts the registry does not know, filters
    attention_layouts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    mlp_layouts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    attention_modules: str | None = None
    mlp_modules: str | None = None
    exclude_modules: str | None = None
    allow_missing_attention: bool = False  # prune the MLPs of a model whose attention is not found
    method: str = "neuroprune"  # neuroprune, l1, gmp or dense (neuroprune.methods)
    target_sparsity: float | None = None  # fraction; alpha / beta are then steered to reach it
    target_heads: int | None = None  # neuroprune: theta steered to end with this many heads
    target_flops: float | None = None  # fraction of the dense blocks' FLOPs (structural; not with sparsity)
    uniform_widths: bool = False  # with target_flops: the same widths in every layer (compact --uniform)
    scores: str = "auto"  # neuroprune with target_flops: rank units by weights / activations / family default
    distill_from: str | None = None  # dense teacher (run dir or model folder): recovery by distillation
    distill_temperature: float = 2.0
    distill_weight: float = 0.5  # share of the loss taken by the teacher's soft targets
    distill_hidden_weight: float = 0.0  # hidden-state MSE weight (0: logits only)
    save_steps: int = 0  # 0: checkpoint at the end of every epoch
    logging_steps: int = 50
    generation_max_length: int = 128
    num_beams: int = 1
    report_to: str = "auto"  # auto: tensorboard when installed
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad value."""
        positive = (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "max_length",
            "learning_rate",
            "gradient_accumulation_steps",
            "logging_steps",
            "generation_max_length",
            "num_beams",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}={value!r} is out of range: {name} must be > 0.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name}={value!r} must be a positive whole number.")
        for name in ("prune_every_steps", "save_steps", "weight_decay", "warmup_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is out of range: it must be >= 0.")
        if self.warmup_ratio >= 1:
            raise ConfigError(
                f"warmup_ratio={self.warmup_ratio!r} is a fraction of the steps: it must be < 1."
            )
        if self.task is not None and self.task not in KINDS:
            raise ConfigError(f"task={self.task!r} is not one of {', '.join(KINDS)}.")
        self.method_config()
        check_distill_values(self.distill_temperature, self.distill_weight, self.distill_hidden_weight)
        check_method(self.method, self.target_sparsity, self.target_heads, self.target_flops)
        structural = self.method == "neuroprune" and self.target_flops is not None
        if self.scores not in ("auto", "weights") and not structural:
            raise ConfigError(f"scores={self.scores!r} ranks the units NeuroPrune removes under a FLOP "
                              "target: use it with --method neuroprune --target-flops F, or drop it.")
        if self.uniform_widths and self.target_flops is None:
            raise ConfigError("uniform_widths shapes the selection of a FLOP target: give target_flops "
                              "(--target-flops F), or drop uniform_widths.")

    def flop_target(self) -> SparsityTarget | None:
        """The FLOP target these settings ask for (None without target_flops), with its options."""
        if self.target_flops is None:
            return None
        return SparsityTarget(flops=self.target_flops, uniform=self.uniform_widths)

    def method_config(self) -> MethodConfig:
        """The config of `method` (its own class) from the settings of the same name: l1 takes
        alpha and eps, dense only eps; the others are not its business."""
        return method_config(self.method, self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "settings") -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {unknown}; known settings are {sorted(known)}.")
        return cls(**data)
