"""Tasks: what model head a run needs and how its predictions are scored.

One `Task` per kind of problem (classification, regression, sequence-to-sequence, causal LM).
Metrics follow the GLUE conventions: accuracy; F1 (of the positive class) and accuracy for MRPC
and QQP; Matthews correlation for CoLA; Pearson and Spearman for STS-B. Sequence-to-sequence
runs report sacrebleu BLEU (translation) or ROUGE-1/2/L/Lsum (summarisation); causal language
models report perplexity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from neuroprune.errors import ConfigError

KINDS = ("classification", "regression", "seq2seq", "causal_lm")
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation", "accuracy"),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
}
SEQ2SEQ_METRICS = {"translation": ("bleu",), "summarization": ("rouge1", "rouge2", "rougeL", "rougeLsum")}
IGNORE_INDEX = -100


@dataclass
class Task:
    """A task kind plus what its metrics need to know.

    Attributes:
        kind: one of ``classification``, ``regression``, ``seq2seq``, ``causal_lm``.
        name: a GLUE task name (``mrpc``, ``cola``, ...) selects GLUE's metric convention; for
            seq2seq, ``translation`` (BLEU) or ``summarization`` (ROUGE).
        label_names: class names in label-id order (classification only).
    """

    kind: str
    name: str | None = None
    label_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.kind!r} is not one of {', '.join(KINDS)}.")
        if self.kind == "seq2seq" and self.name not in SEQ2SEQ_METRICS:
            self.name = "translation" if self.name is None else self.name
            if self.name not in SEQ2SEQ_METRICS:
                raise ConfigError(
                    f"a seq2seq task is 'translation' (BLEU) or 'summarization' (ROUGE), got {self.name!r}."
                )

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names)

    @property
    def metric_names(self) -> tuple[str, ...]:
        if self.kind == "classification":
            if self.name in GLUE_METRICS:
                return GLUE_METRICS[self.name]
            return ("accuracy", "f1") if self.num_labels == 2 else ("accuracy",)
        if self.kind == "regression":
            return GLUE_METRICS["stsb"]
        if self.kind == "seq2seq":
            return SEQ2SEQ_METRICS[self.name or "translation"]
        return ("perplexity",)

    @property
    def main_metric(self) -> str:
        """The metric a run is judged by (the first of `metric_names`)."""
        return self.metric_names[0]

    def model_class(self) -> type:
        import transformers

        return {
            "classification": transformers.AutoModelForSequenceClassification,
            "regression": transformers.AutoModelForSequenceClassification,
            "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "causal_lm": transformers.AutoModelForCausalLM,
        }[self.kind]

    def model_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments (head size and label names for classifiers)."""
        if self.kind == "classification":
            return {
                "num_labels": self.num_labels,
                "id2label": dict(enumerate(self.label_names)),
                "label2id": {n: i for i, n in enumerate(self.label_names)},
            }
        if self.kind == "regression":
            return {"num_labels": 1, "problem_type": "regression"}
        return {}

    def compute_metrics(self, tokenizer: Any = None) -> Callable[[Any], dict[str, float]]:
        """A `compute_metrics` function for `transformers.Trainer` (seq2seq needs the tokenizer
        to decode generated ids)."""
        if self.kind == "seq2seq":
            return lambda pred: seq2seq_metrics(self.name or "translation", pred, tokenizer)
        if self.kind == "causal_lm":
            return perplexity_metrics
        return lambda pred: classification_metrics(self, pred.predictions, pred.label_ids)

    def preprocess_logits(self) -> Callable[[Any, Any], torch.Tensor] | None:
        """For causal LM, reduce logits to per-example (summed NLL, token count) during evaluation,
        so the Trainer never accumulates vocabulary-sized logits."""
        return token_nll if self.kind == "causal_lm" else None


def classification_metrics(task: Task, predictions: Any, labels: Any) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = predictions[0] if isinstance(predictions, tuple) else predictions
    preds, labels = np.asarray(preds), np.asarray(labels)
    out: dict[str, float] = {}
    if task.kind == "regression":
        preds = preds.reshape(-1)
        out["pearson"] = float(pearsonr(preds, labels)[0]) if len(preds) > 1 else float("nan")
        out["spearmanr"] = float(spearmanr(preds, labels)[0]) if len(preds) > 1 else float("nan")
        return out
    pred_ids = preds.argmax(-1)
    for name in task.metric_names:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, pred_ids))
        elif name == "f1":
            average = "binary" if task.num_labels == 2 else "macro"
            out[name] = float(f1_score(labels, pred_ids, average=average))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, pred_ids))
    return out


def token_nll(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """Per example [summed next-token negative log-likelihood, number of predicted tokens]."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = shift_labels != IGNORE_INDEX
    return torch.stack([(nll * mask).sum(1), mask.sum(1).to(nll.dtype)], dim=1)


def perplexity_metrics(pred: Any) -> dict[str, float]:
    stats = np.asarray(pred.predictions).reshape(-1, 2)
    tokens = stats[:, 1].sum()
    nll = stats[:, 0].sum() / max(tokens, 1.0)
    return {"perplexity": float(math.exp(min(nll, 50.0))), "nll": float(nll)}


def _decode(ids: Any, tokenizer: Any) -> list[str]:
    ids = np.asarray(ids)
    ids = np.where(ids == IGNORE_INDEX, tokenizer.pad_token_id or 0, ids)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _sentences(text: str) -> str:
    """ROUGE-Lsum scores summary-level LCS over sentences, which rouge-score reads as lines."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text) if s)


def seq2seq_metrics(name: str, pred: Any, tokenizer: Any) -> dict[str, float]:
    preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    hyps, refs = _decode(preds, tokenizer), _decode(pred.label_ids, tokenizer)
    if name == "translation":
        import sacrebleu

        return {"bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score)}
    from rouge_score import rouge_scorer

    keys = list(SEQ2SEQ_METRICS["summarization"])
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, ref in zip(hyps, refs):
        scores = scorer.score(_sentences(ref), _sentences(hyp))
        for key in keys:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / max(len(hyps), 1) for key, value in totals.items()}
