"""Data: a hub data set by name (``glue/sst2``) or local JSONL / CSV / TSV files per split, the
text and label fields found automatically or given explicitly, every row checked before training
so that a bad file fails at once with its name, line and field, then tokenised for the task."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from neuroprune.errors import DataError
from neuroprune.training.tasks import Task

SPLITS = ("train", "validation", "test")
# GLUE configs and their input fields, so `glue/<task>` needs no --text-fields.
GLUE_FIELDS: dict[str, tuple[str, ...]] = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "ax": ("premise", "hypothesis"),
}
GLUE_VALIDATION = {"mnli": "validation_matched"}
GLUE_CLASSES = {"cola": 2, "sst2": 2, "mrpc": 2, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2, "wnli": 2, "ax": 3}
HUB_ALIASES = {"glue": "nyu-mll/glue"}
# Usual field names, most specific first.
TEXT_FIELDS: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("question", "context"),
    ("text_a", "text_b"),
    ("sentence",),
    ("text",),
    ("review",),
    ("content",),
    ("document",),
    ("snippet",),
    ("tweet",),
)
LABEL_FIELDS = ("label", "labels", "score", "target", "category", "class", "sentiment", "y")
SEQ2SEQ_FIELDS = (
    ("document", "summary"),
    ("article", "highlights"),
    ("source", "target"),
    ("src", "tgt"),
    ("input", "output"),
    ("dialogue", "summary"),
)
LM_FIELDS = ("text", "content", "sentence", "document")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}


@dataclass
class Split:
    """One split: its rows as a `datasets.Dataset`, where they came from, and (for local files)
    the line each row was read from, so errors can point at it."""

    name: str
    dataset: Any
    source: str
    lines: list[int] | None = None

    def where(self, row: int) -> str:
        return f"{self.source}, line {self.lines[row]}" if self.lines else f"{self.source}, row {row}"


@dataclass
class Fields:
    """Which columns feed the model. ``text`` holds one or two input fields (the source text for
    seq2seq); ``label`` the label / target field (None for causal LM); for a ``translation``
    column of ``{lang: text}`` dicts, ``source_lang`` and ``target_lang``."""

    text: list[str]
    label: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None


# --- reading ----------------------------------------------------------------------------------
def read_file(path: str | Path, split: str) -> Split:
    """Read a local JSONL / CSV / TSV file, checking that it exists, is not empty and parses."""
    import datasets

    path = Path(path)
    if not path.is_file():
        hint = "it is a folder; pass a file inside it" if path.is_dir() else "check the path"
        raise DataError(f"{split} file {path} does not exist ({hint}).")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{split} file {path}: unknown format {path.suffix!r}; use .jsonl, .json, .csv or .tsv."
        )
    rows, lines = (_read_jsonl if fmt == "jsonl" else _read_delimited)(path, fmt)
    if not rows:
        raise DataError(f"{split} file {path} is empty (no data rows); give a file with examples.")
    columns = list(rows[0])
    for row, line in zip(rows, lines):
        bad = next((k for k, v in row.items() if _not_utf8(k) or _not_utf8(v)), None)
        if bad is not None:
            raise _not_utf8_error(path, line, f"field {bad!r}")
        if list(row) != columns:
            missing = sorted(set(columns) - set(row))
            if missing:
                raise DataError(f"{path}, line {line}: field(s) {missing} missing (the first row has them).")
            for key in set(row) - set(columns):
                columns.append(key)
    try:
        dataset = datasets.Dataset.from_list(rows)
    except (TypeError, ValueError, ArithmeticError) as err:
        raise DataError(
            _type_mismatch(rows, lines, path) or f"{path}: inconsistent value types ({err})."
        ) from None
    return Split(split, dataset, str(path), lines)


def _type_mismatch(rows: list[dict[str, Any]], lines: list[int], path: Path) -> str | None:
    """Point at the first value whose type differs from the field's first value (ints and
    floats mix freely)."""

    def kind(value: Any) -> str:
        return (
            "number"
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else type(value).__name__
        )

    first: dict[str, str] = {}
    for row, line in zip(rows, lines):
        for key, value in row.items():
            if value is None:
                continue
            expected = first.setdefault(key, kind(value))
            if kind(value) != expected:
                return (
                    f"{path}, line {line}: field {key!r} is {value!r} ({kind(value)}), but earlier "
                    f"rows hold {expected} values; fix the file so every row has the same types."
                )
    return None


def _read_jsonl(path: Path, fmt: str) -> tuple[list[dict[str, Any]], list[int]]:
    rows, lines = [], []
    with path.open(encoding="utf-8", errors="surrogateescape") as handle, _rows_bar(path) as bar:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                if _not_utf8(text):
                    raise _not_utf8_error(path, number, "the line") from None
                raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object per line, got {text[:60]!r}.")
            rows.append(row)
            lines.append(number)
            bar.update()
    return rows, lines


def _rows_bar(path: Path) -> tqdm:
    """A bar counting the rows read (updated per row, so the count it ends with is right; kept on
    screen so the number of rows read stays visible)."""
    return tqdm(desc=f"reading {path.name}", unit=" rows", mininterval=0.5, dynamic_ncols=True)


def _read_delimited(path: Path, fmt: str) -> tuple[list[dict[str, Any]], list[int]]:
    rows, lines = [], []
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as handle, _rows_bar(path) as bar:
        reader = csv.DictReader(
            handle,
            delimiter="\t" if fmt == "tsv" else ",",
            quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
        )
        try:
            if not reader.fieldnames:
                return [], []
            for row in reader:
                if None in row:
                    raise DataError(
                        f"{path}, line {reader.line_num}: more values than the {len(reader.fieldnames)} "
                        f"header fields {reader.fieldnames}."
                    )
                rows.append(row)
                lines.append(reader.line_num)
                bar.update()
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: not valid {fmt.upper()} ({err}).") from None
    return rows, lines


def _not_utf8(value: Any) -> bool:
    """Whether a value read with errors='surrogateescape' holds bytes that were not UTF-8 (they
    become lone surrogates, which cannot be encoded back)."""
    if not isinstance(value, str):
        return isinstance(value, (dict, list)) and _not_utf8(json.dumps(value, ensure_ascii=False))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _not_utf8_error(path: Path, line: int, what: str) -> DataError:
    return DataError(
        f"{path}, line {line}: {what} holds bytes that are not UTF-8 text; re-save the file as UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8 FILE`)."
    )


def load_hub(name: str, cache_dir: str | None = None) -> dict[str, Split]:
    """Load ``owner/name`` or ``glue/<task>`` from the Hugging Face hub (needs network access)."""
    import datasets

    path, _, config = name.partition("/")
    path = HUB_ALIASES.get(path, path)
    if path not in HUB_ALIASES.values():
        path, config = name, ""
    try:
        loaded = datasets.load_dataset(path, config or None, cache_dir=cache_dir)
    except Exception as err:  # the hub raises many unrelated types (network, not found, config)
        raise DataError(
            f"cannot load data set {name!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err)[:200]}); without network access pass local files with --train-file and "
            "--validation-file instead."
        ) from None
    validation = GLUE_VALIDATION.get(config, "validation")
    found = {"train": "train", "validation": validation, "test": "test"}
    return {
        split: Split(split, loaded[key], f"{name}[{key}]") for split, key in found.items() if key in loaded
    }


def load_splits(
    dataset: str | None = None, files: dict[str, str | None] | None = None, cache_dir: str | None = None
) -> dict[str, Split]:
    """Local files override the hub data set's split of the same name."""
    splits = load_hub(dataset, cache_dir) if dataset else {}
    for split, path in (files or {}).items():
        if path:
            splits[split] = read_file(path, split)
    if not splits:
        raise DataError("no data given: pass --dataset NAME or --train-file / --validation-file.")
    return splits


