"""Datasets: a file, a Hub id or in-memory rows → normalised chat examples → train/validation/test splits.

The flow, top to bottom:

    read_rows / rows_from_text     raw rows (plain dicts): .json .jsonl .csv .parquet .txt, a Hub id, a paste box
    detect_format                  alpaca | messages | sharegpt | prompt_completion | text, from the column names
    normalize_rows                 every row → {"messages": [...]} or {"text": ...}; bad rows → DataError (or skipped)
    split_examples                 drop exact duplicates, seeded shuffle, cut test / validation / train
    length_stats / split_stats     token-length summary per split (the caller supplies the tokenizer)
    load_examples                  all of the above, driven by a RunConfig

Every expected mistake raises `DataError` with the file, the 1-based row (or line) number, the field and the fix.
Row numbers count rows as read: for JSON lines that is the n-th non-blank line, for CSV the n-th data row. With
`skip_invalid`, a JSON line that holds no JSON object is read as an `UnreadableLine` in its row's place: a row read
and skipped, so the rows after it keep their numbers.

Formats (column names are matched case-insensitively; `column_mapping` names them explicitly, the format's fields
and `system`, `tools` (conversations), `chosen`, `rejected` and `label` (any format with an answer) alike):

- alpaca:            instruction, optional input (alias context), output (alias response), optional system.
                     The user turn is `instruction` + "\\n\\n" + `input` when input is non-empty.
- messages:          a `messages` (or `conversations`) list of {"role", "content"} turns; role is system | user |
                     assistant | tool. `content` may be a list of text parts ({"type": "text", "text" or "value": ...}),
                     which are joined with newlines; an image, audio or video part is refused (text only).
- sharegpt:          a `conversations` (or `messages`) list of {"from", "value"} turns; from is system | human | gpt
                     (aliases user, assistant, bot, chatgpt, model) | function_call | observation, optional `system`
                     column.
- prompt_completion: prompt/completion, prompt/response, question/answer, query/response, input/output
                     (when there is no instruction) or prompt/chosen; optional system.
- text:              a `text` column; plain text, loss on every token; `system_prompt` does not apply.

Tool calls, in either shape, become one: an assistant turn {"role": "assistant", "content": "", "tool_calls":
[{"type": "function", "function": {"name": ..., "arguments": {...}}}]}, then {"role": "tool", "content": ...} results,
and a `tools` list of {"type": "function", "function": {JSON schema}} on the example, as transformers'
`apply_chat_template(tools=...)` takes them. ShareGPT's `function_call` turn holds {"name", "arguments"} (or a list of
them) as JSON text, its `observation` turn the result, and its `tools` column the schemas as JSON text; OpenAI-style
rows have assistant turns with `tool_calls` (arguments as JSON text or an object), `role: tool` turns and `tools`.

Reasoning: an assistant turn's `reasoning_content`, `reasoning` or `thinking` field, or its `{"type": "reasoning"}`
(or `"thinking"`) content parts, become its `reasoning_content` (parts joined with newlines); `templates` renders it.

Preference data is detected and, for supervised fine-tuning, never teaches a bad answer:
- pairs (a `chosen` and a `rejected` column: ShareGPT conversations ending with the user's turn as in LLaMA-Factory's
  DPO data, prompt/chosen/rejected, or instruction/input/chosen/rejected): the chosen reply is the assistant's answer,
  `rejected` is kept only in `NormalizedData.preference_rows`.
- KTO (a boolean `label` column marking each row's answer good or bad): rows labelled false are left out.
Either way `NormalizedData.notices` says so, and `preference_rows` keeps the rows in TRL's conversational preference
shapes ({"prompt", "chosen", "rejected"} or {"prompt", "completion", "label"}) for a preference-training stage.

A .txt file is read one document per paragraph (blank lines separate them), or one document per line when no blank line
separates its text; `NormalizedData.text_split` and a notice say which.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import itertools
import json
import math
import random
import re
import secrets
import shutil
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig
from .data_cache import ENTRY_META
from .errors import DataError
from .hub import MODEL_ID as HUB_ID
from .run_folder import RunFolder

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")
FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
SPLIT_NAMES = ("train", "validation", "test")
# Our field names, which `column_mapping` maps to a dataset's columns.
CANONICAL_FIELDS = ("instruction", "input", "output", "system", "prompt", "completion", "messages",
                    "conversations", "text", "tools", "chosen", "rejected", "label")
SKIP_HINT = " (or set skip_invalid: true to drop bad rows)"

# Which formats each canonical field fits (`system` fits every one): tool schemas go with conversations, and a
# preference pair's answers or a KTO label with any format that has an answer (not plain text).
_ANSWER_FAMILIES = frozenset({"alpaca", "prompt_completion", "conversation"})
_FIELD_FAMILIES = {"instruction": frozenset({"alpaca"}), "input": frozenset({"alpaca"}),
                   "output": frozenset({"alpaca"}), "prompt": frozenset({"prompt_completion"}),
                   "completion": frozenset({"prompt_completion"}), "messages": frozenset({"conversation"}),
                   "conversations": frozenset({"conversation"}), "text": frozenset({"text"}),
                   "tools": frozenset({"conversation"}), "chosen": _ANSWER_FAMILIES, "rejected": _ANSWER_FAMILIES,
                   "label": _ANSWER_FAMILIES}
# Column-name aliases tried in order when nothing is mapped.
_ALPACA_ALIASES = {"instruction": ("instruction",), "input": ("input", "context"),
                   "output": ("output", "response", "chosen")}
_PROMPT_COMPLETION_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"),
                            ("query", "response"), ("input", "output"), ("prompt", "chosen"))
_CONVERSATION_COLUMNS = ("messages", "conversations")
_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "bot": "assistant", "chatgpt": "assistant", "model": "assistant", "function_call": "assistant",
                 "tool": "tool", "observation": "tool", "function": "tool"}
_ALLOWED_ROLES_TEXT = ("system, user, assistant, tool (also human, gpt, bot, chatgpt, model; function_call and "
                       "observation for tool calls)")
_TOOL_CALL_FIX = 'write it as {"name": "...", "arguments": {...}} (JSON text), or a list of them'
_TOOLS_FIX = 'write it as a list of function schemas: [{"name": "...", "description": "...", "parameters": {...}}]'
# Content parts that carry no text: the article and the kind, for "turn 2 has an image part".
_MEDIA_PARTS = {"image": "an image", "image_url": "an image", "input_image": "an image", "audio": "an audio",
                "input_audio": "an audio", "audio_url": "an audio", "video": "a video", "video_url": "a video"}
_TEXT_PART_TYPES = ("text", "input_text", "output_text")
_PART_FIX = 'write each part as {"type": "text", "text": "..."}'
_REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")  # the first one present is the turn's reasoning
_REASONING_PART_TYPES = ("reasoning", "thinking")
# Keys that are row fields, so a top-level JSON object holding one of them as its only list is a row, not a wrapper.
_ROW_LIST_KEYS = {"messages", "conversations", "chosen", "rejected"}
# Hub ids: `name` or `org/name`, letters, digits, `-`, `_`, `.` (huggingface_hub's repo id rules, simplified).
# Python's csv module refuses fields over 128 KiB by default; training texts can be longer.
_CSV_FIELD_LIMIT = 2**31 - 1


# ============================================================================ result types

@dataclass(frozen=True)
class SkippedRow:
    row: int  # 1-based, as the user counts rows
    reason: str


@dataclass(frozen=True)
class UnreadableLine:
    """A JSON line read with `skip_invalid` that holds no JSON object. It stands where its row would, so that
    normalisation counts it as a row read and skipped and the rows after it keep their numbers."""
    line: int     # 1-based line number in the file or paste box
    reason: str   # the skipped row's reason: "invalid JSON on line 3: Expecting value (column 32)"
    detail: str   # the same without the line number: "Expecting value (column 32)"


@dataclass
class NormalizedData:
    examples: list[dict]  # what supervised fine-tuning learns: never a rejected or label-false answer
    format: str
    skipped: list[SkippedRow] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # for people: how the data was read, what was left out and why
    preference: str | None = None  # "pairs" (chosen/rejected) or "kto" (a boolean label); None for plain data
    preference_rows: list[dict] = field(default_factory=list)  # TRL's conversational preference shapes, valid rows
    label_false: int = 0  # KTO rows labelled false (bad answers), left out of `examples`
    text_split: str | None = None  # a .txt file: "lines" (one document per line) or "paragraphs"


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    duplicates_removed: int = 0

    def as_dict(self) -> dict[str, list[dict]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


@dataclass
class PreparedData:
    splits: Splits
    format: str
    skipped: list[SkippedRow]
    source: str
    rows_read: int = 0
    notices: list[str] = field(default_factory=list)
    preference: str | None = None  # NormalizedData.preference
    preference_rows: list[dict] = field(default_factory=list)  # NormalizedData.preference_rows (all rows, unsplit)


# ============================================================================ sources: files, Hub ids, pasted text

def read_rows(source: str | Path, *, dataset_config: str | None = None, split: str = "train",
              max_rows: int | None = None, max_bytes: int | None = None, skip_invalid: bool = False) -> list[dict]:
    """Rows from a local file (by extension) or, for a string that is no file but looks like `org/name`, the Hub.

    `max_rows` stops reading early; `max_bytes` rejects larger local files before reading them. `skip_invalid`
    reads a JSON line that holds no JSON object as an `UnreadableLine` instead of raising (normalisation skips it).
    """
    stream = stream_rows(source, dataset_config=dataset_config, split=split, max_rows=max_rows, max_bytes=max_bytes,
                         skip_invalid=skip_invalid)
    rows = list(stream)
    if stream.text_split:
        rows = _TextFileRows(rows)
        rows.text_split = stream.text_split
    return rows


class RowStream:
    """Rows read one at a time, as `read_rows` reads them (same checks, same messages), so that a 1 GB file is
    never held in memory. Iterate once. `text_split` is a .txt file's "lines" or "paragraphs"; `fingerprint`
    identifies a Hub dataset's content (`datasets`' own fingerprint), None for files."""

    def __init__(self, rows: Iterator[dict], name: str, *, max_rows: int | None = None,
                 text_split: str | None = None, fingerprint: str | None = None):
        self._rows = itertools.islice(rows, max_rows) if max_rows else rows
        self.name, self.text_split, self.fingerprint = name, text_split, fingerprint

    def __iter__(self) -> Iterator[dict]:
        empty = True
        for row in self._rows:
            empty = False
            yield row
        if empty:
            raise DataError(f"{self.name} contains no rows; it needs at least one example", source=self.name)


def stream_rows(source: str | Path, *, dataset_config: str | None = None, split: str = "train",
                max_rows: int | None = None, max_bytes: int | None = None, skip_invalid: bool = False) -> RowStream:
    """`read_rows`, one row at a time: a `RowStream`."""
    if max_rows is not None and max_rows < 1:
        raise DataError(f"`max_rows` must be at least 1, or unset (got {max_rows})")
    path = _local_path(source)
    if path is None:
        return _stream_hub_rows(str(source).strip(), dataset_config, split, max_rows)
    return _stream_local_rows(path, max_rows=max_rows, max_bytes=max_bytes, skip_invalid=skip_invalid)


def rows_from_text(text: str, *, source: str = "pasted rows", skip_invalid: bool = False) -> list[dict]:
    """Rows from the UI's paste box: a JSON array (or `{"data": [...]}`), a single object, or JSON lines
    (`skip_invalid`: as in `read_rows`)."""
    body = text.strip().lstrip("\ufeff").strip()
    if not body:
        raise DataError(f"{source}: nothing to read; paste a JSON array of rows or one JSON object per line",
                        source=source)
    if body[0] not in "[{":
        raise DataError(f"{source}: expected a JSON array of rows (starting with `[`) or one JSON object per "
                        f"line (starting with `{{`), got text starting with {body[:20]!r}", source=source)
    try:
        doc = _loads(body)
    except _JsonLimit as e:
        raise DataError(f"{source}: the JSON {e}", source=source) from None
    except json.JSONDecodeError as e:
        if body[0] == "{":  # several objects: JSON lines
            return _rows_from_json_lines(enumerate(body.splitlines(), 1), source, max_rows=None,
                                         skip_invalid=skip_invalid)
        raise _json_document_error(e, source) from None
    rows = _rows_from_document(doc, source)
    if not rows:
        raise DataError(f"{source} contains no rows; it needs at least one example", source=source)
    return rows


def display_name(source: str | Path) -> str:
    """How errors name a source: the file name for local files (upload folders are noise), else the Hub id."""
    path = _local_path(source, must_exist=False)
    return path.name if path is not None else str(source).strip()


def _local_path(source: str | Path, *, must_exist: bool = True) -> Path | None:
    """The local path `source` means, or None if it is a Hub dataset id. Raises for a missing local-looking path."""
    if isinstance(source, Path):
        path = source.expanduser()
    else:
        text = str(source).strip()
        if not text:
            raise DataError("`dataset` is not set; give a file path, a Hub dataset id, or rows")
        path = Path(text).expanduser()
        if not path.exists() and not _looks_like_path(text) and HUB_ID.fullmatch(text):
            return None
    if must_exist and not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise DataError(f"file not found: {source}{where}", source=str(source))
    return path


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1
            or re.match(r"[A-Za-z]:", text) is not None or Path(text).suffix.lower() in SUPPORTED_EXTENSIONS)


def _stream_local_rows(path: Path, *, max_rows: int | None, max_bytes: int | None,
                       skip_invalid: bool = False) -> RowStream:
    name = path.name
    if path.is_dir():
        raise DataError(f"{path} is a folder; give one file ({_extensions_text()})", source=name)
    ext = path.suffix.lower()
    readers = {".json": functools.partial(_read_json_file, skip_invalid=skip_invalid),
               ".jsonl": functools.partial(_read_jsonl_file, skip_invalid=skip_invalid), ".csv": _read_csv_file,
               ".parquet": _read_parquet_file, ".txt": _read_text_file}
    if ext not in readers:
        kind = f"`{ext}`" if ext else "with no extension"
        raise DataError(f"{name}: unsupported file type {kind}; use one of {_extensions_text()}", source=name)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{name} is empty (0 bytes); it needs at least one row", source=name)
    if max_bytes is not None and size > max_bytes:
        raise DataError(f"{name} is too large ({_format_bytes(size)}; the limit here is {_format_bytes(max_bytes)}); "
                        "use a smaller file, or load it from the command line", source=name)
    if ext == ".txt":
        text_split = _text_split_kind(path, name)
        return RowStream(_read_text_file(path, name, text_split), name, max_rows=max_rows, text_split=text_split)
    return RowStream(readers[ext](path, name), name, max_rows=max_rows)


def _extensions_text() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


def _format_bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1000:
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ---------------------------------------------------------------------------- text decoding

def _check_not_utf16(start: bytes, name: str) -> None:
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{name} is UTF-16 encoded; re-save it as UTF-8", source=name)


def _utf8_error(name: str, offset: int, line: int) -> DataError:
    return DataError(f"{name}: invalid UTF-8 at byte {offset} (line {line}); re-save the file as UTF-8 "
                     "(it may be in a legacy encoding such as Windows-1252 or Latin-1)", source=name)


def _decode(data: bytes, name: str) -> str:
    """Whole-file decode: UTF-8 with an optional byte-order mark."""
    _check_not_utf16(data[:2], name)
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # bytes; error offsets count them, as an editor would
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        raise _utf8_error(name, offset, data.count(b"\n", 0, offset) + 1) from None


def _decoded_lines(path: Path, name: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) streamed from a UTF-8 file; a leading BOM is dropped."""
    offset = 0  # bytes before the current line, for error messages
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                _check_not_utf16(raw[:2], name)
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw, offset = raw[3:], 3
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(name, offset + e.start, number) from None
            offset += len(raw)


