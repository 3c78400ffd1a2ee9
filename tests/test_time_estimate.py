"""The expected duration before a run (and its cost on a Space), from a throughput measured here with a few real
training steps and cached per settings; after the run, results.json holds the estimate beside the actual duration."""

from __future__ import annotations

import json

import pytest

from finetune.config import RunConfig
from finetune.errors import FinetuneError
from finetune.estimate import (
    Speed,
    _speed,
    cached_step_s,
    cached_throughput,
    duration_text,
    estimate_duration,
    mean_tokens,
    measure_in_child,
    save_throughput,
    space_cost,
    throughput_key,
)
from finetune.run_folder import RunFolder
from finetune.train import train
from ui import settings_tab, train_tab

DATA = {"dataset": "x.jsonl", "rows": {"train": 80, "validation": 10, "test": 10},
        "train_lengths": [50, 150, 300, 900], "tokenizer_model": "demo"}


def test_estimate_counts_training_evaluations_and_the_test_split():
    config = RunConfig(base_model="demo", num_train_epochs=2, batch_size=4, gradient_accumulation_steps=2,
                       max_seq_length=512)
    # 80 rows / (4 x 2) = 10 steps an epoch, 20 in all; evaluations every 20 // 5 = 4 steps: 5, + the final one
    est = estimate_duration(config, DATA["rows"], 250.0, tokens_per_s=100.0)
    assert est.train_tokens == 80 * 2 * 250
    assert est.eval_tokens == (6 * 10 + 2 * 10) * 250
    assert est.train_s == 400.0 and est.eval_s == pytest.approx(20_000 / 300)
    steps = estimate_duration(config.replace(max_steps=3), DATA["rows"], 250.0, tokens_per_s=100.0)
    assert steps.train_tokens == 3 * 4 * 2 * 250


def test_a_fixed_cost_per_micro_batch_is_added_for_every_micro_batch():
    config = RunConfig(base_model="demo", num_train_epochs=2, batch_size=4, gradient_accumulation_steps=2)
    est = estimate_duration(config, DATA["rows"], 250.0, tokens_per_s=100.0, step_s=0.5)
    assert est.micro_batches == 80 * 2 // 4 and est.train_s == 400.0 + 40 * 0.5


def test_the_speed_is_the_line_through_a_long_and_a_short_step():
    speed = _speed(long_tokens=4000, short_tokens=500, long_s=2.0, short_s=0.6)  # 0.4 ms a token, 0.4 s a step
    assert speed.tokens_per_s == pytest.approx(2500) and speed.step_s == pytest.approx(0.4)
    # times that say nothing more (noise: the short step as slow as the long one) are all per token
    assert _speed(4000, 500, 2.0, 2.1) == Speed(tokens_per_s=2000.0, step_s=0.0)
    assert _speed(4000, 500, 2.0, 0.1) == Speed(tokens_per_s=2000.0, step_s=0.0)  # a negative fixed cost


def test_token_lengths_are_capped_at_max_seq_length_and_durations_read_as_estimates():
    assert mean_tokens([50, 150, 300, 900], 512) == (50 + 150 + 300 + 512) / 4
    assert mean_tokens([], 512) == 0.0
    assert [duration_text(s) for s in (0.2, 42, 90, 719, 3600, 7530)] == \
        ["1 s", "42 s", "2 min", "12 min", "1 h 00 min", "2 h 06 min"]


def test_the_cache_is_kept_per_settings_and_hardware(tmp_path):
    config = RunConfig(base_model="demo", max_seq_length=256, batch_size=2)
    save_throughput(config, 1234.5, cache_dir=tmp_path, hardware="GPU X")
    assert cached_throughput(config, cache_dir=tmp_path, hardware="GPU X") == 1234.5
    assert cached_throughput(config, cache_dir=tmp_path, hardware="GPU Y") is None
    for change in ({"max_seq_length": 512}, {"batch_size": 4}, {"method": "full"}, {"precision": "fp32"},
                   {"gradient_checkpointing": True}, {"base_model": "other"}):
        assert cached_throughput(config.replace(**change), cache_dir=tmp_path, hardware="GPU X") is None, change
    assert cached_throughput(config.replace(num_train_epochs=9, lora_r=4), cache_dir=tmp_path,
                             hardware="GPU X") == 1234.5  # what doesn't change a step's speed shares the entry
    assert json.loads(throughput_key(config, "GPU X")) == ["demo", "lora", "auto", 256, 2, False, "GPU X"]


