"""finetune.data: sources → format detection → normalised messages → splits → stats, and every error message."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.config import RunConfig
from finetune.data import (
    NormalizedData,
    SkippedRow,
    Splits,
    detect_format,
    display_name,
    hub_load_error,
    length_stats,
    load_examples,
    normalize_rows,
    read_jsonl_examples,
    read_rows,
    rows_from_text,
    split_examples,
    split_stats,
    write_split_files,
)
from finetune.errors import DataError
from finetune.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / "tests" / "fixtures" / "datasets"  # slices of LLaMA-Factory's demo files
EXAMPLES = REPO / "examples" / "data"
SKIP = " (or set skip_invalid: true to drop bad rows)"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def normalize_error(rows, **kw) -> str:
    with pytest.raises(DataError) as info:
        normalize_rows(rows, source="data.jsonl", **kw)
    return str(info.value)


def read_error(path, **kw) -> str:
    with pytest.raises(DataError) as info:
        read_rows(path, **kw)
    return str(info.value)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ============================================================================ formats: detection + normalisation

def test_alpaca_with_and_without_input():
    rows = [{"instruction": "Translate to French", "input": "cat", "output": "chat"},
            {"instruction": "Say hi", "input": "", "output": "Hi!"},
            {"instruction": "Say bye", "output": "Bye!"}]
    data = normalize_rows(rows)
    assert data == NormalizedData(examples=[
        {"messages": [user("Translate to French\n\ncat"), assistant("chat")]},
        {"messages": [user("Say hi"), assistant("Hi!")]},
        {"messages": [user("Say bye"), assistant("Bye!")]},
    ], format="alpaca", skipped=[])


def test_alpaca_system_column_wins_over_system_prompt():
    rows = [{"instruction": "Q1", "output": "A1", "system": "Be brief."},
            {"instruction": "Q2", "output": "A2", "system": ""},
            {"instruction": "Q3", "output": "A3", "system": None}]
    data = normalize_rows(rows, system_prompt="Default.")
    assert [ex["messages"][0] for ex in data.examples] == [system("Be brief."), system("Default."),
                                                           system("Default.")]


def test_dolly_style_instruction_context_response_is_alpaca():
    rows = [{"instruction": "Summarise", "context": "Long text.", "response": "Short.", "category": "summary"}]
    assert detect_format(rows) == "alpaca"
    assert normalize_rows(rows).examples == [{"messages": [user("Summarise\n\nLong text."), assistant("Short.")]}]


def test_messages_format_and_system_prompt_insertion():
    rows = [{"messages": [user("Hi"), assistant("Hello"), user("Bye"), assistant("Ciao")]},
            {"messages": [system("Own system."), user("Q"), assistant("A")]}]
    data = normalize_rows(rows, system_prompt="Be kind.")
    assert data.format == "messages"
    assert data.examples == [
        {"messages": [system("Be kind."), user("Hi"), assistant("Hello"), user("Bye"), assistant("Ciao")]},
        {"messages": [system("Own system."), user("Q"), assistant("A")]},
    ]


def test_conversations_column_with_role_content_is_messages():
    rows = [{"conversations": [user("Q"), assistant("A")]}]
    assert detect_format(rows) == "messages"
    assert normalize_rows(rows).examples == [{"messages": [user("Q"), assistant("A")]}]


def test_sharegpt_roles_and_aliases():
    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                               {"from": "gpt", "value": "A1"}, {"from": "user", "value": "Q2"},
                               {"from": "bot", "value": "A2"}, {"from": "Human", "value": "Q3"},
                               {"from": "chatgpt", "value": "A3"}]},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "assistant", "value": "A"}],
             "system": "From the column."}]
    data = normalize_rows(rows)
    assert data.format == "sharegpt"
    assert data.examples == [
        {"messages": [system("S"), user("Q1"), assistant("A1"), user("Q2"), assistant("A2"), user("Q3"),
                      assistant("A3")]},
        {"messages": [system("From the column."), user("Q"), assistant("A")]},
    ]


def test_empty_system_turn_is_dropped_and_system_prompt_applies():
    rows = [{"messages": [system(""), user("Q"), assistant("A")]}]
    assert normalize_rows(rows, system_prompt="S").examples == [{"messages": [system("S"), user("Q"),
                                                                               assistant("A")]}]


def test_conversation_stored_as_json_text_in_a_csv_cell():
    rows = [{"messages": json.dumps([user("Q"), assistant("A")])}]
    assert normalize_rows(rows).examples == [{"messages": [user("Q"), assistant("A")]}]


@pytest.mark.parametrize("prompt,completion", [("prompt", "completion"), ("prompt", "response"),
                                               ("question", "answer"), ("query", "response"),
                                               ("input", "output"), ("Question", "Answer")])
def test_prompt_completion_aliases(prompt, completion):
    rows = [{prompt: "What is 2+2?", completion: "4", "system": "Maths tutor."}]
    data = normalize_rows(rows)
    assert data.format == "prompt_completion"
    assert data.examples == [{"messages": [system("Maths tutor."), user("What is 2+2?"), assistant("4")]}]


def test_text_format_ignores_system_prompt():
    data = normalize_rows([{"text": "Once upon a time."}, {"text": "The end.", "meta": 1}], system_prompt="S")
    assert data == NormalizedData(examples=[{"text": "Once upon a time."}, {"text": "The end."}], format="text")


def test_detection_prefers_conversations_then_alpaca_then_pairs_then_text():
    assert detect_format([{"messages": [user("q")], "instruction": "i", "output": "o"}]) == "messages"
    assert detect_format([{"instruction": "i", "input": "x", "output": "o", "text": "t"}]) == "alpaca"
    assert detect_format([{"prompt": "p", "completion": "c", "text": "t"}]) == "prompt_completion"
    assert detect_format([{"text": "t", "id": 3}]) == "text"


def test_detection_looks_past_the_first_row_for_optional_columns():
    rows = [{"instruction": "i"}] + [{"instruction": "i", "output": "o"}] * 3
    assert detect_format(rows) == "alpaca"


def test_undetectable_columns_suggest_a_mapping():
    with pytest.raises(DataError) as info:
        detect_format([{"q": "What?", "a": "That."}], source="qa.csv")
    assert str(info.value) == ("qa.csv: could not detect the data format; columns found: q, a. "
                               "Map them with column_mapping: {prompt: q, completion: a}")
    with pytest.raises(DataError, match=re.escape("columns found: body. Map them with column_mapping: "
                                                  "{text: body}")):
        detect_format([{"body": "Some text"}])
    with pytest.raises(DataError, match=re.escape("columns found: dialog. Map them with column_mapping: "
                                                  "{messages: dialog}")):
        detect_format([{"dialog": [user("q"), assistant("a")]}])
    with pytest.raises(DataError, match=re.escape("columns found: system, Q, A. Map them with column_mapping: "
                                                  "{prompt: Q, completion: A}")):
        detect_format([{"system": "s", "Q": "q", "A": "a"}])


# ---------------------------------------------------------------------------- column_mapping

def test_column_mapping_overrides_detection():
    rows = [{"text": "ignored", "q": "Capital of France?", "a": "Paris"}]
    assert detect_format(rows) == "text"
    mapping = {"prompt": "q", "completion": "a"}
    assert detect_format(rows, mapping) == "prompt_completion"
    assert normalize_rows(rows, column_mapping=mapping).examples == [
        {"messages": [user("Capital of France?"), assistant("Paris")]}]


def test_column_mapping_alpaca_and_conversation_columns():
    rows = [{"task": "Add", "numbers": "2 and 3", "result": "5", "persona": "Calculator."}]
    mapping = {"instruction": "task", "input": "numbers", "output": "result", "system": "persona"}
    data = normalize_rows(rows, column_mapping=mapping)
    assert data.format == "alpaca"
    assert data.examples == [{"messages": [system("Calculator."), user("Add\n\n2 and 3"), assistant("5")]}]

    dialog = [{"dialog": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}]
    assert normalize_rows(dialog, column_mapping={"conversations": "dialog"}).format == "sharegpt"
    assert normalize_rows(dialog, column_mapping={"messages": "dialog"}).examples == [
        {"messages": [user("Hi"), assistant("Hey")]}]


def test_column_mapping_one_side_finds_the_other_by_alias():
    rows = [{"q": "Why?", "answer": "Because."}]
    assert normalize_rows(rows, column_mapping={"prompt": "q"}).examples == [
        {"messages": [user("Why?"), assistant("Because.")]}]


def test_column_mapping_errors():
    rows = [{"q": "x", "a": "y"}]
    with pytest.raises(DataError) as info:
        normalize_rows(rows, column_mapping={"question": "q"})
    assert str(info.value) == ("column_mapping: unknown field `question`; use one of instruction, input, output, "
                               "system, prompt, completion, messages, conversations, text, tools, chosen, rejected, "
                               "label")
    with pytest.raises(DataError) as info:
        normalize_rows(rows, column_mapping={"prompt": "query"}, source="qa.csv")
    assert str(info.value) == ("column_mapping maps `prompt` to the column `query`, but qa.csv has no such column; "
                               "columns found: q, a")
    with pytest.raises(DataError) as info:
        normalize_rows(rows, column_mapping={"prompt": "q", "output": "a"})
    assert str(info.value) == ("column_mapping mixes fields of different formats (`prompt`, `output`); map "
                               "instruction/input/output, or prompt/completion, or messages, or text")
    with pytest.raises(DataError) as info:
        normalize_rows(rows, fmt="text", column_mapping={"prompt": "q"})
    assert str(info.value) == ("data_format is `text` but column_mapping maps fields of another format (prompt); "
                               "set data_format: auto, or map the fields of `text`")


def renamed(rows: list[dict], names: dict[str, str]) -> list[dict]:
    """`rows` with columns renamed (old → new), in their order."""
    return [{names.get(k, k): v for k, v in row.items()} for row in rows]


def same_reading(a, b) -> bool:
    return (a.format, a.examples, a.preference, a.preference_rows, a.notices, a.label_false) == (
        b.format, b.examples, b.preference, b.preference_rows, b.notices, b.label_false)


def test_tools_chosen_rejected_and_label_columns_can_be_mapped():
    """A file whose tool, preference or KTO columns have other names reads as the canonically named one does."""
    glaive = read_rows(SHARED / "glaive_toolcall_en_demo.json")
    canonical = normalize_rows(glaive, source="data.jsonl")
    assert sum("tools" in ex for ex in canonical.examples) == 24  # of 40 rows: the others have no tools
    mapped = normalize_rows(renamed(glaive, {"tools": "functions"}), column_mapping={"tools": "functions"},
                            source="data.jsonl")
    assert same_reading(mapped, canonical)
    assert not any("tools" in ex for ex in normalize_rows(renamed(glaive, {"tools": "functions"})).examples)

    dpo = read_rows(SHARED / "dpo_en_demo.json")
    names = {"chosen": "preferred", "rejected": "dispreferred"}
    mapped = normalize_rows(renamed(dpo, names), column_mapping={"chosen": "preferred", "rejected": "dispreferred"},
                            source="data.jsonl")
    assert mapped.preference == "pairs" and same_reading(mapped, normalize_rows(dpo, source="data.jsonl"))

    pairs = [{"question": "Q1", "good": "Fine", "bad": "Wrong"}, {"question": "Q2", "good": "Yes", "bad": "No"}]
    mapped = normalize_rows(pairs, column_mapping={"prompt": "question", "chosen": "good", "rejected": "bad"},
                            source="data.jsonl")
    canonical = renamed(pairs, {"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert same_reading(mapped, normalize_rows(canonical, source="data.jsonl"))
    assert mapped.preference_rows[0]["rejected"] == [assistant("Wrong")]
    # `rejected` mapped beside an alpaca answer: the answer read is the chosen one, the other is never learned
    alpaca = [{"instruction": "Translate cat", "output": "chat", "worse": "chien"}]
    mapped = normalize_rows(alpaca, column_mapping={"rejected": "worse"}, source="data.jsonl")
    assert (mapped.preference, mapped.examples) == ("pairs", [{"messages": [user("Translate cat"), assistant("chat")]}])
    assert mapped.preference_rows[0]["rejected"] == [assistant("chien")] and mapped.notices == [PAIRS_NOTICE.format(1)]

    kto = [{"messages": [user("Q1"), assistant("Good")], "is_good": True},
           {"messages": [user("Q2"), assistant("Bad")], "is_good": False}]
    mapped = normalize_rows(kto, column_mapping={"label": "is_good"}, source="data.jsonl")
    assert mapped.preference == "kto" and mapped.examples == [{"messages": [user("Q1"), assistant("Good")]}]
    assert same_reading(mapped, normalize_rows(renamed(kto, {"is_good": "label"}), source="data.jsonl"))


def test_mapped_tools_and_preference_fields_keep_the_format_checks():
    rows = [{"q": "x", "a": "y", "fns": "[]", "verdict": "yes", "body": "text"}]
    with pytest.raises(DataError) as info:
        normalize_rows(rows, column_mapping={"prompt": "q", "completion": "a", "tools": "fns"})
    assert str(info.value) == ("column_mapping mixes fields of different formats (`prompt`, `completion`, `tools`); "
                               "map instruction/input/output, or prompt/completion, or messages, or text")
    with pytest.raises(DataError) as info:
        normalize_rows(rows, column_mapping={"text": "body", "label": "verdict"})
    assert str(info.value) == ("column_mapping mixes fields of different formats (`text`, `label`); map "
                               "instruction/input/output, or prompt/completion, or messages, or text")
    with pytest.raises(DataError) as info:
        normalize_rows(rows, fmt="alpaca", column_mapping={"tools": "fns"})
    assert str(info.value) == ("data_format is `alpaca` but column_mapping maps fields of another format (tools); "
                               "set data_format: auto, or map the fields of `alpaca`")
    with pytest.raises(DataError) as info:
        normalize_rows([{"text": "t", "verdict": True}], column_mapping={"label": "verdict"}, source="notes.jsonl")
    assert str(info.value) == ("column_mapping maps `label`, but notes.jsonl reads as plain text (`text`), which has "
                               "no answer to prefer or label; map its prompt and answer columns too (e.g. "
                               "prompt/completion), or remove `label`")
    with pytest.raises(DataError) as info:
        normalize_rows(rows, column_mapping={"prompt": "q", "completion": "a", "label": "verdict"}, source="qa.csv")
    assert str(info.value) == ("column_mapping maps `label` to the column `verdict`, but qa.csv has a string in its "
                               "first rows; a KTO label marks each row's answer true (good) or false (bad), so map "
                               "`label` to such a column or remove it")


def test_explicit_format_needs_its_columns():
    rows = [{"q": "x", "a": "y"}]
    with pytest.raises(DataError) as info:
        normalize_rows(rows, fmt="alpaca", source="qa.csv")
    assert str(info.value) == ("qa.csv: data_format `alpaca` needs a column `instruction`, but the columns found "
                               "are: q, a. Map yours with column_mapping, e.g. {instruction: q}")
    assert normalize_rows([{"text": "t", "prompt": "p", "completion": "c"}], fmt="text").examples == [{"text": "t"}]
    with pytest.raises(DataError, match=re.escape("`data_format` must be auto or one of alpaca, messages, sharegpt, "
                                                  "prompt_completion, text (got 'chat')")):
        normalize_rows(rows, fmt="chat")


# ============================================================================ bad rows

ALPACA_GOOD = {"instruction": "Q", "output": "A"}


@pytest.mark.parametrize("bad,expected", [
    ({"instruction": "Q", "output": ""}, "field `output` is empty; every row needs a non-empty answer"),
    ({"instruction": "Q", "output": "  \n"}, "field `output` is empty; every row needs a non-empty answer"),
    ({"instruction": "Q", "output": None}, "field `output` is empty; every row needs a non-empty answer"),
    ({"instruction": "Q"}, "field `output` is missing; every row needs a non-empty answer"),
    ({"output": "A"}, "field `instruction` is missing; every row needs a non-empty instruction"),
    ({"instruction": "2+2", "output": 4}, "field `output` must be text, got a number (4); write it as a JSON string"),
    ({"instruction": ["Q"], "output": "A"}, "field `instruction` must be text, got a list; write it as a JSON string"),
    ({"instruction": "Q", "input": {"x": 1}, "output": "A"},
     "field `input` must be text, got an object; write it as a JSON string (or leave it empty)"),
])
def test_bad_alpaca_rows_name_file_row_field_and_fix(bad, expected):
    assert normalize_error([ALPACA_GOOD, ALPACA_GOOD, bad]) == f"data.jsonl, row 3: {expected}{SKIP}"


def test_bad_row_error_carries_source_row_and_field():
    with pytest.raises(DataError) as info:
        normalize_rows([ALPACA_GOOD, {"instruction": "Q", "output": ""}], source="data.jsonl")
    assert (info.value.source, info.value.row, info.value.field) == ("data.jsonl", 2, "output")


def test_bad_prompt_completion_and_text_rows():
    assert normalize_error([{"prompt": "", "completion": "c"}]) == (
        f"data.jsonl, row 1: field `prompt` is empty; every row needs a non-empty prompt{SKIP}")
    assert normalize_error([{"text": "ok"}, {"text": 3.5}]) == (
        f"data.jsonl, row 2: field `text` must be text, got a number (3.5); write it as a JSON string{SKIP}")
    assert normalize_error([{"text": "ok"}, {"body": "x"}]) == (
        f"data.jsonl, row 2: field `text` is missing; every row needs non-empty text{SKIP}")


def test_a_row_that_is_not_an_object():
    assert normalize_error([ALPACA_GOOD, "just text"]) == (
        "data.jsonl, row 2: expected an object with named fields, got a string; write each row as an object such "
        f'as {{"instruction": ..., "output": ...}}{SKIP}')


ROLE_FIX = ("allowed roles: system, user, assistant, tool (also human, gpt, bot, chatgpt, model; function_call and "
            "observation for tool calls)")


@pytest.mark.parametrize("turns,expected", [
    ([user("Q"), {"role": "narrator", "content": "x"}, assistant("A")],
     f"turn 2 of `messages` has unknown role `narrator`; {ROLE_FIX}"),
    ([user("Q"), {"role": 7, "content": "x"}], f"turn 2 of `messages` has unknown role a number (7); {ROLE_FIX}"),
    ([user("Q1"), user("Q2"), assistant("A")],
     "turns 1 and 2 of `messages` are both user turns; user and assistant turns must alternate; merge them or "
     "remove one"),
    ([system("S"), user("Q"), assistant("A1"), assistant("A2")],
     "turns 3 and 4 of `messages` are both assistant turns; user and assistant turns must alternate; merge them or "
     "remove one"),
    ([user("Q")], "`messages` has no assistant turn; every conversation needs at least one assistant answer to "
                  "learn from"),
    ([system("S"), assistant("A"), user("Q"), assistant("A2")],
     "turn 2 of `messages` is an assistant turn, but a conversation must start with the user; add the user's "
     "message before it, or remove it"),
    ([system(" "), user("Q1"), user("Q2"), assistant("A")],  # a blank system turn is dropped, numbers stay
     "turns 2 and 3 of `messages` are both user turns; user and assistant turns must alternate; merge them or "
     "remove one"),
    ([user("Q"), assistant("A"), system("S")],
     "turn 3 of `messages` is a system turn, but only the first turn may be one; move the system prompt to the "
     "start of the conversation"),
    ([user("Q"), assistant("A"), user("Follow-up?")],
     "`messages` ends with a user turn with no answer; add the assistant's reply, or remove the last turn"),
    ([user("Q"), {"role": "assistant", "content": ["part"]}],
     'turn 2 of `messages` (assistant) has content part 1 that is a string, not an object; write each part as '
     '{"type": "text", "text": "..."}'),
    ([user("Q"), {"role": "assistant", "content": 5}],
     "turn 2 of `messages` (assistant) has content of type a number (5), not text; write the content as a string, "
     "or a list of text parts"),
    ([user("Q"), assistant(" ")], "turn 2 of `messages` (assistant) is empty; every user and assistant turn needs "
                                  "content"),
    ([user("Q"), "A"], 'turn 2 of `messages` is a string, not an object; write each turn as {"role": "user", '
                       '"content": "..."}'),
    ([user("Q"), {"speaker": "bot", "content": "A"}],
     'turn 2 of `messages` has no `role` (or `from`) key; write each turn as {"role": "user", "content": "..."}'),
    ([user("Q"), {"role": "assistant", "text": "A"}],
     'turn 2 of `messages` has no `content` (or `value`) key; write each turn as {"role": "user", "content": '
     '"..."}'),
    ([], "field `messages` has no turns; every conversation needs a user turn and an assistant answer"),
    ("Hello", 'field `messages` must be a list of turns, got a string; write it as [{"role": "user", "content": '
              '"..."}, ...]'),
])
def test_bad_conversations(turns, expected):
    good = {"messages": [user("Q"), assistant("A")]}
    assert normalize_error([good, good, {"messages": turns}], fmt="messages") == f"data.jsonl, row 3: {expected}{SKIP}"


def test_bad_sharegpt_turn_shows_sharegpt_shape():
    rows = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt"}]}]
    assert normalize_error(rows) == (
        "data.jsonl, row 1: turn 2 of `conversations` has no `content` (or `value`) key; write each turn as "
        f'{{"from": "human", "value": "..."}}{SKIP}')


def test_skip_invalid_drops_bad_rows_and_says_why():
    rows = [ALPACA_GOOD, {"instruction": "Q", "output": ""}, {"instruction": "Q2", "output": "A2"},
            {"output": "A"}, "oops"]
    data = normalize_rows(rows, skip_invalid=True, source="data.jsonl")
    assert data.examples == [{"messages": [user("Q"), assistant("A")]}, {"messages": [user("Q2"), assistant("A2")]}]
    assert data.skipped == [SkippedRow(2, "field `output` is empty"), SkippedRow(4, "field `instruction` is missing"),
                            SkippedRow(5, "expected an object with named fields, got a string")]


def test_skip_invalid_with_every_row_bad_still_raises():
    rows = [{"instruction": "Q", "output": ""}, {"instruction": "Q"}]
    assert normalize_error(rows, skip_invalid=True) == (
        "data.jsonl: all 2 rows are invalid, nothing is left to train on; the first problem: data.jsonl, row 1: "
        "field `output` is empty; every row needs a non-empty answer")


def test_no_rows():
    assert normalize_error([]) == "data.jsonl contains no rows; it needs at least one example"


# ---------------------------------------------------------------------------- preference (DPO) rows

def test_preference_row_uses_chosen_as_the_answer():
    rows = [{"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                               {"from": "human", "value": "Q2"}],
             "chosen": {"from": "gpt", "value": "Good"}, "rejected": {"from": "gpt", "value": "Bad"}},
            {"conversations": [{"from": "human", "value": "Q"}], "chosen": "Plain text answer", "rejected": "x"},
            {"conversations": [{"from": "human", "value": "Q"}], "chosen": [assistant("From a list")]}]
    assert normalize_rows(rows).examples == [
        {"messages": [user("Q1"), assistant("A1"), user("Q2"), assistant("Good")]},
        {"messages": [user("Q"), assistant("Plain text answer")]},
        {"messages": [user("Q"), assistant("From a list")]},
    ]


def test_preference_row_with_a_non_assistant_chosen_turn():
    rows = [{"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "human", "value": "?"}}]
    assert normalize_error(rows) == (
        'data.jsonl, row 1: field `chosen` is not an assistant reply; write it as {"from": "gpt", "value": "..."} '
        f"or as text{SKIP}")


PAIRS_NOTICE = ("data.jsonl holds preference pairs (`chosen` and `rejected` answers); supervised fine-tuning learns "
                "the {} chosen answers only, never the rejected ones")


def test_preference_pairs_are_detected_and_rejected_answers_never_trained():
    rows = [{"prompt": "Q1", "chosen": "Good", "rejected": "Bad"},
            {"prompt": "Q2", "chosen": "Fine", "rejected": {"role": "assistant", "content": "Wrong"}}]
    data = normalize_rows(rows, source="data.jsonl")
    assert (data.format, data.preference) == ("prompt_completion", "pairs")
    assert data.examples == [{"messages": [user("Q1"), assistant("Good")]},
                             {"messages": [user("Q2"), assistant("Fine")]}]
    assert data.notices == [PAIRS_NOTICE.format(2)]
    assert data.preference_rows == [
        {"prompt": [user("Q1")], "chosen": [assistant("Good")], "rejected": [assistant("Bad")]},
        {"prompt": [user("Q2")], "chosen": [assistant("Fine")], "rejected": [assistant("Wrong")]}]


def test_alpaca_preference_pairs():
    rows = [{"instruction": "Translate", "input": "cat", "chosen": "chat", "rejected": "chien"}]
    data = normalize_rows(rows)
    assert (data.format, data.preference) == ("alpaca", "pairs")
    assert data.examples == [{"messages": [user("Translate\n\ncat"), assistant("chat")]}]
    assert data.preference_rows[0]["rejected"] == [assistant("chien")]


def test_shared_dpo_pairs_are_kept_for_preference_training():
    rows = read_rows(SHARED / "dpo_en_demo.json")
    data = normalize_rows(rows, source="data.jsonl")
    assert (data.preference, len(data.preference_rows), data.notices) == ("pairs", 40, [PAIRS_NOTICE.format(40)])
    for row, pair, example in zip(rows, data.preference_rows, data.examples):
        assert pair["prompt"] + pair["chosen"] == example["messages"]
        assert pair["rejected"] == [assistant(row["rejected"]["value"])]
        assert row["rejected"]["value"] not in json.dumps(data.examples)


def test_a_bad_rejected_answer_names_the_row():
    rows = [{"prompt": "Q", "chosen": "Good", "rejected": "Bad"}, {"prompt": "Q", "chosen": "Good", "rejected": 3}]
    assert normalize_error(rows) == ('data.jsonl, row 2: field `rejected` is not an assistant reply; write it as '
                                     f'{{"from": "gpt", "value": "..."}} or as text{SKIP}')


KTO_NOTICE = ("data.jsonl holds KTO data (a true/false `label` per answer); supervised fine-tuning learns the {} "
              "answers labelled true and leaves out the {} rows labelled false, so their bad answers are never learned")


def test_kto_rows_labelled_false_are_left_out():
    rows = [{"messages": [user("Q1"), assistant("Good")], "label": True},
            {"messages": [user("Q2"), assistant("Bad")], "label": False},
            {"messages": [user("Q3"), assistant("Also good")], "label": "true"},  # CSV has no booleans
            {"messages": [user("Q4"), assistant("Also bad")], "label": "False"}]
    data = normalize_rows(rows, source="data.jsonl")
    assert (data.preference, data.label_false, data.skipped) == ("kto", 2, [])
    assert data.examples == [{"messages": [user("Q1"), assistant("Good")]},
                             {"messages": [user("Q3"), assistant("Also good")]}]
    assert data.notices == [KTO_NOTICE.format(2, 2)]
    assert [(r["prompt"], r["completion"], r["label"]) for r in data.preference_rows] == [
        ([user("Q1")], [assistant("Good")], True), ([user("Q2")], [assistant("Bad")], False),
        ([user("Q3")], [assistant("Also good")], True), ([user("Q4")], [assistant("Also bad")], False)]


@pytest.mark.parametrize("label,shown", [(1, "a number (1)"), ("yes", "a string"), (None, "null")])
def test_kto_label_must_be_a_boolean(label, shown):
    rows = [{"prompt": "Q", "completion": "A", "label": True}, {"prompt": "Q", "completion": "B", "label": label}]
    assert normalize_error(rows) == (f"data.jsonl, row 2: field `label` must be true or false, got {shown}; mark "
                                     f"each row's answer true (good) or false (bad){SKIP}")
    data = normalize_rows(rows, skip_invalid=True)
    assert data.skipped == [SkippedRow(2, f"field `label` must be true or false, got {shown}")]
    assert data.examples == [{"messages": [user("Q"), assistant("A")]}]


def test_kto_file_with_only_bad_answers():
    rows = [{"prompt": "Q", "completion": "Bad", "label": False}]
    assert normalize_error(rows) == ("data.jsonl: every usable row is labelled false (a bad answer), and supervised "
                                     "fine-tuning learns only answers labelled true; nothing is left to train on")


def test_a_label_column_that_is_not_boolean_is_no_kto_file():
    rows = [{"prompt": "Q", "completion": "A", "label": "positive"}]
    data = normalize_rows(rows)
    assert (data.preference, data.examples, data.notices) == (None, [{"messages": [user("Q"), assistant("A")]}], [])




# ---------------------------------------------------------------------------- tool calls

def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def calls(*tool_calls, content=""):
    return {"role": "assistant", "content": content, "tool_calls": list(tool_calls)}


def tool(text):
    return {"role": "tool", "content": text}


WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_shared_glaive_tool_calls():
    rows = read_rows(SHARED / "glaive_toolcall_en_demo.json")
    data = normalize_rows(rows, source="glaive_toolcall_en_demo.json")
    assert (data.format, len(data.examples), data.skipped, data.notices) == ("sharegpt", 40, [], [])
    first = data.examples[0]
    assert first["messages"][2:5] == [
        user("I have chicken, bell peppers, and rice."),
        calls(call("search_recipes", {"ingredients": ["chicken", "bell peppers", "rice"]})),
        tool(rows[0]["conversations"][4]["value"])]
    assert first["tools"] == [{"type": "function", "function": json.loads(rows[0]["tools"])[0]}]
    for row, example in zip(rows, data.examples):
        turns = row["conversations"]
        assert len(example["messages"]) == len(turns)
        for turn, message in zip(turns, example["messages"]):
            if turn["from"] == "function_call":
                wanted = json.loads(turn["value"])
                assert message == calls(call(wanted["name"], wanted["arguments"]))
            else:
                role = {"human": "user", "gpt": "assistant", "observation": "tool"}[turn["from"]]
                assert message == {"role": role, "content": turn["value"]}
        schemas = json.loads(row["tools"])
        assert example.get("tools") == ([{"type": "function", "function": s} for s in schemas] or None)
    assert sum(len(m.get("tool_calls", [])) for ex in data.examples for m in ex["messages"]) == 29
    assert sum("tools" not in ex for ex in data.examples) == 16  # rows whose `tools` is "[]"


def test_openai_style_tool_row():
    row = {"messages": [
        system("Use tools."), user("Weather in Paris and Rome?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "24 C"},
        {"role": "assistant", "content": "Paris 18 C, Rome 24 C.", "tool_calls": None}],
        "tools": [{"type": "function", "function": WEATHER}]}
    data = normalize_rows([row])
    assert data.format == "messages"
    assert data.examples == [{"messages": [
        system("Use tools."), user("Weather in Paris and Rome?"),
        calls({**call("get_weather", {"city": "Paris"}), "id": "call_1"},
              {**call("get_weather", {"city": "Rome"}), "id": "call_2"}),
        {**tool("18 C"), "tool_call_id": "call_1"}, {**tool("24 C"), "tool_call_id": "call_2"},
        assistant("Paris 18 C, Rome 24 C.")], "tools": [{"type": "function", "function": WEATHER}]}]


def test_sharegpt_parallel_calls_flat_calls_and_a_single_tool_object():
    row = {"conversations": [
        {"from": "human", "value": "Paris and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                                                       {"name": "get_weather", "arguments": {"city": "Rome"}}])},
        {"from": "observation", "value": '["18 C", "24 C"]'},
        {"from": "gpt", "value": "Warm in both."},
        {"from": "human", "value": "And now?"},
        {"from": "assistant", "content": "Checking.", "tool_calls": [{"name": "now", "arguments": ""}]},
        {"from": "tool", "value": "noon"}, {"from": "gpt", "value": "Noon."}],
        "tools": json.dumps(WEATHER)}
    assert normalize_rows([row]).examples == [{"messages": [
        user("Paris and Rome?"),
        calls(call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "Rome"})),
        tool('["18 C", "24 C"]'), assistant("Warm in both."), user("And now?"),
        calls(call("now", {}), content="Checking."), tool("noon"), assistant("Noon.")],
        "tools": [{"type": "function", "function": WEATHER}]}]


def test_a_conversation_may_end_with_a_tool_call():
    turns = [user("Weather?"), calls(call("get_weather", {"city": "Oslo"}))]
    assert normalize_rows([{"messages": turns}]).examples == [{"messages": turns}]


CALL = calls(call("get_weather", {"city": "Oslo"}))
RESULT_FIX = "put each tool result (a `tool` turn; `observation` in ShareGPT) right after the call it answers"
CALL_FIX = 'write it as {"type": "function", "function": {"name": "...", "arguments": {...}}}'
TOOLS_FIX = 'write it as a list of function schemas: [{"name": "...", "description": "...", "parameters": {...}}]'


@pytest.mark.parametrize("row,expected", [
    ({"messages": [user("Q"), tool("x"), assistant("A")]},
     f"turn 2 of `messages` is a tool result, but turn 1 before it calls no tool; {RESULT_FIX}"),
    ({"messages": [user("Q"), CALL, user("Q2"), assistant("A")]},
     f"turn 2 of `messages` calls a tool, but turn 3 after it is not the tool's result; {RESULT_FIX}"),
    ({"messages": [user("Q"), CALL, tool("sun"), user("Q2"), assistant("A")]},
     "turn 4 of `messages` is a user turn right after a tool result; after tool results the assistant answers; "
     "add its reply before the user's next message"),
    ({"messages": [user("Q"), CALL, tool("sun")]},
     "`messages` ends with a tool result with no answer; add the assistant's reply after it, or remove the last "
     "turn"),
    ({"messages": [tool("sun"), assistant("A")]},
     "turn 1 of `messages` is a tool result, but a conversation must start with the user; add the user's message "
     "before it, or remove it"),
    ({"messages": [user("Q"), CALL, tool(" "), assistant("A")]},
     "turn 3 of `messages` (tool) is empty; write what the tool returned"),
    ({"messages": [{"role": "user", "content": "Q", "tool_calls": CALL["tool_calls"]}, assistant("A")]},
     "turn 1 of `messages` (user) has `tool_calls`, but only assistant turns call tools; move the calls to the "
     "assistant turn that makes them"),
    ({"messages": [user("Q"), {"role": "assistant", "tool_calls": "get_weather"}]},
     "turn 2 of `messages` has `tool_calls` of type a string, not a list of calls; write them as "
     '[{"type": "function", "function": {"name": "...", "arguments": {...}}}]'),
    ({"messages": [user("Q"), {"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}]},
     f"turn 2 of `messages`, tool call 1 has no function `name`; {CALL_FIX}"),
    ({"messages": [user("Q"), calls(call("f", "{city: Oslo}"))]},
     "`arguments` of turn 2 of `messages`, tool call 1 (`f`) is not valid JSON (Expecting property name enclosed "
     'in double quotes at column 2); write them as a JSON object, e.g. {"city": "Paris"}'),
    ({"messages": [user("Q"), calls(call("f", [1, 2]))]},
     "turn 2 of `messages`, tool call 1 (`f`) has arguments of type a list, not an object; write them as a JSON "
     'object, e.g. {"city": "Paris"}'),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "get_weather(Oslo)"}]},
     "turn 2 of `conversations` (function_call) is not valid JSON (Expecting value at column 1); write it as "
     '{"name": "...", "arguments": {...}} (JSON text), or a list of them'),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "42"}]},
     "turn 2 of `conversations` (function_call) must be a call, got a number (42); write it as "
     '{"name": "...", "arguments": {...}} (JSON text), or a list of them'),
    ({"messages": [user("Q"), assistant("A")], "tools": "[{name: f}]"},
     f"field `tools` is not valid JSON (Expecting property name enclosed in double quotes at column 3); {TOOLS_FIX}"),
    ({"messages": [user("Q"), assistant("A")], "tools": 3},
     f"field `tools` must be a list of function schemas, got a number (3); {TOOLS_FIX}"),
    ({"messages": [user("Q"), assistant("A")], "tools": [WEATHER, {"description": "no name"}]},
     f"tool 2 in `tools` has no `name`; {TOOLS_FIX}"),
])
def test_bad_tool_rows(row, expected):
    good = ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
            if "conversations" in row else {"messages": [user("Q"), assistant("A")]})
    assert normalize_error([good, row]) == f"data.jsonl, row 2: {expected}{SKIP}"


def test_bad_tool_rows_are_skipped_and_reported():
    good = {"messages": [user("Q"), CALL, tool("sun"), assistant("Sunny.")], "tools": [WEATHER]}
    bad = {"messages": [user("Q"), CALL, assistant("Sunny.")], "tools": [WEATHER]}
    data = normalize_rows([good, bad], skip_invalid=True)
    assert len(data.examples) == 1 and data.examples[0]["tools"] == [{"type": "function", "function": WEATHER}]
    assert data.skipped == [SkippedRow(2, "turn 2 of `messages` calls a tool, but turn 3 after it is not the tool's "
                                          "result")]


# ---------------------------------------------------------------------------- content parts

def test_content_parts_are_joined():
    rows = [{"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Line one"}, {"type": "text", "text": "line two"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "LLaMA-Factory v1 style"}]}]},
        {"messages": [{"role": "user", "content": [{"text": "untyped"}]}, assistant("A")]}]
    assert normalize_rows(rows).examples == [
        {"messages": [system("Be brief."), user("Line one\nline two"), assistant("LLaMA-Factory v1 style")]},
        {"messages": [user("untyped"), assistant("A")]}]


@pytest.mark.parametrize("part,expected", [
    ({"type": "image", "image": "cat.png"}, "turn 1 of `messages` has an image part; this tool trains on text only; "
                                            "remove the part, or drop the row"),
    ({"type": "image_url", "image_url": {"url": "http://x/cat.png"}}, "turn 1 of `messages` has an image part; this "
                                                                      "tool trains on text only; remove the part, or "
                                                                      "drop the row"),
    ({"type": "input_audio", "input_audio": {}}, "turn 1 of `messages` has an audio part; this tool trains on text "
                                                 "only; remove the part, or drop the row"),
    ({"video": "clip.mp4"}, "turn 1 of `messages` has a video part; this tool trains on text only; remove the part, "
                            "or drop the row"),
    ({"type": "file", "file": {}}, 'turn 1 of `messages` (user) has content part 2 of type `file`; write each part '
                                   'as {"type": "text", "text": "..."}'),
    ({"type": "text", "text": 3}, 'turn 1 of `messages` (user) has content part 2 with no text; write each part as '
                                  '{"type": "text", "text": "..."}'),
])
def test_content_parts_that_are_not_text(part, expected):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]},
                        assistant("A")]}
    assert normalize_error([row]) == f"data.jsonl, row 1: {expected}{SKIP}"


def test_image_rows_are_skipped_and_reported():
    rows = [{"messages": [user("Q"), assistant("A")]},
            {"messages": [{"role": "user", "content": [{"type": "image"}]}, assistant("A")]}]
    assert normalize_rows(rows, skip_invalid=True).skipped == [SkippedRow(2, "turn 1 of `messages` has an image part")]


# ============================================================================ local files

ROWS = [{"instruction": "Say hi", "input": "", "output": "Hi!"}, {"instruction": "Add", "input": "1 2", "output": "3"}]


def test_json_array_wrapper_and_single_object(tmp_path):
    assert read_rows(write(tmp_path / "a.json", json.dumps(ROWS))) == ROWS
    assert read_rows(write(tmp_path / "b.json", json.dumps({"version": 2, "data": ROWS}))) == ROWS
    one = {"messages": [user("Q"), assistant("A")]}
    assert read_rows(write(tmp_path / "c.json", json.dumps(one))) == [one]


def test_json_file_holding_json_lines_is_read(tmp_path):
    assert read_rows(write(tmp_path / "lines.json", jsonl(ROWS))) == ROWS


def test_json_errors(tmp_path):
    path = write(tmp_path / "bad.json", '[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c"}\n]')
    assert read_error(path) == ("bad.json: invalid JSON at line 3, column 3: Expecting ',' delimiter; look for a "
                                "missing comma, quote or bracket there")
    assert read_error(write(tmp_path / "num.json", "42")) == (
        'num.json: expected a JSON array of rows like [{"instruction": ..., "output": ...}], got a number (42)')
    assert read_error(write(tmp_path / "mixed.json", json.dumps([ROWS[0], [1, 2]]))) == (
        'mixed.json, row 2: expected a JSON object with named fields such as {"instruction": ..., "output": ...}, '
        "got a list")
    assert read_error(write(tmp_path / "empty.json", "[]")) == (
        "empty.json contains no rows; it needs at least one example")


def test_jsonl_streams_lines_and_skips_blank_ones(tmp_path):
    path = write(tmp_path / "d.jsonl", "\n" + jsonl(ROWS[:1]) + "\n  \n" + jsonl(ROWS[1:]))
    assert read_rows(path) == ROWS


def test_jsonl_errors_name_the_line(tmp_path):
    path = write(tmp_path / "data.jsonl", jsonl(ROWS) + '{"instruction": "x", "output": }\n')
    assert read_error(path) == ("data.jsonl: invalid JSON on line 3: Expecting value (column 32); each line must "
                                "hold one complete JSON object" + SKIP)
    path = write(tmp_path / "list.jsonl", jsonl(ROWS) + '"just a string"\n')
    assert read_error(path) == ('list.jsonl, line 3: expected a JSON object with named fields such as '
                                '{"instruction": ..., "output": ...}, got a string' + SKIP)


def test_jsonl_holding_a_json_array_is_read(tmp_path):
    assert read_rows(write(tmp_path / "arr.jsonl", json.dumps(ROWS, indent=2))) == ROWS


def test_csv_with_quotes_newlines_bom_and_blank_lines(tmp_path):
    text = '\ufeffQuestion,Answer,\n"Hi, there","Line one\nLine two",\n\n"Say ""yes""",yes\n'
    path = write(tmp_path / "qa.csv", text)
    rows = read_rows(path)
    assert rows == [{"Question": "Hi, there", "Answer": "Line one\nLine two"},
                    {"Question": 'Say "yes"', "Answer": "yes"}]
    assert normalize_rows(rows).examples[0] == {"messages": [user("Hi, there"), assistant("Line one\nLine two")]}


