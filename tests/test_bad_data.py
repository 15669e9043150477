"""Bad data is found before training starts and reported with file, line and field; property-based
tests over malformed rows and bytes: every case works or raises our own error with a message."""

import csv
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from neuroprune.errors import DataError, NeuroPruneError
from neuroprune.training.data import encode
from neuroprune.training.dataprep import prepare_data
from neuroprune.training.settings import TrainSettings
from textdata import sentiment_rows, tokenizer, write


def _prepare(train, validation=None, **kwargs):
    return prepare_data(TrainSettings(train_file=str(train), validation_file=validation and str(validation),
                                      **kwargs))


def _jsonl(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def _raises(match, train, validation=None, **kwargs):
    with pytest.raises(DataError, match=match) as info:
        _prepare(train, validation, **kwargs)
    return str(info.value)


def test_good_files_pass(tmp_path):
    train = write(tmp_path / "train.csv", sentiment_rows(6))
    validation = write(tmp_path / "validation.jsonl", sentiment_rows(4, seed=1))
    _, task, fields = _prepare(train, validation)
    assert task.kind == "classification" and fields.text == ["sentence"] and fields.label == "label"


@pytest.mark.parametrize("content", [b"", b"\n\n", b"sentence,label\n"])
def test_an_empty_file(tmp_path, content):
    path = tmp_path / ("train.csv" if b"," in content else "train.jsonl")
    path.write_bytes(content)
    _raises(rf"train file {path} is empty", path)


def test_a_missing_column_names_file_line_and_field(tmp_path):
    rows = [json.dumps(r) for r in sentiment_rows(4)]
    rows[2] = json.dumps({"sentence": "good film"})
    path = _jsonl(tmp_path / "train.jsonl", rows)
    _raises(rf"{path}, line 3: field\(s\) \['label'\] missing", path)


def test_a_field_absent_from_the_whole_file(tmp_path):
    train = write(tmp_path / "train.jsonl", sentiment_rows(4))
    validation = write(tmp_path / "validation.jsonl", [{"text": "good", "label": 1}] * 2)
    _raises(rf"{validation}: field 'sentence' is not in the file", train, validation)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_non_utf8_bytes_name_file_line_and_field(tmp_path, suffix):
    rows = sentiment_rows(5)
    rows[2]["sentence"] += " MARK"  # becomes Latin-1 "f\xe9lm" on line 3 (+1 for the CSV header)
    path = write(tmp_path / f"train{suffix}", rows)
    path.write_bytes(path.read_bytes().replace(b"MARK", b"f\xe9lm"))
    line = 3 + (suffix != ".jsonl")
    _raises(rf"{path}, line {line}: field 'sentence' holds bytes that are not UTF-8", path)


def test_non_utf8_bytes_outside_a_field_name_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    _jsonl(path, [json.dumps(r) for r in sentiment_rows(3)] + [b"\xff\xfe{}"])
    _raises(rf"{path}, line 4: .*not UTF-8", path)


@pytest.mark.parametrize("blank", ["", "   "])
def test_empty_text(tmp_path, blank):
    rows = sentiment_rows(5)
    rows[1]["sentence"] = blank
    path = write(tmp_path / "train.jsonl", rows)
    _raises(rf"{path}, line 2: field 'sentence' is empty", path)


def test_empty_second_sentence_of_a_pair(tmp_path):
    rows = sentiment_rows(4, pair=True)
    rows[3]["sentence2"] = ""
    path = write(tmp_path / "train.csv", rows)
    _raises(rf"{path}, line 5: field 'sentence2' is empty", path)  # line 1 is the header


def test_labels_outside_the_training_label_set(tmp_path):
    train = write(tmp_path / "train.jsonl", sentiment_rows(6))
    rows = sentiment_rows(4, seed=2)
    rows[2]["label"] = 2
    validation = write(tmp_path / "validation.jsonl", rows)
    _raises(rf"{validation}, line 3: label 2 in 'label' does not match the task", train, validation)


def test_string_labels_outside_the_label_set(tmp_path):
    train = write(tmp_path / "train.csv", sentiment_rows(6, labels="str"))
    rows = sentiment_rows(3, labels="str")
    rows[1]["label"] = "meh"
    validation = write(tmp_path / "validation.csv", rows)
    _raises(rf"{validation}, line 3: label 'meh' in 'label'", train, validation)


def test_labels_outside_a_glue_tasks_label_set(tmp_path):
    rows = sentiment_rows(6)
    rows[4]["label"] = 2
    train = write(tmp_path / "sst2" / "train.jsonl", rows)  # SST-2 has two classes
    _raises(rf"{train}, line 5: label 2 in 'label' .*sst2", train)


@pytest.mark.parametrize("suffix, nan", [(".jsonl", math.nan), (".csv", "nan"), (".jsonl", None)])
def test_nan_regression_labels(tmp_path, suffix, nan):
    rows = sentiment_rows(6, labels="float")
    rows[3]["label"] = nan
    path = write(tmp_path / f"train{suffix}", rows)
    what = "empty" if nan is None else "nan, not a finite number"
    _raises(rf"{path}, line {4 + (suffix == '.csv')}: field 'label' is {what}", path, task="regression")


def test_nan_regression_labels_in_validation(tmp_path):
    train = write(tmp_path / "train.jsonl", sentiment_rows(6, labels="float"))
    rows = sentiment_rows(4, labels="float")
    rows[0]["label"] = math.nan
    validation = write(tmp_path / "validation.jsonl", rows)
    _raises(rf"{validation}, line 1: label nan in 'label'", train, validation)


# --- property-based: malformed rows and bytes --------------------------------------------------
SETTINGS = settings(deadline=None, max_examples=60, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["good film", "bad", "", " ", "nan", "1", "0.5", "-1", "a,b", 'q"t']),
    st.integers(-2, 3), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from(["en", "de"]), st.text(max_size=3)),
)
DELETE = object()
good_rows = st.lists(
    st.fixed_dictionaries({"sentence": st.sampled_from(["good film", "a bad plot", "the cast is great"]),
                           "label": st.sampled_from([0, 1, 0.5, 3.25])}),
    min_size=2, max_size=6,
)
# a few rows of good data, then a few cells changed to anything (or deleted)
edits = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["sentence", "label", "sentence2", "text"]),
                           st.one_of(values, st.just(DELETE))), max_size=2)
