"""Runs survive faults: a training killed with SIGKILL is reported failed with its last log lines and resumes from
its last checkpoint at the right step; running out of memory or disk ends in a clear error (real faults, no
mocks: an address-space limit, the kernel's /dev/full); an app restart lists failed runs with their metrics; old
runs are cleaned by age or quota, never while they run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.config import RunConfig
from finetune.errors import FinetuneError
from finetune.run_folder import RunFolder
from finetune.runs import Retention, RunManager, RunNotFound
from ui.context import create_context

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "examples" / "data" / "python_qa.jsonl"
TIMEOUT_S = 150


def tiny(**changes) -> RunConfig:
    base = dict(base_model="demo", dataset=str(DATASET), max_steps=2, batch_size=2, gradient_accumulation_steps=1,
                max_seq_length=128, logging_steps=1, learning_rate=2e-3)
    return RunConfig(**{**base, **changes})


def wait_for(predicate, what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_done(manager: RunManager, run_id: str, owner: str = "alice"):
    return wait_for(lambda: (s := manager.status(run_id, owner)).done and s, f"run {run_id} to end")


# ----------------------------------------------------------------------------- SIGKILL, restart, resume

def test_a_killed_run_keeps_its_checkpoint_is_listed_after_a_restart_and_resumes_at_the_next_step(tmp_path):
    workspace = tmp_path / "ws"
    app = RunManager(workspace)
    run_id = app.submit(tiny(max_steps=2000, save_steps=3, save_total_limit=2), "alice")
    run_dir = app.run_dir(run_id, "alice")
    try:
        # a complete checkpoint, and training already past it (work the kill will lose)
        wait_for(lambda: (c := RunFolder(run_dir).latest_complete_checkpoint()) and app.status(run_id, "alice").step >
                 int(c.name.split("-")[1]), "a checkpoint and a step after it")
        os.kill(json.loads((run_dir / "status.json").read_text())["pid"], signal.SIGKILL)
        killed = wait_done(app, run_id)
    finally:
        app.close()
    assert killed.state == "failed"
    assert "killed by signal 9" in killed.error and "Last log lines:" in killed.error
    checkpoint = RunFolder(run_dir).latest_complete_checkpoint()
    step = int(checkpoint.name.split("-")[1])
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert killed.step >= step  # on a fast machine the kill can land just as a newer checkpoint completes

    restarted = RunManager(workspace)  # the app restarts: the failed run is listed with its metrics
    try:
        [summary] = restarted.list_runs("alice")
        assert (summary.run_id, summary.state) == (run_id, "failed")
        before = restarted.status(run_id, "alice")
        assert before.metrics and before.error == killed.error
        with pytest.raises(RunNotFound):
            restarted.resume(run_id, "bob")

        assert restarted.resume(run_id, "alice") in ("queued", "running")
        assert RunConfig.from_yaml(run_dir / "run.yaml").resume_from_checkpoint == str(checkpoint)
        with pytest.raises(FinetuneError, match="only a failed or stopped run can be resumed"):
            restarted.resume(run_id, "alice")
        n = len(before.metrics)
        resumed = wait_for(lambda: (m := restarted.status(run_id, "alice").metrics[n:]) and m, "metrics after resume")
        assert resumed[0]["step"] == step + 1  # continues right after the checkpoint, not from step 1
        restarted.stop(run_id, "alice")
        stopped = wait_done(restarted, run_id)
    finally:
        restarted.close()
    assert stopped.state == "stopped", stopped.error
    assert stopped.results["global_step"] > step
    assert f"=== resuming from {checkpoint.name} ===" in (run_dir / "log.txt").read_text()
    # weights are saved as safetensors, never as pickles
    saved = {p.name for p in (run_dir / "adapter").iterdir()}
    assert "adapter_model.safetensors" in saved
    assert not [n for n in saved if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], saved


def test_resume_skips_a_checkpoint_left_half_written_by_a_kill(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step, complete in ((3, True), (6, True), (9, False), (12, False)):
        folder = checkpoints / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"0")
        if complete:  # the Trainer writes trainer_state.json last
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (checkpoints / "checkpoint-12" / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    assert RunFolder(tmp_path).latest_complete_checkpoint() == checkpoints / "checkpoint-6"
    assert RunFolder(tmp_path / "nothing").latest_complete_checkpoint() is None


# ----------------------------------------------------------------------------- out of memory, disk full

# Runs `python -m finetune ARGS` with its address space capped at what the imports took + HEADROOM_MB: a real
# allocation failure later on, with no mock of torch.
LIMITED = """
import os, resource, sys
import datasets, peft, torch, transformers, trl  # the heavy imports, before the cap
from finetune.cli import main

with open("/proc/self/status") as f:
    vm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm_kib * 1024 + int(os.environ["HEADROOM_MB"]) * 2**20,
                                        resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