def test_csv_errors(tmp_path):
    assert read_error(write(tmp_path / "wide.csv", "prompt,completion\na,b\nc,d,e\n")) == (
        "wide.csv, line 3: 3 values but the header has 2 columns; put values that contain commas in double quotes")
    assert read_error(write(tmp_path / "head.csv", "prompt,completion\n")) == (
        "head.csv has a header row but no data rows")
    assert read_error(write(tmp_path / "dup.csv", "text,text\na,b\n")) == (
        "dup.csv: the header row names the column `text` more than once; give every column a different name")


def test_csv_short_rows_get_empty_values(tmp_path):
    assert read_rows(write(tmp_path / "short.csv", "prompt,completion,system\na,b\n")) == [
        {"prompt": "a", "completion": "b", "system": ""}]


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_rows(path) == ROWS
    assert read_rows(path, max_rows=1) == ROWS[:1]
    assert read_error(write(tmp_path / "fake.parquet", "not parquet")).startswith(
        "fake.parquet: not a readable Parquet file (")


def test_txt_paragraphs(tmp_path):
    path = write(tmp_path / "book.txt", "First para\nstill first.\n\n\n  \nSecond.\r\n\r\nThird\n")
    assert read_rows(path) == [{"text": "First para\nstill first."}, {"text": "Second."}, {"text": "Third"}]
    assert read_rows(path, max_rows=2) == [{"text": "First para\nstill first."}, {"text": "Second."}]
    data = normalize_rows(read_rows(path), source="book.txt")
    assert (data.text_split, data.notices) == ("paragraphs", [
        "book.txt has blank lines, so each of its 3 paragraphs (text between blank lines) is one document"])


