"""Run folders written straight to a workspace (no training), as a finished run leaves them: for the app tests
that list, open and compare runs. The layout is finetune.run_folder's; only the values are made up."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from finetune.config import RunConfig
from finetune.run_folder import RunFolder, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "examples" / "data" / "python_qa.jsonl"


def loss_metrics(start: float, steps: int = 4) -> list[dict]:
    """A falling train loss every step from `start`, and a validation loss every second step."""
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, "epoch": step / steps, "loss": round(start - 0.25 * step, 3),
                        "learning_rate": 1e-3, "elapsed_s": float(step)})
        if step % 2 == 0:
            records.append({"step": step, "epoch": step / steps, "eval_loss": round(start - 0.2 * step, 3)})
    return records


def write_finished_run(runs_dir: Path, owner: str, *, metrics: list[dict] | None = None, created: float | None = None,
                       run_id: str | None = None, **config_changes) -> str:
    """A finished run of `owner` in `runs_dir` with its config (demo model, the bundled dataset copied in),
    metrics and results; returns its id. A folder `run_id` that already holds a config (weights built by
    conftest's `make_adapter_run`) keeps it."""
    run_id = run_id or secrets.token_urlsafe(18)
    run = RunFolder(Path(runs_dir) / run_id)
    if not run.has_config:
        run.input_dir.mkdir(parents=True)
        dataset = run.input_dir / DATASET.name
        dataset.write_bytes(DATASET.read_bytes())
        run.write_config(RunConfig(**{"base_model": "demo", "dataset": str(dataset.resolve()),
                                      "output_dir": str(run.root.resolve()), **config_changes}))
    write_json_atomic(run.owner_file, {"owner": owner, "created": created or time.time()})
    run.write_status({"state": "finished", "time": time.time()})
    metrics = loss_metrics(3.0) if metrics is None else metrics
    run.metrics_file.write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
    train = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    run.write_results({"status": "finished", "global_step": max((m["step"] for m in metrics), default=0),
                       "train_loss": sum(train) / len(train) if train else None,
                       "eval_loss": evals[-1] if evals else None, "train_runtime": 12.0})
    return run_id
