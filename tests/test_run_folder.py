"""RunFolder: the run folder's layout and the round trips of its files (pure file I/O, no model)."""

from __future__ import annotations

import json
import logging

import pytest

from finetune.config import RunConfig
from finetune.errors import ConfigError
from finetune.run_folder import RunFolder, folder_bytes, read_json_object, write_json_atomic


def test_layout_matches_the_readme(tmp_path):
    run = RunFolder(tmp_path)
    assert run.config_file == tmp_path / "run.yaml"
    assert run.status_file == tmp_path / "status.json"
    assert run.metrics_file == tmp_path / "metrics.jsonl"
    assert run.results_file == tmp_path / "results.json"
    assert run.split_file("validation") == tmp_path / "data" / "validation.jsonl"
    assert run.checkpoints_dir == tmp_path / "checkpoints"
    assert run.final_dir_for("lora") == run.final_dir_for("qlora") == tmp_path / "adapter"
    assert run.final_dir_for("full") == tmp_path / "model"
    assert run.merged_dir == tmp_path / "merged"
    assert run.answers_file == tmp_path / "eval" / "answers.jsonl"
    assert run.log_file == tmp_path / "log.txt"
    assert RunFolder(str(tmp_path)) == run and RunFolder(tmp_path / "other") != run
    assert list(tmp_path.iterdir()) == []  # naming paths creates nothing


def test_config_round_trip_and_missing_config(tmp_path):
    run = RunFolder(tmp_path)
    assert not run.has_config
    with pytest.raises(ConfigError, match="config file not found"):
        run.read_config()
    config = RunConfig(base_model="demo", dataset="d.jsonl", method="qlora", lora_r=4, output_dir=str(tmp_path))
    run.write_config(config)
    assert run.has_config
    assert run.read_config() == config


def test_status_round_trip_is_atomic_and_missing_or_damaged_status_is_empty(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_status() == {}
    run.write_status({"state": "running", "pid": 12, "total_steps": 30})
    run.write_status({"state": "finished", "pid": 12})
    assert run.read_status() == {"state": "finished", "pid": 12}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left behind
    run.status_file.write_text('{"state": "runn')
    assert run.read_status() == {}
    run.status_file.write_text('["running"]')  # JSON, but not an object
    assert run.read_status() == {}


def test_metrics_append_read_and_clear(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_metrics() == []
    run.append_metrics({"step": 1, "loss": 2.5, "eval_loss": None})
    run.append_metrics({"step": 2, "loss": 2.0, "eval_loss": 2.2})
    assert run.read_metrics() == [{"step": 1, "loss": 2.5, "eval_loss": None},
                                  {"step": 2, "loss": 2.0, "eval_loss": 2.2}]
    run.clear_metrics()
    assert not run.metrics_file.exists() and run.read_metrics() == []
    run.clear_metrics()  # nothing to clear: no error


def test_read_metrics_skips_a_torn_last_line_and_lines_that_are_not_records(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics_file.write_bytes(b'{"step": 1, "loss": 2.0}\n[1, 2]\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert run.read_metrics() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    run.metrics_file.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "lo\xe2')  # cut inside a UTF-8 character
    assert run.read_metrics() == [{"step": 1, "loss": 2.0}]


def test_results_round_trip_missing_and_damaged(tmp_path, caplog):
    run = RunFolder(tmp_path)
    assert run.read_results() is None
    results = {"status": "finished", "train_loss": 1.25, "data": {"rows": {"train": 8}}}
    run.write_results(results)
    assert run.read_results() == results
    assert run.results_file.read_text().startswith('{\n  "status": "finished"')  # indented for people
    run.results_file.write_text('{"status": "fin')
    with caplog.at_level(logging.WARNING, logger="finetune.run_folder"):
        assert run.read_results() is None
    assert f"{run.results_file} can't be read as a JSON object" in caplog.text


def test_final_dir_is_whichever_weights_folder_exists(tmp_path):
    run = RunFolder(tmp_path)
    assert run.final_dir is None
    run.model_dir.mkdir()
    assert run.final_dir == tmp_path / "model"
    run.adapter_dir.mkdir()
    assert run.final_dir == tmp_path / "adapter"


def test_answers_are_read_back_as_written(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_answers() == []
    rows = [{"prompt": "2+2?", "reference": "4", "base_answer": "5", "finetuned_answer": "4"},
            {"prompt": "héllo", "reference": "ok", "base_answer": "", "finetuned_answer": "ok"}]
    run.eval_dir.mkdir()
    run.answers_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert run.read_answers() == rows


def test_latest_complete_checkpoint_ignores_partial_and_foreign_folders(tmp_path):
    run = RunFolder(tmp_path)
    assert run.latest_complete_checkpoint() is None  # no checkpoints/ at all
    for name, state in (("checkpoint-5", '{"global_step": 5}'), ("checkpoint-40", '{"global_step": 40}'),
                        ("checkpoint-100", None), ("checkpoint-x", "{}")):
        (run.checkpoints_dir / name).mkdir(parents=True)
        if state is not None:
            (run.checkpoints_dir / name / "trainer_state.json").write_text(state)
    assert run.latest_complete_checkpoint() == run.checkpoints_dir / "checkpoint-40"  # 40 > 5 as numbers


def test_size_and_json_helpers(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights").write_bytes(b"x" * 1000)
    write_json_atomic(tmp_path / "owner.json", {"owner": "alice"})
    assert read_json_object(run.owner_file) == {"owner": "alice"}
    assert run.size_bytes() == folder_bytes(tmp_path) == 1000 + len('{"owner": "alice"}')
    assert read_json_object(tmp_path / "missing.json") is None