def test_txt_without_blank_lines_is_one_document_per_line(tmp_path):
    path = write(tmp_path / "corpus.txt", "\n\nDoc one.\nDoc two, longer.\r\nDoc three.\n\n\n")  # blank lines only
    assert read_rows(path) == [{"text": "Doc one."}, {"text": "Doc two, longer."}, {"text": "Doc three."}]
    assert read_rows(path, max_rows=2) == [{"text": "Doc one."}, {"text": "Doc two, longer."}]
    data = normalize_rows(read_rows(path), source="corpus.txt")
    assert (data.format, len(data.examples), data.text_split) == ("text", 3, "lines")
    assert data.notices == ["corpus.txt has no blank lines between its text, so each of its 3 lines is one document"]


def test_txt_max_rows_reads_on_until_the_split_is_known(tmp_path):
    path = write(tmp_path / "two.txt", "a\nb\n\nc\n")
    assert read_rows(path, max_rows=1) == [{"text": "a\nb"}]  # paragraphs: a blank line separates text
    assert normalize_rows(read_rows(path, max_rows=1)).text_split == "paragraphs"


def test_txt_corpus_splits_into_train_validation_and_test(tmp_path):
    path = write(tmp_path / "corpus.txt", "".join(f"Document number {i}.\n" for i in range(1, 101)))
    data = load_examples(RunConfig(dataset=str(path), eval_fraction=0.1, test_fraction=0.1))
    assert (len(data.splits.train), len(data.splits.validation), len(data.splits.test)) == (80, 10, 10)
    assert data.notices == ["corpus.txt has no blank lines between its text, so each of its 100 lines is one document"]