# ---------------------------------------------------------------------------- one reader per file type
# Each yields the file's rows one at a time (a JSON document is parsed whole: JSON has no streaming reader here).

def _read_json_file(path: Path, name: str, *, skip_invalid: bool = False) -> Iterator[dict]:
    text = _decode(path.read_bytes(), name)
    if not text.strip():
        return
    try:
        doc = _loads(text)
    except _JsonLimit as e:
        raise DataError(f"{name}: the JSON {e}", source=name) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines saved as .json: read it anyway
            yield from _iter_json_lines(enumerate(text.splitlines(), 1), name, skip_invalid)
            return
        raise _json_document_error(e, name) from None
    yield from _rows_from_document(doc, name)


def _read_jsonl_file(path: Path, name: str, *, skip_invalid: bool = False) -> Iterator[dict]:
    lines = _decoded_lines(path, name)
    first = next(((n, line) for n, line in lines if line.strip()), None)
    if first is None:
        return
    if first[1].lstrip().startswith("["):  # a JSON array saved as .jsonl: read it as one document
        lines.close()
        yield from _read_json_file(path, name)
        return
    yield from _iter_json_lines(itertools.chain([first], lines), name, skip_invalid)


def _rows_from_json_lines(lines: Iterable[tuple[int, str]], name: str, max_rows: int | None, *,
                          skip_invalid: bool = False) -> list[dict]:
    return list(itertools.islice(_iter_json_lines(lines, name, skip_invalid), max_rows))


def _iter_json_lines(lines: Iterable[tuple[int, str]], name: str, skip_invalid: bool = False) -> Iterator[dict]:
    """The object on each non-blank line; a line holding none raises, or with `skip_invalid` is an `UnreadableLine`."""
    for number, line in lines:
        if not line.strip():
            continue
        row, message = _json_line(line, number, name)
        if message is None or skip_invalid:
            yield row
        else:
            raise DataError(message + SKIP_HINT, source=name, row=number)


def _json_line(line: str, number: int, name: str) -> tuple[dict | UnreadableLine, str | None]:
    """(the line's object, None), or (an `UnreadableLine`, the error for people) when it holds no JSON object."""
    try:
        row = _loads(line)
    except _JsonLimit as e:
        bad = UnreadableLine(number, f"the JSON on line {number} {e}", f"the JSON {e}")
        return bad, f"{name}: {bad.reason}"
    except json.JSONDecodeError as e:
        detail = f"{e.msg} (column {e.colno})"
        bad = UnreadableLine(number, f"invalid JSON on line {number}: {detail}", detail)
        return bad, f"{name}: {bad.reason}; each line must hold one complete JSON object"
    if isinstance(row, dict):
        return row, None
    detail = f'expected a JSON object with named fields such as {{"instruction": ..., "output": ...}}, got {_kind(row)}'
    bad = UnreadableLine(number, f"line {number}: {detail}", detail)
    return bad, f"{name}, {bad.reason}"


class _JsonLimit(ValueError):
    """Hostile JSON that `json.loads` refuses with something other than a JSONDecodeError; says why."""


