"""Hostile and malformed data: property-based tests drive the loaders with random JSON, JSON lines, CSV and text
(wrong types, huge fields, deep nesting, invalid UTF-8, byte-order marks, empty files, mixed formats).

The property: `read_rows`, `rows_from_text`, `normalize_rows` and `load_examples` either return rows/examples or
raise `DataError` with a message; never another exception, never a hang (hypothesis' per-example deadline).
Plus: a file over the size limit is refused before it is read, and JSON lines are streamed.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.config import RunConfig
from finetune.data import load_examples, normalize_rows, read_rows, rows_from_text
from finetune.errors import DataError

# Per-example deadline: a loader that hangs (or goes quadratic) on some input fails the property.
FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow], derandomize=True)
EXTENSIONS = (".json", ".jsonl", ".csv", ".txt")

# ----------------------------------------------------------------------------- strategies

# Keys our formats look at, so that random rows often reach the deep parts of detection and normalisation.
KEYS = st.sampled_from(["instruction", "input", "output", "prompt", "completion", "messages", "conversations",
                        "text", "role", "content", "from", "value", "system", "chosen", "question", "answer",
                        "rejected", "label", "tools", "tool_calls", "type", "function", "name", "arguments"])
# Text including control characters, emoji and lone surrogates (which can't be encoded as UTF-8).
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=30) | st.sampled_from(
    ["", " ", "\ufeff", "\x00", "\ud800", "user", "assistant", "gpt", "human", "system", "x" * 5000])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(KEYS | TEXT, inner, max_size=4), max_leaves=25)
ROWS = st.lists(st.dictionaries(KEYS, JSON_VALUES, max_size=5), min_size=0, max_size=6)

# Conversations in the newer shapes: tool calls (OpenAI and ShareGPT), content parts, preference columns. Rows are
# built valid, then about one value in 25 is swapped for a random one, so that most rows get deep into
# normalisation and many survive it.


def _mostly(good, bad):
    return st.integers(0, 24).flatmap(lambda i: bad if i == 0 else good)


_WORDS = _mostly(st.sampled_from(["Hi", "Weather in Oslo?", "Sunny, 18 C.", "é 🙂"]), TEXT)
_PART = _mostly(st.builds(lambda key, text: {"type": "text", key: text}, st.sampled_from(["text", "value"]), _WORDS),
                st.fixed_dictionaries({"type": st.sampled_from(["image", "image_url", "audio", "video", "file"])
                                       | JSON_VALUES}, optional={"text": JSON_VALUES}) | JSON_VALUES)
_CONTENT = _mostly(_WORDS | st.lists(_PART, min_size=1, max_size=2), JSON_VALUES)
_ARGUMENTS = st.dictionaries(st.sampled_from(["city", "days"]), _WORDS | st.integers(), max_size=2)
_ARGUMENTS = _mostly(_ARGUMENTS | _ARGUMENTS.map(json.dumps), JSON_VALUES)
_NAME = _mostly(st.sampled_from(["get_weather", "now"]), TEXT | JSON_VALUES)
_FUNCTION = st.builds(lambda name, arguments: {"name": name, "arguments": arguments}, _NAME, _ARGUMENTS)
_CALLS = _mostly(st.lists(_FUNCTION.map(lambda f: {"type": "function", "function": f}) | _FUNCTION, min_size=1,
                          max_size=2), JSON_VALUES)


def _turn(role):
    return st.builds(lambda content: {"role": role, "content": content}, _CONTENT)


_CALL_TURN = st.builds(lambda calls, content: {"role": "assistant", "content": content, "tool_calls": calls},
                       _CALLS, st.none() | _WORDS)
_EXCHANGE = (st.tuples(_turn("user"), _turn("assistant"))
             | st.tuples(_turn("user"), _CALL_TURN, _turn("tool"), _turn("assistant")))
_SHAREGPT = {"user": "human", "assistant": "gpt", "tool": "observation"}


def _as_sharegpt(message):
    if "tool_calls" in message:
        calls = message["tool_calls"]
        return {"from": "function_call", "value": json.dumps(calls) if isinstance(calls, list) else calls}
    return {"from": _SHAREGPT[message["role"]], "value": message["content"]}


_MESSAGES = _mostly(st.lists(_EXCHANGE, min_size=1, max_size=3).map(lambda xs: [m for x in xs for m in x]),
                    st.lists(_turn("user") | _turn("assistant") | _turn("tool") | _CALL_TURN | JSON_VALUES,
                             max_size=4))
_TOOLS = _mostly(st.lists(_FUNCTION.map(lambda f: {"name": f["name"], "parameters": {}}), max_size=2), JSON_VALUES)
_TOOLS = _TOOLS | _TOOLS.map(json.dumps)


def _shaped_row(kind, sharegpt):
    """One row of a file of `kind` (plain, kto or pairs), in OpenAI or ShareGPT turns."""
    extras = {"tools": _TOOLS}
    if kind == "kto":
        extras["label"] = _mostly(st.booleans(), JSON_VALUES)
    messages = _MESSAGES
    if kind == "pairs":  # the conversation ends with the user; chosen and rejected are the answers
        messages = st.builds(lambda ms, u: ms + [u], _MESSAGES, _turn("user"))
        extras["chosen"] = _mostly(_WORDS | _turn("assistant"), JSON_VALUES)
        extras["rejected"] = _mostly(_WORDS | _turn("assistant"), JSON_VALUES)
    column = "messages"
    if sharegpt:
        column = "conversations"
        messages = messages.map(lambda ms: [_as_sharegpt(m) if isinstance(m, dict) else m for m in ms])
    return st.fixed_dictionaries({column: messages, **extras})


SHAPED_ROWS = st.tuples(st.sampled_from(["plain", "kto", "pairs"]), st.booleans()).flatmap(
    lambda kind_style: st.lists(_shaped_row(*kind_style), min_size=1, max_size=5))
ROLES = {"system", "user", "assistant", "tool"}


def _deep(depth: int) -> str:
    """JSON nested `depth` levels deep: Python's parser recurses once per level."""
    return "[" * depth + "]" * depth