@pytest.mark.parametrize("name,body", [("a.json", json.dumps(ROWS)), ("a.jsonl", jsonl(ROWS)),
                                       ("a.csv", "instruction,input,output\nSay hi,,Hi!\nAdd,1 2,3\n")])
def test_byte_order_mark_is_tolerated(tmp_path, name, body):
    assert read_rows(write(tmp_path / name, "\ufeff" + body)) == ROWS


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.json", "bad.csv", "bad.txt"])
def test_invalid_utf8_names_byte_and_line(tmp_path, name):
    body = b'{"text": "fine"}\n{"text": "caf\xe9"}\n' if "json" in name else b"text\nfine\ncaf\xe9\n"
    offset = body.index(b"\xe9")
    line = body.count(b"\n", 0, offset) + 1
    assert read_error(write(tmp_path / name, body)) == (
        f"{name}: invalid UTF-8 at byte {offset} (line {line}); re-save the file as UTF-8 (it may be in a legacy "
        "encoding such as Windows-1252 or Latin-1)")


@pytest.mark.parametrize("name", ["b.jsonl", "b.json"])
def test_invalid_utf8_offset_counts_the_bom(tmp_path, name):
    assert read_error(write(tmp_path / name, b'\xef\xbb\xbf[{"text": "\xff"}]\n')).startswith(
        f"{name}: invalid UTF-8 at byte 14 (line 1);")


