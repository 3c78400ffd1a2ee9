"""`skip_invalid` also skips a JSON line that is not one JSON object (the reader used to stop before normalisation):
it becomes a skipped row naming its line, and the rows after it keep their own row numbers."""

from __future__ import annotations

import json

import pytest

from finetune.config import RunConfig
from finetune.data import SkippedRow, load_examples, read_rows, rows_from_text
from finetune.errors import DataError

GOOD = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(12)]


def lines(rows) -> list[str]:
    return [json.dumps(r) for r in rows]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_malformed_line_is_a_skipped_row_with_its_line_number(tmp_path):
    text = "\n".join(lines(GOOD[:2]) + ['{"instruction": "x", "output": }'] + lines(GOOD[2:])) + "\n"
    path = write(tmp_path / "data.jsonl", text)
    data = load_examples(RunConfig(dataset=str(path), skip_invalid=True, eval_fraction=0, test_fraction=0))
    assert data.skipped == [SkippedRow(3, "invalid JSON on line 3: Expecting value (column 32)")]
    assert data.rows_read == 13 and len(data.splits.train) == 12


def test_without_skip_invalid_the_message_is_unchanged(tmp_path):
    path = write(tmp_path / "data.jsonl", "\n".join(lines(GOOD[:2]) + ['{"instruction": "x", "output": }']) + "\n")
    with pytest.raises(DataError) as e:
        load_examples(RunConfig(dataset=str(path)))
    assert str(e.value) == ("data.jsonl: invalid JSON on line 3: Expecting value (column 32); each line must hold "
                            "one complete JSON object")


def test_rows_after_a_skipped_line_keep_their_row_numbers(tmp_path):
    """Row 5 (line 6: a blank line comes first) has an empty answer: it is named row 5, not row 4."""
    rows = lines(GOOD[:2]) + ["not json", '"a string"', json.dumps({"instruction": "q", "output": ""})]
    path = write(tmp_path / "data.jsonl", "\n" + "\n".join(rows + lines(GOOD[2:])) + "\n")
    data = load_examples(RunConfig(dataset=str(path), skip_invalid=True, eval_fraction=0, test_fraction=0))
    assert data.skipped == [
        SkippedRow(3, "invalid JSON on line 4: Expecting value (column 1)"),
        SkippedRow(4, 'line 5: expected a JSON object with named fields such as {"instruction": ..., "output": ...}, '
                      "got a string"),
        SkippedRow(5, "field `output` is empty"),
    ]
    assert data.rows_read == 15


def test_json_lines_saved_as_json_and_pasted_rows_skip_too(tmp_path):
    text = "\n".join(lines(GOOD[:3]) + ['{"instruction": "x",'] + lines(GOOD[3:5]))
    path = write(tmp_path / "data.json", text)
    rows = read_rows(path, skip_invalid=True)
    assert rows == GOOD[:5] and rows.skipped == [
        SkippedRow(4, "invalid JSON on line 4: Expecting property name enclosed in double quotes (column 21)")]
    pasted = rows_from_text(text, skip_invalid=True)
    assert pasted == GOOD[:5] and pasted.skipped == rows.skipped
    with pytest.raises(DataError, match=r"^pasted rows: invalid JSON on line 4: Expecting property name"):
        rows_from_text(text)


def test_every_line_malformed_still_stops_with_the_first_problem(tmp_path):
    path = write(tmp_path / "data.jsonl", "{oops\n{nope\n")
    with pytest.raises(DataError) as e:
        read_rows(path, skip_invalid=True)
    assert str(e.value) == ("data.jsonl: all 2 lines are invalid, nothing is left to train on; the first problem: "
                            "row 1: invalid JSON on line 1: Expecting property name enclosed in double quotes "
                            "(column 2)")