# Whole documents as bytes: valid JSON of any shape, JSON lines, CSV-ish and plain text, plus hostile extras.
HOSTILE = st.sampled_from([
    b"", b"\n\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf{\"text\": \"hi\"}\n", b"\xff\xfe{\x00}\x00", b"\xc3\x28\n",
    b"{\"text\": \"a\"}\n\xff\xfe\n", _deep(5_000).encode(), b'{"text": ' + _deep(3_000).encode() + b"}",
    b"1" * 10_000, b'{"n": ' + b"9" * 10_000 + b"}", b"NaN", b'{"text": "\\ud800"}', b"[1, 2, 3]", b'"just text"',
    b"a,b\n\"unclosed\n", b"a,a\n1,2\n", b"x\x00y,z\n1,2\n", b"instruction,output\n" + b"q," * 1000 + b"\n",
    b'{"messages": [{"role": "user", "content": "hi"}]}\n[1]\n', b"[{\"text\": 1}]" + b" " * 10, b"{}\n{}\n",
])
DOCUMENTS = (HOSTILE
             | JSON_VALUES.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))
             | ROWS.map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode("utf-8", "surrogatepass"))
             | st.binary(max_size=300)
             | st.lists(st.lists(TEXT, max_size=4), max_size=5).map(
                 lambda table: "\n".join(",".join(cells) for cells in table).encode("utf-8", "surrogatepass")))


# ----------------------------------------------------------------------------- the properties

def _only_data_errors(call):
    """Run `call`; return its result, or None when it raised DataError (which must carry a message)."""
    try:
        return call()
    except DataError as e:
        assert str(e).strip(), "a DataError must say what is wrong"
        return None


@FUZZ
@given(data=DOCUMENTS, ext=st.sampled_from(EXTENSIONS), bom=st.booleans(), max_rows=st.none() | st.integers(1, 3))
def test_read_rows_returns_rows_or_a_data_error(tmp_path_factory, data, ext, bom, max_rows):
    path = tmp_path_factory.mktemp("fuzz") / f"data{ext}"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    rows = _only_data_errors(lambda: read_rows(path, max_rows=max_rows, max_bytes=10_000_000))
    if rows is not None:
        assert rows and all(isinstance(r, dict) for r in rows)
        assert max_rows is None or len(rows) <= max_rows


@FUZZ
@given(text=DOCUMENTS.map(lambda b: b.decode("utf-8", "replace")) | TEXT)
def test_rows_from_text_returns_rows_or_a_data_error(text):
    rows = _only_data_errors(lambda: rows_from_text(text))
    if rows is not None:
        assert rows and all(isinstance(r, dict) for r in rows)


@FUZZ
@given(rows=ROWS | st.lists(JSON_VALUES, max_size=4), fmt=st.sampled_from(["auto", "alpaca", "messages", "sharegpt",
                                                                            "prompt_completion", "text"]),
       skip_invalid=st.booleans())