def test_utf16_file(tmp_path):
    path = write(tmp_path / "w.csv", "text\nhello\n".encode("utf-16"))
    assert read_error(path) == "w.csv is UTF-16 encoded; re-save it as UTF-8"


def test_empty_and_blank_files(tmp_path):
    assert read_error(write(tmp_path / "e.jsonl", "")) == "e.jsonl is empty (0 bytes); it needs at least one row"
    assert read_error(write(tmp_path / "w.jsonl", "\n \n")) == "w.jsonl contains no rows; it needs at least one example"
    assert read_error(write(tmp_path / "w.txt", "\n\n")) == "w.txt contains no rows; it needs at least one example"


def test_unsupported_file_types_and_folders(tmp_path):
    assert read_error(write(tmp_path / "sheet.xlsx", "x")) == (
        "sheet.xlsx: unsupported file type `.xlsx`; use one of .json, .jsonl, .csv, .parquet, .txt")
    assert read_error(write(tmp_path / "README", "x")) == (
        "README: unsupported file type with no extension; use one of .json, .jsonl, .csv, .parquet, .txt")
    assert read_error(tmp_path) == f"{tmp_path} is a folder; give one file (.json, .jsonl, .csv, .parquet, .txt)"
    assert read_rows(write(tmp_path / "UPPER.JSONL", jsonl(ROWS))) == ROWS


