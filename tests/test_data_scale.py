"""Large datasets: examples stored once as Arrow, encodings cached by data + tokenizer + template + settings,
previews that read only the first rows, and row-level messages kept through the streamed path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.config import RunConfig
from finetune.data import (
    SKIP_HINT,
    ExampleList,
    SkippedRow,
    collect_examples,
    load_examples,
    normalize_rows,
    read_rows,
    split_examples,
)
from finetune.errors import DataError
from finetune.prepare import prepare_data, preview_data
from finetune.templates import encode_blocks, encode_example, encoding_report


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def alpaca(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Say {i}", "input": "", "output": f"{i} said."} for i in range(start, start + n)]


def cache_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def fresh_encodings(prepared, config: RunConfig) -> dict[str, list[dict]]:
    tok = prepared.model.tokenizer
    return {split: [encode_example(ex, tok, max_seq_length=config.max_seq_length,
                                   train_on_prompt=config.train_on_prompt) for ex in examples]
            for split, examples in prepared.examples.splits.as_dict().items()}


@pytest.fixture
def data_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_DATA_CACHE", str(folder))
    return folder


def test_encodings_are_cached_and_a_second_run_reads_them(demo_model_dir, tmp_path, data_cache):
    path = write_rows(tmp_path / "data.jsonl", alpaca(40))
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(path), max_seq_length=24)
    first = prepare_data(config)
    assert first.encoded == fresh_encodings(first, config)
    entries = cache_files(data_cache)
    assert sorted(name.split("/")[1].split("-")[0].split(".")[0] for name in entries) == \
        ["encoded", "encoded", "examples", "examples"]  # examples.arrow/.json, encoded-<key>.arrow/.json
    second = prepare_data(config)
    assert cache_files(data_cache) == entries  # nothing recomputed
    assert second.encoded["train"].table.cache_files == first.encoded["train"].table.cache_files
    assert second.encoded == first.encoded and second.stats == first.stats
    assert second.examples.splits == first.examples.splits
    assert isinstance(second.examples.splits.train, ExampleList)


def test_the_cache_is_invalidated_by_data_template_and_settings(demo_model_dir, tmp_path, data_cache):
    path = write_rows(tmp_path / "data.jsonl", alpaca(30))
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(path), max_seq_length=64)
    prepare_data(config)
    folders = {p.name for p in data_cache.iterdir()}
    changed = RunConfig(**{**config.__dict__, "max_seq_length": 16})
    short = prepare_data(changed)
    assert short.encoded == fresh_encodings(short, changed)
    assert max(len(enc["input_ids"]) for enc in short.encoded["train"]) == 16
    alpaca_template = RunConfig(**{**config.__dict__, "chat_template": "alpaca"})
    other = prepare_data(alpaca_template)
    assert other.model.template == "alpaca" and other.encoded == fresh_encodings(other, alpaca_template)
    assert {p.name for p in data_cache.iterdir()} == folders  # the same examples, three encodings of them
    assert len(list(data_cache.glob("*/encoded-*.json"))) == 3

    write_rows(path, alpaca(30, start=100))  # same name, same size, new content
    renewed = prepare_data(config)
    assert len({p.name for p in data_cache.iterdir()}) == 2
    assert renewed.examples.splits.train[0]["messages"][0]["content"].startswith("Say 1")
    assert renewed.encoded == fresh_encodings(renewed, config)


def test_the_streamed_path_splits_and_deduplicates_as_split_examples(tmp_path, data_cache):
    rows = alpaca(1500) + alpaca(200)  # 200 exact duplicates, beyond the first written batch
    path = write_rows(tmp_path / "data.jsonl", rows)
    config = RunConfig(dataset=str(path), eval_fraction=0.1, test_fraction=0.05, seed=3)
    data = load_examples(config)
    expected = split_examples(normalize_rows(read_rows(path)).examples, eval_fraction=0.1, test_fraction=0.05,
                              seed=3)
    assert data.splits == expected and data.splits.duplicates_removed == 200
    assert [len(part) for part in data.splits.as_dict().values()] == [1275, 150, 75]
    assert data.splits.train.table.cache_files[0]["filename"].startswith(str(data_cache))  # memory-mapped


def test_row_errors_keep_their_numbers_and_skipped_rows_are_reported(demo_model_dir, tmp_path, data_cache):
    rows = alpaca(1600)
    rows[1499]["output"] = ""  # row 1500: beyond the head that detects the format and the first written batch
    path = write_rows(tmp_path / "data.jsonl", rows)
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(path))
    with pytest.raises(DataError) as info:
        prepare_data(config)
    assert str(info.value) == ("data.jsonl, row 1500: field `output` is empty; every row needs a non-empty answer"
                               f"{SKIP_HINT}")
    assert (info.value.source, info.value.row, info.value.field) == ("data.jsonl", 1500, "output")
    skipping = RunConfig(base_model=str(demo_model_dir), dataset=str(path), skip_invalid=True, max_rows=1510)
    data = load_examples(skipping)
    assert data.skipped == [SkippedRow(1500, "field `output` is empty")] and data.rows_read == 1510
    assert sum(len(part) for part in data.splits.as_dict().values()) == 1509
    assert load_examples(skipping).skipped == data.skipped  # read back from the cache, with its skipped rows


def test_preview_reads_only_the_first_rows(demo_model_dir, tmp_path, data_cache):
    rows = alpaca(3000)
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{not json\n", encoding="utf-8")
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(path), max_seq_length=64)
    with pytest.raises(DataError, match="^big.jsonl: invalid JSON on line 3001"):
        load_examples(config)  # the full path reads every line
    preview = preview_data(config, sample=100)
    assert preview.sample == 100 and preview.examples.rows_read == 100
    assert sum(s["rows"] for s in preview.stats.values()) == 100
    assert not any(data_cache.glob("*/encoded-*"))  # a preview encodes its sample in memory only
    small = preview_data(RunConfig(**{**config.__dict__, "max_rows": 100}), sample=100)
    assert small.sample is None and small.examples.rows_read == 100  # the whole (capped) dataset: exact


def test_cli_preview_of_a_large_file_says_its_lengths_are_estimated(demo_model_dir, tmp_path, capsys):
    path = write_rows(tmp_path / "big.jsonl", alpaca(2100))
    assert main(["preview", str(path), "--base_model", str(demo_model_dir), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "note: previewing the first 2,000 rows of a larger dataset; the counts and token lengths below are " \
           "estimated from them\n" in out
    assert "token lengths per split (max_seq_length = 1024, estimated from a sample of 2,000 rows):\n" in out
    assert "  train      rows=1600 " in out and "  test       rows=200 " in out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores for two encoding processes")
def test_parallel_encoding_equals_encoding_in_process(demo_model_dir, tmp_path, data_cache):
    path = write_rows(tmp_path / "data.jsonl", alpaca(2000))
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(path), max_seq_length=16)
    prepared = prepare_data(config)
    assert len(list(data_cache.glob("*/encoded-*_of_00002.arrow"))) == 2  # two processes, one shard each
    tok = prepared.model.tokenizer
    for split, examples in prepared.examples.splits.as_dict().items():
        sample = [*range(min(20, len(examples))), *range(max(0, len(examples) - 20), len(examples))]
        assert [prepared.encoded[split][i] for i in sample] == \
            [encode_example(examples[i], tok, max_seq_length=16) for i in sample]


def test_a_documents_blocks_stay_together_in_one_split_and_the_report_comes_from_the_cache(demo_model_dir, tmp_path,
                                                                                          data_cache, monkeypatch):
    monkeypatch.setattr("finetune.prepare._REPORT_BATCH", 5)  # the report is summed over batches of encodings
    docs = [{"text": " ".join(f"word{i}-{j}" for j in range(30 + 7 * i))} for i in range(12)]
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(write_rows(tmp_path / "docs.jsonl", docs)),
                       max_seq_length=32, eval_fraction=0.25, test_fraction=0.25)
    first = prepare_data(config)
    tok = first.model.tokenizer
    expected = {split: [enc for ex in examples for enc in encode_blocks(ex, tok, max_seq_length=32)]
                for split, examples in first.examples.splits.as_dict().items()}
    assert first.encoded == expected  # every example's blocks, in split order, in its split only
    assert all(len(encs) > len(getattr(first.examples.splits, split)) for split, encs in expected.items())
    assert first.report == {split: encoding_report(encs) for split, encs in expected.items()}
    second = prepare_data(config)  # read from the cache
    assert second.encoded == first.encoded and second.report == first.report


def test_the_report_of_truncated_chats_summed_over_batches_equals_one_report_of_all(demo_model_dir, tmp_path,
                                                                                     data_cache, monkeypatch):
    monkeypatch.setattr("finetune.prepare._REPORT_BATCH", 7)
    rows = [{"instruction": f"Say {i}", "output": " ".join(["word"] * (2 + i % 15))} for i in range(60)]
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(write_rows(tmp_path / "data.jsonl", rows)),
                       max_seq_length=24, eval_fraction=0.25, test_fraction=0.25)
    prepared = prepare_data(config)
    for split, encs in prepared.encoded.items():
        report = encoding_report(list(encs))
        assert report["answer_tokens_lost"] > 0 and len(encs) > 7
        assert prepared.report[split] == report


def test_preference_rows_are_kept_in_the_cache_and_leave_with_rows_the_encoder_refuses(tmp_path, data_cache):
    rows = [{"prompt": f"Q{i}", "chosen": f"A{i}.", "rejected": f"No{i}."} for i in range(4)]
    config = RunConfig(stage="dpo", dataset=str(write_rows(tmp_path / "pairs.jsonl", rows)))
    first, second = load_examples(config), load_examples(config)  # the second from the cache
    assert first.preference == second.preference == "pairs"
    assert first.preference_rows == second.preference_rows and len(second.preference_rows) == 4
    store = collect_examples(config)
    kept = store.split(config, keep=[0, 1, 3], skipped=[SkippedRow(3, "refused")])
    assert [r["prompt"][0]["content"] for r in kept.preference_rows] == ["Q0", "Q1", "Q3"]