def _loads(text: str) -> Any:
    """`json.loads`, with its two non-JSONDecodeError failures (Python's recursion limit, ~1000 levels, and
    its 4300-digit limit on integers) turned into `_JsonLimit`, so that no input escapes as a crash."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _JsonLimit("is nested too deeply (about 1000 levels of brackets or more); rows need only a few "
                         "levels: a list of turns, each an object") from None
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError):
            raise
        raise _JsonLimit("holds a number with too many digits (more than 4300); write it as a string") from None


def _json_document_error(e: json.JSONDecodeError, name: str) -> DataError:
    return DataError(f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; look for a missing "
                     "comma, quote or bracket there", source=name)


def _rows_from_document(doc: Any, name: str) -> list[dict]:
    """A parsed JSON document → rows: an array of objects, `{"data": [...]}` (any one list), or a single object."""
    if isinstance(doc, dict):
        lists = [key for key, value in doc.items() if isinstance(value, list)]
        if len(lists) == 1 and lists[0].lower() not in _ROW_LIST_KEYS:
            doc = doc[lists[0]]
        else:
            doc = [doc]
    if not isinstance(doc, list):
        raise DataError(f'{name}: expected a JSON array of rows like [{{"instruction": ..., "output": ...}}], '
                        f"got {_kind(doc)}", source=name)
    for number, row in enumerate(doc, 1):
        if not isinstance(row, dict):
            raise DataError(f"{name}, row {number}: expected a JSON object with named fields such as "
                            f'{{"instruction": ..., "output": ...}}, got {_kind(row)}', source=name, row=number)
    return doc


def _read_csv_file(path: Path, name: str) -> Iterator[dict]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader(line for _, line in _decoded_lines(path, name))
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        named = [h for h in header if h]  # unnamed columns (e.g. a trailing comma from a spreadsheet) are ignored
        duplicates = sorted({h for h in named if named.count(h) > 1})
        if duplicates:
            raise DataError(f"{name}: the header row names the column `{duplicates[0]}` more than once; give every "
                            "column a different name", source=name)
        empty = True
        for values in reader:
            if not values:  # blank line
                continue
            if len(values) > len(header):
                raise DataError(f"{name}, line {reader.line_num}: {len(values)} values but the header has "
                                f"{len(header)} columns; put values that contain commas in double quotes",
                                source=name, row=reader.line_num)
            values += [""] * (len(header) - len(values))
            empty = False
            yield {h: v for h, v in zip(header, values) if h}
    except csv.Error as e:
        raise DataError(f"{name}, line {reader.line_num}: unreadable CSV ({e}); re-export the file as CSV",
                        source=name, row=reader.line_num) from None
    if empty:
        raise DataError(f"{name} has a header row but no data rows", source=name)


def _read_parquet_file(path: Path, name: str) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        batches = parquet.iter_batches(batch_size=1024)  # rows per batch: memory stays bounded
        for batch in batches:
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable Parquet file ({e}); re-export it, or use .jsonl or .csv",
                        source=name) from None


class _TextFileRows(list):
    """A .txt file's rows, remembering how the file was cut into documents ("lines" or "paragraphs")."""

    text_split: str | None = None


def _text_split_kind(path: Path, name: str) -> str:
    """"paragraphs" when a blank line separates text, else "lines": a corpus of one document a line, read as
    paragraphs, would be a single example. Blank lines before or after all text count for nothing. Reads only
    up to the first blank line that has text after it."""
    text_seen = blank_after_text = False
    for _, line in _decoded_lines(path, name):
        if line.strip():
            if blank_after_text:
                return "paragraphs"
            text_seen = True
        elif text_seen:
            blank_after_text = True
    return "lines"


def _read_text_file(path: Path, name: str, text_split: str) -> Iterator[dict]:
    """One document per paragraph or per line, as `text_split` says."""
    paragraph: list[str] = []
    for _, line in _decoded_lines(path, name):
        text = line.rstrip("\r\n")
        if text_split == "lines":
            if text.strip():
                yield {"text": text}
        elif text.strip():
            paragraph.append(text)
        elif paragraph:  # a blank line ends a paragraph
            yield {"text": "\n".join(paragraph)}
            paragraph = []
    if paragraph:
        yield {"text": "\n".join(paragraph)}


# ---------------------------------------------------------------------------- Hugging Face Hub

def _stream_hub_rows(dataset_id: str, dataset_config: str | None, split: str, max_rows: int | None) -> RowStream:
    import datasets  # heavy (~1 s); only when a Hub id is used

    try:
        with _offline_unless_reachable():
            ds = datasets.load_dataset(dataset_id, name=dataset_config, split=split)
    except Exception as e:  # every failure of a user's dataset id becomes a message for people
        raise hub_load_error(e, dataset_id, dataset_config, split) from e
    if len(ds) == 0:
        raise DataError(f"dataset `{dataset_id}` (split `{split}`) contains no rows", source=dataset_id)
    return RowStream(iter(ds), dataset_id, max_rows=max_rows, fingerprint=ds._fingerprint)


@contextlib.contextmanager
def _offline_unless_reachable():
    """When one quick connect shows the Hub is unreachable, load in offline mode: the local cache answers at
    once, or the offline message comes at once, instead of after ~25 s of the clients' retries."""
    from datasets import config as datasets_config
    from huggingface_hub import constants as hub_constants

    from .models import hub_reachable

    if datasets_config.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    saved = datasets_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets_config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


# Connection failures from requests/httpx/huggingface_hub, matched by name so that none of them must be imported.
_CONNECTION_ERROR_NAMES = {"ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "OfflineModeIsEnabled"}


def hub_load_error(error: Exception, dataset_id: str, dataset_config: str | None, split: str) -> DataError:
    """Translate an exception from `datasets.load_dataset` into a DataError that says what to do."""
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    text = str(error)
    available = re.search(r"(?:Available(?: splits)?|Should be one of|among the available configs):?\s*(\[.*?\])",
                          text)
    choices = f" (available: {available.group(1)})" if available else ""
    if isinstance(error, DatasetNotFoundError):
        return DataError(f"dataset `{dataset_id}` was not found on the Hugging Face Hub, or it is private or gated "
                         f"({text}); check the id, log in with a token that can read it, or use a local file",
                         source=dataset_id)
    if isinstance(error, DataFilesNotFoundError):
        return DataError(f"dataset `{dataset_id}` has no data files that can be loaded ({text}); use another "
                         "dataset or a local file", source=dataset_id)
    if isinstance(error, ConnectionError) or type(error).__name__ in _CONNECTION_ERROR_NAMES:
        return DataError(f"could not reach the Hugging Face Hub to load dataset `{dataset_id}`; check your "
                         "connection or use a local file", source=dataset_id)
    if isinstance(error, ValueError) and ("Unknown split" in text or "Bad split" in text):
        return DataError(f"dataset `{dataset_id}` has no split `{split}`{choices}; set `dataset_split` to one of "
                         "its splits", source=dataset_id, field="dataset_split")
    if isinstance(error, ValueError) and "BuilderConfig" in text:
        return DataError(f"dataset `{dataset_id}` has no configuration `{dataset_config}`{choices}; set "
                         "`dataset_config` to one of its configurations", source=dataset_id, field="dataset_config")
    if isinstance(error, ValueError) and "Config name is missing" in text:
        return DataError(f"dataset `{dataset_id}` has several configurations{choices}; set `dataset_config` to "
                         "one of them", source=dataset_id, field="dataset_config")
    return DataError(f"could not load dataset `{dataset_id}` from the Hugging Face Hub: {type(error).__name__}: "
                     f"{text}", source=dataset_id)


def _kind(value: Any) -> str:
    """'a string', 'a list', 'a number (42)': how a JSON value's type reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    names = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


# ============================================================================ format detection

def detect_format(rows: list[dict], column_mapping: dict[str, str] | None = None, *,
                  source: str = "<rows>") -> str:
    """The format of `rows`, from the column names of the first rows (or from what `column_mapping` maps)."""
    return _resolve_columns(rows, "auto", column_mapping, source)[0]


def _column_index(rows: list[dict]) -> dict[str, str]:
    """Lower-cased name → real column name, over the first 20 rows (enough to see optional columns)."""
    index: dict[str, str] = {}
    for row in rows[:20]:
        if isinstance(row, dict):
            for key in row:
                index.setdefault(str(key).strip().lower(), key)
    return index


def _resolve_columns(rows: list[dict], fmt: str, column_mapping: dict[str, str] | None,
                     source: str) -> tuple[str, dict[str, str]]:
    """(format, canonical field → the dataset's column name) for `rows`; raise a DataError that says the fix."""
    if not rows:
        raise DataError(f"{source} contains no rows; it needs at least one example", source=source)
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"`data_format` must be auto or one of {', '.join(FORMATS)} (got {fmt!r})",
                        field="data_format")
    index = _column_index(rows)
    mapping = _check_mapping(column_mapping or {}, index, source)
    family = _mapping_family(mapping, fmt)
    named = {**index, **mapping}  # the columns by the names we look for: a mapped field's column under its name
    if fmt == "auto":
        fmt = (_format_of_family(family, rows, mapping, index) if family
               else _detect_from_columns(rows, index, source, named=named))
    _check_answer_fields(mapping, fmt, source)
    columns = {canonical: mapping.get(canonical) or _default_column(canonical, fmt, named)
               for canonical in _fields_of(fmt)}
    if fmt in ("messages", "sharegpt"):
        columns["messages"] = _conversation_column(mapping, index)
        columns.pop("conversations", None)
        columns["chosen"] = named.get("chosen") or named.get("completion")  # the reply to a prompt-only conversation
        columns["tools"] = named.get("tools")
    if fmt != "text":
        columns.update(_preference_columns(columns, named, mapping))
        _check_mapped_label(rows, mapping, source)
    required = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
                "messages": ("messages",), "sharegpt": ("messages",), "text": ("text",)}[fmt]
    for canonical in required:
        if not columns.get(canonical):
            wanted = "messages` or `conversations" if canonical == "messages" else canonical
            raise DataError(f"{source}: data_format `{fmt}` needs a column `{wanted}`, but the columns found are: "
                            f"{_columns_text(index)}. Map yours with column_mapping, e.g. "
                            f"{{{canonical}: {_example_column(index)}}}", source=source, field=canonical)
    return fmt, {k: v for k, v in columns.items() if v}


