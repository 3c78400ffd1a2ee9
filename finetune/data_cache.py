"""The data cache: a dataset's normalised examples and their encodings, computed once and reused.

Preparing a million rows (reading, normalising, removing duplicates, then the chat template and loss mask of
every example) takes minutes; a second run, a resume or another run on the same data starts from here at once.

    <cache>/<examples key>/examples.arrow        unique normalised examples in source order: row, example (JSON)
                           examples.json         how they were read: format, skipped rows, notices, counts
                           preference.jsonl      preference rows with their source rows (preference data only)
                           encoded-<key>*.arrow  token ids and labels for one tokenizer + template + settings
                           encoded-<key>.json    rows that could not be encoded; written last, so it marks a
                                                 complete entry

`<cache>` is `$FINETUNE_DATA_CACHE`, else `data/` in the project's cache folder (`$FINETUNE_CACHE`, see
`finetune.demo`): shared by every run, so a new run folder (the app copies the dataset into each) still finds
the entries of a file with the same content. Keys hash what the result depends on: the file's content (not its
name or time), the settings that change the result, the tokenizer's files and chat template, and the source of
the code that computes it, so that an upgrade never serves stale encodings. Entries are written under a
temporary name and renamed into place, so concurrent runs at worst repeat the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20  # bytes read at a time when hashing a file


def cache_root() -> Path:
    from .demo import default_cache_dir

    return Path(os.environ.get("FINETUNE_DATA_CACHE") or default_cache_dir() / "data")


def file_digest(path: Path) -> str:
    """BLAKE2b of the file's bytes: the same content, wherever and whenever it was copied, has the same key."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def code_digest(*modules: Any) -> str:
    """Digest of the source files of `modules`: a changed normaliser or encoder invalidates its cache entries."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def cache_key(*parts: Any) -> str:
    """A short key for JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the entry is missing or unreadable (then it is recomputed)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def publish_folder(tmp: Path, final: Path) -> Path:
    """Move a fully written entry folder into place; if another process was first, keep its entry."""
    try:
        os.rename(tmp, final)
    except OSError:  # `final` exists (written meanwhile) and is not empty
        shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = ["cache_key", "cache_root", "code_digest", "file_digest", "publish_folder", "read_json", "write_json"]