def glue_name(dataset: str | None, files: dict[str, str | None]) -> str | None:
    """The GLUE task a data set is, from ``glue/<task>`` or a local file's folder name
    (``.../mrpc/train.jsonl``), so that its metric convention applies."""
    if dataset:
        last = dataset.rstrip("/").split("/")[-1].lower()
        return last if last in GLUE_FIELDS else None
    for path in files.values():
        if path and Path(path).parent.name.lower() in GLUE_FIELDS:
            return Path(path).parent.name.lower()
    return None


# --- fields ------------------------------------------------------------------------------------
def resolve_fields(
    splits: dict[str, Split],
    kind: str | None,
    text_fields: list[str] | None = None,
    label_field: str | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
    glue: str | None = None,
) -> Fields:
    """Explicit fields are checked against every split; otherwise the usual names are tried."""
    first = splits.get("train") or next(iter(splits.values()))
    columns = list(first.dataset.column_names)
    if text_fields:
        label = label_field
        if label is None and kind != "causal_lm":
            label = next((c for c in LABEL_FIELDS if c in columns and c not in text_fields), None)
        fields = Fields(list(text_fields), label)
    elif kind == "seq2seq" or (kind is None and "translation" in columns):
        fields = _seq2seq_fields(first, columns, label_field, source_lang, target_lang)
    elif kind == "causal_lm":
        fields = Fields([_first_present(first, columns, LM_FIELDS, "text")])
    else:
        names = GLUE_FIELDS.get(glue or "", ())
        if not (names and set(names) <= set(columns)):
            names = next((c for c in TEXT_FIELDS if set(c) <= set(columns)), ())
        if not names:
            raise DataError(
                f"{first.source}: none of the usual text fields {[c[0] for c in TEXT_FIELDS]} is "
                f"present (fields: {columns}); name yours with --text-fields."
            )
        label = label_field or next((c for c in LABEL_FIELDS if c in columns and c not in names), None)
        fields = Fields(list(names), label)
    if kind in ("classification", "regression", None) and fields.label is None and not fields.source_lang:
        raise DataError(
            f"{first.source}: no label field found among {list(LABEL_FIELDS)} (fields: {columns}); "
            "name it with --label-field."
        )
    for split in splits.values():
        needed = (["translation"] if fields.source_lang else fields.text) + (
            [fields.label] if fields.label and split.name != "test" else []
        )
        for name in needed:
            if name not in split.dataset.column_names:
                raise DataError(
                    f"{split.source}: field {name!r} is not in the file (fields: "
                    f"{split.dataset.column_names}); check --text-fields / --label-field."
                )
    return fields