def _preference_columns(columns: dict[str, str | None], named: dict[str, str],
                        mapping: dict[str, str]) -> dict[str, str]:
    """`rejected` when the answer is read from a `chosen` column (or `rejected` is mapped: the answer read is then
    the chosen one), and a `label` column (KTO if it holds booleans). `named`: the columns by our field names."""
    found = {}
    chosen = named.get("chosen")
    answer_is_chosen = chosen and chosen in (columns.get("chosen"), columns.get("completion"), columns.get("output"))
    if "rejected" in named and (answer_is_chosen or "rejected" in mapping):
        found["rejected"] = named["rejected"]
    if "label" in named:
        found["label"] = named["label"]
    return found


def _check_mapped_label(rows: list[dict], mapping: dict[str, str], source: str) -> None:
    """A column mapped to `label` must hold KTO labels: its first value in the first rows true or false (an unmapped
    `label` column that doesn't is just another column)."""
    column = mapping.get("label")
    if column is None:
        return
    first = next((row[column] for row in rows[:20] if isinstance(row, dict) and row.get(column) is not None), None)
    if _as_bool(first) is None:
        shown = "no value in the first rows" if first is None else f"{_kind(first)} in its first rows"
        raise DataError(f"column_mapping maps `label` to the column `{column}`, but {source} has {shown}; a KTO "
                        "label marks each row's answer true (good) or false (bad), so map `label` to such a column or "
                        "remove it", source=source, field="column_mapping")


def _preference_kind(rows: list[dict], columns: dict[str, str]) -> str | None:
    """The kind of preference data: `pairs` with a `rejected` column, `kto` when the first `label` value found is
    true or false, else None."""
    if "rejected" in columns:
        return "pairs"
    label = columns.get("label")
    if label:
        first = next((row[label] for row in rows[:20] if isinstance(row, dict) and row.get(label) is not None), None)
        if _as_bool(first) is not None:
            return "kto"
    return None


def _as_bool(value: Any) -> bool | None:
    """A boolean, or the text true/false (CSV has no booleans); None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _check_mapping(mapping: dict[str, str], index: dict[str, str], source: str) -> dict[str, str]:
    """Validate `column_mapping` (our field → their column) and return it with real column names."""
    checked: dict[str, str] = {}
    for canonical, column in mapping.items():
        if canonical not in CANONICAL_FIELDS:
            raise DataError(f"column_mapping: unknown field `{canonical}`; use one of {', '.join(CANONICAL_FIELDS)}",
                            field="column_mapping")
        real = index.get(str(column).strip().lower())
        if real is None:
            raise DataError(f"column_mapping maps `{canonical}` to the column `{column}`, but {source} has no such "
                            f"column; columns found: {_columns_text(index)}", source=source, field="column_mapping")
        checked[canonical] = real
    if "messages" in checked and "conversations" in checked:
        raise DataError("column_mapping maps both `messages` and `conversations`; map only one of them to your "
                        "conversation column", field="column_mapping")
    return checked


def _mapping_family(mapping: dict[str, str], fmt: str) -> str | None:
    """The one format family every mapped field fits, None when the mapped fields fit several (or none is mapped);
    a DataError when they fit no family together, or not `fmt`'s."""
    fitting = [_FIELD_FAMILIES[k] for k in mapping if k in _FIELD_FAMILIES]
    common = frozenset.intersection(*fitting) if fitting else None
    if common is not None and not common:
        names = ", ".join(f"`{k}`" for k in mapping if k in _FIELD_FAMILIES)
        raise DataError(f"column_mapping mixes fields of different formats ({names}); map instruction/input/output, "
                        "or prompt/completion, or messages, or text", field="column_mapping")
    if common and fmt != "auto" and ("conversation" if fmt in ("messages", "sharegpt") else fmt) not in common:
        raise DataError(f"data_format is `{fmt}` but column_mapping maps fields of another format "
                        f"({', '.join(mapping)}); set data_format: auto, or map the fields of `{fmt}`",
                        field="column_mapping")
    return next(iter(common)) if common and len(common) == 1 else None


def _check_answer_fields(mapping: dict[str, str], fmt: str, source: str) -> None:
    """Preference fields mapped on data detected as plain text (which has no answer to prefer or label) are refused,
    not ignored."""
    mapped = [k for k in mapping if _FIELD_FAMILIES.get(k) == _ANSWER_FAMILIES]
    if fmt == "text" and mapped:
        raise DataError(f"column_mapping maps `{mapped[0]}`, but {source} reads as plain text (`text`), which has no "
                        "answer to prefer or label; map its prompt and answer columns too (e.g. prompt/completion), "
                        f"or remove `{mapped[0]}`", source=source, field="column_mapping")


def _format_of_family(family: str, rows: list[dict], mapping: dict[str, str], index: dict[str, str]) -> str:
    if family != "conversation":
        return family
    column = _conversation_column(mapping, index)
    return _turn_style(rows, column) if column else "messages"  # none: `messages` then asks for its column


def _conversation_column(mapping: dict[str, str], index: dict[str, str]) -> str | None:
    """The column of turns: the mapped one, else `messages` or `conversations`."""
    return mapping.get("messages") or mapping.get("conversations") or _first_present(index, _CONVERSATION_COLUMNS)


def _turn_style(rows: list[dict], column: str) -> str:
    """`sharegpt` if the first turn found uses from/value keys, else `messages` (role/content)."""
    for row in rows[:20]:
        turns = _parse_turns(row.get(column)) if isinstance(row, dict) else None
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt" if "from" in turns[0] or "value" in turns[0] else "messages"
    return "messages"


def _detect_from_columns(rows: list[dict], index: dict[str, str], source: str, *,
                         named: dict[str, str] | None = None) -> str:
    """The format from the column names; `named` adds mapped columns under our field names (a `chosen` mapping)."""
    named = named or index
    conversation = _first_present(named, _CONVERSATION_COLUMNS)
    if conversation:
        return _turn_style(rows, conversation)
    if "instruction" in named and _first_present(named, _ALPACA_ALIASES["output"]):
        return "alpaca"
    if any(p in named and c in named for p, c in _PROMPT_COMPLETION_PAIRS):
        return "prompt_completion"
    if "text" in named:
        return "text"
    raise DataError(f"{source}: could not detect the data format; columns found: {_columns_text(index)}. "
                    f"Map them with column_mapping: {_suggest_mapping(rows, index)}", source=source,
                    field="column_mapping")


def _suggest_mapping(rows: list[dict], index: dict[str, str]) -> str:
    first = rows[0] if isinstance(rows[0], dict) else {}
    texts = [c for c in index.values() if isinstance(first.get(c), str) and c.lower() != "system"]
    lists = [c for c in index.values() if isinstance(first.get(c), list)]
    if len(texts) >= 2:
        return f"{{prompt: {texts[0]}, completion: {texts[1]}}}"
    if lists:
        return f"{{messages: {lists[0]}}}"
    if texts:
        return f"{{text: {texts[0]}}}"
    return "{prompt: QUESTION_COLUMN, completion: ANSWER_COLUMN}"


def _fields_of(fmt: str) -> tuple[str, ...]:
    return {"alpaca": ("instruction", "input", "output", "system"), "prompt_completion": ("prompt", "completion",
            "system"), "messages": ("system",), "sharegpt": ("system",), "text": ("text",)}[fmt]


def _default_column(canonical: str, fmt: str, index: dict[str, str]) -> str | None:
    if fmt == "alpaca" and canonical in _ALPACA_ALIASES:
        return _first_present(index, _ALPACA_ALIASES[canonical])
    if fmt == "prompt_completion" and canonical in ("prompt", "completion"):
        side = 0 if canonical == "prompt" else 1
        pair = next((p for p in _PROMPT_COMPLETION_PAIRS if p[0] in index and p[1] in index), None)
        if pair:
            return index[pair[side]]
        return _first_present(index, dict.fromkeys(p[side] for p in _PROMPT_COMPLETION_PAIRS))
    return index.get(canonical)


def _first_present(index: dict[str, str], names: Iterable[str]) -> str | None:
    return next((index[n] for n in names if n in index), None)


def _columns_text(index: dict[str, str]) -> str:
    return ", ".join(index.values()) or "(none)"


def _example_column(index: dict[str, str]) -> str:
    return next(iter(index.values()), "YOUR_COLUMN")


# ============================================================================ normalisation

class _RowProblem(Exception):
    """One row is unusable: `reason` says what is wrong, `fix` what to do. Becomes a DataError or a SkippedRow."""

    def __init__(self, reason: str, fix: str, field: str | None = None):
        super().__init__(reason)
        self.reason, self.fix, self.field = reason, fix, field