def test_max_bytes_rejects_before_reading(tmp_path):
    path = write(tmp_path / "big.jsonl", jsonl(ROWS * 50))
    size = path.stat().st_size
    assert read_error(path, max_bytes=1000) == (
        f"big.jsonl is too large ({size / 1000:.1f} KB; the limit here is 1.0 KB); use a smaller file, or load "
        "it from the command line")
    assert len(read_rows(path, max_bytes=size)) == 100


@pytest.mark.parametrize("name,body", [("m.jsonl", jsonl(ROWS * 3)), ("m.json", json.dumps(ROWS * 3)),
                                       ("m.csv", "text\na\nb\nc\nd\n")])
def test_max_rows(tmp_path, name, body):
    assert len(read_rows(write(tmp_path / name, body), max_rows=2)) == 2


def test_max_rows_stops_reading_jsonl_before_a_later_bad_line(tmp_path):
    path = write(tmp_path / "x.jsonl", jsonl(ROWS) + "not json\n")
    assert read_rows(path, max_rows=2) == ROWS


def test_missing_local_looking_paths_are_file_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["data/train.jsonl", "./mydata", "train.csv", "a/b/c", "my data"]:
        assert read_error(name) == f"file not found: {name} (relative to {tmp_path})"
    missing = tmp_path / "nope.json"
    assert read_error(str(missing)) == f"file not found: {missing}"
    assert read_error(missing) == f"file not found: {missing}"