def test_space_cost_comes_from_the_hardware_price_table():
    hour = 3600.0
    assert space_cost(hour, {"SPACE_ID": "u/s", "SPACE_HARDWARE": "t4-small"}) == ("t4-small", 0.40,
                                                                                   pytest.approx(0.40))
    assert space_cost(hour / 2, {"SPACE_ID": "u/s", "SPACE_HARDWARE": "a10g-large"}) == ("a10g-large", 1.50,
                                                                                         pytest.approx(0.75))
    assert space_cost(hour, {"SPACE_HARDWARE": "t4-small"}) is None          # not on a Space
    assert space_cost(hour, {"SPACE_ID": "u/s", "SPACE_HARDWARE": "new-gpu"}) is None  # no listed price


def test_time_report_says_what_is_missing_then_the_duration_and_the_cost(tmp_path):
    config = RunConfig(base_model="demo", num_train_epochs=2, batch_size=4, gradient_accumulation_steps=2,
                       max_seq_length=512)
    assert "load a dataset on the **Data** tab first" in settings_tab.time_report(config, {}, cache_dir=tmp_path)
    assert "Press **Estimate time**" in settings_tab.time_report(config, DATA, cache_dir=tmp_path)
    save_throughput(config, 100.0, cache_dir=tmp_path)
    text = settings_tab.time_report(config, DATA, cache_dir=tmp_path, environ={})
    # 80 rows x 2 epochs x 253 tokens = 40,480 at 100/s = 405 s; evaluation 20,240 / 300 = 67 s
    assert "Expected duration: **about 8 min** (training 7 min + evaluation 1 min; 40,480 training tokens at " \
           "100 tokens/s, measured here)." in text
    assert "USD" not in text
    space = settings_tab.time_report(config, DATA, cache_dir=tmp_path,
                                     environ={"SPACE_ID": "u/s", "SPACE_HARDWARE": "a10g-small"})
    assert "On this Space's `a10g-small` hardware (1.00 USD an hour) that is about **0.13 USD**" in space
    assert "https://huggingface.co/docs/hub/spaces-gpus, as read on 2026-11-29; prices may change" in space
    other = settings_tab.time_report(config.replace(base_model="other/model"), {**DATA}, cache_dir=tmp_path)
    assert "Press **Estimate time**" in other  # measured per model


def test_measured_in_a_child_process_cached_and_shown(demo_model_dir, tmp_path):
    """The "Estimate time" path: a child process trains a few real steps of the demo model; the speed is cached."""
    config = RunConfig(base_model=str(demo_model_dir), max_seq_length=32, batch_size=2)
    tokens_per_s = measure_in_child(config, cache_dir=tmp_path)
    assert tokens_per_s > 0
    assert cached_throughput(config, cache_dir=tmp_path) == tokens_per_s
    assert cached_step_s(config, cache_dir=tmp_path) >= 0.0
    assert "Expected duration: **about" in settings_tab.time_report(config, DATA, cache_dir=tmp_path)


def test_a_failed_measurement_says_why(tmp_path):
    config = RunConfig(base_model=str(tmp_path / "no-such-model"), offline_fallback=False, max_seq_length=32)
    with pytest.raises(FinetuneError) as e:
        measure_in_child(config, cache_dir=tmp_path)
    assert str(e.value).startswith("measuring the speed failed: error: ")
    assert cached_throughput(config, cache_dir=tmp_path) is None


def test_results_record_the_estimate_beside_the_actual_duration(demo_model_dir, tmp_path):
    rows = [{"prompt": f"Say {i}", "completion": f"{i}"} for i in range(8)]
    out = tmp_path / "run"
    out.mkdir()
    RunFolder(out).write_estimate({"duration_s": 12.5})
    config = RunConfig(base_model=str(demo_model_dir), max_steps=2, batch_size=2, gradient_accumulation_steps=1,
                       max_seq_length=32, eval_fraction=0.0, test_fraction=0.0, output_dir=str(out))
    results = train(config, rows=rows).results
    assert results["estimated_duration_s"] == 12.5
    assert 0 < results["actual_duration_s"] < results["wall_seconds"]
    assert RunFolder(out).read_results()["estimated_duration_s"] == 12.5
    table = dict(train_tab.metrics_table({**results, "actual_duration_s": 610.0}))
    assert table["duration: estimated → actual"] == "12 s → 10 min"
    assert "duration: estimated → actual" not in dict(train_tab.metrics_table({"actual_duration_s": 3.0}))