def normalize_rows(rows: list[dict], *, fmt: str = "auto", column_mapping: dict[str, str] | None = None,
                   system_prompt: str | None = None, skip_invalid: bool = False, source: str = "<rows>",
                   pairs_required: bool = False) -> NormalizedData:
    """Every row → `{"messages": [...]}` (with `tools` when the row has tool schemas) or `{"text": ...}`; KTO rows
    labelled false are left out and counted. A bad row raises a DataError naming the source, the 1-based row, the
    field and the fix; with `skip_invalid` it is dropped and recorded in `skipped` instead. `pairs_required` (a
    preference stage) makes a pair row without its `rejected` answer a bad row. (A row the template can't encode is
    found where the examples are encoded: `prepare.prepare_data`.)"""
    normalizer = RowNormalizer(_read_head(iter(rows)), fmt=fmt, column_mapping=column_mapping,
                               system_prompt=system_prompt, skip_invalid=skip_invalid, source=source,
                               pairs_required=pairs_required)
    examples: list[dict] = []
    preference_rows: list[dict] = []
    for number, row in enumerate(rows, 1):
        example, record = normalizer.normalize(number, row)
        if record is not None:
            preference_rows.append(record)
        if example is not None:
            examples.append(example)
    text_split = getattr(rows, "text_split", None)
    notices = normalizer.finish(len(rows), text_split)
    return NormalizedData(examples=examples, format=normalizer.format, skipped=normalizer.skipped, notices=notices,
                          preference=normalizer.preference, preference_rows=preference_rows,
                          label_false=normalizer.label_false, text_split=text_split)


_HEAD_ROWS = 20  # the first rows, from which the format, columns and preference kind are detected


def _read_head(rows: Iterator[Any]) -> list:
    """The first rows, as `RowNormalizer` is built from: up to `_HEAD_ROWS` readable ones, with the unreadable
    lines among them (all of them when no readable row follows)."""
    head, readable = [], 0
    for row in rows:
        head.append(row)
        readable += not isinstance(row, UnreadableLine)
        if readable == _HEAD_ROWS:
            break
    return head


class RowNormalizer:
    """`normalize_rows` one row at a time, for rows streamed from a large file: built from the first rows
    (`_read_head`: their readable rows decide the format and columns), then `normalize` each row in order (an
    `UnreadableLine` too: a row read and skipped) and `finish`."""

    def __init__(self, head: list[dict], *, fmt: str = "auto", column_mapping: dict[str, str] | None = None,
                 system_prompt: str | None = None, skip_invalid: bool = False, source: str = "<rows>",
                 pairs_required: bool = False):
        head = _readable_head(head, source)
        self.format, self.columns = _resolve_columns(head, fmt, column_mapping, source)
        self.preference = _preference_kind(head, self.columns)
        self.system_prompt = system_prompt if system_prompt and system_prompt.strip() else None
        self.skip_invalid, self.source, self.pairs_required = skip_invalid, source, pairs_required
        self.skipped: list[SkippedRow] = []
        self.kept = self.label_false = 0
        self._first_problem = ""

    def normalize(self, number: int, row: Any) -> tuple[dict | None, dict | None]:
        """(the example, or None when the row is skipped or labelled false; its preference record or None)."""
        try:
            if isinstance(row, UnreadableLine):
                raise _RowProblem(row.reason, "each line must hold one complete JSON object")
            example = _normalize_row(row, self.format, self.columns, self.system_prompt)
            record = (_preference_row(row, example, self.columns, self.preference, self.pairs_required)
                      if self.preference else None)
        except _RowProblem as p:
            message = f"{self.source}, row {number}: {p.reason}" + (f"; {p.fix}" if p.fix else "")
            if not self.skip_invalid:
                raise DataError(message + SKIP_HINT, source=self.source, row=number, field=p.field) from None
            self.skipped.append(SkippedRow(number, p.reason))
            self._first_problem = self._first_problem or message
            return None, None
        if record is not None and record.get("label") is False:  # a bad answer (KTO label false) is never a target
            self.label_false += 1
            return None, record
        self.kept += 1
        return example, record

    def finish(self, rows: int, text_split: str | None) -> list[str]:
        """Raise when nothing is left to train on; else the notices for people (see `_reading_notices`)."""
        if not self.kept and self.label_false:
            raise DataError(f"{self.source}: every usable row is labelled false (a bad answer), and supervised "
                            "fine-tuning learns only answers labelled true; nothing is left to train on",
                            source=self.source, field=self.columns["label"])
        if not self.kept:
            raise DataError(f"{self.source}: all {rows} rows are invalid, nothing is left to train on; the first "
                            f"problem: {self._first_problem}", source=self.source)
        return _reading_notices(self.source, text_split, rows, self.preference, self.kept, self.label_false)


def _readable_head(head: list, source: str) -> list[dict]:
    """The head's rows without its unreadable lines; when every line read is unreadable, nothing is left to train
    on: an error, not an empty dataset."""
    readable = [row for row in head if not isinstance(row, UnreadableLine)]
    if head and not readable:
        first = head[0]
        raise DataError(f"{source}: all {len(head)} lines are invalid JSON (first: line {first.line}: {first.detail}), "
                        "so nothing is left to train on; each line must hold one complete JSON object", source=source)
    return readable


def _reading_notices(source: str, text_split: str | None, rows: int, preference: str | None, kept: int,
                     label_false: int) -> list[str]:
    """What people should know about how the rows were read: a .txt file's documents, preference data's answers."""
    notices = []
    if text_split == "lines":
        notices.append(f"{source} has no blank lines between its text, so each of its {rows:,} lines is one document")
    elif text_split == "paragraphs":
        notices.append(f"{source} has blank lines, so each of its {rows:,} paragraphs (text between blank lines) is "
                       "one document")
    if preference == "pairs":
        notices.append(f"{source} holds preference pairs (`chosen` and `rejected` answers); supervised fine-tuning "
                       f"learns the {kept:,} chosen answers only, never the rejected ones")
    elif preference == "kto":
        notices.append(f"{source} holds KTO data (a true/false `label` per answer); supervised fine-tuning learns the "
                       f"{kept:,} answers labelled true and leaves out the {label_false:,} rows labelled false, so "
                       "their bad answers are never learned")
    return notices


def _normalize_row(row: Any, fmt: str, columns: dict[str, str], system_prompt: str | None) -> dict:
    if not isinstance(row, dict):
        raise _RowProblem(f"expected an object with named fields, got {_kind(row)}",
                          'write each row as an object such as {"instruction": ..., "output": ...}')
    if fmt == "text":
        return {"text": _required_text(row, columns["text"], "every row needs non-empty text")}
    if fmt in ("messages", "sharegpt"):
        turns = _conversation_turns(row, columns, fmt)
    elif fmt == "alpaca":
        user = _required_text(row, columns["instruction"], "every row needs a non-empty instruction")
        extra = _optional_text(row, columns.get("input"))
        if extra:
            user = f"{user}\n\n{extra}"
        answer = _required_text(row, columns["output"], "every row needs a non-empty answer")
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    elif isinstance(_parse_turns(row.get(columns["prompt"])), list):  # TRL's conversational shape: prompt turns
        turns = _conversation_turns(row, {"messages": columns["prompt"], "chosen": columns["completion"]}, "messages")
    else:  # prompt_completion
        user = _required_text(row, columns["prompt"], "every row needs a non-empty prompt")
        answer = _answer_text(row, columns["completion"])
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if turns[0]["role"] != "system":
        system = _optional_text(row, columns.get("system")) or system_prompt
        if system:
            turns.insert(0, {"role": "system", "content": system})
    tools = _tools(row, columns.get("tools"))
    return {"messages": turns, "tools": tools} if tools else {"messages": turns}


def _preference_row(row: dict, example: dict, columns: dict[str, str], kind: str,
                    pairs_required: bool = False) -> dict | None:
    """The row in TRL's conversational preference shape: {prompt, chosen, rejected} or {prompt, completion, label};
    None for a row of a pairs file with no rejected answer (it is still a fine-tuning example, but no pair), unless
    `pairs_required`."""
    messages = example["messages"]
    record: dict[str, Any] = {"prompt": messages[:-1]}
    if kind == "pairs":
        rejected = columns["rejected"]
        if row.get(rejected) is None and pairs_required:
            raise _RowProblem(f"field `{rejected}` is missing", "a preference stage needs the rejected answer of "
                              "every pair", rejected)
        if row.get(rejected) is None:
            return None
        record.update(chosen=messages[-1:], rejected=[_reply_turn(row.get(rejected), rejected)])
    else:
        record.update(completion=messages[-1:], label=_kto_label(row, columns["label"]))
    if "tools" in example:
        record["tools"] = example["tools"]
    return record


def _answer_text(row: dict, column: str) -> str:
    """A prompt/completion row's answer: text, or an assistant turn (a list ending in one) as TRL writes it."""
    value = row.get(column)
    if isinstance(value, (list, dict)):
        return _reply_turn(value, column)["content"]
    return _required_text(row, column, "every row needs a non-empty answer")


def _kto_label(row: dict, column: str) -> bool:
    fix = "mark each row's answer true (good) or false (bad)"
    if column not in row:
        raise _RowProblem(f"field `{column}` is missing", fix, column)
    label = _as_bool(row[column])
    if label is None:
        raise _RowProblem(f"field `{column}` must be true or false, got {_kind(row[column])}", fix, column)
    return label


def _required_text(row: dict, column: str, fix: str) -> str:
    if column not in row:
        raise _RowProblem(f"field `{column}` is missing", fix, column)
    value = row[column]
    if value is not None and not isinstance(value, str):
        raise _RowProblem(f"field `{column}` must be text, got {_kind(value)}", "write it as a JSON string", column)
    if value is None or not value.strip():
        raise _RowProblem(f"field `{column}` is empty", fix, column)
    _check_encodable(value, f"field `{column}`", column)
    return value


