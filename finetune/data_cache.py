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

The cache is kept within a size budget (`$FINETUNE_DATA_CACHE_MAX_GB`, default 20 GB; 0 = never prune): after an
entry is written, the least recently used other entries are removed until the cache fits (an entry's folder
time is its last use; a cache hit renews it). `python -m finetune cache list|clear` shows or empties it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .run_folder import folder_bytes

_CHUNK = 1 << 20  # bytes read at a time when hashing a file
ENTRY_META = "examples.json"  # an entry's description (see the layout above); `finetune.data` writes it
MAX_GB_ENV = "FINETUNE_DATA_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0  # an encoding of 1M chat rows takes a few GB

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- size budget: least recently used
@dataclass
class CacheEntry:
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch
    source: str       # the data it holds, as messages name it ("" when the entry's description can't be read)

    @property
    def last_used_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.last_used))


def mark_used(folder: Path) -> None:
    """A cache hit: `folder` becomes the most recently used entry."""
    try:
        os.utime(folder)
    except OSError:  # removed meanwhile (`finetune cache clear`): nothing to renew
        pass


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """The complete entries (temporary folders of writes in progress left out), least recently used first."""
    root = cache_root() if root is None else root
    entries = []
    for path in root.iterdir() if root.is_dir() else ():
        if path.is_dir() and not path.name.startswith("."):
            meta = read_json(path / ENTRY_META) or {}
            try:
                entries.append(CacheEntry(path, folder_bytes(path), path.stat().st_mtime, str(meta.get("source", ""))))
            except OSError:  # removed meanwhile by another process's pruning
                continue
    return sorted(entries, key=lambda entry: entry.last_used)


def max_cache_bytes() -> int | None:
    """The size budget from $FINETUNE_DATA_CACHE_MAX_GB (default 20 GB); None when it is 0 (never prune)."""
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    try:
        gigabytes = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:
        raise ConfigError(f"${MAX_GB_ENV} must be a number of gigabytes (got {raw!r}); set it to e.g. "
                          f"{DEFAULT_MAX_GB:g}, or 0 to never prune the data cache")
    return int(gigabytes * 1e9) if gigabytes else None


def prune(keep: Path) -> list[Path]:
    """After `keep` was written: remove the least recently used other entries until the cache fits its budget
    (`keep` stays even when it alone is larger). Returns the removed folders."""
    mark_used(keep)
    budget = max_cache_bytes()
    if budget is None:
        return []
    entries = cache_entries(keep.parent)
    total = sum(entry.bytes for entry in entries)
    removed = []
    for entry in entries:
        if total <= budget:
            break
        if entry.path == keep:
            continue
        try:
            shutil.rmtree(entry.path)
        except OSError as e:
            log.warning("data cache: could not remove %s (%s); remove it by hand or run `finetune cache clear`",
                        entry.path, e)
            continue
        total -= entry.bytes
        removed.append(entry.path)
        log.info("data cache over its %s budget: removed %s (%s, %s, last used %s)", human_size(budget),
                 entry.path.name, entry.source or "unknown data", human_size(entry.bytes), entry.last_used_text)
    return removed


def clear(root: Path | None = None) -> tuple[int, int]:
    """Remove every entry and any temporary folder a killed write left; (entries removed, bytes freed)."""
    root = cache_root() if root is None else root
    entries = freed = 0
    for path in list(root.iterdir()) if root.is_dir() else ():
        if path.is_dir():
            freed += folder_bytes(path)
            entries += not path.name.startswith(".")
            shutil.rmtree(path)
        else:
            freed += path.stat().st_size
            path.unlink()
    return entries, freed


def human_size(n: int) -> str:
    """Bytes in decimal units: 999 B, 12.3 kB, 4.5 MB, 2.90 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


__all__ = ["DEFAULT_MAX_GB", "MAX_GB_ENV", "CacheEntry", "cache_entries", "cache_key", "cache_root", "clear",
           "code_digest", "file_digest", "human_size", "mark_used", "max_cache_bytes", "prune", "publish_folder",
           "read_json", "write_json"]
