"""Datasets: a file, a Hub id or in-memory rows → normalised chat examples → train/validation/test splits.

The flow, top to bottom:

    read_rows / rows_from_text     raw rows (plain dicts): .json .jsonl .csv .parquet .txt, a Hub id, a paste box
    detect_format                  alpaca | messages | sharegpt | prompt_completion | text, from the column names
    normalize_rows                 every row → {"messages": [...]} or {"text": ...}; bad rows → DataError (or skipped)
    split_examples                 drop exact duplicates, seeded shuffle, cut test / validation / train
    length_stats / split_stats     token-length summary per split (the caller supplies the tokenizer)
    load_examples                  all of the above, driven by a RunConfig

Every expected mistake raises `DataError` with the file, the 1-based row (or line) number, the field and the fix.
Row numbers count rows as read: for JSON lines that is the n-th non-blank line, for CSV the n-th data row.

Formats (column names are matched case-insensitively; `column_mapping` names them explicitly):

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
import itertools
import json
import math
import random
import re
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import DataError
from .hub import MODEL_ID as HUB_ID

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")
FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
SPLIT_NAMES = ("train", "validation", "test")
# Our field names, which `column_mapping` maps to a dataset's columns.
CANONICAL_FIELDS = ("instruction", "input", "output", "system", "prompt", "completion", "messages",
                    "conversations", "text")
SKIP_HINT = " (or set skip_invalid: true to drop bad rows)"

# Which format each canonical field belongs to; `system` fits every chat format.
_FIELD_FAMILY = {"instruction": "alpaca", "input": "alpaca", "output": "alpaca", "prompt": "prompt_completion",
                 "completion": "prompt_completion", "messages": "conversation", "conversations": "conversation",
                 "text": "text"}
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


# ============================================================================ sources: files, Hub ids, pasted text

def read_rows(source: str | Path, *, dataset_config: str | None = None, split: str = "train",
              max_rows: int | None = None, max_bytes: int | None = None, skip_invalid: bool = False) -> list[dict]:
    """Rows from a local file (by extension) or, for a string that is no file but looks like `org/name`, the Hub.

    `max_rows` stops reading early; `max_bytes` rejects larger local files before reading them. With
    `skip_invalid`, a JSON line that is not one JSON object is left out instead of stopping the read: the rows
    returned then carry it in `.skipped` (see `_JsonLineRows`).
    """
    if max_rows is not None and max_rows < 1:
        raise DataError(f"`max_rows` must be at least 1, or unset (got {max_rows})")
    path = _local_path(source)
    if path is None:
        return _read_hub_rows(str(source).strip(), dataset_config, split, max_rows)
    return _read_local_rows(path, max_rows=max_rows, max_bytes=max_bytes, skip_invalid=skip_invalid)


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


def _read_local_rows(path: Path, *, max_rows: int | None, max_bytes: int | None,
                     skip_invalid: bool = False) -> list[dict]:
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
    rows = readers[ext](path, name, max_rows)
    if not rows:
        raise DataError(f"{name} contains no rows; it needs at least one example", source=name)
    if max_rows:
        del rows[max_rows:]  # in place: a .txt file's rows keep their `text_split`
    return rows


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

def _read_json_file(path: Path, name: str, max_rows: int | None, *, skip_invalid: bool = False) -> list[dict]:
    text = _decode(path.read_bytes(), name)
    if not text.strip():
        return []
    try:
        doc = _loads(text)
    except _JsonLimit as e:
        raise DataError(f"{name}: the JSON {e}", source=name) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines saved as .json: read it anyway
            return _rows_from_json_lines(enumerate(text.splitlines(), 1), name, max_rows, skip_invalid=skip_invalid)
        raise _json_document_error(e, name) from None
    return _rows_from_document(doc, name)


def _read_jsonl_file(path: Path, name: str, max_rows: int | None, *, skip_invalid: bool = False) -> list[dict]:
    lines = _decoded_lines(path, name)
    first = next(((n, line) for n, line in lines if line.strip()), None)
    if first is None:
        return []
    if first[1].lstrip().startswith("["):  # a JSON array saved as .jsonl: read it as one document
        return _read_json_file(path, name, max_rows)
    return _rows_from_json_lines(itertools.chain([first], lines), name, max_rows, skip_invalid=skip_invalid)


class _JsonLineRows(list):
    """Rows read from JSON lines, with the lines left out under `skip_invalid` (`skipped`, by row number) and each
    kept row's own number (`row_numbers`: the n-th non-blank line), so later row errors still name the right row."""

    def __init__(self):
        super().__init__()
        self.skipped: list[SkippedRow] = []
        self.row_numbers: list[int] = []