def test_existing_file_wins_over_hub_id_lookalike(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    write(tmp_path / "org" / "name", jsonl(ROWS))
    assert read_error("org/name") == ("name: unsupported file type with no extension; use one of .json, .jsonl, "
                                      ".csv, .parquet, .txt")


def test_display_name():
    assert display_name("/some/where/data.jsonl") == "data.jsonl"
    assert display_name("tatsu-lab/alpaca") == "tatsu-lab/alpaca"


# ---------------------------------------------------------------------------- pasted rows

def test_rows_from_text_accepts_array_lines_wrapper_and_one_object():
    assert rows_from_text(json.dumps(ROWS)) == ROWS
    assert rows_from_text("\n" + jsonl(ROWS) + "\n") == ROWS
    assert rows_from_text(json.dumps({"rows": ROWS})) == ROWS
    assert rows_from_text(json.dumps(ROWS[0], indent=2)) == ROWS[:1]


def test_rows_from_text_errors():
    with pytest.raises(DataError) as info:
        rows_from_text("  \n")
    assert str(info.value) == "pasted rows: nothing to read; paste a JSON array of rows or one JSON object per line"
    with pytest.raises(DataError) as info:
        rows_from_text("question,answer\nhi,hello")
    assert str(info.value) == ("pasted rows: expected a JSON array of rows (starting with `[`) or one JSON object "
                               "per line (starting with `{`), got text starting with 'question,answer\\nhi,h'")
    with pytest.raises(DataError) as info:
        rows_from_text('{"text": "a"}\n{"text": "b"')
    assert str(info.value) == ("pasted rows: invalid JSON on line 2: Expecting ',' delimiter (column 13); each line "
                               "must hold one complete JSON object" + SKIP)
    with pytest.raises(DataError) as info:
        rows_from_text('[{"text": "a"}\n {"text": "b"}]')
    assert str(info.value) == ("pasted rows: invalid JSON at line 2, column 2: Expecting ',' delimiter; look for a "
                               "missing comma, quote or bracket there")
    with pytest.raises(DataError, match=re.escape("pasted rows contains no rows")):
        rows_from_text("[]")


# ---------------------------------------------------------------------------- Hub errors (no network)

def test_hub_errors_become_messages_for_people():
    from datasets.exceptions import DatasetNotFoundError

    def message(error, config=None, split="train"):
        return str(hub_load_error(error, "org/ds", config, split))

    assert message(ConnectionError("Couldn't reach 'org/ds' on the Hub (LocalEntryNotFoundError)")) == (
        "could not reach the Hugging Face Hub to load dataset `org/ds`; check your connection or use a local file")
    assert message(DatasetNotFoundError("Dataset 'org/ds' doesn't exist on the Hub or cannot be accessed.")) == (
        "dataset `org/ds` was not found on the Hugging Face Hub, or it is private or gated (Dataset 'org/ds' doesn't "
        "exist on the Hub or cannot be accessed.); check the id, log in with a token that can read it, or use a "
        "local file")
    assert message(ValueError("Unknown split \"dev\". Should be one of ['train', 'test']."), split="dev") == (
        "dataset `org/ds` has no split `dev` (available: ['train', 'test']); set `dataset_split` to one of its splits")
    assert message(ValueError("BuilderConfig 'xx' not found. Available: ['en', 'fr']"), config="xx") == (
        "dataset `org/ds` has no configuration `xx` (available: ['en', 'fr']); set `dataset_config` to one of its "
        "configurations")
    assert message(ValueError("Config name is missing.\nPlease pick one among the available configs: ['en', 'fr']"
                              "\nExample of usage:")) == (
        "dataset `org/ds` has several configurations (available: ['en', 'fr']); set `dataset_config` to one of them")
    assert message(RuntimeError("Dataset scripts are no longer supported")) == (
        "could not load dataset `org/ds` from the Hugging Face Hub: RuntimeError: Dataset scripts are no longer "
        "supported")


def test_hub_id_offline_goes_through_load_dataset(tmp_path):
    """Real `datasets.load_dataset` in offline mode (it never touches the network), in a fresh process."""
    code = "from finetune.data import read_rows\nread_rows('someorg/no-such-dataset')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert ("finetune.errors.DataError: could not reach the Hugging Face Hub to load dataset "
            "`someorg/no-such-dataset`; check your connection or use a local file") in done.stderr


def test_unreachable_hub_gives_the_offline_message_at_once(tmp_path):
    """No HF_HUB_OFFLINE, and a Hub endpoint that refuses connections: one quick probe switches the load to
    offline mode, so the message comes in seconds instead of after the clients' ~25 s of retries."""
    code = "from finetune.data import read_rows\nread_rows('someorg/no-such-dataset')"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))  # port 9 (discard): refused at once
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert ("finetune.errors.DataError: could not reach the Hugging Face Hub to load dataset "
            "`someorg/no-such-dataset`; check your connection or use a local file") in done.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s"


# ============================================================================ splits

def _examples(n):
    return [{"messages": [user(f"q{i}"), assistant(f"a{i}")]} for i in range(n)]


def test_split_is_deterministic_and_removes_duplicates():
    examples = _examples(20)
    with_dupes = examples + [examples[3], examples[7], examples[3]]
    a = split_examples(with_dupes, eval_fraction=0.1, test_fraction=0.2, seed=1)
    b = split_examples(with_dupes, eval_fraction=0.1, test_fraction=0.2, seed=1)
    c = split_examples(with_dupes, eval_fraction=0.1, test_fraction=0.2, seed=2)
    assert a == b
    assert a != c
    assert a.duplicates_removed == 3
    assert (len(a.train), len(a.validation), len(a.test)) == (14, 2, 4)
    everything = a.train + a.validation + a.test
    assert sorted(map(json.dumps, everything)) == sorted(map(json.dumps, examples))


def test_split_keeps_the_first_of_equal_examples_regardless_of_key_order():
    first = {"messages": [user("q"), assistant("a")]}
    same = {"messages": [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}]}
    splits = split_examples([first, same], eval_fraction=0, test_fraction=0, seed=0)
    assert splits == Splits(train=[first], validation=[], test=[], duplicates_removed=1)


@pytest.mark.parametrize("n,eval_fraction,test_fraction,sizes", [
    (10, 0.1, 0.1, (8, 1, 1)),
    (25, 0.1, 0.1, (21, 2, 2)),  # round(2.5) == 2
    (3, 0.1, 0.1, (1, 1, 1)),    # a non-zero fraction gets one row once n >= 3
    (3, 0.5, 0.5, (1, 1, 1)),    # train keeps at least one row
    (4, 0.5, 0.5, (1, 1, 2)),  # a tie shrinks validation first: the test split is the comparison
    (2, 0.1, 0.1, (2, 0, 0)),
    (1, 0.5, 0.5, (1, 0, 0)),
    (10, 0.0, 0.2, (8, 0, 2)),
])
def test_split_sizes(n, eval_fraction, test_fraction, sizes):
    splits = split_examples(_examples(n), eval_fraction=eval_fraction, test_fraction=test_fraction, seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == sizes


def test_split_of_nothing():
    with pytest.raises(DataError, match=re.escape("no examples to split; the dataset needs at least one row")):
        split_examples([], eval_fraction=0.1, test_fraction=0.1, seed=0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), ev=st.floats(0, 0.5), te=st.floats(0, 0.5), seed=st.integers(0, 10**6))
def test_split_is_a_partition_with_a_non_empty_train(n, ev, te, seed):
    examples = _examples(n)
    splits = split_examples(examples, eval_fraction=ev, test_fraction=te, seed=seed)
    assert len(splits.train) >= 1
    assert sorted(map(json.dumps, splits.train + splits.validation + splits.test)) == sorted(map(json.dumps, examples))


# ============================================================================ stats

def test_length_stats():
    assert length_stats([5, 1, 3, 10, 7], max_seq_length=6) == {
        "rows": 5, "min": 1, "median": 5.0, "p95": 10, "max": 10, "truncated": 2}
    assert length_stats(list(range(1, 21)), max_seq_length=100) == {
        "rows": 20, "min": 1, "median": 10.5, "p95": 19, "max": 20, "truncated": 0}
    assert length_stats([], max_seq_length=8) == {
        "rows": 0, "min": None, "median": None, "p95": None, "max": None, "truncated": 0}


def test_split_stats_with_a_whitespace_length():
    def words(example):
        return sum(len(m["content"].split()) for m in example["messages"])

    splits = Splits(train=[{"messages": [user("one two"), assistant("three")]},
                           {"messages": [user("a b c d"), assistant("e f g h i")]}],
                    validation=[{"messages": [user("x"), assistant("y")]}], test=[])
    assert split_stats(splits, words, max_seq_length=5) == {
        "train": {"rows": 2, "min": 3, "median": 6.0, "p95": 9, "max": 9, "truncated": 1},
        "validation": {"rows": 1, "min": 2, "median": 2.0, "p95": 2, "max": 2, "truncated": 0},
        "test": {"rows": 0, "min": None, "median": None, "p95": None, "max": None, "truncated": 0},
    }


