"""The run folder (`output_dir`): its layout and the readers and writers of its files, in one place.

    run.yaml        the resolved RunConfig the run trains from (no secrets)
    status.json     queued | running | stopping | finished | stopped | failed (+ pid, time, error, total_steps)
    metrics.jsonl   one record per log/eval step (`train.METRIC_FIELDS`), appended while training
    results.json    final losses and perplexities, runtime, parameters, memory, data stats, library versions
    estimate.json   the duration estimated before the run (`finetune.estimate`); results.json sets it beside the actual
    data/           train.jsonl, validation.jsonl, test.jsonl: the split actually used (a preference stage: the
                    good answers, and its preference rows in preference_train.jsonl, ...)
    checkpoints/    checkpoint-N folders (`resume_from_checkpoint`)
    adapter/        LoRA/QLoRA adapter + tokenizer with its chat template   (model/ for full fine-tuning)
    merged/         the adapter merged into its base (`python -m finetune merge`)
    eval/           answers.jsonl, answers.csv, summary.json: base vs fine-tuned on a held-out split
    gguf/           the GGUF export: <name>-<quant>.gguf, Modelfile, export_report.json (`python -m finetune export`)
    preferences.jsonl  judgements made in the app's Compare tab, one row each (finetune/preference_loop.py)

A run started by the app's run manager (`finetune.runs`) also holds owner.json, launch.json, input/ (the
dataset file), log.txt and, while a stop is pending, stop_requested.

JSON files are written atomically (a temporary file, then a rename), so a reader polling the folder never
sees half a file; metrics.jsonl is appended to while a reader may follow it, so a torn last line is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import DataError

log = logging.getLogger(__name__)

CONFIG_FILE = "run.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
ANSWERS_FILE = "answers.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
ESTIMATE_FILE = "estimate.json"


class RunFolder:
    """One run's folder: where each file lives, and how it is read and written. Creates nothing by itself."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    # ------------------------------------------------------------------ where things are
    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def status_file(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def results_file(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def estimate_file(self) -> Path:
        return self.root / ESTIMATE_FILE

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def split_file(self, split: str) -> Path:
        """data/<split>.jsonl: the normalised examples of `split` (train, validation or test)."""
        return self.data_dir / f"{split}.jsonl"

    def preference_split_file(self, split: str) -> Path:
        """data/preference_<split>.jsonl: a preference stage's rows of `split` (finetune/preference.py)."""
        return self.data_dir / f"preference_{split}.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def gguf_dir(self) -> Path:
        """gguf/: where `finetune.export.export_gguf` writes the GGUF, its Modelfile and export_report.json."""
        return self.root / "gguf"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def answers_file(self) -> Path:
        return self.eval_dir / ANSWERS_FILE

    @property
    def answers_csv(self) -> Path:
        return self.eval_dir / "answers.csv"

    @property
    def eval_summary_file(self) -> Path:
        return self.eval_dir / "summary.json"

    @property
    def preferences_file(self) -> Path:
        return self.root / PREFERENCES_FILE

    # the run manager's files
    @property
    def owner_file(self) -> Path:
        return self.root / "owner.json"

    @property
    def launch_file(self) -> Path:
        return self.root / "launch.json"

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def log_file(self) -> Path:
        return self.root / "log.txt"

    @property
    def stop_request_file(self) -> Path:
        return self.root / "stop_requested"

    # ------------------------------------------------------------------ the trained weights
    def final_dir_for(self, method: str) -> Path:
        """Where training saves its weights: model/ for a full fine-tune, else adapter/."""
        return self.model_dir if method == "full" else self.adapter_dir

    @property
    def final_dir(self) -> Path | None:
        """adapter/ or model/, whichever the run has saved; None before it saved any."""
        return next((d for d in (self.adapter_dir, self.model_dir) if d.is_dir()), None)

    # ------------------------------------------------------------------ run.yaml
    @property
    def has_config(self) -> bool:
        """True for a run folder: training (or the run manager) writes the config first."""
        return self.config_file.is_file()

    def read_config(self) -> RunConfig:
        """The resolved config; ConfigError when it is missing or invalid."""
        return RunConfig.from_yaml(self.config_file)

    def write_config(self, config: RunConfig) -> None:
        config.to_yaml(self.config_file)

    # ------------------------------------------------------------------ status.json
    def read_status(self) -> dict[str, Any]:
        """The last status written ({} when there is none or it can't be read)."""
        return read_json_object(self.status_file) or {}

    def write_status(self, status: dict[str, Any]) -> None:
        write_json_atomic(self.status_file, status)

    # ------------------------------------------------------------------ metrics.jsonl
    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records so far ([] before the first); a torn last line (training still writing) is skipped."""
        if not self.metrics_file.is_file():
            return []
        records = []
        for line in self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def clear_metrics(self) -> None:
        """A fresh run starts a fresh curve."""
        self.metrics_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------ results.json
    def read_results(self) -> dict[str, Any] | None:
        """The final results; None before the run wrote them (or, with a warning, when the file is damaged)."""
        results = read_json_object(self.results_file)
        if results is None and self.results_file.is_file():
            log.warning("%s can't be read as a JSON object; the run's results are ignored", self.results_file)
        return results

    def write_results(self, results: dict[str, Any]) -> None:
        write_json_atomic(self.results_file, results, indent=2)

    # ------------------------------------------------------------------ estimate.json
    def read_estimate(self) -> dict[str, Any] | None:
        """The estimate written before the run ({"duration_s": ..., ...}); None when there is none."""
        return read_json_object(self.estimate_file)

    def write_estimate(self, estimate: dict[str, Any]) -> None:
        write_json_atomic(self.estimate_file, estimate, indent=2)

    # ------------------------------------------------------------------ eval/
    def read_answers(self) -> list[dict[str, Any]]:
        """eval/answers.jsonl: one row per answered prompt (`evaluate.ANSWER_COLUMNS`); [] before an evaluation."""
        if not self.answers_file.is_file():
            return []
        return [json.loads(line) for line in self.answers_file.read_text(encoding="utf-8").splitlines()
                if line.strip()]

    # ------------------------------------------------------------------ preferences.jsonl
    def append_preference(self, row: dict[str, Any]) -> None:
        """Add one judgement; a single write of one line, so a reader never sees half a row."""
        with self.preferences_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def read_preferences(self) -> list[dict[str, Any]]:
        """The judgements so far ([] before the first); a line that is not a JSON object is a DataError naming it."""
        if not self.preferences_file.is_file():
            return []
        rows = []
        for number, line in enumerate(self.preferences_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise DataError(f"{self.preferences_file}: line {number} is not a JSON object; fix or delete that "
                                "line", source=str(self.preferences_file), row=number)
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ checkpoints/, size
    def latest_complete_checkpoint(self) -> Path | None:
        """The newest `checkpoints/checkpoint-N` that was written completely (the Trainer writes
        trainer_state.json last), or None. A process killed while saving leaves a partial folder, which
        resuming must skip."""
        found = []
        folder = self.checkpoints_dir
        for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
            step = path.name.rpartition("-")[2]
            if step.isdigit() and read_json_object(path / "trainer_state.json") is not None:
                found.append((int(step), path))
        return max(found)[1] if found else None

    def size_bytes(self) -> int:
        return folder_bytes(self.root)


# ----------------------------------------------------------------------------- file helpers
def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON file holding an object; None when it is missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: dict[str, Any], *, indent: int | None = None) -> None:
    """Write to a uniquely named temporary file, then rename: a reader never sees half a file, and two
    writers (the trainer and the run manager) never share a temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data, indent=indent), encoding="utf-8")
    os.replace(tmp, path)


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder`, in bytes."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


__all__ = ["ANSWERS_FILE", "CONFIG_FILE", "METRICS_FILE", "PREFERENCES_FILE", "RESULTS_FILE", "STATUS_FILE",
           "RunFolder", "folder_bytes", "read_json_object", "write_json_atomic"]