class _BadLine(Exception):
    """A JSON line that is not one JSON object: the message for people, and the reason alone (for a skipped row)."""

    def __init__(self, message: str, reason: str, row: int | None = None):
        super().__init__(message)
        self.message, self.reason, self.row = message, reason, row


def _rows_from_json_lines(lines: Iterable[tuple[int, str]], name: str, max_rows: int | None, *,
                          skip_invalid: bool = False) -> list[dict]:
    rows = _JsonLineRows()
    row_number = 0
    for number, line in lines:
        if not line.strip():
            continue
        row_number += 1
        try:
            row = _json_line_row(line, number, name)
        except _BadLine as bad:
            if not skip_invalid:
                raise DataError(bad.message, source=name, row=bad.row) from None
            rows.skipped.append(SkippedRow(row_number, bad.reason))
            continue
        rows.append(row)
        rows.row_numbers.append(row_number)
        if max_rows and len(rows) >= max_rows:
            break
    if not rows and rows.skipped:
        first = rows.skipped[0]
        raise DataError(f"{name}: all {len(rows.skipped)} lines are invalid, nothing is left to train on; the first "
                        f"problem: row {first.row}: {first.reason}", source=name)
    return rows


def _json_line_row(line: str, number: int, name: str) -> dict:
    """The row on JSON line `number`; `_BadLine` when the line is not one complete JSON object."""
    try:
        row = _loads(line)
    except _JsonLimit as e:
        reason = f"the JSON on line {number} {e}"
        raise _BadLine(f"{name}: {reason}", reason, row=number) from None
    except json.JSONDecodeError as e:
        reason = f"invalid JSON on line {number}: {e.msg} (column {e.colno})"
        raise _BadLine(f"{name}: {reason}; each line must hold one complete JSON object", reason) from None
    if not isinstance(row, dict):
        reason = (f"line {number}: expected a JSON object with named fields such as "
                  f'{{"instruction": ..., "output": ...}}, got {_kind(row)}')
        raise _BadLine(f"{name}, {reason}", reason)
    return row


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


def _read_csv_file(path: Path, name: str, max_rows: int | None) -> list[dict]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader(line for _, line in _decoded_lines(path, name))
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        named = [h for h in header if h]  # unnamed columns (e.g. a trailing comma from a spreadsheet) are ignored
        duplicates = sorted({h for h in named if named.count(h) > 1})
        if duplicates:
            raise DataError(f"{name}: the header row names the column `{duplicates[0]}` more than once; give every "
                            "column a different name", source=name)
        rows: list[dict] = []
        for values in reader:
            if not values:  # blank line
                continue
            if len(values) > len(header):
                raise DataError(f"{name}, line {reader.line_num}: {len(values)} values but the header has "
                                f"{len(header)} columns; put values that contain commas in double quotes",
                                source=name, row=reader.line_num)
            values += [""] * (len(header) - len(values))
            rows.append({h: v for h, v in zip(header, values) if h})
            if max_rows and len(rows) >= max_rows:
                break
    except csv.Error as e:
        raise DataError(f"{name}, line {reader.line_num}: unreadable CSV ({e}); re-export the file as CSV",
                        source=name, row=reader.line_num) from None
    if not rows:
        raise DataError(f"{name} has a header row but no data rows", source=name)
    return rows


def _read_parquet_file(path: Path, name: str, max_rows: int | None) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        rows: list[dict] = []
        for batch in parquet.iter_batches(batch_size=1024):  # rows per batch; bounded memory for max_rows
            rows.extend(batch.to_pylist())
            if max_rows and len(rows) >= max_rows:
                break
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable Parquet file ({e}); re-export it, or use .jsonl or .csv",
                        source=name) from None
    return rows


class _TextFileRows(list):
    """A .txt file's rows, remembering how the file was cut into documents ("lines" or "paragraphs")."""

    text_split: str | None = None