# ============================================================================ load_examples, split files

def test_load_examples_from_a_file(tmp_path):
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(30)] + [{"instruction": "bad", "output": ""}]
    path = write(tmp_path / "data.jsonl", jsonl(rows))
    config = RunConfig(dataset=str(path), skip_invalid=True, system_prompt="Be brief.", eval_fraction=0.1,
                       test_fraction=0.2, seed=7)
    data = load_examples(config)
    assert (data.format, data.source, data.rows_read) == ("alpaca", "data.jsonl", 31)
    assert data.skipped == [SkippedRow(31, "field `output` is empty")]
    assert (len(data.splits.train), len(data.splits.validation), len(data.splits.test)) == (21, 3, 6)
    assert all(ex["messages"][0] == system("Be brief.") for ex in data.splits.train)
    assert data.splits == load_examples(config).splits


def test_load_examples_max_rows_and_in_memory_rows(tmp_path):
    rows = [{"q": f"Q{i}", "a": f"A{i}"} for i in range(10)]
    config = RunConfig(max_rows=4, column_mapping={"prompt": "q", "completion": "a"}, eval_fraction=0,
                       test_fraction=0)
    data = load_examples(config, rows)
    assert (data.format, data.source, data.rows_read) == ("prompt_completion", "rows", 4)
    assert sorted(ex["messages"][0]["content"] for ex in data.splits.train) == ["Q0", "Q1", "Q2", "Q3"]


def test_load_examples_errors_name_the_file(tmp_path):
    path = write(tmp_path / "data.jsonl", jsonl([ALPACA_GOOD, ALPACA_GOOD, {"instruction": "x", "output": ""}]))
    with pytest.raises(DataError) as info:
        load_examples(RunConfig(dataset=str(path)))
    assert str(info.value) == ("data.jsonl, row 3: field `output` is empty; every row needs a non-empty answer"
                               f"{SKIP}")
    with pytest.raises(DataError) as info:
        load_examples(RunConfig(dataset="  "))
    assert str(info.value) == "`dataset` is not set; give a file path, a Hub dataset id, or rows"


def test_split_files_round_trip(tmp_path):
    splits = Splits(train=[{"messages": [user("héllo"), assistant("wörld")]}, {"text": "plain"}], validation=[],
                    test=[{"text": "t"}])
    run = RunFolder(tmp_path / "run")
    paths = write_split_files(splits, run)
    assert paths == {split: run.split_file(split) for split in ("train", "validation", "test")}
    assert paths["validation"] == tmp_path / "run" / "data" / "validation.jsonl"
    assert "héllo" in paths["train"].read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert {k: read_jsonl_examples(p) for k, p in paths.items()} == splits.as_dict()


def test_read_jsonl_examples_rejects_raw_rows(tmp_path):
    with pytest.raises(DataError) as info:
        read_jsonl_examples(write(tmp_path / "train.jsonl", jsonl([{"text": "ok"}, ALPACA_GOOD])))
    assert str(info.value) == ('train.jsonl, row 2: not a normalised example; expected {"messages": [...]} or '
                               '{"text": "..."}')
    with pytest.raises(DataError, match=re.escape(f"file not found: {tmp_path / 'none.jsonl'}")):
        read_jsonl_examples(tmp_path / "none.jsonl")


# ============================================================================ real datasets and our examples

def test_shared_alpaca_demo():
    data = normalize_rows(read_rows(SHARED / "alpaca_en_demo.json"), source="alpaca_en_demo.json")
    assert (data.format, len(data.examples), data.skipped) == ("alpaca", 60, [])
    first = data.examples[0]["messages"]
    assert first[0] == user("Describe a process of making crepes.")
    assert first[1]["role"] == "assistant" and first[1]["content"].startswith("Making crepes is an easy")
    assert all(len(ex["messages"]) == 2 for ex in data.examples)


def test_shared_identity():
    data = normalize_rows(read_rows(SHARED / "identity.json"))
    assert (data.format, len(data.examples)) == ("alpaca", 91)
    assert data.examples[0] == {"messages": [user("hi"), assistant(
        "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?")]}


def test_shared_c4_text():
    data = normalize_rows(read_rows(SHARED / "c4_demo.jsonl"))
    assert (data.format, len(data.examples)) == ("text", 40)
    assert data.examples[0]["text"].startswith("Don’t think you need all the bells and whistles?")


def test_shared_dpo_conversations_take_the_chosen_reply():
    rows = read_rows(SHARED / "dpo_en_demo.json")
    data = normalize_rows(rows)
    assert (data.format, len(data.examples), data.skipped) == ("sharegpt", 40, [])
    for row, example in zip(rows, data.examples):
        messages = example["messages"]
        assert messages[-1] == assistant(row["chosen"]["value"])
        assert len(messages) == len(row["conversations"]) + 1
        assert (messages[0]["role"] == "system") == (row["conversations"][0]["from"] == "system")


def test_example_datasets_load_and_are_small_and_distinct():
    qa = normalize_rows(read_rows(EXAMPLES / "python_qa.jsonl"))
    headlines = normalize_rows(read_rows(EXAMPLES / "zenx_headlines.json"))
    assert (qa.format, headlines.format) == ("messages", "alpaca")
    assert len(qa.examples) >= 35 and len(headlines.examples) >= 35
    assert any(len(ex["messages"]) > 3 for ex in qa.examples)  # some multi-turn rows
    assert any(ex["messages"][0]["role"] == "system" for ex in qa.examples)
    for data in (qa, headlines):
        assert split_examples(data.examples, eval_fraction=0.1, test_fraction=0.1, seed=0).duplicates_removed == 0
    assert all("ZenX" in ex["messages"][0]["content"] for ex in headlines.examples)
    for path in EXAMPLES.iterdir():
        assert path.stat().st_size < 30_000, path


# ---------------------------------------------------------------------------- reasoning

@pytest.mark.parametrize("reply", [
    {"role": "assistant", "content": "4", "reasoning_content": "Add."},
    {"role": "assistant", "content": "4", "reasoning": "Add."},
    {"from": "gpt", "value": "4", "thinking": "Add."},
    {"role": "assistant", "content": [{"type": "reasoning", "text": "Add."}, {"type": "text", "text": "4"}]},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "Add."}, {"type": "text", "text": "4"}]},
])
def test_reasoning_in_each_shape_becomes_reasoning_content(reply):
    column = "conversations" if "from" in reply else "messages"
    question = {"from": "human", "value": "2+2?"} if "from" in reply else user("2+2?")
    data = normalize_rows([{column: [question, reply]}])
    assert data.examples == [{"messages": [user("2+2?"), {**assistant("4"), "reasoning_content": "Add."}]}]


def test_reasoning_with_tool_calls_and_blank_reasoning():
    rows = [{"messages": [user("Q"), {**CALL, "reasoning_content": "Need the weather."}, tool("sun"),
                          {**assistant("Sunny."), "reasoning": "  "}]}]
    messages = normalize_rows(rows).examples[0]["messages"]
    assert messages[1]["reasoning_content"] == "Need the weather." and messages[1]["tool_calls"] == CALL["tool_calls"]
    assert messages[3] == assistant("Sunny.")  # blank reasoning is no reasoning


@pytest.mark.parametrize("turn, expected", [
    ({"role": "user", "content": "Q", "reasoning_content": "Hmm."},
     "turn 1 of `messages` (user) has reasoning, but only assistant turns reason; move the reasoning to the "
     "assistant's reply, or remove it"),
    ({"role": "assistant", "content": "A", "thinking": ["Hmm."]},
     "turn 2 of `messages` (assistant) has `thinking` of type a list, not text; write the reasoning as a string"),
    ({"role": "assistant", "content": [{"type": "reasoning", "summary": ["Hmm."]}, {"type": "text", "text": "A"}]},
     'turn 2 of `messages` (assistant) has reasoning part 1 with no text; write it as {"type": "reasoning", '
     '"text": "..."}'),
])
def test_bad_reasoning_is_named_by_row_turn_and_field_and_skipped_with_skip_invalid(turn, expected):
    conversation = [turn, assistant("A")] if turn["role"] == "user" else [user("Q"), turn]
    good = {"messages": [user("Q"), assistant("A")]}
    assert normalize_error([good, {"messages": conversation}]) == f"data.jsonl, row 2: {expected}{SKIP}"
    data = normalize_rows([good, {"messages": conversation}], skip_invalid=True)
    assert data.examples == [good] and data.skipped == [SkippedRow(2, expected.split("; ")[0])]