def _first_present(split: Split, columns: list[str], names: tuple[str, ...], what: str) -> str:
    found = next((c for c in names if c in columns), None)
    if found is None:
        raise DataError(
            f"{split.source}: no {what} field among {list(names)} (fields: {columns}); "
            "name it with --text-fields."
        )
    return found


def _seq2seq_fields(
    split: Split, columns: list[str], target: str | None, source_lang: str | None, target_lang: str | None
) -> Fields:
    if "translation" in columns:
        pair = split.dataset[0]["translation"]
        if not isinstance(pair, dict) or len(pair) < 2:
            raise DataError(
                f"{split.where(0)}: field 'translation' must be a dict {{lang: text}} with two languages."
            )
        langs = list(pair)
        source_lang = source_lang or langs[0]
        target_lang = target_lang or next(lang for lang in langs if lang != source_lang)
        for lang in (source_lang, target_lang):
            if lang not in pair:
                raise DataError(f"{split.where(0)}: language {lang!r} not in 'translation' (has {langs}).")
        return Fields(["translation"], None, source_lang, target_lang)
    pair = next((p for p in SEQ2SEQ_FIELDS if set(p) <= set(columns)), None)
    if target and pair is None:
        raise DataError(f"{split.source}: name the source field with --text-fields.")
    if pair is None:
        raise DataError(
            f"{split.source}: no source/target fields among {list(SEQ2SEQ_FIELDS)} and no "
            f"'translation' field (fields: {columns}); use --text-fields and --label-field."
        )
    return Fields([pair[0]], target or pair[1])


# --- labels and task ---------------------------------------------------------------------------
def _number(value: Any) -> Any:
    """CSV gives every value as a string; read numeric labels as numbers."""
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value.strip())
            except ValueError:
                pass
    return value