def _read_text_file(path: Path, name: str, max_rows: int | None) -> list[dict]:
    """One document per paragraph when blank lines separate the text, else one document per line: a corpus of one
    document a line, read as paragraphs, would be a single example. Blank lines before or after all text count for
    nothing."""
    paragraphs: list[list[str]] = [[]]
    for _, line in _decoded_lines(path, name):
        text = line.rstrip("\r\n")
        if text.strip():
            paragraphs[-1].append(text)
        elif paragraphs[-1]:  # a blank line ends a paragraph
            if max_rows and len(paragraphs) >= max(max_rows, 2):  # a second paragraph proves the split
                break
            paragraphs.append([])
    paragraphs = [p for p in paragraphs if p]
    rows = _TextFileRows()
    if len(paragraphs) > 1:
        rows.text_split = "paragraphs"
        rows.extend({"text": "\n".join(p)} for p in paragraphs[:max_rows])
    else:
        rows.text_split = "lines"
        rows.extend({"text": text} for p in paragraphs for text in p[:max_rows])
    return rows


# ---------------------------------------------------------------------------- Hugging Face Hub

def _read_hub_rows(dataset_id: str, dataset_config: str | None, split: str, max_rows: int | None) -> list[dict]:
    import datasets  # heavy (~1 s); only when a Hub id is used

    try:
        with _offline_unless_reachable():
            ds = datasets.load_dataset(dataset_id, name=dataset_config, split=split)
    except Exception as e:  # every failure of a user's dataset id becomes a message for people
        raise hub_load_error(e, dataset_id, dataset_config, split) from e
    if max_rows:
        ds = ds.select(range(min(max_rows, len(ds))))
    rows = ds.to_list()
    if not rows:
        raise DataError(f"dataset `{dataset_id}` (split `{split}`) contains no rows", source=dataset_id)
    return rows


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
    if fmt == "auto":
        fmt = _format_of_family(family, rows, mapping) if family else _detect_from_columns(rows, index, source)
    columns = {canonical: mapping.get(canonical) or _default_column(canonical, fmt, index)
               for canonical in _fields_of(fmt)}
    if fmt in ("messages", "sharegpt"):
        columns["messages"] = mapping.get("messages") or mapping.get("conversations") or \
            _first_present(index, _CONVERSATION_COLUMNS)
        columns.pop("conversations", None)
        columns["chosen"] = index.get("chosen")
        columns["tools"] = index.get("tools")
    if fmt != "text":
        columns.update(_preference_columns(columns, index))
    required = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
                "messages": ("messages",), "sharegpt": ("messages",), "text": ("text",)}[fmt]
    for canonical in required:
        if not columns.get(canonical):
            wanted = "messages` or `conversations" if canonical == "messages" else canonical
            raise DataError(f"{source}: data_format `{fmt}` needs a column `{wanted}`, but the columns found are: "
                            f"{_columns_text(index)}. Map yours with column_mapping, e.g. "
                            f"{{{canonical}: {_example_column(index)}}}", source=source, field=canonical)
    return fmt, {k: v for k, v in columns.items() if v}


def _preference_columns(columns: dict[str, str | None], index: dict[str, str]) -> dict[str, str]:
    """`rejected` when the answer is read from a `chosen` column, and a `label` column (KTO if it holds booleans)."""
    found = {}
    chosen = index.get("chosen")
    if chosen and chosen in (columns.get("chosen"), columns.get("completion"), columns.get("output")) \
            and "rejected" in index:
        found["rejected"] = index["rejected"]
    if "label" in index:
        found["label"] = index["label"]
    return found


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
    families = sorted({_FIELD_FAMILY[k] for k in mapping if k in _FIELD_FAMILY})
    if len(families) > 1:
        names = ", ".join(f"`{k}`" for k in mapping if k in _FIELD_FAMILY)
        raise DataError(f"column_mapping mixes fields of different formats ({names}); map instruction/input/output, "
                        "or prompt/completion, or messages, or text", field="column_mapping")
    family = families[0] if families else None
    if family and fmt != "auto" and family != ("conversation" if fmt in ("messages", "sharegpt") else fmt):
        raise DataError(f"data_format is `{fmt}` but column_mapping maps fields of another format "
                        f"({', '.join(mapping)}); set data_format: auto, or map the fields of `{fmt}`",
                        field="column_mapping")
    return family


def _format_of_family(family: str, rows: list[dict], mapping: dict[str, str]) -> str:
    if family != "conversation":
        return family
    column = mapping.get("messages") or mapping["conversations"]
    return _turn_style(rows, column)