def _optional_text(row: dict, column: str | None) -> str | None:
    """The column's text, or None when the column is absent, null or blank."""
    value = row.get(column) if column else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise _RowProblem(f"field `{column}` must be text, got {_kind(value)}", "write it as a JSON string "
                          "(or leave it empty)", column)
    _check_encodable(value, f"field `{column}`", column)
    return value if value.strip() else None


def _check_encodable(text: str, where: str, column: str) -> None:
    """Refuse text that can't be written as UTF-8: a lone UTF-16 surrogate, e.g. JSON's `"\\ud800"` escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _RowProblem(f"{where} contains a character that is not valid Unicode (U+{ord(text[e.start]):04X})",
                          "remove it (it is half of a broken emoji or accented letter)", column) from None


def _parse_turns(value: Any) -> Any:
    """A conversation column's value; a JSON string (conversations stored in a CSV cell) is parsed."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return _loads(value)
        except ValueError:  # JSONDecodeError or _JsonLimit: not a list of turns; reported as text below
            return value
    return value


def _conversation_turns(row: dict, columns: dict[str, str], fmt: str) -> list[dict]:
    column = columns["messages"]
    example = ('{"from": "human", "value": "..."}' if fmt == "sharegpt"
               else '{"role": "user", "content": "..."}')
    shape_fix = f"write each turn as {example}"
    if column not in row:
        raise _RowProblem(f"field `{column}` is missing", f"every row needs a list of turns such as [{example}, ...]",
                          column)
    turns_in = _parse_turns(row[column])
    if not isinstance(turns_in, list):
        raise _RowProblem(f"field `{column}` must be a list of turns, got {_kind(turns_in)}",
                          f"write it as [{example}, ...]", column)
    if not turns_in:
        raise _RowProblem(f"field `{column}` has no turns",
                          "every conversation needs a user turn and an assistant answer", column)
    # (turn number as the user counts it, turn): numbers stay right after blank system turns are dropped
    numbered = [(n, _turn(t, n, column, shape_fix)) for n, t in enumerate(turns_in, 1)]
    numbered = [(n, t) for n, t in numbered if t["role"] != "system" or t["content"].strip()]
    if numbered and numbered[-1][1]["role"] == "user" and row.get(columns.get("chosen")) is not None:
        numbered.append((len(turns_in) + 1, _reply_turn(row[columns["chosen"]], columns["chosen"])))
    _check_order(numbered, column)
    return [t for _, t in numbered]


def _turn(turn: Any, number: int, column: str, shape_fix: str) -> dict:
    where = f"turn {number} of `{column}`"
    if not isinstance(turn, dict):
        raise _RowProblem(f"{where} is {_kind(turn)}, not an object", shape_fix, column)
    role_key = "role" if "role" in turn else "from" if "from" in turn else None
    content_key = "content" if "content" in turn else "value" if "value" in turn else None
    calls = turn.get("tool_calls") or None  # OpenAI exports write `"tool_calls": null` or `[]` on plain replies
    if role_key is None:
        raise _RowProblem(f"{where} has no `role` (or `from`) key", shape_fix, column)
    if content_key is None and calls is None:  # a turn that only calls tools may leave out its content
        raise _RowProblem(f"{where} has no `content` (or `value`) key", shape_fix, column)
    raw_role = turn[role_key]
    role = _ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
    if role is None:
        shown = f"`{raw_role}`" if isinstance(raw_role, str) else _kind(raw_role)
        raise _RowProblem(f"{where} has unknown role {shown}", f"allowed roles: {_ALLOWED_ROLES_TEXT}", column)
    content = turn.get(content_key) if content_key else None
    if raw_role.strip().lower() == "function_call":  # ShareGPT: the turn's text is the call, as JSON
        return {"role": "assistant", "content": "", "tool_calls": _sharegpt_calls(content, where, column)}
    content, reasoning = _split_reasoning(turn, content, where, role, column)
    thought = {} if reasoning is None else {"reasoning_content": reasoning}
    if calls is not None:
        if role != "assistant":
            raise _RowProblem(f"{where} ({role}) has `tool_calls`, but only assistant turns call tools",
                              "move the calls to the assistant turn that makes them", column)
        text = "" if content is None else _content_text(content, where, role, column)
        _check_encodable(text, where, column)
        return {"role": "assistant", "content": text, **thought, "tool_calls": _tool_calls(calls, where, column)}
    content = _content_text(content, where, role, column)
    if role != "system" and not content.strip():
        fix = "write what the tool returned" if role == "tool" else "every user and assistant turn needs content"
        raise _RowProblem(f"{where} ({role}) is empty", fix, column)
    _check_encodable(content, where, column)
    out = {"role": role, "content": content, **thought}
    if role == "tool" and isinstance(turn.get("tool_call_id"), str) and turn["tool_call_id"]:
        out["tool_call_id"] = turn["tool_call_id"]  # some templates (Mistral's) pair results with calls by id
    return out


def _split_reasoning(turn: dict, content: Any, where: str, role: str, column: str) -> tuple[Any, str | None]:
    """A turn's reasoning (its first `reasoning_content`/`reasoning`/`thinking` field, and its reasoning content
    parts, joined with newlines; None when it has none) and its content without those parts."""
    texts = []
    field_name = next((key for key in _REASONING_FIELDS if turn.get(key) not in (None, "")), None)
    if field_name is not None:
        if not isinstance(turn[field_name], str):
            raise _RowProblem(f"{where} ({role}) has `{field_name}` of type {_kind(turn[field_name])}, not text",
                              "write the reasoning as a string", column)
        texts.append(turn[field_name])
    if isinstance(content, list):
        kept = []
        for number, part in enumerate(content, 1):
            kind = part.get("type") if isinstance(part, dict) else None
            if not (isinstance(kind, str) and kind.strip().lower() in _REASONING_PART_TYPES):
                kept.append(part)
                continue
            text = next((part[key] for key in ("text", "reasoning", "thinking", "value")
                         if isinstance(part.get(key), str)), None)
            if text is None:
                raise _RowProblem(f"{where} ({role}) has reasoning part {number} with no text",
                                  'write it as {"type": "reasoning", "text": "..."}', column)
            texts.append(text)
        content = kept
    reasoning = "\n".join(texts) if any(text.strip() for text in texts) else None
    if reasoning is not None and role != "assistant":
        raise _RowProblem(f"{where} ({role}) has reasoning, but only assistant turns reason",
                          "move the reasoning to the assistant's reply, or remove it", column)
    if reasoning is not None:
        _check_encodable(reasoning, where, column)
    return content, reasoning


def _content_text(content: Any, where: str, role: str, column: str) -> str:
    """A turn's content as text: a string, or a list of text parts (OpenAI/HF: `text`, LLaMA-Factory: `value`)
    joined with newlines. A part without text (an image, audio, video) is refused: training is on text only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _RowProblem(f"{where} ({role}) has content of type {_kind(content)}, not text",
                          "write the content as a string, or a list of text parts", column)
    texts = []
    for number, part in enumerate(content, 1):
        if not isinstance(part, dict):
            raise _RowProblem(f"{where} ({role}) has content part {number} that is {_kind(part)}, not an object",
                              _PART_FIX, column)
        kind = part.get("type")
        if kind is None:  # untyped parts: {"text": ...} or {"image": ...}
            kind = next((key for key in ("text", "value", *_MEDIA_PARTS) if key in part), None)
        kind = kind.strip().lower() if isinstance(kind, str) else kind
        if isinstance(kind, str) and kind in _MEDIA_PARTS:
            raise _RowProblem(f"{where} has {_MEDIA_PARTS[kind]} part", "this tool trains on text only; remove the "
                              "part, or drop the row", column)
        text = part.get("text", part.get("value"))
        if kind not in (*_TEXT_PART_TYPES, "value") or not isinstance(text, str):
            shown = f"`{kind}`" if isinstance(kind, str) else _kind(kind)
            what = f"of type {shown}" if kind not in (*_TEXT_PART_TYPES, "value") else "with no text"
            raise _RowProblem(f"{where} ({role}) has content part {number} {what}", _PART_FIX, column)
        texts.append(text)
    return "\n".join(texts)


def _sharegpt_calls(value: Any, where: str, column: str) -> list[dict]:
    """A ShareGPT `function_call` turn's value: {"name", "arguments"}, or a list of them, usually as JSON text."""
    if isinstance(value, str):
        value = _json_field(value, f"{where} (function_call)", _TOOL_CALL_FIX, column)
    if not isinstance(value, (dict, list)):
        raise _RowProblem(f"{where} (function_call) must be a call, got {_kind(value)}", _TOOL_CALL_FIX, column)
    return _tool_calls(value, where, column)


def _tool_calls(value: Any, where: str, column: str) -> list[dict]:
    """OpenAI `tool_calls` (or ShareGPT calls) → [{"type": "function", "function": {"name", "arguments": {...}}}]."""
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list) or not calls:
        raise _RowProblem(f"{where} has `tool_calls` of type {_kind(value)}, not a list of calls",
                          'write them as [{"type": "function", "function": {"name": "...", "arguments": {...}}}]',
                          column)
    return [_tool_call(call, f"{where}, tool call {number}", column) for number, call in enumerate(calls, 1)]


