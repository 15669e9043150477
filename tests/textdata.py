"""Tiny text data and tokenizers for the training tests: a word-level tokenizer built in-test with
the `tokenizers` library, tiny random models of `tiny.py` saved as model folders, and small
JSONL / CSV / TSV files for every task kind."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

from tiny import VOCAB, tiny_config

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
POSITIVE = ["good", "great", "fine", "lovely", "superb", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "grim", "weak"]
NEUTRAL = ["the", "a", "film", "movie", "plot", "cast", "is", "was", "very", "quite", "and", "story"]
GERMAN = ["der", "die", "das", "film", "ist", "gut", "schlecht", "sehr", "und", "geschichte"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL + GERMAN


def tokenizer(kind: str = "encoder") -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `WORDS` (ids < tiny.VOCAB): [CLS] a [SEP] b [SEP] for encoders,
    text + </s> for seq2seq / decoders."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + WORDS))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="</s>",
        bos_token="[CLS]",
        model_max_length=64,
    )


def model_folder(path: Path, family: str = "bert") -> Path:
    """A tiny random model of `family` saved with its tokenizer, as `--model` takes it."""
    config = tiny_config(family)
    if family in ("t5", "bart"):
        config.update({"pad_token_id": 0, "decoder_start_token_id": 0, "eos_token_id": 5, "bos_token_id": 2})
        model = AutoModelForSeq2SeqLM.from_config(config)
        kind = "seq2seq"
    elif family in ("gpt2", "llama", "opt"):
        config.update({"pad_token_id": 0, "eos_token_id": 5, "bos_token_id": 2})
        model = AutoModelForCausalLM.from_config(config)
        kind = "decoder"
    else:
        model = AutoModel.from_config(config)
        kind = "encoder"
    model.save_pretrained(path)
    tokenizer(kind).save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0, pair: bool = False, labels: str = "int") -> list[dict]:
    """Sentences whose label is the polarity of their one sentiment word (learnable in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(NEUTRAL, 4) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        rng.shuffle(words)
        row: dict = {"sentence1" if pair else "sentence": " ".join(words)}
        if pair:
            row["sentence2"] = " ".join(rng.sample(NEUTRAL, 3))
        row["label"] = {
            "int": int(positive),
            "str": "pos" if positive else "neg",
            "float": round(rng.uniform(2.5, 5) if positive else rng.uniform(0, 2.5), 3),
        }[labels]
        rows.append(row)
    return rows


def translation_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = [
        ("the film is good", "der film ist gut"),
        ("the film is bad", "der film ist schlecht"),
        ("the story is very good", "die geschichte ist sehr gut"),
        ("a film and a story", "der film und die geschichte"),
    ]
    return [{"translation": dict(zip(("en", "de"), rng.choice(pairs)))} for _ in range(n)]


def summary_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "document": " ".join(rng.sample(NEUTRAL, 6)) + ". " + " ".join(rng.sample(POSITIVE, 3)) + ".",
            "summary": " ".join(rng.sample(POSITIVE, 2)) + ".",
        }
        for _ in range(n)
    ]


def lm_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.sample(NEUTRAL, 5) + rng.sample(POSITIVE, 2))} for _ in range(n)]


def write(path: Path, rows: list[dict]) -> Path:
    """JSONL, CSV or TSV by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(
                handle, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ","
            )
            writer.writeheader()
            writer.writerows(rows)
    return path


def splits(folder: Path, rows_fn, suffix: str = ".jsonl", sizes=(16, 8), **kwargs) -> dict[str, Path]:
    return {
        name: write(folder / f"{name}{suffix}", rows_fn(n, seed=i, **kwargs))
        for i, (name, n) in enumerate(zip(("train", "validation"), sizes))
    }