def _turn_style(rows: list[dict], column: str) -> str:
    """`sharegpt` if the first turn found uses from/value keys, else `messages` (role/content)."""
    for row in rows[:20]:
        turns = _parse_turns(row.get(column)) if isinstance(row, dict) else None
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt" if "from" in turns[0] or "value" in turns[0] else "messages"
    return "messages"


def _detect_from_columns(rows: list[dict], index: dict[str, str], source: str) -> str:
    conversation = _first_present(index, _CONVERSATION_COLUMNS)
    if conversation:
        return _turn_style(rows, conversation)
    if "instruction" in index and _first_present(index, _ALPACA_ALIASES["output"]):
        return "alpaca"
    if any(p in index and c in index for p, c in _PROMPT_COMPLETION_PAIRS):
        return "prompt_completion"
    if "text" in index:
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
                   check_example: Callable[[dict], Any] | None = None) -> NormalizedData:
    """Every row → `{"messages": [...]}` (with `tools` when the row has tool schemas) or `{"text": ...}`; KTO rows
    labelled false are left out and counted. A bad row raises a DataError naming the source, the
    1-based row, the field and the fix; with `skip_invalid` it is dropped and recorded in `skipped` instead.

    `check_example`, when given, is called on each normalised example (training passes the tokenizer's encoding,
    `templates.encode_example`); a DataError it raises makes that row a bad row like any other."""
    fmt, columns = _resolve_columns(rows, fmt, column_mapping, source)
    preference = _preference_kind(rows, columns)
    system_prompt = system_prompt if system_prompt and system_prompt.strip() else None
    examples: list[dict] = []
    skipped: list[SkippedRow] = []
    preference_rows: list[dict] = []
    first_problem = ""
    numbers = getattr(rows, "row_numbers", None) or range(1, len(rows) + 1)  # JSON lines may have skipped some
    for number, row in zip(numbers, rows):
        try:
            example = _normalize_row(row, fmt, columns, system_prompt)
            record = _preference_row(row, example, columns, preference) if preference else None
            if check_example is not None:
                _check_example(check_example, example)
        except _RowProblem as p:
            message = f"{source}, row {number}: {p.reason}" + (f"; {p.fix}" if p.fix else "")
            if not skip_invalid:
                raise DataError(message + SKIP_HINT, source=source, row=number, field=p.field) from None
            skipped.append(SkippedRow(number, p.reason))
            first_problem = first_problem or message
            continue
        if record is not None:
            preference_rows.append(record)
        if record is None or record.get("label", True):  # a bad answer (KTO label false) is never a target
            examples.append(example)
    label_false = sum(1 for r in preference_rows if r.get("label") is False)
    if not examples and label_false:
        raise DataError(f"{source}: every usable row is labelled false (a bad answer), and supervised fine-tuning "
                        "learns only answers labelled true; nothing is left to train on", source=source,
                        field=columns["label"])
    if not examples:
        raise DataError(f"{source}: all {len(rows)} rows are invalid, nothing is left to train on; the first "
                        f"problem: {first_problem}", source=source)
    text_split = getattr(rows, "text_split", None)
    notices = _reading_notices(source, text_split, len(rows), preference, len(examples), label_false)
    return NormalizedData(examples=examples, format=fmt, skipped=skipped, notices=notices, preference=preference,
                          preference_rows=preference_rows, label_false=label_false, text_split=text_split)


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


def _check_example(check_example: Callable[[dict], Any], example: dict) -> None:
    """Run the caller's check; its DataError (reason and fix in one message) becomes this row's problem."""
    try:
        check_example(example)
    except DataError as e:
        raise _RowProblem(str(e), "", e.field) from None


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
    else:  # prompt_completion
        user = _required_text(row, columns["prompt"], "every row needs a non-empty prompt")
        answer = _required_text(row, columns["completion"], "every row needs a non-empty answer")
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if turns[0]["role"] != "system":
        system = _optional_text(row, columns.get("system")) or system_prompt
        if system:
            turns.insert(0, {"role": "system", "content": system})
    tools = _tools(row, columns.get("tools"))
    return {"messages": turns, "tools": tools} if tools else {"messages": turns}