def build_task(
    splits: dict[str, Split],
    fields: Fields,
    kind: str | None = None,
    name: str | None = None,
    known: Task | None = None,
) -> Task:
    """Check every text and label value and decide the task: integer labels (or strings) mean
    classification, fractional numbers regression, unless `kind` says otherwise. With `known`
    (the task a saved model was trained for), the labels are checked against its classes."""
    targets = [fields.label] if kind == "seq2seq" and fields.label else []
    for split in splits.values():
        _check_text(split, fields, fields.text + targets)
    if kind in ("seq2seq", "causal_lm"):
        return Task(kind, name)
    labelled = {s: split for s, split in splits.items() if fields.label in split.dataset.column_names}
    _check_label_kinds(labelled, fields.label)
    if known is not None:
        task = Task(known.kind, name or known.name, known.label_names)
        for split in labelled.values():
            _check_labels(split, fields.label, task)
        return task
    if not labelled:
        raise DataError(f"no split has the label field {fields.label!r}; name it with --label-field.")
    train = labelled.get("train") or next(iter(labelled.values()))
    values = [_number(v) for v in train.dataset[fields.label]]
    for row, value in enumerate(values):
        if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
            what = "empty" if value is None or value == "" else f"{value!r}, not a finite number"
            raise DataError(f"{train.where(row)}: field {fields.label!r} is {what}; every row needs a label.")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    fractional = numeric and any(isinstance(v, float) and not float(v).is_integer() for v in values)
    kind = kind or ("regression" if fractional else "classification")
    if kind == "regression":
        bad = next((r for r, v in enumerate(values) if not isinstance(v, (int, float))), None)
        if bad is not None:
            raise DataError(
                f"{train.where(bad)}: label {values[bad]!r} in {fields.label!r} is not a "
                "number, but the task is regression; use --task classification."
            )
        task = Task("regression", "stsb" if name == "stsb" else name)
    else:
        if fractional:
            bad = next(r for r, v in enumerate(values) if isinstance(v, float) and not v.is_integer())
            raise DataError(
                f"{train.where(bad)}: label {values[bad]!r} in {fields.label!r} is not a class; "
                "fractional labels mean regression (use --task regression) or fix the file."
            )
        task = Task("classification", name, _label_names(train, fields.label, values, numeric))
        if task.num_labels < 2:
            raise DataError(
                f"{train.source}: field {fields.label!r} has a single class "
                f"{task.label_names}; classification needs at least two."
            )
        _check_glue_classes(train, fields.label, task, values, numeric)
    for split in labelled.values():
        _check_labels(split, fields.label, task)
    return task


def _label_kind(split: Split, label: str) -> tuple[str, int] | None:
    """Whether a split's labels are numbers or names, with the first row of that kind; a split
    holding both is refused (is `1` the class named "1" or the second class?). None: no labels
    to judge (an unlabelled test split)."""
    if split.name == "test" and all(v in (-1, None) for v in split.dataset[label]):
        return None
    first: dict[str, int] = {}
    for row, value in enumerate(split.dataset[label]):
        value = _number(value)
        if value is None or value == "":
            continue
        kind = "numbers" if isinstance(value, (int, float)) and not isinstance(value, bool) else "names"
        first.setdefault(kind, row)
    if len(first) == 2:
        row = max(first.values())
        raise DataError(
            f"{split.where(row)}: label {split.dataset[label][row]!r} in {label!r} is a "
            f"{'number' if first['numbers'] == row else 'name'}, but earlier rows hold "
            f"{'names' if first['numbers'] == row else 'numbers'}; use class names or class numbers "
            "(0..K-1) throughout."
        )
    return next(iter(first.items()), None)


def _check_label_kinds(labelled: dict[str, Split], label: str) -> None:
    """Every split must label classes the same way: names in one split and numbers in another
    would silently map number i to the i-th name in sorted order."""
    kinds = {name: found for name, split in labelled.items() if (found := _label_kind(split, label))}
    if len({kind for kind, _ in kinds.values()}) < 2:
        return
    names = next(n for n, (kind, _) in kinds.items() if kind == "names")
    numbers = next(n for n, (kind, _) in kinds.items() if kind == "numbers")
    named, numbered = labelled[names], labelled[numbers]
    raise DataError(
        f"{numbered.where(kinds[numbers][1])}: label {numbered.dataset[label][kinds[numbers][1]]!r} in "
        f"{label!r} is a class number, but {named.source} labels classes by name (e.g. "
        f"{named.dataset[label][kinds[names][1]]!r}); use the same kind of labels in every split."
    )


def _check_glue_classes(split: Split, label: str, task: Task, values: list[Any], numeric: bool) -> None:
    """A GLUE task's data must not have more classes than the task defines."""
    expected = GLUE_CLASSES.get(task.name or "")
    if not expected or task.num_labels <= expected:
        return
    bad = next((r for r, v in enumerate(values) if numeric and int(v) >= expected), None)
    if bad is not None:
        where, what = split.where(bad), f"label {values[bad]!r}"
    else:
        where, what = split.source, f"labels {task.label_names}"
    raise DataError(
        f"{where}: {what} in {label!r} is outside the {expected} classes of GLUE {task.name}; fix "
        "the file, or pass --task-name if this is not that GLUE task."
    )