def _tool_call(call: Any, where: str, column: str) -> dict:
    fix = 'write it as {"type": "function", "function": {"name": "...", "arguments": {...}}}'
    function = call.get("function", call) if isinstance(call, dict) else call  # nested (OpenAI) or flat
    if not isinstance(function, dict):
        raise _RowProblem(f"{where} is {_kind(function)}, not an object", fix, column)
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _RowProblem(f"{where} has no function `name`", fix, column)
    arguments = function.get("arguments")
    if isinstance(arguments, str):  # OpenAI sends arguments as JSON text
        arguments = _json_field(arguments, f"`arguments` of {where} (`{name}`)", 'write them as a JSON object, '
                                'e.g. {"city": "Paris"}', column) if arguments.strip() else None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise _RowProblem(f"{where} (`{name}`) has arguments of type {_kind(arguments)}, not an object",
                          'write them as a JSON object, e.g. {"city": "Paris"}', column)
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    _check_encodable(json.dumps(out, ensure_ascii=False), where, column)
    return out


def _tools(row: dict, column: str | None) -> list[dict] | None:
    """The row's tool schemas as [{"type": "function", "function": {...}}], or None when it has none.
    LLaMA-Factory writes bare schemas ({"name", "description", "parameters"}) as JSON text; OpenAI wraps them."""
    value = row.get(column) if column else None
    if isinstance(value, str):
        value = _json_field(value, f"field `{column}`", _TOOLS_FIX, column) if value.strip() else None
    if value is None or value == []:
        return None
    schemas = [value] if isinstance(value, dict) else value
    if not isinstance(schemas, list):
        raise _RowProblem(f"field `{column}` must be a list of function schemas, got {_kind(value)}", _TOOLS_FIX,
                          column)
    tools = []
    for number, schema in enumerate(schemas, 1):
        where = f"tool {number} in `{column}`"
        if not isinstance(schema, dict):
            raise _RowProblem(f"{where} is {_kind(schema)}, not an object", _TOOLS_FIX, column)
        wrapped = schema.get("type") == "function" and isinstance(schema.get("function"), dict)
        function = schema["function"] if wrapped else schema
        if not isinstance(function.get("name"), str) or not function["name"].strip():
            raise _RowProblem(f"{where} has no `name`", _TOOLS_FIX, column)
        _check_encodable(json.dumps(function, ensure_ascii=False), where, column)
        tools.append({"type": "function", "function": function})
    return tools


def _json_field(text: str, where: str, fix: str, column: str) -> Any:
    """Parse JSON text held in a field (tool calls, arguments, tools); a _RowProblem that names `where` if it fails."""
    try:
        return _loads(text)
    except _JsonLimit as e:
        raise _RowProblem(f"{where}: the JSON {e}", fix, column) from None
    except json.JSONDecodeError as e:
        raise _RowProblem(f"{where} is not valid JSON ({e.msg} at column {e.colno})", fix, column) from None


def _reply_turn(value: Any, column: str) -> dict:
    """A preference row's reply (`chosen` or `rejected`) as an assistant turn: text, a turn, or a list ending in one."""
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, str) and value.strip():
        _check_encodable(value, f"field `{column}`", column)
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        turn = _turn(value, 1, column, 'write it as {"from": "gpt", "value": "..."} or as text')
        if turn["role"] == "assistant":
            return turn
    raise _RowProblem(f"field `{column}` is not an assistant reply", 'write it as {"from": "gpt", "value": "..."} '
                      "or as text", column)


def _check_order(numbered: list[tuple[int, dict]], column: str) -> None:
    """Optional leading system turn, then user/assistant alternating, starting with user, ending with assistant.
    An assistant turn that calls tools is followed by their results (`tool` turns), then the assistant again."""
    for number, turn in numbered[1:]:
        if turn["role"] == "system":
            raise _RowProblem(f"turn {number} of `{column}` is a system turn, but only the first turn may be one",
                              "move the system prompt to the start of the conversation", column)
    chat = numbered[1:] if numbered and numbered[0][1]["role"] == "system" else numbered
    if not any(turn["role"] == "assistant" for _, turn in chat):
        raise _RowProblem(f"`{column}` has no assistant turn",
                          "every conversation needs at least one assistant answer to learn from", column)
    number, first = chat[0]
    if first["role"] != "user":
        kind = "an assistant turn" if first["role"] == "assistant" else "a tool result"
        raise _RowProblem(f"turn {number} of `{column}` is {kind}, but a conversation must start "
                          "with the user", "add the user's message before it, or remove it", column)
    for (before, previous), (number, turn) in zip(chat, chat[1:]):
        _check_follows(before, previous, number, turn, column)
    if chat[-1][1]["role"] == "user":
        raise _RowProblem(f"`{column}` ends with a user turn with no answer",
                          "add the assistant's reply, or remove the last turn", column)
    if chat[-1][1]["role"] == "tool":
        raise _RowProblem(f"`{column}` ends with a tool result with no answer",
                          "add the assistant's reply after it, or remove the last turn", column)


def _check_follows(before: int, previous: dict, number: int, turn: dict, column: str) -> None:
    """Turn `number` may follow turn `before`: see `_check_order`."""
    result_fix = "put each tool result (a `tool` turn; `observation` in ShareGPT) right after the call it answers"
    if "tool_calls" in previous and turn["role"] != "tool":
        raise _RowProblem(f"turn {before} of `{column}` calls a tool, but turn {number} after it is not the tool's "
                          "result", result_fix, column)
    if turn["role"] == "tool" and previous["role"] != "tool" and "tool_calls" not in previous:
        raise _RowProblem(f"turn {number} of `{column}` is a tool result, but turn {before} before it calls no tool",
                          result_fix, column)
    if previous["role"] == "tool" and turn["role"] == "user":
        raise _RowProblem(f"turn {number} of `{column}` is a user turn right after a tool result",
                          "after tool results the assistant answers; add its reply before the user's next message",
                          column)
    if turn["role"] == previous["role"] != "tool":
        raise _RowProblem(f"turns {before} and {number} of `{column}` are both {turn['role']} turns",
                          "user and assistant turns must alternate; merge them or remove one", column)


# ============================================================================ splitting