def _preference_row(row: dict, example: dict, columns: dict[str, str], kind: str) -> dict | None:
    """The row in TRL's conversational preference shape: {prompt, chosen, rejected} or {prompt, completion, label};
    None for a row of a pairs file with no rejected answer (it is still a fine-tuning example, but no pair)."""
    messages = example["messages"]
    record: dict[str, Any] = {"prompt": messages[:-1]}
    if kind == "pairs":
        rejected = columns["rejected"]
        if row.get(rejected) is None:
            return None
        record.update(chosen=messages[-1:], rejected=[_reply_turn(row.get(rejected), rejected)])
    else:
        record.update(completion=messages[-1:], label=_kto_label(row, columns["label"]))
    if "tools" in example:
        record["tools"] = example["tools"]
    return record


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
    if calls is not None:
        if role != "assistant":
            raise _RowProblem(f"{where} ({role}) has `tool_calls`, but only assistant turns call tools",
                              "move the calls to the assistant turn that makes them", column)
        text = "" if content is None else _content_text(content, where, role, column)
        _check_encodable(text, where, column)
        return {"role": "assistant", "content": text, "tool_calls": _tool_calls(calls, where, column)}
    content = _content_text(content, where, role, column)
    if role != "system" and not content.strip():
        fix = "write what the tool returned" if role == "tool" else "every user and assistant turn needs content"
        raise _RowProblem(f"{where} ({role}) is empty", fix, column)
    _check_encodable(content, where, column)
    out = {"role": role, "content": content}
    if role == "tool" and isinstance(turn.get("tool_call_id"), str) and turn["tool_call_id"]:
        out["tool_call_id"] = turn["tool_call_id"]  # some templates (Mistral's) pair results with calls by id
    return out


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
    seen: set[str] = set()
    for example in examples:
        key = json.dumps(example, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            unique.append(example)
    if not unique:
        raise DataError("no examples to split; the dataset needs at least one row")
    shuffled = unique[:]
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n_test, n_eval = _split_size(n, test_fraction), _split_size(n, eval_fraction)
    while n_test + n_eval > n - 1:  # train keeps at least one row: shrink the larger held-out split
        if n_eval >= n_test:
            n_eval -= 1
        else:
            n_test -= 1
    return Splits(train=shuffled[n_test + n_eval:], validation=shuffled[n_test:n_test + n_eval],
                  test=shuffled[:n_test], duplicates_removed=len(examples) - n)


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

def load_examples(config: RunConfig, rows: list[dict] | None = None, *,
                  check_example: Callable[[dict], Any] | None = None) -> PreparedData:
    """Read `config.dataset` (or the given rows), keep `max_rows`, normalise and split as the config says.
    `check_example`: see `normalize_rows` (a row it refuses is an error, or skipped with `skip_invalid`)."""
    if rows is None:
        if not config.dataset.strip():
            raise DataError("`dataset` is not set; give a file path, a Hub dataset id, or rows", field="dataset")
        source = display_name(config.dataset)
        rows = read_rows(config.dataset, dataset_config=config.dataset_config, split=config.dataset_split,
                         max_rows=config.max_rows, skip_invalid=config.skip_invalid)
    else:
        source = "rows"
        rows = rows[:config.max_rows] if config.max_rows else rows
    normalized = normalize_rows(rows, fmt=config.data_format, column_mapping=config.column_mapping,
                                system_prompt=config.system_prompt, skip_invalid=config.skip_invalid, source=source,
                                check_example=check_example)
    splits = split_examples(normalized.examples, eval_fraction=config.eval_fraction,
                            test_fraction=config.test_fraction, seed=config.seed)
    unreadable = getattr(rows, "skipped", [])  # JSON lines left out under skip_invalid: skipped rows like any other
    skipped = sorted(unreadable + normalized.skipped, key=lambda s: s.row)
    return PreparedData(splits=splits, format=normalized.format, skipped=skipped, source=source,
                        rows_read=len(rows) + len(unreadable), notices=normalized.notices)


def write_split_files(splits: Splits, folder: str | Path) -> dict[str, Path]:
    """Write train.jsonl, validation.jsonl and test.jsonl (an empty split gives an empty file); return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, examples in splits.as_dict().items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples),
                               encoding="utf-8")
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


__all__ = ["CANONICAL_FIELDS", "FORMATS", "SPLIT_NAMES", "SUPPORTED_EXTENSIONS", "NormalizedData", "PreparedData",
           "SkippedRow", "Splits", "detect_format", "display_name", "hub_load_error", "length_stats",
           "load_examples", "normalize_rows", "read_jsonl_examples", "read_rows", "rows_from_text",
           "split_examples", "split_stats", "write_split_files"]