rows = st.builds(lambda base, changes: _edit(base, changes), good_rows, edits)


def _edit(base, changes):
    for index, field, value in changes:
        row = base[index % len(base)]
        if value is DELETE:
            row.pop(field, None)
        else:
            row[field] = value
    return base


damage = st.one_of(st.none(), st.binary(max_size=4), st.sampled_from([b"\xff", b"\x00", b'"', b"\r", b"\t,"]))


def _write_rows(path, data, junk, position):
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in data).encode()
    else:
        buffer = io.StringIO()
        columns = sorted({k for r in data for k in r}) or ["sentence"]
        writer = csv.DictWriter(buffer, fieldnames=columns, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(data)
        text = buffer.getvalue().encode()
    if junk is not None:
        cut = position % (len(text) + 1)
        text = text[:cut] + junk + text[cut:]
    path.write_bytes(text)
    return path


@SETTINGS
@given(train=rows, validation=st.one_of(st.none(), rows), suffix=st.sampled_from([".jsonl", ".csv", ".tsv"]),
       junk=damage, position=st.integers(0, 500),
       task=st.sampled_from([None, "classification", "regression"]))
def test_malformed_rows_work_or_raise_our_error(tmp_path, train, validation, suffix, junk, position, task):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    train_path = _write_rows(folder / f"train{suffix}", train, junk, position)
    val_path = validation is not None and _write_rows(folder / f"validation{suffix}", validation, None, 0)
    try:
        splits, built, fields = _prepare(train_path, val_path or None, task=task)
        encoded = encode(splits, built, fields, tokenizer(), max_length=16)
    except NeuroPruneError as err:
        assert str(err).strip()
        event(f"refused: {str(err).split(': ', 2)[-1][:40]}")
        return
    event("accepted")
    # accepted data is usable data: every text non-empty, every label a valid target
    for split in encoded.values():
        for label in split["labels"]:
            if built.kind == "regression":
                assert math.isfinite(label)
            else:
                assert 0 <= label < built.num_labels
    for split in splits.values():
        for name in fields.text:
            assert all(isinstance(t, str) and t.strip() for t in split.dataset[name])


def test_class_names_in_one_split_and_numbers_in_another_are_refused(tmp_path):
    train = write(tmp_path / "train.jsonl", sentiment_rows(6, labels="str"))
    validation = write(tmp_path / "validation.jsonl", sentiment_rows(4, seed=1))
    message = _raises("is a class number, but", train, validation)
    assert f"{validation}, line 1: label 1 in 'label'" in message
    assert f"{train} labels classes by name (e.g. 'pos')" in message
    _raises("is a class number, but", validation, train)  # the other way round too


def test_class_names_and_numbers_in_one_csv_file_are_refused(tmp_path):
    rows = sentiment_rows(6, labels="str")
    rows[3]["label"] = "1"
    train = write(tmp_path / "train.csv", rows)
    _raises(rf"{train}, line 5: label '1' in 'label' is a number, but earlier rows hold names", train)