"""


def _cli(args: list[str], *, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "finetune", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_out_of_memory_ends_with_a_clear_message_and_suggestions(tmp_path):
    """A batch of 200 x 2048 tokens needs several GB (its logits alone: 409,600 tokens x 1536 vocab x 4 bytes
    = 2.5 GB) but the process may only grow by 1 GB: a real CPU allocation failure."""
    words = "the quick brown fox jumps over a lazy dog while lists and dicts hold values".split()
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "completion": " ".join(
        words[(i * 7 + j) % len(words)] for j in range(1500))}) + "\n" for i in range(200)))
    out = tmp_path / "run"
    result = _cli(["train", "--base_model", "demo", "--dataset", str(data), "--output_dir", str(out),
                   "--batch_size", "200", "--gradient_accumulation_steps", "1", "--max_seq_length", "2048",
                   "--max_steps", "1", "--eval_fraction", "0", "--test_fraction", "0"],
                  env={"HEADROOM_MB": "1000"}, code=LIMITED)
    expected = ("training ran out of memory (CPU RAM). Try: a smaller `batch_size` (200 → 100; double "
                "`gradient_accumulation_steps` to keep the effective batch); a shorter `max_seq_length` (2048 → "
                "1024); `method: qlora` (a 4-bit base needs about a quarter of the weight memory); "
                "`gradient_checkpointing: true` (recomputes activations: less memory, ~30% slower)")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {expected}\n" in result.stderr and "Traceback" not in result.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == expected


def test_a_full_disk_ends_with_a_clear_error_naming_the_run_folder(tmp_path):
    """The run writes its data split into a file that is the kernel's /dev/full: every write fails with ENOSPC,
    exactly as on a full disk (no root, mount or mock needed)."""
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").symlink_to("/dev/full")
    result = _cli(["train", "--base_model", "demo", "--dataset", str(DATASET), "--output_dir", str(out),
                   "--max_steps", "1"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: the disk is full: writing to {out} failed (No space left on device; " in result.stderr
    assert "Free space there (delete old runs or checkpoints), lower `save_total_limit`" in result.stderr
    assert "Traceback" not in result.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith(f"the disk is full: writing to {out}")


# ----------------------------------------------------------------------------- disk hygiene

def _fake_run(manager: RunManager, name: str, state: str, age_days: float, size: int = 1000) -> Path:
    run_dir = manager.runs_dir / name.ljust(22, "x")
    run_dir.mkdir()
    (run_dir / "owner.json").write_text(json.dumps({"owner": "a", "created": time.time() - age_days * 86400}))
    (run_dir / "status.json").write_text(json.dumps({"state": state}))
    (run_dir / "weights.bin").write_bytes(b"0" * size)
    return run_dir


def test_retention_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FINETUNE_MAX_RUN_AGE_DAYS", "7")
    monkeypatch.setenv("FINETUNE_MAX_WORKSPACE_GB", "0.5")
    assert Retention.from_env() == Retention(max_age_days=7.0, max_total_bytes=500_000_000)
    monkeypatch.setenv("FINETUNE_MAX_WORKSPACE_GB", "lots")
    with pytest.raises(FinetuneError, match=r"\$FINETUNE_MAX_WORKSPACE_GB must be a positive number \(got 'lots'\)"):
        Retention.from_env()
    monkeypatch.delenv("FINETUNE_MAX_RUN_AGE_DAYS")
    monkeypatch.delenv("FINETUNE_MAX_WORKSPACE_GB")
    assert not Retention.from_env().active


def test_the_app_cleans_old_runs_at_start_but_never_a_running_one(tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    seed = RunManager(workspace, start_worker=False)
    old = _fake_run(seed, "oldfinished", "finished", age_days=30)
    failed = _fake_run(seed, "oldfailed", "failed", age_days=20)
    recent = _fake_run(seed, "recent", "finished", age_days=1)
    running = _fake_run(seed, "oldrunning", "running", age_days=40)
    seed.close()
    # a live training process of the running run (the manager knows it by its pid and the folder in its command)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(running)])
    try:
        (running / "status.json").write_text(json.dumps({"state": "running", "pid": sleeper.pid}))
        monkeypatch.setenv("FINETUNE_MAX_RUN_AGE_DAYS", "7")
        monkeypatch.setenv("FINETUNE_WORKSPACE", str(workspace))
        ctx = create_context(start_worker=False)  # what `python app.py` builds
        ctx.runs.close()
        assert not old.exists() and not failed.exists()
        assert recent.exists() and running.exists()
        # over quota: the oldest finished run goes first; the running one stays even though it is the oldest
        assert ctx.runs.cleanup(max_total_bytes=1500) == [recent.name]
        assert running.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_runs_are_cleaned_again_when_a_run_ends(tmp_path):
    manager = RunManager(tmp_path / "ws", retention=Retention(max_age_days=7), poll_interval_s=0.2)
    try:
        # a run that fails fast (its dataset doesn't exist) is a real training process ending
        run_id = manager.submit(tiny(dataset=str(tmp_path / "missing.jsonl")), "alice")
        old = _fake_run(manager, "oldfinished", "finished", age_days=30)
        ended = wait_done(manager, run_id)
        assert ended.state == "failed" and "file not found" in ended.error
        wait_for(lambda: not old.exists(), "the old run to be cleaned after the run ended", timeout_s=10)
        assert manager.run_dir(run_id, "alice").exists()  # the run that just ended is kept
    finally:
        manager.close()