def _label_names(split: Split, label: str, values: list[Any], numeric: bool) -> list[str]:
    feature = split.dataset.features.get(label)
    if getattr(feature, "names", None):
        return list(feature.names)
    if numeric:
        ints = [int(v) for v in values]
        bad = next((r for r, v in enumerate(ints) if v < 0), None)
        if bad is not None:
            raise DataError(
                f"{split.where(bad)}: label {ints[bad]} in {label!r} is negative; class "
                "labels are 0..K-1 (or names)."
            )
        return [str(i) for i in range(max(ints) + 1)]
    return sorted({str(v) for v in values})


def _check_labels(split: Split, label: str, task: Task) -> None:
    if split.name == "test" and all(v in (-1, None) for v in split.dataset[label]):
        return  # GLUE's hub test splits are unlabelled (-1)
    for row, value in enumerate(split.dataset[label]):
        value = _number(value)
        if task.kind == "regression":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = float(value).is_integer() and 0 <= value < task.num_labels
        else:
            ok = str(value) in task.label_names
        if not ok:
            expected = "a number" if task.kind == "regression" else f"one of {task.label_names}"
            raise DataError(
                f"{split.where(row)}: label {value!r} in {label!r} does not match the task "
                f"({task.kind}; expected {expected})."
            )


def _check_text(split: Split, fields: Fields, names: list[str]) -> None:
    for name in names:
        if name not in split.dataset.column_names:
            continue
        for row, value in enumerate(split.dataset[name]):
            if name == "translation":
                ok = isinstance(value, dict) and all(
                    isinstance(value.get(lang), str) for lang in (fields.source_lang, fields.target_lang)
                )
            else:
                ok = isinstance(value, str)
            if not ok:
                raise DataError(f"{split.where(row)}: field {name!r} is {value!r}, expected text.")
            pair = (fields.source_lang, fields.target_lang)
            texts = [value[lang] for lang in pair] if name == "translation" else [value]
            if any(not text.strip() for text in texts):
                raise DataError(
                    f"{split.where(row)}: field {name!r} is empty; fill it in or remove the row."
                )


# --- tokenisation ------------------------------------------------------------------------------
def encode(
    splits: dict[str, Split],
    task: Task,
    fields: Fields,
    tokenizer: Any,
    max_length: int,
    source_prefix: str = "",
    max_samples: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """Tokenise every split for `task` (labels as ids / floats / target ids)."""
    max_samples = max_samples or {}
    out = {}
    for name, split in splits.items():
        ds = split.dataset
        if max_samples.get(name):
            ds = ds.select(range(min(max_samples[name], len(ds))))
        has_labels = (
            fields.label is not None
            and fields.label in ds.column_names
            and not (name == "test" and all(v in (-1, None) for v in ds[fields.label]))
        )
        fn = _encoder(task, fields, tokenizer, max_length, source_prefix, has_labels)
        out[name] = ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"tokenising {name}")
    return out


def _encoder(task: Task, fields: Fields, tokenizer: Any, max_length: int, prefix: str, has_labels: bool):
    label_ids = {n: i for i, n in enumerate(task.label_names)}

    def classify(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[f] for f in fields.text]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        if has_labels:
            values = [_number(v) for v in batch[fields.label]]
            if task.kind == "regression":
                enc["labels"] = [float(v) for v in values]
            else:
                enc["labels"] = [int(v) if isinstance(v, (int, float)) else label_ids[str(v)] for v in values]
        return enc

    def seq2seq(batch: dict[str, list]) -> dict[str, list]:
        if fields.source_lang:
            sources = [p[fields.source_lang] for p in batch["translation"]]
            targets = [p[fields.target_lang] for p in batch["translation"]]
        else:
            sources, targets = batch[fields.text[0]], batch[fields.label]
        return tokenizer(
            [prefix + s for s in sources], text_target=targets, truncation=True, max_length=max_length
        )

    def causal(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch[fields.text[0]], truncation=True, max_length=max_length)

    return {"seq2seq": seq2seq, "causal_lm": causal}.get(task.kind, classify)


def collator(task: Task, tokenizer: Any, model: Any = None) -> Any:
    """Dynamic padding for the task (labels padded with -100 where the loss must skip them)."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task.kind == "seq2seq":
        return DataCollatorForSeq2Seq(tokenizer, model=model)
    if task.kind == "causal_lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)
