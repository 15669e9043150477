"""Method configs (peft-style: one typed, validated, frozen dataclass per method): `MethodConfig`,
the options every method shares, and `NeuroPruneConfig`. The baselines' configs derive from
`MethodConfig` beside their methods (`neuroprune.methods.baselines`)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from neuroprune.errors import ConfigError

if TYPE_CHECKING:
    from typing import Self

MergeMode = Literal["output", "mlp_input", "none"]
MERGE_MODES: tuple[str, ...] = ("output", "mlp_input", "none")
UnitScoreKind = Literal["auto", "weights", "activations"]
UNIT_SCORES: tuple[str, ...] = ("auto", "weights", "activations")


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """What every method's config holds (peft-style: one frozen config dataclass per method,
    derived from this one): the threshold below which a weight counts as absent, and which blocks
    the model index finds. A method adds only its own hyper-parameters.

    Attributes:
        eps: magnitude below which a weight counts as absent, both for neuron degrees and for
            `finalize()`.
        attention_modules: optional regex; only attention blocks whose module name matches
            (``re.search``) are regularised and pruned.
        mlp_modules: optional regex; only MLP blocks whose module name matches are regularised.
        exclude_modules: optional regex; blocks whose name matches are left alone.
        attention_layouts: extra attention layouts tried before the built-in registry, for an
            architecture the registry does not know. Each is a dict with the fields of
            `neuroprune.model.architectures.AttentionLayout`, e.g.
            ``{"q": "wq", "k": "wk", "v": "wv", "o": "wo"}``.
        mlp_layouts: extra MLP layouts, dicts with the fields of
            `neuroprune.model.architectures.MLPLayout`, e.g. ``{"up": "w1", "down": "w2"}``.
        allow_missing_attention: accept a model in which no attention block can be found (a
            warning says that the attention penalty and head removal are then off); by default
            such a model is refused, since pruning only its MLPs is rarely what was meant.
    """

    eps: float = 1e-4
    attention_modules: str | None = None
    mlp_modules: str | None = None
    exclude_modules: str | None = None
    attention_layouts: list[dict[str, Any]] = field(default_factory=list)
    mlp_layouts: list[dict[str, Any]] = field(default_factory=list)
    allow_missing_attention: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad field, its value and what is allowed (a
        method's config extends this with its own fields)."""
        check_number("eps", self.eps, lower=0.0, inclusive=False)
        for name in ("attention_modules", "mlp_modules", "exclude_modules"):
            pattern = getattr(self, name)
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ConfigError(f"{name}={pattern!r} is not a valid regular expression: {err}.") from None
        if not isinstance(self.allow_missing_attention, bool):
            raise ConfigError(
                f"allow_missing_attention must be true or false, got {self.allow_missing_attention!r}."
            )
        from neuroprune.model.architectures import AttentionLayout, MLPLayout

        for name, cls in (("attention_layouts", AttentionLayout), ("mlp_layouts", MLPLayout)):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ConfigError(f"{name} must be a list of layout dicts, got {getattr(self, name)!r}.")
            for layout in getattr(self, name):
                cls.from_dict(layout, source=name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}."
            )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Self:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist.") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}.") from None


@dataclass(frozen=True, kw_only=True)
class NeuroPruneConfig(MethodConfig):
    """Hyper-parameters of NeuroPrune (see `method.md`): what the user asked for, plus the
    options every method shares (`MethodConfig`: eps and the discovery options). Frozen: values a
    controller changes during training (the scaled alpha and beta, a steered theta) live in the
    method's state (`NeuroPrune.alpha` / `.beta` / `.theta`), not here.

    Attributes:
        alpha: weight of the preferential-attachment l1 penalty on MLP rows (method.md sec. 1).
            0 switches it off.
        beta: weight of the l_{1,0.5} group penalty on attention input dimensions (sec. 2).
            0 switches it off.
        theta: l_inf distance at or below which two heads (or GQA key/value groups) count as
            similar (sec. 4). The paper uses 0.15-0.25 for classification, 0.1-0.4 for
            translation.
        merge: how a removed head is folded into its replacement. ``"output"`` (default) adds its
            slice of the output projection into the survivor's slice, which preserves the
            function exactly when the heads are identical; ``"mlp_input"`` is the paper's literal
            wording (add the head's slice of the layer's MLP expand matrix into the survivor's
            slice); ``"none"`` drops the head without merging.
        prune_heads: set False to train with the regularisers only and never remove heads.
        output_penalty: also put the preferential-attachment row penalty (weight alpha) on each
            attention block's output projection W^O. Not in the paper, whose penalties never touch
            W^O; but the section 5 measure counts it (1/12 of a BERT-style block), so without it
            a 90% target forces Q, K, V and the MLPs to ~98%. Off by default (paper behaviour).
        tiny: added inside the square root of the group penalty so its gradient is finite at 0.
        scores: how units are ranked for removal under a FLOP target (`--target-flops`; unused
            otherwise). ``"weights"``: the paper's mechanisms on the weights alone
            (`NeuroPrune.unit_scores`). ``"activations"``: the root mean energy each unit adds
            to its output, from the inputs seen in training (`methods/activation_scores.py`,
            Wanda / FLAP style), times the neuron's degree. ``"auto"`` (default): the family's
            default (`ArchSpec.unit_scores`): activations for decoder-only LLM families (Llama,
            Qwen2, Mistral, GPT-2, OPT, ...), weights for the others. Weight-only scores remove
            load-bearing neurons of LLM-style decoders (SmolLM2: one-shot removal of 10% of the
            FLOPs leaves chance accuracy with weight scores, 78.5 of 82.0 with activation scores;
            `docs/sparsity_targets.md`); on MiniLM both are level.
    """

    alpha: float = 1e-4
    beta: float = 1e-4
    theta: float = 0.15
    merge: MergeMode = "output"
    prune_heads: bool = True
    output_penalty: bool = False
    tiny: float = 1e-12
    scores: UnitScoreKind = "auto"

    def validate(self) -> None:
        super().validate()
        if self.scores not in UNIT_SCORES:
            raise ConfigError(f"scores={self.scores!r} is not one of {', '.join(UNIT_SCORES)}.")
        for name in ("alpha", "beta"):
            check_number(name, getattr(self, name), lower=0.0, inclusive=True)
        check_number("theta", self.theta, lower=0.0, inclusive=False)
        check_number("tiny", self.tiny, lower=0.0, inclusive=False)
        if self.merge not in MERGE_MODES:
            raise ConfigError(f"merge={self.merge!r} is not one of {', '.join(MERGE_MODES)}.")
        for name in ("prune_heads", "output_penalty"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}.")


def check_number(name: str, value: Any, *, lower: float, inclusive: bool) -> None:
    """Raise `ConfigError` unless `value` is a finite number above `lower` (or equal, when
    `inclusive`); every method config checks its numbers with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    if value < lower or (value == lower and not inclusive):
        bound = f">= {lower}" if inclusive else f"> {lower}"
        raise ConfigError(f"{name}={value!r} is out of range: {name} must be {bound}.")
