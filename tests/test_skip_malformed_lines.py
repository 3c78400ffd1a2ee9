"""`skip_invalid` also skips a JSON line that holds no JSON object: it is a row read and skipped, with its line in
the reason, and the rows after it keep their numbers. Without `skip_invalid` the reader's error is unchanged and
ends with the hint to set it; when every line is bad, nothing is left to train on and the error says so."""

from __future__ import annotations

import json

import pytest

from finetune.cli import main
from finetune.config import RunConfig
from finetune.data import SkippedRow, UnreadableLine, load_examples, normalize_rows, read_rows, rows_from_text
from finetune.errors import DataError
from finetune.prepare import prepare_data, preview_data

GOOD = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(12)]
BROKEN = '{"instruction": "x", "output": }'  # line error: Expecting value (column 32)
HINT = " (or set skip_invalid: true to drop bad rows)"


def lines(rows) -> list[str]:
    return [json.dumps(r) for r in rows]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def every_row(path, **kw) -> RunConfig:
    return RunConfig(dataset=str(path), skip_invalid=True, eval_fraction=0, test_fraction=0, **kw)


def test_a_malformed_line_is_a_skipped_row_numbered_by_its_line(tmp_path):
    path = write(tmp_path / "data.jsonl", "\n".join(lines(GOOD[:2]) + [BROKEN] + lines(GOOD[2:])) + "\n")
    data = load_examples(every_row(path))
    assert data.skipped == [SkippedRow(3, "invalid JSON on line 3: Expecting value (column 32)")]
    assert data.rows_read == 13
    trained = {tuple(turn["content"] for turn in example["messages"]) for example in data.splits.train}
    assert trained == {(r["instruction"], r["output"]) for r in GOOD}  # every good row, in shuffled order


def test_without_skip_invalid_the_error_is_unchanged_and_names_the_fix(tmp_path):
    path = write(tmp_path / "data.jsonl", "\n".join(lines(GOOD[:2]) + [BROKEN]) + "\n")
    with pytest.raises(DataError) as e:
        load_examples(RunConfig(dataset=str(path)))
    assert str(e.value) == ("data.jsonl: invalid JSON on line 3: Expecting value (column 32); each line must hold "
                            "one complete JSON object" + HINT)
    assert (e.value.source, e.value.row, e.value.field) == ("data.jsonl", 3, None)


def test_rows_after_skipped_lines_keep_their_numbers(tmp_path):
    """A bad line, a line that is JSON but no object, one too deeply nested, then a row with an empty answer: that
    row is row 6, as it would be were the lines above it good."""
    rows = [*lines(GOOD[:2]), "not json", '"a string"', "[" * 5000 + "]" * 5000,
            json.dumps({"instruction": "q", "output": ""}), *lines(GOOD[2:])]
    path = write(tmp_path / "data.jsonl", "\n".join(rows) + "\n")
    data = load_examples(every_row(path))
    assert data.skipped == [
        SkippedRow(3, "invalid JSON on line 3: Expecting value (column 1)"),
        SkippedRow(4, 'line 4: expected a JSON object with named fields such as {"instruction": ..., "output": ...}, '
                      "got a string"),
        SkippedRow(5, "the JSON on line 5 is nested too deeply (about 1000 levels of brackets or more); rows need "
                      "only a few levels: a list of turns, each an object"),
        SkippedRow(6, "field `output` is empty"),
    ]
    assert data.rows_read == 16 and len(data.splits.train) == 12


def test_bad_lines_before_the_first_rows_do_not_hide_the_format(tmp_path):
    """The format is detected from the first 20 readable rows, however many bad lines come before them."""
    path = write(tmp_path / "data.jsonl", "\n".join(["{broken"] * 25 + lines(GOOD)) + "\n")
    data = load_examples(every_row(path))
    assert data.format == "alpaca" and data.rows_read == 37 and len(data.splits.train) == 12
    assert data.skipped == [SkippedRow(n, f"invalid JSON on line {n}: Expecting property name enclosed in double "
                                          "quotes (column 2)") for n in range(1, 26)]
    assert len(normalize_rows(read_rows(path, skip_invalid=True), skip_invalid=True).examples) == 12


def test_every_line_malformed_is_an_error_not_an_empty_dataset(tmp_path):
    path = write(tmp_path / "data.jsonl", "{oops\n\n[1, 2]\n{nope\n")
    with pytest.raises(DataError) as e:
        load_examples(every_row(path))
    assert str(e.value) == ("data.jsonl: all 3 lines are invalid JSON (first: line 1: Expecting property name "
                            "enclosed in double quotes (column 2)), so nothing is left to train on; each line must "
                            "hold one complete JSON object")
    with pytest.raises(DataError, match=r"^rows: all 3 lines are invalid JSON \(first: line 1: "):
        normalize_rows(read_rows(path, skip_invalid=True), skip_invalid=True, source="rows")


def test_json_lines_saved_as_json_skip_a_bad_line_too(tmp_path):
    text = "\n".join(lines(GOOD[:3]) + ['{"instruction": "x",'] + lines(GOOD[3:5]))
    path = write(tmp_path / "data.json", text)
    reason = "invalid JSON on line 4: Expecting property name enclosed in double quotes (column 21)"
    assert read_rows(path, skip_invalid=True) == [*GOOD[:3], UnreadableLine(4, reason, reason.split(": ", 1)[1]),
                                                  *GOOD[3:5]]
    data = load_examples(every_row(path))
    assert data.skipped == [SkippedRow(4, reason)] and data.rows_read == 6 and len(data.splits.train) == 5
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert str(e.value) == f"data.json: {reason}; each line must hold one complete JSON object" + HINT


def test_pasted_json_lines_skip_a_bad_line(tmp_path):
    text = "\n".join(lines(GOOD[:2]) + [BROKEN] + lines(GOOD[2:4]))
    rows = rows_from_text(text, skip_invalid=True)
    assert rows[:2] == GOOD[:2] and rows[3:] == GOOD[2:4]
    assert rows[2] == UnreadableLine(3, "invalid JSON on line 3: Expecting value (column 32)",
                                     "Expecting value (column 32)")
    with pytest.raises(DataError, match=r"^pasted rows: invalid JSON on line 3: Expecting value \(column 32\)"):
        rows_from_text(text)


def test_training_and_preview_count_the_skipped_line(tmp_path, demo_model_dir, capsys):
    path = write(tmp_path / "data.jsonl", "\n".join(lines(GOOD[:2]) + [BROKEN] + lines(GOOD[2:])) + "\n")
    config = every_row(path, base_model=str(demo_model_dir))
    skipped = [SkippedRow(3, "invalid JSON on line 3: Expecting value (column 32)")]
    for encoded in (prepare_data(config), preview_data(config)):
        assert encoded.examples.skipped == skipped and encoded.examples.rows_read == 13
        assert len(encoded.encoded["train"]) == 12
    assert main(["preview", "-n", "1", "--base_model", str(demo_model_dir), "--dataset", str(path),
                 "--skip_invalid", "true"]) == 0
    assert "skipped 1 invalid rows, e.g. row 3: invalid JSON on line 3: Expecting value (column 32)" in (
        capsys.readouterr().out)
