"""RunManager: run folders, owners, the FIFO queue, stop, crashes and app restarts, with real training
subprocesses (`python -m finetune train run.yaml`) on the demo model."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from finetune.config import RunConfig
from finetune.runs import (
    RunManager,
    RunNotFound,
    copy_into,
    estimate_total_steps,
    safe_filename,
    tail,
    workspace_from_env,
)

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "examples" / "data" / "python_qa.jsonl"
RUN_TIMEOUT_S = 150


def tiny(**changes) -> RunConfig:
    """A demo-model run of a few optimizer steps (~10 s, most of it importing torch)."""
    base = dict(base_model="demo", dataset=str(DATASET), max_steps=2, batch_size=2, gradient_accumulation_steps=1,
                max_seq_length=128, logging_steps=1, learning_rate=2e-3)
    return RunConfig(**{**base, **changes})


def wait_for(predicate, timeout_s: float = RUN_TIMEOUT_S, what: str = "condition"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_done(manager: RunManager, run_id: str, owner: str):
    return wait_for(lambda: (s := manager.status(run_id, owner)).done and s, what=f"run {run_id} to end")


# ----------------------------------------------------------------------------- names and paths (pure)

@pytest.mark.parametrize("name, expected", [
    ("data.jsonl", "data.jsonl"),
    ("../../x", "x"),
    ("/etc/passwd", "passwd"),
    ("..\\..\\evil.jsonl", "evil.jsonl"),
    ("..", "upload"),
    ("", "upload"),
    (".bashrc", "bashrc"),
    ("my data (1).csv", "my_data__1_.csv"),
    ("données.json", "donn_es.json"),
])
def test_safe_filename_keeps_names_inside_a_folder(name, expected):
    assert safe_filename(name) == expected


def test_safe_filename_caps_length_and_keeps_the_extension():
    name = safe_filename("a" * 300 + ".jsonl")
    assert len(name) == 100 and name.endswith(".jsonl")


def test_copy_into_never_writes_outside_the_folder(tmp_path):
    source = tmp_path / "src.jsonl"
    source.write_text("{}\n")
    target = copy_into(tmp_path / "run" / "input", source, "../../../escape.jsonl")
    assert target == (tmp_path / "run" / "input" / "escape.jsonl").resolve()
    assert not (tmp_path / "escape.jsonl").exists()


def test_estimate_total_steps_counts_optimizer_steps():
    assert estimate_total_steps(tiny(max_steps=7), 1000) == 7
    # 32 examples, 4 per step (2 x 2 accumulation) → 8 steps per epoch, 3 epochs
    assert estimate_total_steps(tiny(max_steps=-1, num_train_epochs=3, batch_size=2,
                                     gradient_accumulation_steps=2), 32) == 24


def test_tail_keeps_the_last_redraw_of_progress_bars(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("one\ntwo\nbar 10%\rbar 50%\rbar 90%\nthree\n")
    assert tail(log, 3) == "two\nbar 90%\nthree"


def test_workspace_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_WORKSPACE", str(tmp_path / "ws"))
    assert workspace_from_env() == (tmp_path / "ws").resolve()
    monkeypatch.delenv("FINETUNE_WORKSPACE")
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert workspace_from_env() == Path("./workspace").resolve()


# ----------------------------------------------------------------------------- folders and owners

def test_submit_creates_an_unguessable_self_contained_run_folder(tmp_path):
    manager = RunManager(tmp_path / "ws", start_worker=False)
    try:
        upload = tmp_path / "upload.jsonl"
        upload.write_bytes(DATASET.read_bytes())
        run_id = manager.submit(tiny(), "alice", dataset_file=upload, dataset_name="../../../my data.jsonl")
        assert re.fullmatch(r"[A-Za-z0-9_-]{24}", run_id)
        run_dir = tmp_path / "ws" / "runs" / run_id
        assert json.loads((run_dir / "owner.json").read_text())["owner"] == "alice"
        config = RunConfig.from_yaml(run_dir / "run.yaml")
        assert config.output_dir == str(run_dir.resolve())
        assert config.dataset == str((run_dir / "input" / "my_data.jsonl").resolve())
        assert Path(config.dataset).read_bytes() == DATASET.read_bytes()
        assert "token" not in (run_dir / "run.yaml").read_text().lower()

        assert [s.run_id for s in manager.list_runs("alice")] == [run_id]
        assert manager.list_runs("bob") == []
        with pytest.raises(RunNotFound, match=f"no run `{run_id}` in this session"):
            manager.status(run_id, "bob")
        with pytest.raises(RunNotFound, match="no run `../x`"):
            manager.run_dir("../x", "alice")
        assert manager.stop(run_id, "alice") in ("stopping", "stopped")
        wait_done(manager, run_id, "alice")
    finally:
        manager.close()


def test_a_shared_manager_shows_every_run_to_everyone(tmp_path):
    """`shared` (a local app's one user, a team Space): every caller lists and opens every run; else only the
    owner does. A caller still needs an owner."""
    from run_folders import write_finished_run

    private = RunManager(tmp_path / "ws", start_worker=False)
    shared = RunManager(tmp_path / "ws", start_worker=False, shared=True)
    try:
        run_id = write_finished_run(private.runs_dir, "alice")
        assert private.list_runs("bob") == []
        with pytest.raises(RunNotFound, match=f"no run `{run_id}` in this session"):
            private.run_dir(run_id, "bob")
        assert [s.run_id for s in shared.list_runs("bob")] == [run_id]
        assert shared.status(run_id, "bob").state == "finished"
        with pytest.raises(RunNotFound):
            shared.run_dir(run_id, "")
    finally:
        private.close()
        shared.close()


# ----------------------------------------------------------------------------- real trainings

def test_queue_runs_one_at_a_time_and_survives_an_app_restart(tmp_path):
    """Two runs: the second waits (position 1); a new manager (the app restarted) adopts the running one,
    keeps the queue, and both finish, listed with their metrics."""
    workspace = tmp_path / "ws"
    first_app = RunManager(workspace, start_worker=False)
    first = first_app.submit(tiny(), "alice")
    second = first_app.submit(tiny(seed=1), "alice")
    assert first_app.status(first, "alice").state == "running"
    status = first_app.status(second, "alice")
    assert status.state == "queued" and status.queue_position == 1
    first_app.close()  # the app goes away; the training subprocess keeps going

    app = RunManager(workspace)
    try:
        assert app.active_run() == first
        assert app.queue_position(second) == 1
        done_first = wait_done(app, first, "alice")
        assert done_first.state == "finished", done_first.error
        done_second = wait_done(app, second, "alice")
        assert done_second.state == "finished", done_second.error
        assert done_second.results["global_step"] == 2
        assert (done_second.run_dir / "adapter" / "adapter_config.json").is_file()
        assert [m["step"] for m in done_second.metrics if m.get("loss") is not None] == [1, 2]
    finally:
        app.close()

    restarted = RunManager(workspace, start_worker=False)
    summaries = {s.run_id: s for s in restarted.list_runs("alice")}
    assert set(summaries) == {first, second}
    assert all(s.state == "finished" and s.train_loss is not None and s.has_weights for s in summaries.values())
    restarted.close()


def test_stop_is_graceful_and_keeps_a_usable_adapter(tmp_path):
    manager = RunManager(tmp_path / "ws", stop_timeout_s=60)
    try:
        run_id = manager.submit(tiny(max_steps=2000), "alice")
        wait_for(lambda: manager.status(run_id, "alice").metrics, what="the first metrics")
        assert manager.stop(run_id, "alice") == "stopping"
        status = wait_done(manager, run_id, "alice")
        assert status.state == "stopped", status.error
        assert (status.run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert status.results["status"] == "stopped" and status.results["global_step"] < 2000
    finally:
        manager.close()


def test_a_killed_training_is_reported_failed_with_the_last_log_lines(tmp_path):
    manager = RunManager(tmp_path / "ws")
    try:
        run_id = manager.submit(tiny(max_steps=2000), "alice")
        wait_for(lambda: manager.status(run_id, "alice").metrics, what="the first metrics")
        pid = json.loads((manager.run_dir(run_id, "alice") / "status.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        status = wait_done(manager, run_id, "alice")
        assert status.state == "failed"
        assert "killed by signal 9" in status.error and "Last log lines:" in status.error
        assert "step 1 |" in status.error or "step" in status.log_tail
        assert manager.active_run() is None  # the queue is not stuck on the dead run: the next one can start
    finally:
        manager.close()


def test_cleanup_removes_old_finished_runs_but_never_active_ones(tmp_path):
    manager = RunManager(tmp_path / "ws", start_worker=False)
    try:
        ids = []
        for age_days, state in ((10, "finished"), (9, "failed"), (10, "queued"), (0, "finished")):
            run_dir = manager.runs_dir / f"{state}{age_days}".ljust(20, "x")
            run_dir.mkdir()
            (run_dir / "owner.json").write_text(json.dumps({"owner": "a", "created": time.time() - age_days * 86400}))
            (run_dir / "status.json").write_text(json.dumps({"state": state}))
            (run_dir / "big.bin").write_bytes(b"0" * 1000)
            ids.append(run_dir.name)
        manager._queue.append(ids[2])  # the queued one is waiting in this manager
        assert sorted(manager.cleanup(max_age_days=7)) == sorted(ids[:2])
        assert manager.cleanup(max_total_bytes=10_000) == []
        assert manager.cleanup(max_total_bytes=1500) == [ids[3]]
        assert [p.name for p in manager.runs_dir.iterdir()] == [ids[2]]
    finally:
        manager.close()
