"""prepare_data: data → template → tokens, the one path shared by training, the CLI preview and the Data tab."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.config import RunConfig
from finetune.data import load_examples, split_stats
from finetune.errors import DataError
from finetune.prepare import load_templated_tokenizer, prepare_data
from finetune.templates import IGNORE_INDEX, encode_example

ROOT = Path(__file__).resolve().parents[1]
QA = ROOT / "examples" / "data" / "python_qa.jsonl"


def test_every_split_is_encoded_as_training_encodes_it(demo_model_dir):
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(QA), max_seq_length=48, train_on_prompt=True)
    prepared = prepare_data(config)
    assert prepared.model.template == "tokenizer"  # the demo tokenizer's own ChatML template
    assert prepared.model.source.path == str(demo_model_dir) and prepared.model.source.notice is None
    splits = load_examples(config).splits
    assert prepared.examples.splits == splits
    tok = prepared.model.tokenizer
    for split, examples in splits.as_dict().items():
        assert prepared.encoded[split] == [encode_example(ex, tok, max_seq_length=48, train_on_prompt=True)
                                           for ex in examples]
    length = lambda ex: encode_example(ex, tok, max_seq_length=48, train_on_prompt=True)["length"]  # noqa: E731
    assert prepared.stats == split_stats(splits, length, 48)
    assert prepared.stats["train"]["truncated"] > 0  # 48 tokens cut some examples: the stats say so
    assert prepared.lengths["test"] == [enc["length"] for enc in prepared.encoded["test"]]


def test_examples_left_without_answer_tokens_are_dropped_from_the_dataset_only(demo_model_dir):
    rows = [{"instruction": "word " * 60, "output": "long prompt"}] + \
           [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(5)]
    config = RunConfig(base_model=str(demo_model_dir), eval_fraction=0.0, test_fraction=0.0, max_seq_length=32)
    prepared = prepare_data(config, rows)
    assert len(prepared.encoded["train"]) == 6 and prepared.stats["train"]["rows"] == 6
    assert prepared.dropped("train") == 1
    dataset = prepared.dataset("train")
    assert len(dataset) == 5 and dataset.column_names == ["input_ids", "labels"]
    assert all(any(label != IGNORE_INDEX for label in row["labels"]) for row in dataset)
    assert prepared.dataset("validation") is None and prepared.dropped("validation") == 0


def test_limit_encodes_a_sample_of_each_split(demo_model_dir):
    config = RunConfig(base_model=str(demo_model_dir), dataset=str(QA))
    prepared = prepare_data(config, limit=2)
    full = load_examples(config).splits
    assert {k: len(v) for k, v in prepared.encoded.items()} == {k: min(2, len(v)) for k, v in full.as_dict().items()}
    assert prepared.stats["train"]["rows"] == 2
    assert prepared.examples.splits == full  # the examples themselves are all kept


def test_a_given_tokenizer_loader_is_used_and_data_mistakes_come_first(demo_model_dir, tmp_path):
    calls = []

    def cached(config):
        calls.append(config.base_model)
        return load_templated_tokenizer(config)

    config = RunConfig(base_model=str(demo_model_dir), dataset=str(QA), chat_template="alpaca")
    assert prepare_data(config, tokenizer_for=cached).model.template == "alpaca"
    assert calls == [str(demo_model_dir)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi"}\n')  # no output
    missing_model = RunConfig(base_model=str(tmp_path / "no-model"), dataset=str(bad))
    with pytest.raises(DataError, match="^bad.jsonl: could not detect the data format"):  # not "no config.json"
        prepare_data(missing_model)
