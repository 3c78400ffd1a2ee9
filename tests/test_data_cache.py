"""The data cache's size budget: the least recently used entries go once it is exceeded, never the entry in use; a
cache hit renews an entry; `finetune cache list|clear` shows and empties it. Entries are real ones (a few rows)."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path

import pytest

from finetune import data_cache
from finetune.cli import main
from finetune.config import RunConfig
from finetune.data import collect_examples
from finetune.errors import ConfigError
from finetune.prepare import prepare_data
from finetune.run_folder import folder_bytes


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_DATA_CACHE", str(folder))
    monkeypatch.delenv(data_cache.MAX_GB_ENV, raising=False)
    return folder


def dataset(folder: Path, name: str, rows: int = 20) -> RunConfig:
    """A small alpaca file `name`.jsonl whose rows differ from every other name's."""
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"{name} {i}?", "input": "", "output": f"{name} {i}."}) + "\n"
                            for i in range(rows)), encoding="utf-8")
    return RunConfig(dataset=str(path))


def entry(config: RunConfig) -> Path:
    """Read `config`'s data through the cache (a hit or a new entry); its entry folder."""
    return collect_examples(config).folder


def set_budget(monkeypatch, n_bytes: int) -> None:
    monkeypatch.setenv(data_cache.MAX_GB_ENV, repr(n_bytes / 1e9))


def names(cache: Path) -> set[str]:
    return {path.name for path in cache.iterdir()}


def used_at(folder: Path, when: str) -> None:
    """Set an entry's last use to `when` (local time, "YYYY-MM-DD HH:MM", as `cache list` prints it)."""
    seconds = datetime.strptime(when, "%Y-%m-%d %H:%M").timestamp()
    os.utime(folder, (seconds, seconds))


def test_the_least_recently_used_entries_go_beyond_the_budget_and_a_hit_renews_an_entry(tmp_path, cache, monkeypatch,
                                                                                         caplog):
    a, b = entry(dataset(tmp_path, "a")), entry(dataset(tmp_path, "b"))
    used_at(a, "2024-05-01 09:00")  # a was used first, b after it
    used_at(b, "2024-05-02 17:45")
    size = folder_bytes(a)
    assert entry(dataset(tmp_path, "a")) == a  # a hit: a is now the most recently used
    budget = 2 * size + size // 2  # room for two entries of this size, not three
    set_budget(monkeypatch, budget)
    with caplog.at_level(logging.INFO, logger="finetune.data_cache"):
        c = entry(dataset(tmp_path, "c"))
    assert names(cache) == {a.name, c.name}  # b, the least recently used, went; without the hit it would be a
    assert [r.getMessage() for r in caplog.records if r.name == "finetune.data_cache"] == [
        f"data cache over its {data_cache.human_size(budget)} budget: removed {b.name} (b.jsonl, "
        f"{data_cache.human_size(folder_bytes(c))}, last used 2024-05-02 17:45)"]


def test_the_entry_in_use_stays_even_when_it_alone_is_over_the_budget(tmp_path, cache, monkeypatch):
    old = entry(dataset(tmp_path, "old"))
    set_budget(monkeypatch, 1)
    new = entry(dataset(tmp_path, "new"))
    assert names(cache) == {new.name} and data_cache.prune(keep=new) == []
    assert len(collect_examples(dataset(tmp_path, "new")).table) == 20  # still readable
    assert not old.exists()


def test_a_budget_of_zero_never_prunes_and_a_bad_one_names_the_variable(tmp_path, cache, monkeypatch):
    monkeypatch.setenv(data_cache.MAX_GB_ENV, "0")
    folders = {entry(dataset(tmp_path, name)).name for name in ("a", "b", "c")}
    assert names(cache) == folders
    monkeypatch.setenv(data_cache.MAX_GB_ENV, "20GB")
    with pytest.raises(ConfigError) as info:
        entry(dataset(tmp_path, "d"))
    assert str(info.value) == ("$FINETUNE_DATA_CACHE_MAX_GB must be a number of gigabytes (got '20GB'); set it to "
                               "e.g. 20, or 0 to never prune the data cache")
    monkeypatch.delenv(data_cache.MAX_GB_ENV)
    assert data_cache.max_cache_bytes() == 20_000_000_000  # the default


def test_a_new_encoding_of_a_cached_entry_prunes_too(demo_model_dir, tmp_path, cache, monkeypatch):
    """The encodings are most of an entry's size: writing one into an entry that was already cached counts."""
    config = dataset(tmp_path, "a")
    config = RunConfig(**{**config.__dict__, "base_model": str(demo_model_dir), "max_seq_length": 32})
    a, b = entry(config), entry(dataset(tmp_path, "b"))
    used_at(b, "2024-05-01 09:00")
    set_budget(monkeypatch, folder_bytes(cache))  # everything fits until an encoding is added
    prepare_data(config)
    assert names(cache) == {a.name} and list(a.glob("encoded-*.json"))


def test_cli_lists_and_clears_the_cache(tmp_path, cache, monkeypatch, capsys):
    a, b = entry(dataset(tmp_path, "a")), entry(dataset(tmp_path, "b"))
    used_at(a, "2024-05-02 17:45")
    used_at(b, "2024-05-01 09:00")
    (cache / ".leftover.1234.tmp").mkdir()  # a write killed half-way
    monkeypatch.setenv(data_cache.MAX_GB_ENV, "1.5")
    assert main(["cache", "list"]) == 0
    size = data_cache.human_size(folder_bytes(a))
    total = data_cache.human_size(folder_bytes(a) + folder_bytes(b))
    assert capsys.readouterr().out.splitlines() == [
        f"{b.name}  {size:>9}  last used 2024-05-01 09:00  b.jsonl",  # least recently used first
        f"{a.name}  {size:>9}  last used 2024-05-02 17:45  a.jsonl",
        f"{cache}: 2 entries, {total} (budget 1.50 GB; $FINETUNE_DATA_CACHE_MAX_GB changes it)"]
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out == f"removed 2 entries ({total}) from {cache}\n"
    assert names(cache) == set()
    monkeypatch.setenv(data_cache.MAX_GB_ENV, "0")
    assert main(["cache"]) == 0
    assert capsys.readouterr().out == f"{cache}: 0 entries, 0 B (never pruned; $FINETUNE_DATA_CACHE_MAX_GB changes " \
                                      "it)\n"
    monkeypatch.setenv(data_cache.MAX_GB_ENV, "-1")
    assert main(["cache", "list"]) == 2
    assert capsys.readouterr().err.startswith("error: $FINETUNE_DATA_CACHE_MAX_GB must be a number of gigabytes")


def test_human_size():
    assert [data_cache.human_size(n) for n in (999, 12_345, 4_500_000, 2_900_000_000)] == \
        ["999 B", "12.3 kB", "4.5 MB", "2.90 GB"]