def test_normalize_rows_returns_examples_or_a_data_error(rows, fmt, skip_invalid):
    result = _only_data_errors(lambda: normalize_rows(rows, fmt=fmt, skip_invalid=skip_invalid))
    if result is not None:
        for example in result.examples:
            # every example must survive being written as UTF-8 JSON (what the run folder's data/ holds)
            json.dumps(example, ensure_ascii=False).encode("utf-8")
            assert set(example) in ({"messages"}, {"messages", "tools"}, {"text"})


@FUZZ
@given(rows=SHAPED_ROWS, skip_invalid=st.booleans())
def test_tool_calls_content_parts_and_preference_rows_normalise_or_a_data_error(rows, skip_invalid):
    """The canonical shape holds for whatever passes: roles, text content, parsed tool calls and schemas; a KTO
    file's examples are exactly its rows labelled true."""
    result = _only_data_errors(lambda: normalize_rows(rows, skip_invalid=skip_invalid))
    if result is None:
        return
    for example in result.examples:
        json.dumps(example, ensure_ascii=False).encode("utf-8")
        assert set(example) in ({"messages"}, {"messages", "tools"})
        for message in example["messages"]:
            assert message["role"] in ROLES and isinstance(message["content"], str)
            for tool_call in message.get("tool_calls", []):
                assert tool_call["type"] == "function" and isinstance(tool_call["function"]["arguments"], dict)
                assert tool_call["function"]["name"].strip()
        for schema in example.get("tools", []):
            assert schema["type"] == "function" and schema["function"]["name"].strip()
    assert len(result.examples) + len(result.skipped) + result.label_false == len(rows)
    if result.preference == "kto":
        assert [r["prompt"] + r["completion"] for r in result.preference_rows if r["label"]] == \
            [ex["messages"] for ex in result.examples]


@FUZZ
@given(data=DOCUMENTS, ext=st.sampled_from(EXTENSIONS))
def test_load_examples_returns_splits_or_a_data_error(tmp_path_factory, data, ext):
    path = tmp_path_factory.mktemp("fuzz") / f"data{ext}"
    path.write_bytes(data)
    prepared = _only_data_errors(lambda: load_examples(RunConfig(base_model="demo", dataset=str(path))))
    if prepared is not None:
        assert prepared.splits.train


# ----------------------------------------------------------------------------- the cases fuzzing found, pinned

@pytest.mark.parametrize("text, message", [
    (_deep(5_000), "nested too deeply"),
    ('{"text": ' + _deep(3_000) + "}", "nested too deeply"),
    ('{"text": "hi", "n": ' + "9" * 10_000 + "}", "number with too many digits"),
])
def test_pathological_json_is_a_data_error(tmp_path, text, message):
    for ext in (".json", ".jsonl"):
        path = tmp_path / f"evil{ext}"
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_rows(path)
    with pytest.raises(DataError, match=message):
        rows_from_text(text)


def test_a_lone_surrogate_names_the_row_and_field():
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "bad \ud800 text", "output": "x"}]
    with pytest.raises(DataError, match=r"<rows>, row 2: field `instruction` contains a character that is not "
                                        r"valid Unicode \(U\+D800\)"):
        normalize_rows(rows)
    assert len(normalize_rows(rows, skip_invalid=True).examples) == 1


# ----------------------------------------------------------------------------- size limit and streaming

def _big_jsonl(path: Path, megabytes: int) -> Path:
    """A JSON lines file of about `megabytes` MB: 1 KB rows."""
    line = (json.dumps({"instruction": "q" * 480, "output": "a" * 480}) + "\n").encode()
    with path.open("wb") as f:
        f.write(line * (megabytes * 1_000_000 // len(line)))
    return path


def _peak_python_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    path = _big_jsonl(tmp_path / "big.jsonl", 30)
    with pytest.raises(DataError, match=r"big.jsonl is too large \(30.0 MB; the limit here is 5.0 MB\); use a "
                                        "smaller file"):
        read_rows(path, max_bytes=5_000_000)
    peak = _peak_python_bytes(lambda: _only_data_errors(lambda: read_rows(path, max_bytes=5_000_000)))
    assert peak < 1_000_000, f"refusing a 30 MB file allocated {peak} bytes: it was read"


def test_json_lines_are_streamed_not_loaded_at_once(tmp_path):
    """With max_rows, reading a 30 MB JSON lines file touches only its first lines: Python's peak allocation
    stays far below the file's size (reading it whole would allocate at least 30 MB)."""
    path = _big_jsonl(tmp_path / "big.jsonl", 30)
    rows = []
    peak = _peak_python_bytes(lambda: rows.extend(read_rows(path, max_rows=5)))
    assert len(rows) == 5 and rows[0]["instruction"] == "q" * 480
    assert peak < 1_000_000, f"reading 5 rows allocated {peak} bytes: the file was not streamed"