def split_examples(examples: list[dict], *, eval_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Drop exact duplicates (keep the first), shuffle with `seed`, then cut test, validation and train.

    Sizes are round(n x fraction); a non-zero fraction gets at least 1 row once there are 3 or more examples, and
    train always keeps at least 1.
    """
    unique: list[dict] = []
    seen: set[bytes] = set()
    for example in examples:
        key = duplicate_key(example)
        if key not in seen:
            seen.add(key)
            unique.append(example)
    if not unique:
        raise DataError("no examples to split; the dataset needs at least one row")
    train, validation, test = split_positions(len(unique), eval_fraction=eval_fraction,
                                              test_fraction=test_fraction, seed=seed)
    return Splits(train=[unique[i] for i in train], validation=[unique[i] for i in validation],
                  test=[unique[i] for i in test], duplicates_removed=len(examples) - len(unique))


def duplicate_key(example: dict) -> bytes:
    """Equal for exact duplicates (same fields and text, in any key order): a 16-byte digest, so that the keys of
    a million examples take tens of megabytes."""
    text = json.dumps(example, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def split_positions(n: int, *, eval_fraction: float, test_fraction: float,
                    seed: int) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) positions among `n` examples: a `seed`-shuffled order cut as `split_examples`
    says. Shuffling positions gives the order shuffling the examples themselves gives (it depends on n only)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test, n_eval = _split_size(n, test_fraction), _split_size(n, eval_fraction)
    while n_test + n_eval > n - 1:  # train keeps at least one row: shrink the larger held-out split
        if n_eval >= n_test:
            n_eval -= 1
        else:
            n_test -= 1
    return order[n_test + n_eval:], order[n_test:n_test + n_eval], order[:n_test]


def _split_size(n: int, fraction: float) -> int:
    size = round(n * fraction)
    return max(size, 1) if fraction > 0 and n >= 3 else size


# ============================================================================ length statistics

def length_stats(lengths: list[int], max_seq_length: int) -> dict:
    """rows, min, median, p95 (nearest rank), max (all in tokens) and how many are over `max_seq_length`."""
    if not lengths:
        return {"rows": 0, "min": None, "median": None, "p95": None, "max": None, "truncated": 0}
    ordered = sorted(lengths)
    return {"rows": len(ordered), "min": ordered[0], "median": float(statistics.median(ordered)),
            "p95": ordered[math.ceil(0.95 * len(ordered)) - 1], "max": ordered[-1],
            "truncated": sum(1 for n in ordered if n > max_seq_length)}


def split_stats(splits: Splits, length_fn: Callable[[dict], int], max_seq_length: int) -> dict[str, dict]:
    """`length_stats` of each split; `length_fn(example)` returns its length in tokens."""
    return {name: length_stats([length_fn(ex) for ex in examples], max_seq_length)
            for name, examples in splits.as_dict().items()}


# ============================================================================ config-driven loading, split files

def load_examples(config: RunConfig, rows: list[dict] | None = None) -> PreparedData:
    """Read `config.dataset` (or the given rows), keep `max_rows`, normalise and split as the config says."""
    return collect_examples(config, rows).split(config)


@dataclass
class ExampleStore:
    """A dataset's unique normalised examples in source order, and how they were read.

    `table` is a `datasets.Dataset` with columns `row` (the 1-based source row, for messages) and `example` (the
    example as JSON text): memory-mapped from the data cache for files and Hub datasets, so that a million
    examples cost no Python objects until they are read. Preference rows (what a preference stage learns from,
    `NormalizedData.preference_rows`) are kept as a list with their source rows: they are read only for that.
    """

    table: Any
    format: str
    skipped: list[SkippedRow]
    source: str
    rows_read: int
    duplicates_removed: int
    notices: list[str]
    folder: Path | None = None  # its data-cache folder; None for rows given in memory (not cached)
    key: str | None = None      # its cache key
    preference: str | None = None  # NormalizedData.preference
    preference_rows: list[tuple[int, dict]] = field(default_factory=list)  # (source row, preference row)

    def split(self, config: RunConfig, keep: list[int] | None = None,
              skipped: list[SkippedRow] | None = None) -> PreparedData:
        """Split the examples (only those at positions `keep`, when given) as the config says; `skipped` adds rows
        dropped after normalisation (by the encoder)."""
        keep = list(range(len(self.table))) if keep is None else keep
        if not keep:
            raise DataError("no examples to split; the dataset needs at least one row")
        parts = split_positions(len(keep), eval_fraction=config.eval_fraction, test_fraction=config.test_fraction,
                                seed=config.seed)
        train, validation, test = (ExampleList(self.table, [keep[i] for i in part]) for part in parts)
        splits = Splits(train=train, validation=validation, test=test, duplicates_removed=self.duplicates_removed)
        all_skipped = sorted([*self.skipped, *(skipped or [])], key=lambda s: s.row)
        dropped = {s.row for s in skipped or []}  # a row the encoder refused is no preference row either
        return PreparedData(splits=splits, format=self.format, skipped=all_skipped, source=self.source,
                            rows_read=self.rows_read, notices=self.notices, preference=self.preference,
                            preference_rows=[record for row, record in self.preference_rows if row not in dropped])


class ExampleList(Sequence):
    """A split's examples: positions in an `ExampleStore` table, read (parsed from JSON) when accessed.

    Behaves as the list of example dicts: len, indexing, slicing (a list), iteration, and == with lists."""

    def __init__(self, table: Any, indices: list[int]):
        self.table, self.indices = table, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self._read(self.indices[item])
        return json.loads(self.table[self.indices[item]]["example"])

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self.indices), _READ_BATCH):
            yield from self._read(self.indices[start:start + _READ_BATCH])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, ExampleList)):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"ExampleList({len(self)} examples)"

    def json_lines(self) -> Iterator[str]:
        """Each example as one line of JSON, as stored (no parsing)."""
        for start in range(0, len(self.indices), _READ_BATCH):
            yield from self.table[self.indices[start:start + _READ_BATCH]]["example"]

    def _read(self, indices: list[int]) -> list[dict]:
        return [json.loads(text) for text in self.table[indices]["example"]] if indices else []


_READ_BATCH = 1000  # examples read from the Arrow table at a time


def collect_examples(config: RunConfig, rows: list[dict] | None = None, *, source: str = "rows") -> ExampleStore:
    """Read `config.dataset` (or `rows`, named `source` in messages) one row at a time, normalise, drop exact
    duplicates, and store the unique examples (see `ExampleStore`). A file or Hub dataset is stored in the data
    cache under its content and the data settings; a second call with the same ones reads it back at once."""
    from . import data_cache

    if rows is None:
        if not config.dataset.strip():
            raise DataError("`dataset` is not set; give a file path, a Hub dataset id, or rows", field="dataset")
        source = display_name(config.dataset)
        stream = stream_rows(config.dataset, dataset_config=config.dataset_config, split=config.dataset_split,
                             max_rows=config.max_rows, skip_invalid=config.skip_invalid)
        path = _local_path(config.dataset)
        identity = stream.fingerprint or data_cache.file_digest(path)
    else:
        identity = None
        stream = RowStream(iter(rows), source, max_rows=config.max_rows, text_split=getattr(rows, "text_split", None))
    if identity is None:
        return _store_examples(config, stream, source, folder=None)
    key = data_cache.cache_key("examples", identity, source, config.data_format, config.column_mapping,
                               config.system_prompt, config.skip_invalid, config.max_rows, config.dataset_split,
                               config.dataset_config, _pairs_required(config),
                               data_cache.code_digest(sys.modules[__name__]))
    folder = data_cache.cache_root() / key
    meta = data_cache.read_json(folder / _STORE_META)
    if meta is not None and (folder / _STORE_TABLE).is_file():
        data_cache.mark_used(folder)
        return _open_store(folder, key, meta)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{key}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        store = _store_examples(config, stream, source, folder=tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    data_cache.publish_folder(tmp, folder)
    data_cache.prune(keep=folder)
    return _open_store(folder, key, data_cache.read_json(folder / _STORE_META) or _store_meta(store))


_STORE_TABLE, _STORE_META, _STORE_PREFERENCE = "examples.arrow", ENTRY_META, "preference.jsonl"
_WRITE_BATCH = 1000  # examples per Arrow record batch


def _store_examples(config: RunConfig, stream: RowStream, source: str, folder: Path | None) -> ExampleStore:
    """Normalise the stream row by row and write the unique examples to `folder` (or to memory when None)."""
    import pyarrow as pa

    rows = iter(stream)
    head = _read_head(rows)
    normalizer = RowNormalizer(head, fmt=config.data_format, column_mapping=config.column_mapping,
                               system_prompt=config.system_prompt, skip_invalid=config.skip_invalid, source=source,
                               pairs_required=_pairs_required(config))
    preference_rows: list[tuple[int, dict]] = []
    schema = pa.schema([("row", pa.int64()), ("example", pa.string())])
    sink = pa.OSFile(str(folder / _STORE_TABLE), "wb") if folder else pa.BufferOutputStream()
    seen: set[bytes] = set()
    numbers: list[int] = []
    texts: list[str] = []
    rows_read = duplicates = 0
    with pa.ipc.new_stream(sink, schema) as writer:
        for rows_read, row in enumerate(itertools.chain(head, rows), 1):
            example, record = normalizer.normalize(rows_read, row)
            if record is not None:
                preference_rows.append((rows_read, record))
            if example is None:
                continue
            key = duplicate_key(example)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            numbers.append(rows_read)
            texts.append(json.dumps(example, ensure_ascii=False))
            if len(texts) >= _WRITE_BATCH:
                writer.write_batch(pa.record_batch([numbers, texts], schema=schema))
                numbers, texts = [], []
        if texts:
            writer.write_batch(pa.record_batch([numbers, texts], schema=schema))
    notices = normalizer.finish(rows_read, stream.text_split)
    store = ExampleStore(table=None, format=normalizer.format, skipped=normalizer.skipped, source=source,
                         rows_read=rows_read, duplicates_removed=duplicates, notices=notices,
                         preference=normalizer.preference, preference_rows=preference_rows)
    if folder is None:
        from datasets import Dataset
        from datasets.table import InMemoryTable

        store.table = Dataset(InMemoryTable.from_buffer(sink.getvalue()))
    else:
        from . import data_cache

        sink.close()
        if preference_rows:
            with (folder / _STORE_PREFERENCE).open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in preference_rows)
        data_cache.write_json(folder / _STORE_META, _store_meta(store))
    return store


def _pairs_required(config: RunConfig) -> bool:
    """A pairs stage (DPO, ORPO) needs every row's rejected answer: a row without one is a bad row there."""
    return config.stage in ("dpo", "orpo")


def _store_meta(store: ExampleStore) -> dict:
    return {"format": store.format, "skipped": [[s.row, s.reason] for s in store.skipped], "source": store.source,
            "rows_read": store.rows_read, "duplicates_removed": store.duplicates_removed, "notices": store.notices,
            "preference": store.preference}


def _open_store(folder: Path, key: str, meta: dict) -> ExampleStore:
    from datasets import Dataset

    preference_rows = []
    if meta["preference"] is not None and (folder / _STORE_PREFERENCE).is_file():
        with (folder / _STORE_PREFERENCE).open(encoding="utf-8") as f:
            preference_rows = [(row, record) for row, record in map(json.loads, f)]
    return ExampleStore(table=Dataset.from_file(str(folder / _STORE_TABLE)), format=meta["format"],
                        skipped=[SkippedRow(row, reason) for row, reason in meta["skipped"]], source=meta["source"],
                        rows_read=meta["rows_read"], duplicates_removed=meta["duplicates_removed"],
                        notices=meta["notices"], folder=folder, key=key, preference=meta["preference"],
                        preference_rows=preference_rows)


def write_split_files(splits: Splits, run: RunFolder) -> dict[str, Path]:
    """Write the run's data/train.jsonl, validation.jsonl and test.jsonl (an empty split gives an empty file);
    return the paths."""
    run.data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, examples in splits.as_dict().items():
        paths[name] = run.split_file(name)
        lines = examples.json_lines() if isinstance(examples, ExampleList) else \
            (json.dumps(ex, ensure_ascii=False) for ex in examples)
        with paths[name].open("w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    return paths


def read_jsonl_examples(path: str | Path) -> list[dict]:
    """Normalised examples written by `write_split_files`; an empty file is an empty split."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}", source=str(path))
    examples = _rows_from_json_lines(_decoded_lines(path, path.name), path.name, max_rows=None)
    for number, example in enumerate(examples, 1):
        if not (isinstance(example.get("messages"), list) or isinstance(example.get("text"), str)):
            raise DataError(f'{path.name}, row {number}: not a normalised example; expected {{"messages": [...]}} '
                            'or {"text": "..."}', source=path.name, row=number)
    return examples


__all__ = ["CANONICAL_FIELDS", "FORMATS", "SPLIT_NAMES", "SUPPORTED_EXTENSIONS", "ExampleList", "ExampleStore",
           "NormalizedData", "PreparedData", "RowNormalizer", "RowStream", "SkippedRow", "Splits", "collect_examples",
           "detect_format", "display_name", "duplicate_key", "hub_load_error", "length_stats", "load_examples",
           "normalize_rows", "read_jsonl_examples", "read_rows", "rows_from_text", "split_examples",
           "split_positions", "split_stats", "stream_rows", "write_split_files", "UnreadableLine"]
